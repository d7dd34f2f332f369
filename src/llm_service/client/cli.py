"""``llm_cli``: talk to a running llm_service from a terminal.

Commands:
    generate   stream a completion of a prompt (an argument, or stdin)
    chat       an interactive multi-turn chat
    info       the model the service serves
    status     the service's state, pool and load
    health     the standard gRPC health check
    tokenize   the model's token ids for a text
    bench      N concurrent streams x M requests: throughput and latency figures

Connection flags (``--target``, ``--tls-ca``, ...) are generated from ``ClientSettings``, so each
is also an ``LLM_*`` environment variable. With none given, the client connects to
127.0.0.1:50051 with the development certificates ``./scripts/run`` wrote.

Exit codes: 0 ok, 1 the service failed the request, 2 usage or configuration error, 3 cannot
connect (nothing listening, TLS handshake refused, certificate not allowed), 4 invalid request,
5 service overloaded, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llm_service.client.aio import AsyncClient
from llm_service.client.bench import bench_prompt, format_table, run_load
from llm_service.client.chat import ChatSession, default_history_file, describe_call
from llm_service.client.sync import Client
from llm_service.client.types import Chunk, Message, Tool, Tools
from llm_service.errors import (
    ConfigurationError,
    ConnectionFailedError,
    InvalidRequestError,
    LLMServiceError,
    OverloadedError,
    PermissionDeniedError,
)
from llm_service.flags import (
    add_sampling_flags,
    add_settings_flags,
    report_invalid_settings,
    sampling_options,
    settings_from,
)
from llm_service.settings import ClientSettings

__all__ = ["EXIT_CODES", "main"]

PROG = "llm_cli"
EXIT_ERROR, EXIT_USAGE, EXIT_CONNECTION, EXIT_INVALID, EXIT_OVERLOADED = 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
# Tokens a reply gets unless --max-tokens says otherwise (the service's own default is as many
# as the context holds, minutes of text for a small model that does not stop by itself).
DEFAULT_MAX_TOKENS = 512
# Errors with their own exit code (the first matching class wins); any other error: EXIT_ERROR.
EXIT_CODES: tuple[tuple[type[LLMServiceError], int], ...] = (
    (ConfigurationError, EXIT_USAGE),
    (ConnectionFailedError, EXIT_CONNECTION),
    (PermissionDeniedError, EXIT_CONNECTION),
    (InvalidRequestError, EXIT_INVALID),
    (OverloadedError, EXIT_OVERLOADED),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to a running llm_service (gRPC, mutual TLS).",
        epilog="Exit codes: 0 ok, 1 request failed, 2 usage, 3 cannot connect (TLS, refused,"
        " not allowed), 4 invalid request, 5 overloaded, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=description)
        add_settings_flags(
            sub,
            list(ClientSettings.model_fields),
            ClientSettings,
            "connection (each also an LLM_* environment variable)",
        )
        return sub

    gen = command(
        "generate",
        "stream a completion",
        "Stream the completion of PROMPT to stdout as it is produced.",
    )
    gen.add_argument("prompt", nargs="?", default="-", help="the prompt ('-' or none: stdin)")
    gen.add_argument(
        "--system", help="system message; the prompt is then sent as a chat user message"
    )
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    gen.add_argument("--json", action="store_true", help="print one JSON object per event")
    gen.add_argument(
        "--stats", action="store_true",
        help="print tokens, time to first token and tokens/s on stderr at the end",
    )  # fmt: skip
    gen.add_argument("--request-id", help="id for the service's logs (default: a fresh one)")
    add_tool_flags(gen)
    add_sampling_flags(gen, max_tokens=DEFAULT_MAX_TOKENS)

    chat = command(
        "chat",
        "interactive chat",
        "A multi-turn chat; the service applies the model's chat template. Ctrl-C stops the"
        " current reply, /reset forgets the conversation, /system TEXT sets the system"
        " message, /exit or Ctrl-D leaves.",
    )
    chat.add_argument("--system", help="system message")
    add_tool_flags(chat)
    add_sampling_flags(chat, max_tokens=DEFAULT_MAX_TOKENS)

    info = command("info", "the model served", "Print the model and how it is served.")
    info.add_argument("--json", action="store_true", help="print JSON")
    status = command("status", "state, pool and load", "Print the service's state right now.")
    status.add_argument("--json", action="store_true", help="print JSON")
    health = command(
        "health",
        "gRPC health check",
        "Print SERVING or NOT_SERVING; exit 0 only when serving.",
    )
    health.add_argument(
        "--service", default="", help="service to check (default: the server as a whole)"
    )
    tok = command("tokenize", "token ids of a text", "Print the model's token ids for TEXT.")
    tok.add_argument("text", help="the text ('-': stdin)")
    tok.add_argument("--no-special", action="store_true", help="do not add BOS")
    tok.add_argument(
        "--parse-special", action="store_true", help="turn special-token text into its token"
    )

    bench = command(
        "bench",
        "load test: throughput and latency",
        "Send REQUESTS requests, CONCURRENCY at a time (greedy, a different prompt each), and"
        " print aggregate tokens/s, requests/s, time to first token p50/p95/p99, inter-token"
        " latency p50/p99 and errors by status.",
    )
    bench.add_argument(
        "-c", "--concurrency", default="4", metavar="N[,N...]",
        help="concurrent streams; a comma-separated list runs each in turn (default: 4)",
    )  # fmt: skip
    bench.add_argument(
        "-n", "--requests", type=int, default=None, metavar="M",
        help="requests per concurrency level (default: 4 x concurrency)",
    )  # fmt: skip
    bench.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    bench.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args, ClientSettings)
    except ValidationError as exc:
        return report_invalid_settings(PROG, exc)
    try:
        if args.command == "bench":
            return asyncio.run(bench(args, settings))
        with Client.from_settings(settings) as client:
            return run(args, client)
    except LLMServiceError as exc:
        where = f" ({exc.status}, request {exc.request_id})" if exc.status else ""
        if isinstance(exc, ConnectionFailedError):
            where = f" (target {settings.target})"
        print(f"{PROG}: error: {exc}{where}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `llm_cli generate ... | head`: the reader is gone, nothing to say
        sys.stderr.close()
        return EXIT_ERROR


def add_tool_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tools")
    group.add_argument(
        "--tools", type=Path, metavar="FILE",
        help="JSON file: a list of functions the model may call, in OpenAI's shape"
        ' ([{"type": "function", "function": {"name", "description", "parameters"}}]) or'
        ' bare ([{"name", "description", "parameters"}]); the calls are shown, not run',
    )  # fmt: skip
    group.add_argument(
        "--tool-choice", default="auto", metavar="CHOICE",
        help="auto (default: the model decides), none, required, or a tool's name (that tool"
        " must be called)",
    )  # fmt: skip


def tool_options(args: argparse.Namespace) -> Tools | None:
    """The tools ``--tools`` offers (None: none).

    Raises:
        ConfigurationError: the file cannot be read or is not a list of functions (names it).
    """
    if args.tools is None:
        if args.tool_choice != "auto":
            raise ConfigurationError("--tool-choice needs --tools FILE")
        return None
    try:
        listed = json.loads(args.tools.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"--tools: cannot read {args.tools}: {exc}") from None
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ConfigurationError(f"--tools: {args.tools} must hold a JSON list of objects")
    functions = []
    for i, item in enumerate(listed):
        f = item.get("function", item)
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ConfigurationError(f"--tools: {args.tools}: tool {i} has no name")
        try:
            functions.append(Tool(
                f["name"], str(f.get("description") or ""),
                json.dumps(f.get("parameters") or {"type": "object", "properties": {}}),
            ))  # fmt: skip
        except InvalidRequestError as exc:
            raise ConfigurationError(f"--tools: {args.tools}: tool {i}: {exc}") from None
    choice = args.tool_choice
    if choice in ("auto", "none", "required"):
        return Tools(functions, choice)
    if choice not in {t.name for t in functions}:
        raise ConfigurationError(
            f"--tool-choice {choice!r}: not auto, none, required or one of the tools' names"
        )
    return Tools(functions, "required", choice)


def run(args: argparse.Namespace, client: Client) -> int:
    if args.command == "generate":
        return generate(args, client)
    if args.command == "chat":
        sampling = sampling_options(args)
        return ChatSession(
            client,
            sampling,
            system=args.system,
            history_file=default_history_file(),
            tools=tool_options(args),
        ).run()
    if args.command == "info":
        return _print(asdict(client.model_info()), as_json=args.json)
    if args.command == "status":
        return _print(asdict(client.status()), as_json=args.json)
    if args.command == "health":
        state = client.health(args.service)
        print(state)
        return 0 if state == "SERVING" else EXIT_ERROR
    text = read_stdin("text") if args.text == "-" else args.text
    tokens = client.tokenize(
        text, add_special=not args.no_special, parse_special=args.parse_special
    )
    print(json.dumps(tokens))
    return 0


def read_stdin(what: str) -> str:
    if sys.stdin.isatty():
        print(f"{PROG}: reading the {what} from the terminal; end it with Ctrl-D", file=sys.stderr)
    return sys.stdin.read()


def generate(args: argparse.Namespace, client: Client) -> int:
    tools = tool_options(args)
    prompt_text = read_stdin("prompt") if args.prompt == "-" else args.prompt
    prompt: str | list[Message] = prompt_text
    if args.system or args.chat or tools is not None:
        prompt = [("user", prompt_text)]
        if args.system:
            prompt.insert(0, ("system", args.system))
    sent = time.perf_counter()
    first_token_at: float | None = None
    sampling = sampling_options(args)
    with client.stream(prompt, request_id=args.request_id, tools=tools, **sampling) as stream:
        try:
            for chunk in stream:
                if first_token_at is None and chunk.token_ids:
                    first_token_at = time.perf_counter()
                    if args.json and stream.started is not None:
                        print(json.dumps({"event": "started", **asdict(stream.started)}))
                _show(chunk, as_json=args.json)
        except LLMServiceError as exc:
            if args.json:  # the error as the last event too; main() reports it on stderr
                error = {"event": "error", "kind": exc.kind, "status": exc.status,
                         "message": str(exc), "request_id": exc.request_id}  # fmt: skip
                print(json.dumps(error), flush=True)
            raise
        completion = stream.completion
    assert completion is not None
    ended = time.perf_counter()
    text_ended = completion.text.endswith("\n") or (completion.tool_calls and not completion.text)
    if not args.json and not text_ended:
        sys.stdout.write("\n")
    if not args.json:
        for call in completion.tool_calls:
            print(describe_call(call))
    if not args.json and completion.usage.completion_tokens == 0:
        # An empty answer looks like a broken tool; say what happened.
        hint = "" if args.chat or args.system else " (an instruction reads better as --chat)"
        print(f"{PROG}: the model ended at once, with no text{hint}", file=sys.stderr)
    if args.stats:
        n = completion.usage.completion_tokens
        ttft = f"{(first_token_at - sent) * 1000:.0f} ms" if first_token_at else "-"
        rate = (n - 1) / (ended - first_token_at) if first_token_at and n > 1 else 0.0
        print(
            f"[{completion.finish_reason.value}: {n} tokens, prompt"
            f" {completion.usage.prompt_tokens}, first token after {ttft}, {rate:.1f} tokens/s,"
            f" request {completion.request_id}]",
            file=sys.stderr,
        )
    return 0


def _show(chunk: Chunk, *, as_json: bool) -> None:
    if not as_json:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        return
    if chunk.final:
        event: dict[str, Any] = {
            "event": "done",
            "finish_reason": chunk.finish_reason,
            "usage": asdict(chunk.usage) if chunk.usage else None,
            "timings": asdict(chunk.timings) if chunk.timings else None,
        }
    else:
        event = {"event": "delta", "text": chunk.text, "token_ids": list(chunk.token_ids)}
        if chunk.tool_calls:
            event["tool_calls"] = [asdict(c) for c in chunk.tool_calls]
    print(json.dumps(event), flush=True)


def _print(record: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(record, indent=2))
        return 0
    width = max(len(k) for k in record)
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.1f}"
        print(f"{key.ljust(width)}  {value}")
    return 0


async def bench(args: argparse.Namespace, settings: ClientSettings) -> int:
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ConfigurationError(
            f"--concurrency: expected N or N,N,... (N >= 1), got {args.concurrency!r}"
        )
    if "max_retries" not in settings.model_fields_set:
        # A refusal is a figure of the benchmark, not something to retry quietly.
        settings = settings.model_copy(update={"max_retries": 0})
    async with AsyncClient.from_settings(settings) as client:
        info = await client.model_info()  # fails early, and clearly, if the target is wrong
        print(f"{PROG} bench: {settings.target}, {info.name}, pool of {info.pool_size},"
              f" {args.max_tokens} tokens per request, greedy", file=sys.stderr)  # fmt: skip

        def open_stream(i: int) -> AsyncIterator[int]:
            return _token_counts(client, bench_prompt(i), args.max_tokens)

        rows = []
        for n in levels:
            result = await run_load(
                open_stream,
                concurrency=n,
                requests=args.requests or 4 * n,
                progress=sys.stderr.isatty(),
                label=f"{n} streams",
            )
            rows.append(result.figures())
    print(format_table(rows))
    if args.json:
        report = {"target": settings.target, "model": asdict(info), "max_tokens": args.max_tokens,
                  "runs": rows}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{PROG} bench: figures written to {args.json}", file=sys.stderr)
    return 0


async def _token_counts(client: AsyncClient, prompt: str, max_tokens: int) -> AsyncIterator[int]:
    async with client.stream(prompt, max_tokens=max_tokens, temperature=0) as stream:
        async for chunk in stream:
            yield len(chunk.token_ids)


if __name__ == "__main__":
    sys.exit(main())
