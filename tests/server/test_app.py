"""The service lifecycle in-process, on the fake backend: loading, serving, draining, exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.api.v1 import llm_pb2_grpc
from llm_service.engine import FakeBackend
from llm_service.errors import ConfigurationError
from llm_service.server import SERVICE_NAME, app
from llm_service.settings import ServiceSettings
from tests.harness.service import free_port, greedy, run_stream


def serve_in_process(
    monkeypatch: pytest.MonkeyPatch,
    load: Callable[[ServiceSettings], FakeBackend],
    **settings: Any,
) -> tuple[asyncio.Task[int], int, int]:
    """``app.serve`` as a task, plaintext on free ports, loading with ``load``.

    Returns:
        The task (its result is the exit code), the gRPC port and the HTTP port.
    """
    monkeypatch.setattr(app, "load_backend", load)
    grpc_port, http_port = free_port(), free_port()
    config = ServiceSettings(
        insecure=True,
        grpc_addr=f"127.0.0.1:{grpc_port}",
        http_addr=f"127.0.0.1:{http_port}",
        **settings,
    )
    return asyncio.create_task(app.serve(config)), grpc_port, http_port


async def health_of(channel: grpc.aio.Channel) -> set[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {
        (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
        for name in ("", SERVICE_NAME)
    }


async def readyz(http: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, (await response.json())["status"]


@pytest.fixture(autouse=True)
def no_llm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings here come from the test alone, not from the developer's LLM_* variables."""
    for name in os.environ:
        if name.startswith("LLM_"):
            monkeypatch.delenv(name)


async def test_not_serving_while_loading_then_serving_then_drained_on_sigterm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = threading.Event()

    def slow_load(settings: ServiceSettings) -> FakeBackend:
        loaded.wait(30)
        return FakeBackend()

    serving, grpc_port, http_port = serve_in_process(
        monkeypatch, slow_load, llama_service_threads=1
    )
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        async with asyncio.timeout(10):
            while True:  # until the ports are open
                assert not serving.done(), serving.result()
                try:
                    status = await readyz(http, http_port)
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
        assert status == (503, "loading")
        assert await health_of(channel) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        stub = llm_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_stream(stub, greedy("x", 1))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        status_reply = await stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status_reply.state == pb.SERVING_STATE_LOADING

        loaded.set()
        async with asyncio.timeout(10):
            while (await readyz(http, http_port))[0] != 200:
                await asyncio.sleep(0.02)
        assert await health_of(channel) == {health_pb2.HealthCheckResponse.SERVING}
        assert (await run_stream(stub, greedy("x", 1)))[-1].HasField("done")

        os.kill(os.getpid(), signal.SIGHUP)  # plaintext: nothing to re-read, and no harm done
        await asyncio.sleep(0.1)
        assert (await run_stream(stub, greedy("x", 1)))[-1].HasField("done")

        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 10) == 0


async def test_configuration_errors_come_before_anything_starts() -> None:
    with pytest.raises(ConfigurationError, match="--insecure"):
        await app.serve(ServiceSettings())
    with pytest.raises(ConfigurationError, match="--http-addr"):
        await app.serve(ServiceSettings(insecure=True, http_addr="localhost"))


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:50051", ("::1", 50051)),
     ("0.0.0.0:0", ("0.0.0.0", 0))],
)  # fmt: skip
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert app.parse_address(address, "--x") == expected


@pytest.mark.parametrize("address", ["", "host", ":80", "host:", "host:http", "host:70000"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ConfigurationError, match="--x: expected HOST:PORT"):
        app.parse_address(address, "--x")


async def test_sigterm_while_loading_never_turns_ready_and_frees_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = threading.Event()
    backend = FakeBackend()

    def slow_load(settings: ServiceSettings) -> FakeBackend:
        loaded.wait(30)
        return backend

    serving, grpc_port, _ = serve_in_process(monkeypatch, slow_load)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = llm_pb2_grpc.InferenceStub(channel)
        status = await stub.GetServerStatus(pb.GetServerStatusRequest(), wait_for_ready=True)
        assert status.state == pb.SERVING_STATE_LOADING
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.1)
        status = await stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status.state == pb.SERVING_STATE_DRAINING
        loaded.set()
        assert await asyncio.wait_for(serving, 10) == 0
    assert backend.closed and backend.contexts == []


async def test_unparsable_requests_are_invalid_argument_and_harmless(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serving, grpc_port, _ = serve_in_process(monkeypatch, lambda settings: FakeBackend())
    raw = {"serializer": lambda b: b, "deserializer": lambda b: b}
    bad_utf8 = bytes([0x0A, 3, 0xFF, 0xFE, 0x41])  # field 1 (a string), invalid UTF-8
    truncated = bytes([0x0A, 50, 0x41])  # field 1 says 50 bytes, has 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = llm_pb2_grpc.InferenceStub(channel)
        await stub.GetServerStatus(pb.GetServerStatusRequest(), wait_for_ready=True)
        generate = channel.unary_stream(
            "/llm.v1.Inference/Generate",
            request_serializer=raw["serializer"],
            response_deserializer=raw["deserializer"],
        )
        tokenize = channel.unary_unary(
            "/llm.v1.Inference/Tokenize",
            request_serializer=raw["serializer"],
            response_deserializer=raw["deserializer"],
        )
        for data in (bad_utf8, truncated):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in generate(data)]
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "request: not a valid request for /llm.v1.Inference/Generate" in str(
                info.value.details()
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await tokenize(data)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        status = await stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status.pool.free == status.pool.size
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 10) == 0


class _SchedulerBug(BaseException):
    """What no step catches: the batch scheduler's thread dies of it (a test hook for a bug)."""


async def test_a_failed_engine_turns_health_red_then_the_service_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = FakeBackend(pool_mode="batched", slots=2)
    serving, grpc_port, http_port = serve_in_process(
        monkeypatch, lambda settings: backend, llama_service_threads=2, failure_exit_after=1.0
    )
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        async with asyncio.timeout(10):
            while True:
                assert not serving.done(), serving.result()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    if (await readyz(http, http_port))[0] == 200:
                        break
                await asyncio.sleep(0.02)
        stub = llm_pb2_grpc.InferenceStub(channel)
        assert (await run_stream(stub, greedy("x", 1)))[-1].HasField("done")

        def crash(*args: object) -> None:
            raise _SchedulerBug("boom")

        assert backend.decoder is not None
        backend.decoder.decode = crash  # type: ignore[method-assign]
        with contextlib.suppress(grpc.aio.AioRpcError):  # the request it died under fails
            await run_stream(stub, greedy("x", 4))
        async with asyncio.timeout(5):
            while (await readyz(http, http_port))[0] != 503:
                await asyncio.sleep(0.05)
        async with http.get(f"http://127.0.0.1:{http_port}/readyz") as response:
            body = await response.json()
        assert body["status"] == "failed" and body["ready"] is False
        assert body["reason"] == "the batch scheduler failed: _SchedulerBug('boom')"
        assert await health_of(channel) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        status = await stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status.state == pb.SERVING_STATE_FAILED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_stream(stub, greedy("x", 1))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "the server's engine failed (the batch scheduler failed" in str(info.value.details())
        async with http.get(f"http://127.0.0.1:{http_port}/metrics") as response:
            assert "llm_engine_failed 1.0" in await response.text()
        # Then it stops by itself, with the status a supervisor restarts it for.
        assert await asyncio.wait_for(serving, 10) == 1
    assert backend.closed
