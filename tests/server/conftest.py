from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_service.default_model import fetch_default_model
from llm_service.settings import ServiceSettings
from tests.server.service import Certs, Service


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
