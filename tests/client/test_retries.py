"""Retries: only UNAVAILABLE and RESOURCE_EXHAUSTED, only before the first token.

A scripted llm.v1 server runs in-process on a real socket, so each case is exact: the script
says what every attempt gets, and the server counts the attempts.
"""

from __future__ import annotations

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
        self.attempts = 0
        self.request_ids: list[str] = []

    async def Generate(  # type: ignore[override]
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        step = self.script[self.attempts]
        self.attempts += 1
        self.request_ids.append(dict(context.invocation_metadata())["x-request-id"])
        if step in REFUSALS:
            code, message, kind = REFUSALS[step]
            metadata = (("llm-error", kind), ("llm-field", "prompt"), ("retry-after-ms", "10"))
            await context.abort(code, message, metadata)
        yield STARTED
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
