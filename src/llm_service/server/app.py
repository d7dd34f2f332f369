"""``llm_service serve``: the service's lifecycle, from start-up checks to a drained exit.

Order of events:
    1. check the TLS material (fail fast, before the model loads);
    2. open the HTTP port (``/livez`` 200, ``/readyz`` 503) and the gRPC port (health
       NOT_SERVING, Generate UNAVAILABLE) so probes see the service loading;
    3. load the model, create the pool, warm every context up with one decode;
    4. SERVING: health, ``/readyz`` and Generate open;
    5. on SIGTERM/SIGINT: NOT_SERVING at once, new Generate calls refused with UNAVAILABLE,
       running streams get ``LLM_SHUTDOWN_GRACE`` seconds, then are cancelled; contexts are
       freed before the model; exit code 0. A second signal skips the rest of the grace period.
    SIGHUP re-reads the TLS certificates without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llm_service.api.v1 import llm_pb2, llm_pb2_grpc
from llm_service.engine import (
    Engine,
    GenerationRequest,
    SamplingParams,
    load_backend,
    start_engine,
)
from llm_service.errors import ConfigurationError
from llm_service.server.http import start_http
from llm_service.server.metrics import ServiceMetrics
from llm_service.server.servicer import InferenceServicer, Phase, ServerState
from llm_service.server.tls import AllowListInterceptor, ReloadableCredentials
from llm_service.settings import ServiceSettings

__all__ = ["SERVICE_NAME", "parse_address", "serve"]

logger = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as (host, port); ConfigurationError names ``flag``."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"{flag}: expected HOST:PORT, got {address!r}")
    return host, int(port)


class _Shutdown:
    """Signals as events: the first asks for a drain, a second one for haste."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self, signum: signal.Signals) -> None:
        if self.requested.is_set():
            logger.warning("%s again: cancelling the remaining streams now", signum.name)
            self.hurry.set()
        else:
            logger.info("%s received: draining", signum.name)
            self.requested.set()


async def _warm_up(engine: Engine, pool_size: int) -> None:
    """One short greedy decode on every context (run together, so each gets one)."""
    started = time.monotonic()

    async def one(i: int) -> None:
        request = GenerationRequest(
            prompt="Hello",
            sampling=SamplingParams(max_tokens=1, temperature=0),
            request_id=f"warm-up-{i}",
        )
        async for _ in engine.generate(request):
            pass

    await asyncio.gather(*(one(i) for i in range(pool_size)))
    logger.info(
        "warm-up done: %d context(s) decoded in %.0f ms",
        pool_size,
        (time.monotonic() - started) * 1000,
    )


async def serve(settings: ServiceSettings) -> int:
    """Run the service until SIGTERM/SIGINT; return the exit code (0 after a clean drain).

    Raises:
        ConfigurationError: missing TLS material, an unusable address.
        ModelLoadError, ModelFetchError: the model could not be loaded.
    """
    credentials = None if settings.insecure else ReloadableCredentials.from_settings(settings)
    grpc_host, grpc_port = parse_address(settings.grpc_addr, "--grpc-addr")
    http_host, http_port = parse_address(settings.http_addr, "--http-addr")

    state = ServerState(settings.llama_service_threads)
    metrics = ServiceMetrics(state.pool_state)
    servicer = InferenceServicer(state, metrics)
    health = health_aio.HealthServicer()
    interceptors = (
        [AllowListInterceptor(settings.tls_allowed_clients)]
        if settings.tls_allowed_clients and credentials is not None
        else []
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    llm_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, not_serving)

    grpc_target = f"{settings.grpc_addr.rpartition(':')[0]}:{grpc_port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(grpc_target)
        else:
            bound = server.add_secure_port(grpc_target, credentials.credentials)
    except RuntimeError as exc:
        raise ConfigurationError(f"--grpc-addr: cannot listen on {grpc_target}: {exc}") from None
    try:
        http = await start_http(http_host, http_port, state, metrics)
    except OSError as exc:
        raise ConfigurationError(
            f"--http-addr: cannot listen on {settings.http_addr}: {exc.strerror}"
        ) from None
    await server.start()
    logger.info(
        "gRPC (%s) on %s:%d, health and metrics on http://%s:%d",
        "plaintext, --insecure" if credentials is None else "mutual TLS",
        grpc_host,
        bound,
        http_host,
        http_port,
    )
    if credentials is None:
        logger.warning("--insecure: the gRPC port accepts anyone, unencrypted")

    loop = asyncio.get_running_loop()
    shutdown = _Shutdown()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown, signum)
    if credentials is not None:
        loop.add_signal_handler(signal.SIGHUP, credentials.reload)

    engine: Engine | None = None
    try:
        load = asyncio.ensure_future(asyncio.to_thread(load_backend, settings))
        await _first(load, shutdown.requested)
        backend = await load  # a load in progress cannot be interrupted: let it end, then free
        engine = await start_engine(backend, settings)
        if not shutdown.requested.is_set():
            await _warm_up(engine, settings.llama_service_threads)
            state.engine = engine
            state.phase = Phase.SERVING
            for name in ("", SERVICE_NAME):
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)
            logger.info("ready: serving %s", engine.info.name)
            await shutdown.requested.wait()
        state.phase = Phase.DRAINING
        await health.enter_graceful_shutdown()
        await _drain(servicer, settings.shutdown_grace, shutdown.hurry)
    finally:
        state.phase = Phase.DRAINING
        await server.stop(grace=1)
        if engine is not None:
            await engine.aclose()  # contexts first, then the model
        await http.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("stopped")
    return 0


async def _first(work: asyncio.Future[Any], event: asyncio.Event) -> None:
    """Wait until ``work`` is done or ``event`` is set, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([work, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter


async def _drain(servicer: InferenceServicer, grace: float, hurry: asyncio.Event) -> None:
    in_flight = servicer.in_flight
    if in_flight:
        logger.info("waiting up to %g s for %d stream(s) to finish", grace, in_flight)
        idle = asyncio.ensure_future(servicer.wait_idle(grace))
        await _first(idle, hurry)
        idle.cancel()
    cancelled = await servicer.cancel_all()
    if cancelled:
        logger.warning("cancelled %d stream(s) still running at the end of the grace period",
                       cancelled)  # fmt: skip
