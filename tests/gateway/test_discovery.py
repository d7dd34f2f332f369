"""The gateway finds its replicas under a DNS name and follows them as its addresses change.

A real DNS server (UDP, in a thread of this process) answers for ``replicas.test``; the
replicas listen on 127.0.0.2 and 127.0.0.3 (the whole of 127/8 is the loopback on Linux).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from tests.harness.gateway import FAKE_MODEL as MODEL
from tests.harness.gateway import Gateway
from tests.harness.service import Certs, Service, free_port


@pytest.fixture(scope="session")
def model_path() -> None:
    """No model: the replicas of this module serve the fake backend (what is tested is how the
    gateway finds them)."""
    return None


NAME = "replicas.test"


class DnsServer:
    """Answers A queries for ``NAME`` with ``addresses`` (TTL 0); ``fail`` answers SERVFAIL."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.fail = False
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            self.queries += 1
            if self.fail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif question.name.to_text().rstrip(".") != NAME:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and self.addresses:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 0, "IN", "A", self.addresses)
                )
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def replica(start_backend: Callable[..., Service], host: str, port: int) -> Service:
    """A replica on ``host``:``port`` (gRPC), its health port on every address."""
    http = free_port()
    env = {"LLM_GRPC_ADDR": f"{host}:{port}", "LLM_HTTP_ADDR": f"0.0.0.0:{http}"}
    return start_backend(env=env, ports=(port, http))


def discovering_gateway(
    tmp_path: Path, certs: Certs, env: dict[str, str], stopped: list[Gateway]
) -> Gateway:
    gw = Gateway(tmp_path, certs, [], env=env)
    stopped.append(gw)
    return gw.wait_ready(30)


def targets(gw: Gateway) -> dict[str, str]:
    return {b["target"]: b["state"] for b in gw.readyz()[1]["backends"]}


def wait_targets(gw: Gateway, expected: dict[str, str], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while (now := targets(gw)) != expected:
        assert time.monotonic() < end, f"backends {now}, expected {expected}\n{gw.log}"
        time.sleep(0.1)


def ask(gw: Gateway) -> str:
    answer = gw.client("no-key-needed").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    return answer.choices[0].finish_reason


def test_the_gateway_follows_the_addresses_of_a_name(
    dns_server: DnsServer,
    start_backend: Callable[..., Service],
    tmp_path: Path,
    certs: Certs,
) -> None:
    port = free_port()
    a, b = replica(start_backend, "127.0.0.2", port), replica(start_backend, "127.0.0.3", port)
    a_target, b_target = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    dns_server.addresses = ["127.0.0.2"]
    env = {
        "LLM_GATEWAY_BACKENDS": "",
        "LLM_GATEWAY_DISCOVER": f"{NAME}:{port}",
        "LLM_GATEWAY_DNS_SERVER": f"127.0.0.1:{dns_server.port}",
        "LLM_GATEWAY_DISCOVERY_INTERVAL": "0.3",
        "LLM_GATEWAY_TLS_SERVER_NAME": "localhost",  # the replicas' certificate's name
    }
    gateways: list[Gateway] = []
    try:
        gw = discovering_gateway(tmp_path, certs, env, gateways)
        wait_targets(gw, {a_target: "healthy"})
        assert ask(gw) == "length"

        # A replica comes: it is checked and takes requests.
        dns_server.addresses = ["127.0.0.2", "127.0.0.3"]
        wait_targets(gw, {a_target: "healthy", b_target: "healthy"})
        served_before = b.metric("llm_requests_total", finish_reason="length")
        for _ in range(6):
            assert ask(gw) == "length"
        assert b.metric("llm_requests_total", finish_reason="length") > served_before

        # The DNS server fails: the gateway keeps the replicas it knows.
        dns_server.fail = True
        queries = dns_server.queries
        while dns_server.queries < queries + 4:
            time.sleep(0.1)
        assert targets(gw) == {a_target: "healthy", b_target: "healthy"}
        assert "cannot resolve replicas.test (keeping its 2 replica(s))" in gw.log
        dns_server.fail = False

        # A replica goes: no request is sent to it any more.
        dns_server.addresses = ["127.0.0.3"]
        wait_targets(gw, {b_target: "healthy"})
        served_before = a.metric("llm_requests_total", finish_reason="length")
        for _ in range(3):
            assert ask(gw) == "length"
        assert a.metric("llm_requests_total", finish_reason="length") == served_before
        assert f"backend {a_target} left {NAME}" in gw.log

        # The name is gone altogether: no replica, the gateway is not ready.
        dns_server.addresses = []
        wait_targets(gw, {})
        assert gw.readyz()[0] == 503
        dns_server.addresses = ["127.0.0.2"]
        wait_targets(gw, {a_target: "healthy"})
        assert ask(gw) == "length"
    finally:
        for gw in gateways:
            assert gw.stop() == 0, gw.log


def test_names_are_resolved_by_the_system_by_default(
    start_backend: Callable[..., Service], tmp_path: Path, certs: Certs
) -> None:
    svc = start_backend()
    env = {"LLM_GATEWAY_BACKENDS": "", "LLM_GATEWAY_DISCOVER": f"localhost:{svc.grpc_port}"}
    gateways: list[Gateway] = []
    try:
        gw = discovering_gateway(tmp_path, certs, env, gateways)
        assert targets(gw)[f"127.0.0.1:{svc.grpc_port}"] == "healthy"
        assert ask(gw) == "length"
    finally:
        for gw in gateways:
            assert gw.stop() == 0, gw.log
