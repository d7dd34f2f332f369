"""llm-gateway under failure: load spreading, a replica killed and restarted, clients that go
away, overloaded replicas, rate limits. Real replicas, real sockets, real signals; the replicas
serve the fake backend (``LLM_BACKEND=fake``: every reply counts "1, 2, 3, ..." at about 100
tokens/s), since what is tested is the gateway, not what a model says."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from llm_service.client import Client
from tests.harness.gateway import FAKE_MODEL as MODEL
from tests.harness.gateway import HASHED_KEY, KEY, Gateway, running_gateway, running_replicas
from tests.harness.service import Certs, Service, free_port

COUNT = "1, 2, 3,"  # a stream that runs to max_tokens (the fake's reply is longer than any)


@pytest.fixture(scope="session")
def model_path() -> None:
    """No model: dedicated replicas (``start_backend``) serve the fake backend too."""
    return None


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[list[Service]]:
    """Two fake replicas shared by the tests that do not stop them (pool of 2 each)."""
    with running_replicas(tmp_path_factory.mktemp("fake-backends"), certs, None) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, backends: list[Service], keys_file: Path
) -> Iterator[Gateway]:
    """A gateway over both fake replicas, with API keys."""
    workdir = tmp_path_factory.mktemp("gateway")
    with running_gateway(workdir, certs, backends, keys_file=keys_file) as gw:
        yield gw


class SseStream(threading.Thread):
    """One streamed completion read in a thread: its events, and whether it is done."""

    def __init__(self, gateway: Gateway, request_id: str, max_tokens: int = 400) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.request_id = request_id
        self.body = {"model": MODEL, "prompt": COUNT, "max_tokens": max_tokens,
                     "temperature": 0, "stream": True}  # fmt: skip
        self.events: list[str] = []
        self.status = 0
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        headers = {"authorization": f"Bearer {KEY}", "x-request-id": self.request_id}
        with httpx.stream("POST", self.gateway.url + "/v1/completions", json=self.body,
                          headers=headers, timeout=120) as response:  # fmt: skip
            self.status = response.status_code
            for line in response.iter_lines():
                if line:
                    self.events.append(line)
                    self.first.set()
        self.first.set()

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e[6:]) for e in self.events if e.startswith("data: {")]

    def finish_reason(self) -> str | None:
        return next(
            (c["choices"][0]["finish_reason"] for c in self.chunks
             if c.get("choices") and c["choices"][0]["finish_reason"]), None,
        )  # fmt: skip

    def on(self, backends: list[Service]) -> Service:
        """The replica serving this stream (from the replicas' logs)."""
        found = [b for b in backends if f"[{self.request_id}] Generate from" in b.log]
        assert len(found) == 1, f"{self.request_id} is on {len(found)} replicas"
        return found[0]


def wait_pools_free(backends: list[Service], within: float = 1.0) -> float:
    """Seconds until every replica's contexts are all free and nothing waits (or fail)."""
    start = time.monotonic()
    while True:
        pools = [b.readyz()[1]["pool"] for b in backends]
        if all(p["free"] == p["size"] and p["waiting"] == 0 for p in pools):
            return time.monotonic() - start
        assert time.monotonic() - start < within, pools
        time.sleep(0.02)


def requests_served(backend: Service) -> float:
    return sum(backend.metric("llm_requests_total", finish_reason=r) for r in ("stop", "length"))


def test_load_spreads_over_both_replicas(gateway: Gateway, backends: list[Service]) -> None:
    before = [requests_served(b) for b in backends]
    streams = [SseStream(gateway, f"spread-{i}", max_tokens=24) for i in range(8)]
    for s in streams:
        s.join(60)
        assert s.finish_reason() == "length"
    time.sleep(0.2)  # the replicas count a call just after it ends
    after = [requests_served(b) for b in backends]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 8 and min(served) >= 2, served


def test_disconnect_mid_stream_frees_the_replica_context(
    gateway: Gateway, backends: list[Service]
) -> None:
    cancelled = sum(b.metric("llm_requests_cancelled_total") for b in backends)
    disconnects = gateway.metric("llm_gateway_client_disconnects_total")
    body = {"model": MODEL, "prompt": COUNT, "max_tokens": 900, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert sum(b.readyz()[1]["pool"]["leased"] for b in backends) == 1
    took = wait_pools_free(backends, within=1.0)
    time.sleep(0.1)
    assert sum(b.metric("llm_requests_cancelled_total") for b in backends) == cancelled + 1
    assert "client went away mid-stream" in gateway.log
    assert gateway.metric("llm_gateway_client_disconnects_total") == disconnects + 1
    assert took < 1.0


def test_disconnect_before_a_whole_answer_frees_the_replica_context(
    gateway: Gateway, backends: list[Service]
) -> None:
    body = json.dumps({"model": MODEL, "prompt": COUNT, "max_tokens": 900, "temperature": 0})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(request.encode())
        end = time.monotonic() + 10
        while sum(b.readyz()[1]["pool"]["leased"] for b in backends) == 0:
            assert time.monotonic() < end
            time.sleep(0.02)
    wait_pools_free(backends, within=1.0)


def test_a_killed_replica_is_taken_out_and_rejoins_after_restart(
    start_backend: Callable[..., Service], start_gateway: Callable[..., Gateway]
) -> None:
    a, b = start_backend(), start_backend()
    gw = start_gateway(
        [a, b], env={"LLM_GATEWAY_EJECT_AFTER": "1", "LLM_GATEWAY_EJECTION_TIME": "1"}
    )
    streams = [SseStream(gw, f"kill-{i}", max_tokens=300) for i in range(4)]
    for s in streams:
        assert s.first.wait(30)
    doomed = streams[0].on([a, b])
    survivor = b if doomed is a else a
    doomed.process.kill()  # SIGKILL: no drain, connections cut
    doomed.process.wait()
    for s in streams:
        s.join(60)
        assert s.events[-1] == "data: [DONE]", s.events[-3:]
        if s.on([a, b]) is survivor:
            assert s.finish_reason() == "length"  # the other replica's streams complete
        else:
            # A stream cut short ends with an error event, never silently.
            assert s.finish_reason() is None
            error = json.loads(s.events[-2][6:])["error"]
            # Not "no backend could be reached": the replica answered, then died.
            assert (error["type"], error["code"]) == ("server_error", "backend_lost"), error
    # New requests all succeed: one sent to the dead replica is retried on the survivor.
    client = gw.client()
    killed_port = str(doomed.grpc_port)
    end = time.monotonic() + 30
    while gw.states()[killed_port] == "healthy":
        assert time.monotonic() < end, "the dead replica stays in rotation"
        done = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert done.choices[0].finish_reason == "length"
    assert gw.states()[killed_port] in ("ejected", "unhealthy")
    for _ in range(4):
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
    restarted = start_backend(ports=(doomed.grpc_port, doomed.http_port))
    gw.wait_state(restarted, "healthy", timeout=20)
    before = requests_served(restarted)
    rejoined = [SseStream(gw, f"rejoin-{i}", max_tokens=8) for i in range(6)]
    for s in rejoined:
        s.join(60)
        assert s.finish_reason() == "length"
    time.sleep(0.2)
    assert requests_served(restarted) > before, "the restarted replica gets no traffic"


def test_a_replica_started_after_the_gateway_takes_over_when_the_other_stops(
    start_backend: Callable[..., Service], start_gateway: Callable[..., Gateway]
) -> None:
    """A replica never in rotation joins at its first passed check (not after
    ``healthy_after`` of them: here 100), so the gateway can send it the requests of one that
    SIGTERM stopped (found by deploy/smoke: a 503 when the second replica had just started)."""
    first = start_backend()
    late_ports = (free_port(), free_port())
    gw = start_gateway(
        [first, SimpleNamespace(grpc_port=late_ports[0])],
        env={"LLM_GATEWAY_HEALTHY_AFTER": "100", "LLM_GATEWAY_UNHEALTHY_AFTER": "100"},
    )
    assert gw.states()[str(late_ports[0])] == "unhealthy"  # nothing listens there yet
    late = start_backend(ports=late_ports)
    gw.wait_state(late, "healthy", timeout=10)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(30) == 0
    assert gw.states()[str(first.grpc_port)] == "healthy"  # (the checks have not noticed)
    client = gw.client()
    for _ in range(4):  # each sent to the stopped replica is retried on the late one
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices


def test_keepalive_pings_and_disconnect_while_queued(
    start_backend: Callable[..., Service], start_gateway: Callable[..., Gateway]
) -> None:
    small = start_backend(env={"LLM_LLAMA_SERVICE_THREADS": "1"})
    gw = start_gateway([small], env={"LLM_GATEWAY_KEEPALIVE_INTERVAL": "0.3"})
    running = SseStream(gw, "holder", max_tokens=900)
    assert running.first.wait(30)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == ": ping"  # waiting for the only context: kept alive
        assert small.readyz()[1]["pool"]["waiting"] == 1
    end = time.monotonic() + 1
    while small.readyz()[1]["pool"]["waiting"]:
        assert time.monotonic() < end, "the abandoned request still waits for a context"
        time.sleep(0.02)
    end = time.monotonic() + 2  # (the gateway writes its log line in its own time)
    while "client went away" not in gw.log:
        assert time.monotonic() < end, "the gateway did not log the client's disconnect"
        time.sleep(0.02)


def test_an_overloaded_replica_is_retried_elsewhere_then_429(
    start_backend: Callable[..., Service],
    start_gateway: Callable[..., Gateway],
    certs: Certs,
) -> None:
    env = {"LLM_LLAMA_SERVICE_THREADS": "1", "LLM_MAX_QUEUE": "0"}
    a, b = start_backend(env=env), start_backend(env=env)
    gw = start_gateway([a, b])

    def hold(svc: Service) -> Client:
        """Take the replica's only context with a direct gRPC stream (unseen by the gateway)."""
        client = Client(f"127.0.0.1:{svc.grpc_port}", tls_ca=certs.ca, tls_cert=certs.client.cert,
                        tls_key=certs.client.key)  # fmt: skip
        stream = client.stream(COUNT, max_tokens=900, temperature=0)
        next(iter(stream))
        client.held = stream  # type: ignore[attr-defined]
        return client

    held = [hold(a)]
    try:
        client = gw.client()
        for _ in range(10):  # each one first sent to `a` is refused there, then served by `b`
            assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
        assert gw.metric("llm_gateway_retries_total", reason="overloaded") >= 1
        held.append(hold(b))
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert caught.value.code == "overloaded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
    finally:
        for c in held:
            c.close()


def test_rate_limits_per_key(gateway: Gateway, start_gateway: Callable[..., Gateway],
                             backends: list[Service], keys_file: Any) -> None:  # fmt: skip
    gw = start_gateway(
        backends,
        keys_file=keys_file,
        env={"LLM_GATEWAY_RATE_LIMIT_RPM": "2", "LLM_GATEWAY_RATE_LIMIT_TPM": "60"},
    )
    first = gw.client(KEY)
    for _ in range(2):
        first.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        first.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert caught.value.code == "rate_limit_exceeded"
    assert "2 requests per minute" in caught.value.message
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 30
    # The other key has its own allowance; a long answer uses up its tokens.
    second = gw.client(HASHED_KEY)
    second.completions.create(model=MODEL, prompt=COUNT, max_tokens=64, temperature=0)
    with pytest.raises(openai.RateLimitError) as caught:
        second.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert "60 tokens per minute" in caught.value.message
    assert gw.metric("llm_gateway_rate_limited_total") == 2


def test_sigterm_lets_open_streams_finish_then_exits_0(
    backends: list[Service], start_gateway: Callable[..., Gateway]
) -> None:
    gw = start_gateway(backends)
    stream = SseStream(gw, "drained", max_tokens=200)
    assert stream.first.wait(30)
    gw.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connection once draining
        httpx.get(gw.url + "/healthz", timeout=2)
    stream.join(60)
    assert stream.finish_reason() == "length" and stream.events[-1] == "data: [DONE]"
    assert gw.process.wait(30) == 0
    assert "SIGTERM: finishing open requests" in gw.log
