"""``llm-gateway`` as a real second process, in front of real llm_service replicas."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai

from tests.harness.service import Certs, ChildProcess, Service, free_port

MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the default model's id: its file name without .gguf
FAKE_MODEL = "fake"  # the fake backend's (LLM_BACKEND=fake)
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


def replica(
    workdir: Path,
    files: Certs,
    model: Path | None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> Service:
    # One compute thread each: two replicas on 2 cores with 2 threads each make llama.cpp's
    # spinning threads wait on each other (measured: 0.3 tokens/s instead of 40 per stream).
    env = {"LLM_TLS_ALLOWED_CLIENTS": "llm-client", "LLM_N_THREADS": "1"} | (env or {})
    return Service(workdir, files, model, env=env, **kwargs)


@contextlib.contextmanager
def running_replicas(workdir: Path, files: Certs, model: Path | None) -> Iterator[list[Service]]:
    """Two ready replicas (pool of 2 each; ``model`` None: the fake backend), serving
    embeddings too, stopped cleanly (exit 0) at the end."""
    started = [replica(workdir, files, model, {"LLM_EMBEDDINGS": "1"}) for _ in range(2)]
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for s in started:
            assert s.stop() == 0, s.log


@contextlib.contextmanager
def running_gateway(
    workdir: Path, files: Certs, backends: list[Service], **kwargs: Any
) -> Iterator[Gateway]:
    """A ready gateway over ``backends``, stopped cleanly (exit 0) at the end."""
    gw = Gateway(workdir, files, backends, **kwargs)
    try:
        yield gw.wait_ready(30)
    finally:
        assert gw.stop() == 0, gw.log
