"""The servicer on the fake backend, over a real (plaintext, in-process) gRPC socket."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.engine.batching import BatchEntry
from llm_service.engine.fake import FakeBatchDecoder, FakeContext
from llm_service.errors import EngineError
from llm_service.server import Phase, convert
from tests.harness.fixtures import Rig
from tests.harness.service import greedy, read_rest, run_stream


async def test_engine_failure_after_start_ends_the_stream_with_unavailable(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.backend.enqueue("abcdef")
    calls = 0

    if rig.backend.decoder is None:
        real_decode = FakeContext.decode

        def failing_decode(self: FakeContext, token: int, sampler: object) -> int:
            nonlocal calls
            calls += 1
            if calls > 3:
                raise EngineError("llama_decode failed with status -3")
            return real_decode(self, token, sampler)  # type: ignore[arg-type]

        monkeypatch.setattr(FakeContext, "decode", failing_decode)
    else:
        real_step = FakeBatchDecoder.decode

        def failing_step(
            self: FakeBatchDecoder, entries: list[BatchEntry], should_abort: Any = None
        ) -> None:
            nonlocal calls
            calls += 1
            if calls > 3:
                raise EngineError("llama_decode failed with status -3")
            real_step(self, entries, should_abort)

        monkeypatch.setattr(FakeBatchDecoder, "decode", failing_step)
    call = rig.stub.Generate(pb.GenerateRequest(prompt="x"))
    assert (await call.read()).HasField("started")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_rest(call)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "llama_decode failed" in (info.value.details() or "")
    assert rig.state.engine is not None and rig.state.engine.pool_state().free == 2


async def test_a_bug_in_the_servicer_is_internal_with_a_generic_message(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(event: object) -> pb.GenerateResponse:
        raise KeyError("do not show this")

    monkeypatch.setattr(convert, "event_message", broken)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_stream(rig.stub, pb.GenerateRequest(prompt="x"))
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert "do not show" not in (info.value.details() or "")
    monkeypatch.undo()
    rig.backend.enqueue("ok")
    assert (await run_stream(rig.stub, pb.GenerateRequest(prompt="x")))[-1].done.text == "ok"


async def test_client_cancel_stops_generation_and_is_counted(rig: Rig) -> None:
    rig.backend.token_delay_s = 0.01
    rig.backend.enqueue("x" * 500)
    call = rig.stub.Generate(greedy("x", 500))
    for _ in range(4):
        await call.read()
    call.cancel()
    engine = rig.state.engine
    assert engine is not None
    assert await rig.servicer.wait_idle(1)
    await engine.pool.wait_idle()
    assert engine.pool_state().free == 2
    assert rig.metrics.cancelled._value.get() == 1
    # Stopped within a few tokens of the cancel: most of the scripted reply was never sampled.
    assert len(rig.backend.samplers[-1].script) > 450


async def test_loading_and_draining_refuse_with_unavailable(rig: Rig) -> None:
    engine, rig.state.engine, rig.state.phase = rig.state.engine, None, Phase.LOADING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_stream(rig.stub, pb.GenerateRequest(prompt="x"))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "loading" in (info.value.details() or "")
    status = await rig.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert status.state == pb.SERVING_STATE_LOADING and not status.HasField("pool")

    rig.state.engine, rig.state.phase = engine, Phase.DRAINING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.stub.Tokenize(pb.TokenizeRequest(text="x"))
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    info = await rig.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.pool_size == 2
    assert (
        info.pool_mode
        == {"contexts": pb.POOL_MODE_CONTEXTS, "batched": pb.POOL_MODE_BATCHED}[
            rig.backend.pool_mode
        ]
    )


async def test_cancel_all_ends_running_streams_with_unavailable(rig: Rig) -> None:
    rig.backend.token_delay_s = 0.01
    rig.backend.enqueue("y" * 500)
    call = rig.stub.Generate(greedy("x", 500))
    assert (await call.read()).HasField("started")
    assert await rig.servicer.wait_idle(0.05) is False
    assert await rig.servicer.cancel_all() == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_rest(call)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await rig.servicer.wait_idle(1) is True
