"""``llm-gateway``: run the OpenAI-compatible gateway in front of llm_service replicas.

Every flag is also an ``LLM_GATEWAY_*`` environment variable (see ``GatewaySettings``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any, cast

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llm_service.errors import ConfigurationError, LLMServiceError
from llm_service.flags import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_settings_flags,
    report_invalid_settings,
    settings_from,
)
from llm_service.gateway.app import build_gateway, create_app
from llm_service.log import configure_logging
from llm_service.settings import GatewaySettings, split_host_port

__all__ = ["main"]

PROG = "llm-gateway"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,"
        " /v1/models) in front of llm_service replicas, which it reaches over gRPC with mutual"
        " TLS. It sends each request to the less loaded of two healthy replicas, retries a"
        " refused one elsewhere before its first token, and cancels the replica's work when a"
        " client goes away. Also /healthz, /readyz, /metrics and /openapi.json.",
        epilog="example: llm-gateway --backend 127.0.0.1:50051 --backend 127.0.0.1:50052"
        " --listen 127.0.0.1:8000",
    )
    add_settings_flags(
        parser,
        list(GatewaySettings.model_fields),
        GatewaySettings,
        "settings (each also an LLM_GATEWAY_* environment variable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args, GatewaySettings)
    except ValidationError as exc:
        return report_invalid_settings(PROG, exc, GatewaySettings)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        host, port = _address(settings.listen)
        gateway = build_gateway(settings)
    except ConfigurationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if gateway.keys is None:
        logger.warning("no --api-keys-file: every request is served without an API key")
    else:
        logger.info("%d API key(s) accepted", len(gateway.keys))
    if settings.insecure_backends:
        logger.warning("--insecure-backends: requests go to the replicas unencrypted")
    config = uvicorn.Config(
        create_app(gateway),
        host=host,
        port=port,
        log_config=None,  # our logging, configured above
        access_log=False,  # the gateway logs each request itself, with its request id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
        server_header=False,
        http=cast(
            "type[asyncio.Protocol]",
            functools.partial(_Protocol, header_timeout=settings.header_timeout),
        ),
    )
    server = _Server(config)
    try:
        asyncio.run(_serve(server, settings.shutdown_grace))
    except LLMServiceError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit:  # uvicorn's way out when it cannot start (its log says why)
        print(f"{PROG}: error: could not start (see the log above)", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the signal handlers were installed
        return EXIT_INTERRUPTED
    logger.info("stopped")
    return 0


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's headers.

    uvicorn waits for ever for a request on a new connection (its keep-alive timeout starts only
    after a response), so connections that send nothing, or headers a byte at a time, would
    pile up until the gateway runs out of file descriptors.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_too_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logger.debug("closing a connection that sent no complete request in %g s",
                         self._header_timeout)  # fmt: skip
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn's server with our own signal handling.

    uvicorn re-raises SIGTERM after its graceful shutdown, so the process would end "killed by
    SIGTERM" instead of exiting 0 after a clean drain.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host = self.config.host
            shown = f"[{host}]" if ":" in host else host
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else 0
            logger.info("listening on http://%s:%d (OpenAI API under /v1)", shown, port)


async def _serve(server: _Server, grace: float) -> None:
    def stop(signum: signal.Signals) -> None:
        if server.should_exit:  # a second signal: stop now
            logger.warning("%s again: closing open requests now", signum.name)
            server.force_exit = True
            return
        logger.info("%s: finishing open requests (up to %g s), then stopping", signum.name, grace)
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    await server.serve()


def _address(listen: str) -> tuple[str, int]:
    try:
        return split_host_port(listen)
    except ValueError as exc:
        raise ConfigurationError(f"--listen / LLM_GATEWAY_LISTEN: {exc}") from None
