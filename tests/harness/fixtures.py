"""The fixtures every test layer shares, loaded for the whole suite by ``tests/conftest.py``
(``pytest_plugins``): certificates, the model, services and gateways as real second processes,
and the servicer on the fake backend over a real socket.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_service.api.v1 import llm_pb2_grpc
from llm_service.default_model import fetch_default_model
from llm_service.engine import Engine, EngineConfig, FakeBackend
from llm_service.server import InferenceServicer, Phase, ServerState
from llm_service.server.metrics import ServiceMetrics
from llm_service.settings import ServiceSettings
from tests.harness.gateway import (
    HASHED_KEY,
    KEY,
    Gateway,
    replica,
    running_gateway,
    running_replicas,
)
from tests.harness.service import Certs, Service

# -- certificates, the model, services -------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.create(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    return fetch_default_model(ServiceSettings().model_cache, progress=False)


@pytest.fixture(scope="session", params=["contexts", "batched"])
def pool_mode(request: pytest.FixtureRequest) -> str:
    """The pool mode of the services started: every test of a real service runs in both."""
    return str(request.param)


@pytest.fixture(scope="session")
def service(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, model_path: Path, pool_mode: str
) -> Iterator[Service]:
    """One shared service (per pool mode): mTLS, allow-list {llm-client}, pool of 2."""
    svc = Service(
        tmp_path_factory.mktemp("service"),
        certs,
        model_path,
        env={"LLM_TLS_ALLOWED_CLIENTS": "llm-client"},
        pool_mode=pool_mode,
    )
    try:
        yield svc.wait_ready()
    finally:
        assert svc.stop() == 0, svc.log


@pytest.fixture
def start_service(
    tmp_path: Path, certs: Certs, model_path: Path | None, pool_mode: str
) -> Iterator[type[Service]]:
    """Start dedicated services: ``start_service(env={...})``; all stopped at the end. (A
    ``model_path`` fixture that gives None makes them fake-backend services.)"""
    started: list[Service] = []

    def start(
        env: dict[str, str] | None = None, *, tls: bool = True, ready: bool = True
    ) -> Service:
        svc = Service(tmp_path, certs if tls else None, model_path, env=env, pool_mode=pool_mode)
        started.append(svc)
        return svc.wait_ready() if ready else svc

    yield start  # type: ignore[misc]
    for svc in started:
        if svc.process.poll() is None:
            svc.process.kill()
            svc.process.wait()


# -- gateways and their replicas ---------------------------------------------------------------


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    path.write_text(f"# test keys\n{KEY}\n\nsha256:{digest}  # the second key, hashed\n")
    path.chmod(0o600)  # a keys file others may read is refused
    return path


@pytest.fixture(scope="session")
def backends(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    model_path: Path,
) -> Iterator[list[Service]]:
    """Two replicas shared by the tests that do not stop them (pool of 2 each)."""
    with running_replicas(tmp_path_factory.mktemp("backends"), certs, model_path) as started:
        yield started


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    backends: list[Service],
    keys_file: Path,
) -> Iterator[Gateway]:
    """A gateway over both shared replicas, with API keys."""
    workdir = tmp_path_factory.mktemp("gateway")
    with running_gateway(workdir, certs, backends, keys_file=keys_file) as gw:
        yield gw


@pytest.fixture
def start_gateway(tmp_path: Path, certs: Certs) -> Iterator[Callable[..., Gateway]]:
    """Dedicated gateways: ``start_gateway(backends, env={...})``; stopped at the end."""
    started: list[Gateway] = []

    def start(backends: list[Service], **kwargs: Any) -> Gateway:
        started.append(Gateway(tmp_path, certs, backends, **kwargs))
        return started[-1].wait_ready(30)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def start_backend(
    tmp_path: Path,
    certs: Certs,
    model_path: Path,
) -> Iterator[Callable[..., Service]]:
    """Dedicated replicas: ``start_backend(env={...}, ports=...)``; killed at the end."""
    started: list[Service] = []

    def start(*, ready: bool = True, **kwargs: Any) -> Service:
        started.append(replica(tmp_path, certs, model_path, **kwargs))
        return started[-1].wait_ready() if ready else started[-1]

    yield start
    for s in started:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait()


# -- the servicer on the fake backend ----------------------------------------------------------


@dataclass
class Rig:
    backend: FakeBackend
    state: ServerState
    servicer: InferenceServicer
    metrics: ServiceMetrics
    stub: llm_pb2_grpc.InferenceStub


@pytest.fixture(params=["contexts", "batched"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
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
        yield Rig(backend, state, servicer, metrics, llm_pb2_grpc.InferenceStub(channel))
    await server.stop(0)
    await engine.aclose()
