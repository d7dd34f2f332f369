"""Regression tests for the defects the reliability harness (``bench/reliability.py``) found,
each reduced to its smallest reproduction. A test marked ``xfail(strict=True)`` documents a
defect not fixed yet: fixing it makes the test pass, and the marker must then go."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from llm_service.api.v1 import llm_pb2_grpc
from llm_service.client import AsyncClient
from llm_service.engine import Engine, EngineConfig, FakeBackend
from llm_service.errors import ConnectionFailedError, ConnectionLostError, UnavailableError
from llm_service.server import InferenceServicer, Phase, ServerState
from llm_service.server.metrics import ServiceMetrics
from tests.server.service import Certs, Service, greedy


@dataclass
class Replica:
    """The servicer on the fake backend, behind a real in-process gRPC server."""

    backend: FakeBackend
    servicer: InferenceServicer
    metrics: ServiceMetrics
    stub: llm_pb2_grpc.InferenceStub


@pytest.fixture(params=["contexts", "batched"])
async def replica(request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    backend = FakeBackend(pool_mode=request.param)
    engine = await Engine.start(backend, EngineConfig(pool_size=2, max_queue=4))
    state = ServerState(pool_size=2)
    metrics = ServiceMetrics(state)
    servicer = InferenceServicer(state, metrics)
    server = grpc.aio.server()
    llm_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.engine, state.phase = engine, Phase.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Replica(backend, servicer, metrics, llm_pb2_grpc.InferenceStub(channel))
    await server.stop(0)
    await engine.aclose()


CANCELS = 100


async def test_client_cancels_mid_stream_are_cancels_not_internal_errors(
    replica: Replica, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the harness: an abandoned stream logged as an internal error on its replica.
    Many cancels, each after a few messages, so that some land while a write is in flight (about
    one in five on 2 cores; before 35ef97b, none of them was an error)."""
    caplog.set_level(logging.ERROR, logger="llm_service")
    for _ in range(CANCELS):
        replica.backend.enqueue("x" * 300)
        call = replica.stub.Generate(greedy("x", 300))
        for _ in range(3):
            await call.read()
        call.cancel()
        assert await replica.servicer.wait_idle(2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], f"{len(errors)} of {CANCELS} cancels logged as {errors[0]!r}"
    assert replica.metrics.requests.labels("error")._value.get() == 0
    assert replica.metrics.cancelled._value.get() == CANCELS


@pytest.mark.model
async def test_a_replica_killed_mid_stream_is_not_reported_as_unreachable(
    tmp_path: Path, certs: Certs, model_path: Path
) -> None:
    """Found by the harness's SIGKILL phase: the error event of a stream cut by the kill."""
    replica = Service(tmp_path, certs, model_path).wait_ready()
    try:
        options = {"tls_ca": certs.ca, "tls_cert": certs.client.cert, "tls_key": certs.client.key}
        async with AsyncClient(f"localhost:{replica.grpc_port}", **options) as client:  # type: ignore[arg-type]
            with pytest.raises(UnavailableError) as info:
                async with client.stream("1, 2, 3,", max_tokens=400, temperature=0) as stream:
                    async for chunk in stream:
                        if chunk.text:
                            replica.process.kill()  # SIGKILL, as the harness does
    finally:
        replica.process.kill()
        replica.process.wait()
    assert not isinstance(info.value, ConnectionFailedError), str(info.value)
    assert isinstance(info.value, ConnectionLostError), str(info.value)
    assert "handshake" not in str(info.value)
