"""Two real llm_service replicas (mutual TLS, the real model) and llm-gateway processes."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

# The server tests' fixtures: certificates and the model.
from tests.server.conftest import certs, model_path  # noqa: F401
from tests.server.service import Certs, ChildProcess, Service, free_port

MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the default model's id: its file name without .gguf
KEY = "sk-test-key-one"
HASHED_KEY = "sk-test-key-two"  # in the keys file as sha256:HEX only


class Gateway(ChildProcess):
    """One ``llm-gateway`` subprocess on a free port, in front of ``backends``."""

    name = "llm-gateway"

    def __init__(
        self,
        workdir: Path,
        files: Certs,
        backends: list[Service],
        *,
        env: dict[str, str] | None = None,
        keys_file: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = self.http_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        settings = {
            "LLM_GATEWAY_BACKENDS": " ".join(f"127.0.0.1:{b.grpc_port}" for b in backends),
            "LLM_GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "LLM_GATEWAY_TLS_CA": str(files.ca),
            "LLM_GATEWAY_TLS_CERT": str(files.client.cert),
            "LLM_GATEWAY_TLS_KEY": str(files.client.key),
            "LLM_GATEWAY_HEALTH_INTERVAL": "0.5",
            "LLM_GATEWAY_HEALTH_TIMEOUT": "1",
            "LLM_GATEWAY_LOG_LEVEL": "DEBUG",
        }
        if keys_file is not None:
            settings["LLM_GATEWAY_API_KEYS_FILE"] = str(keys_file)
        self.spawn([sys.executable, "-m", "llm_service.gateway"], settings | (env or {}))

    def states(self) -> dict[str, str]:
        """Each backend's state, by gRPC port."""
        return {b["target"].rsplit(":", 1)[1]: b["state"] for b in self.readyz()[1]["backends"]}

    def wait_state(self, backend: Service, state: str, timeout: float = 15) -> float:
        """Wait until ``backend`` is in ``state``; the seconds it took."""
        start = time.monotonic()
        while (now := self.states().get(str(backend.grpc_port))) != state:
            assert time.monotonic() - start < timeout, f"backend is {now}, not {state}"
            time.sleep(0.05)
        return time.monotonic() - start

    def client(self, key: str | None = KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=key or "", max_retries=0, timeout=60, **kwargs
        )


def _service(
    workdir: Path, files: Certs, model: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> Service:
    # One compute thread each: two replicas on 2 cores with 2 threads each make llama.cpp's
    # spinning threads wait on each other (measured: 0.3 tokens/s instead of 40 per stream).
    env = {"LLM_TLS_ALLOWED_CLIENTS": "llm-client", "LLM_N_THREADS": "1"} | (env or {})
    return Service(workdir, files, model, env=env, **kwargs)


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
    certs: Certs,  # noqa: F811
    model_path: Path,  # noqa: F811
) -> Iterator[list[Service]]:
    """Two replicas shared by the tests that do not stop them (pool of 2 each)."""
    workdir = tmp_path_factory.mktemp("backends")
    started = [_service(workdir, certs, model_path) for _ in range(2)]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            assert s.stop() == 0, s.log


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,  # noqa: F811
    backends: list[Service],
    keys_file: Path,
) -> Iterator[Gateway]:
    """A gateway over both shared replicas, with API keys."""
    gw = Gateway(tmp_path_factory.mktemp("gateway"), certs, backends, keys_file=keys_file)
    try:
        yield gw.wait_ready(30)
    finally:
        assert gw.stop() == 0, gw.log


@pytest.fixture
def start_gateway(tmp_path: Path, certs: Certs) -> Iterator[Callable[..., Gateway]]:  # noqa: F811
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
    certs: Certs,  # noqa: F811
    model_path: Path,  # noqa: F811
) -> Iterator[Callable[..., Service]]:
    """Dedicated replicas: ``start_backend(env={...}, ports=...)``; killed at the end."""
    started: list[Service] = []

    def start(*, ready: bool = True, **kwargs: Any) -> Service:
        started.append(_service(tmp_path, certs, model_path, **kwargs))
        return started[-1].wait_ready() if ready else started[-1]

    yield start
    for s in started:
        if s.process.poll() is None:
            s.process.kill()
            s.process.wait()
