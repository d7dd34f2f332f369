from __future__ import annotations

from collections.abc import Callable

import pytest

from llm_service.client import AsyncClient, Client
from llm_service.client.types import ClientOptions
from llm_service.settings import ServiceSettings
from tests.harness.service import Certs, ClientCert, Service


@pytest.fixture(scope="session")
def pool_mode() -> str:
    """The client tests run against the default pool mode (the server tests cover both)."""
    return str(ServiceSettings.model_fields["pool_mode"].default)


def options(files: Certs, client: ClientCert | None = None, **extra: object) -> ClientOptions:
    """Mutual TLS options for ``client`` (default: the good client certificate)."""
    client = client or files.client
    return ClientOptions(tls_ca=files.ca, tls_cert=client.cert, tls_key=client.key, **extra)  # type: ignore[typeddict-item]


def target(svc: Service) -> str:
    return f"localhost:{svc.grpc_port}"


@pytest.fixture
def client(service: Service, certs: Certs) -> Callable[..., Client]:
    """``client(**options)``: a blocking client of the shared service, closed at the end."""
    made: list[Client] = []

    def make(svc: Service | None = None, **extra: object) -> Client:
        made.append(Client(target(svc or service), **options(certs, **extra)))  # type: ignore[arg-type]
        return made[-1]

    yield make  # type: ignore[misc]
    for c in made:
        c.close()


@pytest.fixture
async def aclient(service: Service, certs: Certs) -> AsyncClient:
    """An async client of the shared service."""
    async with AsyncClient(target(service), **options(certs)) as c:
        yield c  # type: ignore[misc]
