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
import os
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from llm_service.api.v1 import MAX_MESSAGE_BYTES, llm_pb2, llm_pb2_grpc
from llm_service.engine import Engine, GenerationRequest, SamplingParams
from llm_service.engine.cpu import check_build_fits_cpu
from llm_service.errors import ConfigurationError
from llm_service.server.guards import AllowListInterceptor, RequestParseInterceptor
from llm_service.server.http import start_http
from llm_service.server.metrics import ServiceMetrics
from llm_service.server.servicer import InferenceServicer
from llm_service.server.state import Phase, ServerState
from llm_service.server.tls import ReloadableCredentials, tls_files
from llm_service.settings import ServiceSettings, split_host_port
from llm_service.wiring import load_backend, start_engine

__all__ = ["SERVICE_NAME", "parse_address", "serve"]

logger = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
# How often the engine's health is looked at, and the exit status of a service whose engine
# failed for good (for its supervisor: restart it).
ENGINE_CHECK_S = 0.5
EXIT_ENGINE_FAILED = 1
# How long a failed engine gets to free its contexts and model before the process exits anyway.
ENGINE_CLOSE_S = 30.0


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as (host, port); ConfigurationError names ``flag``."""
    try:
        return split_host_port(address)
    except ValueError as exc:
        raise ConfigurationError(f"{flag}: {exc}") from None


class _Shutdown:
    """Signals as events: the first asks for a drain, a second one for haste."""

    def __init__(self, state: ServerState) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()
        self._state = state

    def __call__(self, signum: signal.Signals) -> None:
        if self.requested.is_set():
            logger.warning("%s again: not waiting any longer", signum.name)
            self.hurry.set()
        else:
            logger.info("%s received: draining (not ready, new requests refused)", signum.name)
            if self._state.phase is not Phase.FAILED:
                self._state.phase = Phase.DRAINING
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
        async with contextlib.aclosing(engine.generate(request)) as events:
            async for _ in events:
                pass

    await asyncio.gather(*(one(i) for i in range(pool_size)))
    logger.info(
        "warm-up done: %d context(s) decoded in %.0f ms",
        pool_size,
        (time.monotonic() - started) * 1000,
    )


def _credentials(settings: ServiceSettings) -> ReloadableCredentials | None:
    if not settings.insecure:
        return ReloadableCredentials.from_settings(settings)
    tls = {**tls_files(settings), "--tls-allowed-clients": settings.tls_allowed_clients}
    given = [flag for flag, value in tls.items() if value]
    if given:
        raise ConfigurationError(
            f"--insecure serves plaintext, so {', '.join(given)} would be ignored: give one or"
            " the other"
        )
    return None


def _grpc_server(
    settings: ServiceSettings,
    credentials: ReloadableCredentials | None,
    servicer: InferenceServicer,
    health: health_aio.HealthServicer,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with every service added, bound (not started); and its port."""
    # The first interceptor's check runs first: an unknown client learns nothing about parsing.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.tls_allowed_clients:
        interceptors.append(AllowListInterceptor(settings.tls_allowed_clients))
    interceptors.append(RequestParseInterceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Fail on a port already in use, instead of sharing it with another process.
            ("grpc.so_reuseport", 0),
            # Ping idle connections, so that a client that vanished without closing its
            # connection is noticed (and its stream cancelled) within about 40 s.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    llm_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )  # fmt: skip
    address = settings.grpc_addr
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials.credentials)
    except RuntimeError as exc:
        raise ConfigurationError(f"--grpc-addr: cannot listen on {address}: {exc}") from None
    return server, port


async def _set_health(health: health_aio.HealthServicer, serving: bool) -> None:
    statuses = health_pb2.HealthCheckResponse
    status = statuses.SERVING if serving else statuses.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


async def serve(settings: ServiceSettings) -> int:
    """Run the service until SIGTERM/SIGINT; return the exit code (0 after a clean drain).

    Raises:
        ConfigurationError: missing or conflicting TLS settings, an unusable address.
        ModelLoadError, ModelFetchError: the model could not be loaded.
    """
    # Before any port opens: a llama.cpp build for another CPU would die at the model's load.
    check_build_fits_cpu()
    credentials = _credentials(settings)
    grpc_host, _ = parse_address(settings.grpc_addr, "--grpc-addr")
    http_host, http_port = parse_address(settings.http_addr, "--http-addr")

    state = ServerState(settings.llama_service_threads)
    metrics = ServiceMetrics(state)
    servicer = InferenceServicer(state, metrics, stall_timeout=settings.stall_timeout)
    health = health_aio.HealthServicer()
    await _set_health(health, serving=False)
    server, grpc_port = _grpc_server(settings, credentials, servicer, health)
    try:
        http = await start_http(http_host, http_port, state, metrics)
    except OSError as exc:
        raise ConfigurationError(
            f"--http-addr: cannot listen on {settings.http_addr}: {exc.strerror}"
        ) from None
    state.http_port = http.addresses[0][1]
    loop = asyncio.get_running_loop()
    shutdown = _Shutdown(state)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown, signum)
    if credentials is not None:
        # Reading and checking the files is file I/O: off the event loop.
        loop.add_signal_handler(signal.SIGHUP, loop.run_in_executor, None, credentials.reload)
    else:
        loop.add_signal_handler(signal.SIGHUP, logger.info, "SIGHUP: no TLS to re-read")
    engine: Engine | None = None
    exit_code = 0
    try:
        await server.start()
        logger.info(
            "gRPC (%s) on %s:%d, health and metrics on http://%s:%d",
            "plaintext, --insecure" if credentials is None else "mutual TLS",
            grpc_host,
            grpc_port,
            http_host,
            state.http_port,
        )
        if credentials is None:
            logger.warning("--insecure: the gRPC port accepts anyone, unencrypted")
        load = asyncio.ensure_future(asyncio.to_thread(load_backend, settings))
        await _first(load, shutdown.requested)
        backend = await load  # a load in progress cannot be interrupted: let it end, then free
        if shutdown.requested.is_set():
            await asyncio.to_thread(backend.close)
        else:
            try:
                engine = await start_engine(backend, settings)
            except BaseException:
                await asyncio.to_thread(backend.close)
                raise
            await _warm_up(engine, settings.llama_service_threads)
            state.engine = engine
            if not shutdown.requested.is_set():
                # (the warm-up may have found the engine broken already)
                if (failure := _failure(engine)) is None:
                    state.phase = Phase.SERVING
                    await _set_health(health, serving=True)
                    logger.info("ready: serving %s", engine.info.name)
                    failure = await _watch(engine, shutdown.requested)
                if failure is not None:
                    await _fail(failure, state, health, settings, shutdown)
                    exit_code = EXIT_ENGINE_FAILED
        await health.enter_graceful_shutdown()
        await _drain(servicer, settings.shutdown_grace, shutdown.hurry)
    finally:
        if state.phase is not Phase.FAILED:
            state.phase = Phase.DRAINING
        await server.stop(grace=1)
        if engine is not None and exit_code:
            # A broken engine may not let go (a call stuck in llama.cpp): the exit must come.
            try:
                async with asyncio.timeout(ENGINE_CLOSE_S):
                    await engine.aclose()
            except TimeoutError:
                logger.critical(
                    "the failed engine did not close in %g s: exiting now", ENGINE_CLOSE_S
                )
                os._exit(exit_code)
        elif engine is not None:
            await engine.aclose()  # contexts first, then the model
        await http.cleanup()
        # The signal handlers stay until the event loop closes: a signal during this clean-up
        # must not kill the process halfway.
    logger.info("stopped: contexts and model freed")
    if exit_code:
        logger.critical("exiting with status %d: the engine failed", exit_code)
    return exit_code


def _failure(engine: Engine) -> str | None:
    """Why the engine failed for good, or None (a failing look counts as a failure)."""
    try:
        return engine.failure()
    except Exception as exc:
        logger.exception("looking at the engine's health failed")
        return f"looking at its health failed: {exc!r}"


async def _watch(engine: Engine, stop: asyncio.Event) -> str | None:
    """Wait for ``stop`` (return None), unless the engine fails for good first (return why).

    Looks every ENGINE_CHECK_S: the failure's sources are a thread's death and counts kept in
    other threads, and a look costs next to nothing.
    """
    while not stop.is_set():
        if (failure := _failure(engine)) is not None:
            return failure
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENGINE_CHECK_S):
                await stop.wait()
    return None


async def _fail(
    failure: str,
    state: ServerState,
    health: health_aio.HealthServicer,
    settings: ServiceSettings,
    shutdown: _Shutdown,
) -> None:
    """Turn the service's health red for ``failure_exit_after`` seconds (probes and balancers
    see it and stop sending traffic), then let it stop, so that its supervisor restarts it."""
    logger.critical(
        "the engine failed: %s; not ready, exiting in %g s", failure, settings.failure_exit_after
    )
    state.failure = failure
    state.phase = Phase.FAILED
    await _set_health(health, serving=False)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settings.failure_exit_after):
            await shutdown.requested.wait()


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
        logger.warning("cancelled %d stream(s) still running", cancelled)
