"""Slow and hostile clients against real processes: a stream never read, a disconnect during a
long prefill, and connections that open and send nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from llm_service.api.v1 import llm_pb2 as pb
from tests.harness.gateway import KEY, MODEL, Gateway, replica
from tests.harness.service import Certs, Service, greedy

pytestmark = pytest.mark.model

STORY = pb.GenerateRequest(
    chat=pb.Chat(
        messages=[pb.ChatMessage(role="user", content="Write a long story, in chapters.")]
    ),
    # A grammar that never lets the model end: the stream goes on to max_tokens.
    sampling=pb.SamplingParams(max_tokens=900, temperature=0, grammar='root ::= [a-z]+ " " root'),
)


def wait_free(svc: Service, timeout: float) -> float:
    """Seconds until no context of ``svc`` is leased (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while svc.metric("llm_pool_leased") != 0:
        assert time.monotonic() - start < timeout, f"a context is still leased:\n{svc.log}"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    model_path: Path,
) -> Iterator[Service]:
    """One context of 2048 tokens, a 2 s stall timeout."""
    svc = replica(
        tmp_path_factory.mktemp("slow"),
        certs,
        model_path,
        env={
            "LLM_STALL_TIMEOUT": "2",
            "LLM_LLAMA_SERVICE_THREADS": "1",
            "LLM_N_CTX": "2048",
            "LLM_N_THREADS": "2",
        },
    )
    try:
        yield svc.wait_ready()
    finally:
        assert svc.stop() == 0, svc.log


async def test_a_stream_never_read_is_cut_off_and_its_context_freed(service: Service) -> None:
    # A small HTTP/2 window (no growth), so that unread messages fill it after a few tokens.
    window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    assert service.certs is not None
    credentials = grpc.ssl_channel_credentials(
        service.certs.ca.read_bytes(),
        service.certs.client.key.read_bytes(),
        service.certs.client.cert.read_bytes(),
    )
    target = f"localhost:{service.grpc_port}"
    async with grpc.aio.secure_channel(target, credentials, options=window) as channel:
        call = service.stub(channel).Generate(STORY)
        await call.initial_metadata()
        while service.metric("llm_pool_leased") == 0:  # tokenized, then leased
            await asyncio.sleep(0.05)
        # Never read: the write the service waits on stalls, and after LLM_STALL_TIMEOUT (2 s)
        # it gives up on the client. Without that, the context stays leased for good.
        wait_free(service, timeout=120)
        assert "the client read nothing for 2 s (LLM_STALL_TIMEOUT)" in service.log
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() is grpc.StatusCode.CANCELLED
        assert "did not read the stream for 2 s" in (info.value.details() or "")
    assert service.metric("llm_requests_total", finish_reason="stalled") >= 1
    # The freed context serves the next request.
    async with service.channel() as channel:
        events = [e async for e in service.stub(channel).Generate(greedy("Hi", 3))]
    assert events[-1].HasField("done")


async def test_a_slow_reader_is_not_cut_off(service: Service) -> None:
    """A client that reads, slowly, keeps its stream: the timeout is per write, not per call."""
    async with service.channel() as channel:
        request = pb.GenerateRequest()
        request.CopyFrom(STORY)
        request.sampling.max_tokens = 40
        events = []
        async for event in service.stub(channel).Generate(request):
            events.append(event)
            await asyncio.sleep(0.1)  # 40 tokens over 4 s: longer than the 2 s stall timeout
    assert events[-1].HasField("done")


async def test_a_disconnect_during_a_long_prefill_stops_it(service: Service) -> None:
    prompt = " ".join(f"word{i}" for i in range(150))  # about 490 tokens
    async with service.channel() as channel:
        stub = service.stub(channel)
        # The whole prefill, as a yardstick.
        done = [e async for e in stub.Generate(greedy(prompt, 1))][-1].done
        full_prefill_ms = done.timings.prefill_ms
        assert done.usage.prompt_tokens > 400 and full_prefill_ms > 0
        # The same prompt again (the cache was cleared), the client gone 0.1 s into its prefill.
        call = stub.Generate(greedy(prompt + " again", 1))
        await call.initial_metadata()
        await asyncio.sleep(0.1)
        call.cancel()
        # A request behind it waits only for the prefill to notice, not for its end.
        after = [e async for e in stub.Generate(greedy("Hi", 1))]
    waited_ms = after[0].started.queue_wait_ms
    assert waited_ms < full_prefill_ms / 2, (waited_ms, full_prefill_ms, service.log[-3000:])
    assert "cancelled by the client" in service.log


def idle_connections(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if first_bytes:
            s.sendall(first_bytes)
        conns.append(s)
    return conns


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_connections_that_send_nothing_do_not_block_the_service(service: Service) -> None:
    grpc_idle = idle_connections(service.grpc_port, 200)
    http_idle = idle_connections(service.http_port, 100, b"GET /readyz HTTP/1.1\r\nHo")
    try:
        assert service.readyz()[0] == 200  # the HTTP port answers past its idle connections

        async def generate() -> pb.GenerateResponse:
            async with service.channel() as channel:
                return [e async for e in service.stub(channel).Generate(greedy("Hi", 3))][-1]

        assert asyncio.run(generate()).HasField("done")
    finally:
        for s in grpc_idle + http_idle:
            s.close()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    service: Service,
) -> Iterator[Gateway]:
    env = {"LLM_GATEWAY_HEADER_TIMEOUT": "2"}
    gw = Gateway(tmp_path_factory.mktemp("gateway"), certs, [service], env=env)
    try:
        yield gw.wait_ready(30)
    finally:
        assert gw.stop() == 0, gw.log


def test_connections_that_send_nothing_do_not_block_the_gateway(gateway: Gateway) -> None:
    silent = idle_connections(gateway.port, 200)
    partial = idle_connections(gateway.port, 50, b"POST /v1/chat/completions HTTP/1.1\r\nHost")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
        assert response.status_code in (200, 401), response.text
        # Connections that never finish a request are closed (LLM_GATEWAY_HEADER_TIMEOUT, 2 s).
        assert all(closed_by_peer(s, 10) for s in silent + partial)
    finally:
        for s in silent + partial:
            with contextlib.suppress(OSError):
                s.close()


def test_a_never_read_http_stream_frees_its_context(gateway: Gateway, service: Service) -> None:
    body = (
        b'{"model": "%s", "stream": true, "max_tokens": 200,'
        b' "messages": [{"role": "user", "content": "Write a long story, in chapters."}]}'
        % MODEL.encode()
    )
    s = socket.create_connection(("127.0.0.1", gateway.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(1)
        assert service.metric("llm_pool_leased") == 1
        # Never read: the context is freed when generation ends or when the service gives up
        # on writing (LLM_STALL_TIMEOUT), whichever comes first; not held for as long as the
        # connection stays open.
        wait_free(service, timeout=120)
    finally:
        s.close()
