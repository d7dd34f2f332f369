"""Retries: only UNAVAILABLE and RESOURCE_EXHAUSTED, only before the first token, within the
deadline, backing off; and what a client refuses to send.

A scripted llm.v1 server runs in-process on a real socket, so each case is exact: the script
says what every attempt gets, and the server counts the attempts and their times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from llm_service import errors
from llm_service.api.v1 import llm_pb2 as pb
from llm_service.api.v1 import llm_pb2_grpc
from llm_service.client import AsyncClient, FinishReason

STARTED = pb.GenerateResponse(started=pb.Started(request_id="x", prompt_tokens=1))
DELTA = pb.GenerateResponse(delta=pb.Delta(token_ids=[7], text="hi"))
DONE = pb.GenerateResponse(
    done=pb.Done(
        finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(completion_tokens=1), text="hi"
    )
)
REFUSALS = {
    "unavailable": (grpc.StatusCode.UNAVAILABLE, "engine restarting", "unavailable"),
    "busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "overloaded"),
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty", "invalid_request"),
}


class Scripted(llm_pb2_grpc.InferenceServicer):
    """Answers attempt k with script[k]: a refusal, ``token-then-fail``, or ``ok``."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.retry_after_ms = 10
        self.attempts = 0
        self.times: list[float] = []
        self.request_ids: list[str] = []
        self.requests: list[pb.GenerateRequest] = []

    async def _attempt(self, context: Any) -> str:
        step = self.script[self.attempts]
        self.attempts += 1
        self.times.append(time.monotonic())
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if step in REFUSALS:
            code, message, kind = REFUSALS[step]
            metadata = (
                ("llm-error", kind),
                ("llm-field", "prompt"),
                ("retry-after-ms", str(self.retry_after_ms)),
            )
            await context.abort(code, message, metadata)
        return step

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:  # type: ignore[override]
        await self._attempt(context)
        return pb.ModelInfo(name="scripted", pool_size=1)

    async def Generate(  # type: ignore[override]
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        step = await self._attempt(context)
        yield STARTED
        if step == "slow":
            for _ in range(200):
                yield DELTA
                await asyncio.sleep(0.02)
        yield DELTA
        if step == "token-then-fail":
            failed = (("llm-error", "engine"),)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine failed", failed)
        yield DONE


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, AsyncClient]]:
    servicer = Scripted([])
    server = grpc.aio.server()
    llm_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with AsyncClient(f"127.0.0.1:{port}", insecure=True, max_retries=3) as client:
        yield servicer, client
    await server.stop(None)


async def test_refusals_before_the_first_token_are_retried(
    scripted: tuple[Scripted, AsyncClient],
) -> None:
    server, client = scripted
    server.script = ["unavailable", "busy", "ok"]
    done = await client.generate("Hi")
    assert (done.text, done.finish_reason) == ("hi", FinishReason.STOP)
    assert server.attempts == 3
    assert len(set(server.request_ids)) == 1  # one request, under one id, in every attempt


async def test_a_failure_after_the_first_token_is_never_retried(
    scripted: tuple[Scripted, AsyncClient],
) -> None:
    server, client = scripted
    server.script = ["token-then-fail", "ok"]
    chunks = []
    with pytest.raises(errors.EngineError) as info:
        async for chunk in client.stream("Hi"):
            chunks.append(chunk)
    assert [c.text for c in chunks] == ["hi"]
    assert server.attempts == 1
    assert info.value.status == "UNAVAILABLE" and info.value.request_id == server.request_ids[0]


async def test_retries_are_bounded(scripted: tuple[Scripted, AsyncClient]) -> None:
    server, client = scripted
    server.script = ["busy"] * 10
    with pytest.raises(errors.OverloadedError):
        await client.generate("Hi")
    assert server.attempts == 4  # the first attempt and 3 retries


async def test_other_errors_are_not_retried(scripted: tuple[Scripted, AsyncClient]) -> None:
    server, client = scripted
    server.script = ["invalid", "ok"]
    with pytest.raises(errors.InvalidRequestError) as info:
        await client.generate("Hi")
    assert info.value.field == "prompt"
    assert server.attempts == 1


async def test_unary_calls_are_retried_too(scripted: tuple[Scripted, AsyncClient]) -> None:
    server, client = scripted
    server.script = ["unavailable", "ok"]
    assert (await client.model_info()).name == "scripted"
    assert server.attempts == 2


async def test_back_off_grows_and_honours_the_retry_hint(
    scripted: tuple[Scripted, AsyncClient],
) -> None:
    server, client = scripted
    server.script = ["unavailable", "unavailable", "unavailable", "ok"]
    await client.generate("Hi")
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    # 0.1 s doubling, jittered x0.5..x1.5: [0.05, 0.15], [0.1, 0.3], [0.2, 0.6] (+ slack).
    for gap, low in zip(gaps, (0.05, 0.1, 0.2), strict=True):
        assert low <= gap <= 3 * low + 0.1, gaps
    server.script, server.attempts, server.times = ["busy", "busy", "ok"], 0, []
    server.retry_after_ms = 300
    await client.generate("Hi")
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert all(gap >= 0.3 for gap in gaps), gaps  # never sooner than the service asked


async def test_retries_stop_at_the_deadline(scripted: tuple[Scripted, AsyncClient]) -> None:
    server, client = scripted
    client.max_retries = 50
    server.script = ["unavailable"] * 100
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError):
        await client.generate("Hi", timeout=1.0)
    assert time.monotonic() - started < 1.2
    assert 3 <= server.attempts < 20


async def test_closing_a_stream_from_another_task_ends_the_reader_quietly(
    scripted: tuple[Scripted, AsyncClient],
) -> None:
    server, client = scripted
    server.script = ["slow"]
    stream = client.stream("Hi")
    received = []

    async def read() -> None:
        async for chunk in stream:
            received.append(chunk)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.2)
    await stream.aclose()
    await asyncio.wait_for(reader, 5)  # ends, without a CancelledError it did not ask for
    assert 0 < len(received) < 200 and stream.completion is None


def test_values_protobuf_cannot_carry_are_named_before_sending() -> None:
    client = AsyncClient("127.0.0.1:1", insecure=True)
    with pytest.raises(errors.InvalidRequestError) as big:
        client.stream("Hi", max_tokens=2**40)
    assert big.value.field == "sampling.max_tokens"
    with pytest.raises(errors.InvalidRequestError) as text:
        client.stream("bad \udcff surrogate")
    assert text.value.field == "prompt"
    with pytest.raises(errors.InvalidRequestError) as role:
        client.stream([("user", "ok"), ("user", "\udcff")])
    assert role.value.field == "messages[1]"
    with pytest.raises(TypeError, match=r"unknown sampling option.*max_tokenz"):
        client.stream("Hi", max_tokenz=3)  # type: ignore[call-arg]


async def test_a_single_stop_string_is_one_string(scripted: tuple[Scripted, AsyncClient]) -> None:
    server, client = scripted
    server.script = ["ok"]
    await client.generate("Hi", stop="END")
    assert list(server.requests[0].sampling.stop) == ["END"]
