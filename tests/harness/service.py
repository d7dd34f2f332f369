"""Run ``llm_service serve`` as a real second process, and talk to it over real sockets."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.api.v1 import llm_pb2_grpc
from llm_service.certs import Issued, issue, new_ca, write_dev_certs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ClientCert:
    cert: Path
    key: Path


@dataclass
class Certs:
    """A development CA's files, plus client certificates for the refusal cases."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client: ClientCert
    intruder: ClientCert  # same CA, not on the allow-list
    foreign: ClientCert  # signed by another CA
    expired: ClientCert  # same CA, expired yesterday

    @classmethod
    def create(cls, out: Path) -> Certs:
        files = write_dev_certs(out)
        ca = Issued(
            serialization.load_pem_private_key(files["ca.key"].read_bytes(), None),  # type: ignore[arg-type]
            x509.load_pem_x509_certificate(files["ca.crt"].read_bytes()),
        )
        now = datetime.datetime.now(datetime.UTC)

        def save(name: str, item: Issued) -> ClientCert:
            (out / f"{name}.crt").write_bytes(item.cert_pem)
            (out / f"{name}.key").write_bytes(item.key_pem)
            (out / f"{name}.key").chmod(0o600)  # a key others may read is refused
            return ClientCert(out / f"{name}.crt", out / f"{name}.key")

        return cls(
            dir=out,
            ca=files["ca.crt"],
            server_cert=files["server.crt"],
            server_key=files["server.key"],
            client=ClientCert(files["client.crt"], files["client.key"]),
            intruder=save("intruder", issue(ca, "intruder", server=False)),
            foreign=save("foreign", issue(new_ca("another CA"), "llm-client", server=False)),
            expired=save(
                "expired",
                issue(
                    ca,
                    "llm-client",
                    server=False,
                    not_before=now - datetime.timedelta(days=10),
                    not_after=now - datetime.timedelta(days=1),
                ),
            ),
        )


class ChildProcess:
    """A server under test run as a second process: its log file, its HTTP port, its exit.

    Subclasses set ``name``, ``log_path``, ``http_url`` and ``process`` (through ``spawn``).
    """

    name = "process"
    log_path: Path
    http_url: str
    process: subprocess.Popen[bytes]
    terminating = False

    def spawn(self, command: list[str], env: dict[str, str]) -> None:
        """Start ``command`` with ``env`` over the environment's non-``LLM_*`` variables."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
        with self.log_path.open("ab") as log:  # a restarted server adds to its log
            self.process = subprocess.Popen(
                command, env=base | env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = self.http_get("/readyz")
        return status, json.loads(body)

    def metric(self, name: str, **labels: str) -> float:
        """One sample from ``/metrics`` (0 when the series does not exist yet)."""
        for family in text_string_to_metric_families(self.http_get("/metrics")[1]):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def wait_ready(self, timeout: float = 90) -> Self:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.log}")
            try:
                if self.readyz()[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (unless one was sent already), then wait for the exit code."""
        if self.process.poll() is None and not self.terminating:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


class Service(ChildProcess):
    """One ``llm_service serve`` subprocess on free ports, with its log in a file.

    Its pool: 2 slots of 1024 tokens, on two CPU threads in all (``pool_mode`` contexts: one
    thread per context; batched: both for the shared context).
    """

    def __init__(
        self,
        workdir: Path,
        certs: Certs | None,
        model_path: Path | None,
        *,
        env: dict[str, str] | None = None,
        pool_mode: str = "batched",
        ports: tuple[int, int] | None = None,
    ) -> None:
        """``model_path``: None serves the fake backend (``LLM_BACKEND=fake``: no model).
        ``ports``: the gRPC and HTTP ports (default: free ones), to restart a service."""
        self.name = "llm_service"
        self.certs = certs
        self.pool_mode = pool_mode
        self.grpc_port, self.http_port = ports or (free_port(), free_port())
        self.log_path = workdir / f"service-{self.grpc_port}.log"
        backend = {"LLM_MODEL_PATH": str(model_path)} if model_path else {"LLM_BACKEND": "fake"}
        settings = backend | {
            "LLM_GRPC_ADDR": f"127.0.0.1:{self.grpc_port}",
            "LLM_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "LLM_LLAMA_SERVICE_THREADS": "2",
            "LLM_POOL_MODE": pool_mode,
            "LLM_N_CTX": "1024",
            "LLM_N_THREADS": "1" if pool_mode == "contexts" else "2",
            "LLM_LOG_LEVEL": "DEBUG",
        }
        if certs is None:
            settings["LLM_INSECURE"] = "1"
        else:
            settings |= {
                "LLM_TLS_CERT": str(certs.server_cert),
                "LLM_TLS_KEY": str(certs.server_key),
                "LLM_TLS_CA": str(certs.ca),
            }
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.spawn([sys.executable, "-m", "llm_service", "serve"], settings | (env or {}))

    def wait_metric(self, expected: float, name: str, **labels: str) -> None:
        """Wait (2 s at most) for a metric: the server accounts a call just after it ends."""
        end = time.monotonic() + 2
        while (value := self.metric(name, **labels)) != expected:
            assert time.monotonic() < end, f"{name}{labels} = {value}, expected {expected}"
            time.sleep(0.02)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)
        self.terminating |= signum in (signal.SIGTERM, signal.SIGINT)

    def channel(
        self,
        client: ClientCert | None = None,
        *,
        plaintext: bool = False,
        no_client_cert: bool = False,
    ) -> grpc.aio.Channel:
        """A channel to the gRPC port: mTLS with ``client`` (default: the good client cert)."""
        target = f"localhost:{self.grpc_port}"
        if plaintext:
            return grpc.aio.insecure_channel(target)
        assert self.certs is not None
        client = client or self.certs.client
        credentials = grpc.ssl_channel_credentials(
            self.certs.ca.read_bytes(),
            None if no_client_cert else client.key.read_bytes(),
            None if no_client_cert else client.cert.read_bytes(),
        )
        return grpc.aio.secure_channel(target, credentials)

    def stub(self, channel: grpc.aio.Channel) -> llm_pb2_grpc.InferenceStub:
        return llm_pb2_grpc.InferenceStub(channel)


def greedy(prompt: str, max_tokens: int, **sampling: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        sampling=pb.SamplingParams(**{"max_tokens": max_tokens, "temperature": 0, **sampling}),
    )


async def run_stream(
    stub: llm_pb2_grpc.InferenceStub, request: pb.GenerateRequest, **kwargs: Any
) -> list[pb.GenerateResponse]:
    return [event async for event in stub.Generate(request, **kwargs)]


async def pool_status(stub: llm_pb2_grpc.InferenceStub) -> pb.PoolStatus:
    status = await stub.GetServerStatus(pb.GetServerStatusRequest())
    return status.pool


async def read_rest(call: Any) -> list[pb.GenerateResponse]:
    """The remaining events of a stream read with ``call.read()`` (gRPC forbids mixing styles)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events
