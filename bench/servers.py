"""The servers the benchmarks run as child processes: llm_service, llm-gateway, llama-server and
llama-cpp-python's server, each with its log in a file, its readiness URL, its memory and its
signals. Shared by ``compare.py`` (throughput) and ``reliability.py`` (load, faults, soak).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = [
    "Server",
    "Setup",
    "Stack",
    "free_port",
    "llama_cpp_python_server",
    "llama_server",
    "llm_gateway",
    "llm_service",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One server under test, run as a child process with its log in a file.

    ``start`` may be called again after the process ended (a restart on the same ports); the
    log then grows, it is not replaced.

    Attributes:
        url: its plain-HTTP base URL (health, metrics; the API too for HTTP servers).
    """

    name: str
    command: list[str]
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, workdir: Path) -> None:
        self.log = workdir / f"{self.name.replace(' ', '_')}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")} | self.env
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 180) -> None:
        assert self.process is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; its log: {self.log}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s; its log: {self.log}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process (SIGKILL, SIGTERM, SIGSTOP, SIGCONT, ...)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def _processes(self) -> list[psutil.Process]:
        assert self.process is not None
        proc = psutil.Process(self.process.pid)
        return [proc, *proc.children(recursive=True)]

    def rss_mb(self) -> float:
        """Resident memory of the process and its children, MiB (0 when it is gone)."""
        try:
            return sum(p.memory_info().rss for p in self._processes()) / 2**20
        except psutil.NoSuchProcess:
            return 0.0

    def anon_mb(self) -> float:
        """Resident memory not backed by a file (RSS less its shared part: the mapped model
        file and libraries, which the kernel may drop and read back), MiB; what a leak grows."""
        try:
            return (
                sum(m.rss - m.shared for m in (p.memory_info() for p in self._processes())) / 2**20
            )
        except psutil.NoSuchProcess:
            return 0.0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process and its children used so far (0 when gone)."""
        try:
            return sum(sum(p.cpu_times()[:2]) for p in self._processes())
        except psutil.NoSuchProcess:
            return 0.0

    def num_fds(self) -> int:
        """Open file descriptors of the process and its children (0 when it is gone)."""
        try:
            return sum(p.num_fds() for p in self._processes())
        except psutil.NoSuchProcess:
            return 0

    def wait(self, timeout: float) -> int:
        """The exit status, waiting up to ``timeout`` seconds (TimeoutExpired after that)."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Setup:
    model: Path
    slots: int
    ctx_per_slot: int
    threads: int
    workdir: Path
    certs: dict[str, Path]
    tools: Path | None = None  # llama-server and llama-bench (bench/build-llama-tools)


@dataclass
class Stack:
    """Servers measured together (the gateway and its replica): RSS adds up."""

    servers: list[Server]

    def rss_mb(self) -> float:
        return sum(s.rss_mb() for s in self.servers)


def llama_server(s: Setup, *extra: str) -> tuple[Server, str]:
    """llama.cpp's server (with ``extra`` arguments), and its base URL."""
    assert s.tools is not None, "llama-server needs Setup.tools"
    port = free_port()
    server = Server(
        "llama-server",
        [str(s.tools / "llama-server"), "-m", str(s.model), "--host", "127.0.0.1",
         "--port", str(port), "-np", str(s.slots), "-c", str(s.slots * s.ctx_per_slot),
         "-t", str(s.threads), "-tb", str(s.threads), *extra],
        f"http://127.0.0.1:{port}/health",
        url=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    return server, server.url


def llama_cpp_python_server(s: Setup) -> tuple[Server, str]:
    """llama-cpp-python's OpenAI-compatible server, and its base URL."""
    port = free_port()
    # interrupt_requests off: by default it cuts running streams off when new requests arrive.
    server = Server(
        "llama-cpp-python",
        [sys.executable, "-m", "llama_cpp.server", "--model", str(s.model), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", str(s.ctx_per_slot), "--n_threads", str(s.threads),
         "--interrupt_requests", "False"],
        f"http://127.0.0.1:{port}/v1/models",
        url=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    return server, server.url


def llm_service(
    s: Setup,
    mode: str,
    *,
    name: str | None = None,
    ports: tuple[int, int] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Server, str]:
    """llm_service in ``mode``, and its gRPC target.

    Args:
        name: the server's name (and log file's); default ``llm_service MODE``.
        ports: its gRPC and HTTP ports (default: free ones).
        env: settings over the ones made from ``s`` (``LLM_LOG_LEVEL`` is WARNING unless given).
    """
    grpc_port, http_port = ports or (free_port(), free_port())
    settings = {
        "LLM_MODEL_PATH": str(s.model),
        "LLM_POOL_MODE": mode,
        "LLM_LLAMA_SERVICE_THREADS": str(s.slots),
        "LLM_N_CTX": str(s.ctx_per_slot),
        "LLM_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "LLM_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "LLM_TLS_CERT": str(s.certs["server.crt"]),
        "LLM_TLS_KEY": str(s.certs["server.key"]),
        "LLM_TLS_CA": str(s.certs["ca.crt"]),
        "LLM_LOG_LEVEL": "WARNING",
    }
    if mode == "batched":  # one context for all slots: every core on it (the mode's default)
        settings["LLM_N_THREADS"] = str(s.threads)
    server = Server(
        name or f"llm_service {mode}",
        [sys.executable, "-m", "llm_service", "serve"],
        f"http://127.0.0.1:{http_port}/readyz",
        settings | (env or {}),
        url=f"http://127.0.0.1:{http_port}",
    )
    return server, f"localhost:{grpc_port}"


def llm_gateway(
    s: Setup,
    backends: str | list[str],
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Server, str]:
    """llm-gateway in front of llm_service replicas (gRPC targets), and its base URL.

    Args:
        port: its HTTP port (default: a free one).
        env: settings over the ones made from ``s`` (``LLM_GATEWAY_LOG_LEVEL`` is WARNING
            unless given).
    """
    port = port or free_port()
    settings = {
        "LLM_GATEWAY_BACKENDS": backends if isinstance(backends, str) else " ".join(backends),
        "LLM_GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "LLM_GATEWAY_TLS_CA": str(s.certs["ca.crt"]),
        "LLM_GATEWAY_TLS_CERT": str(s.certs["client.crt"]),
        "LLM_GATEWAY_TLS_KEY": str(s.certs["client.key"]),
        "LLM_GATEWAY_LOG_LEVEL": "WARNING",
    }
    server = Server(
        "llm-gateway",
        [sys.executable, "-m", "llm_service.gateway"],
        f"http://127.0.0.1:{port}/readyz",
        settings | (env or {}),
        url=f"http://127.0.0.1:{port}",
    )
    return server, server.url
