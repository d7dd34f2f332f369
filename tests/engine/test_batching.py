"""The batch scheduler on the fake backend's decoder: steps, chunks, aborts, failures, resets."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest

from llm_service.engine import (
    Engine,
    EngineConfig,
    FakeBackend,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Started,
    StepCounts,
    TokenDelta,
)
from llm_service.engine.backend import ContextResetError, DecodeFailures
from llm_service.engine.batching import BatchScheduler
from llm_service.engine.fake import FakeBatchDecoder
from llm_service.engine.generation import MAX_BACKLOG
from llm_service.errors import EngineError
from tests.support import collect, final


@pytest.fixture
async def batched() -> AsyncIterator[tuple[FakeBackend, FakeBatchDecoder, Engine]]:
    backend = FakeBackend(n_ctx=256, pool_mode="batched", slots=3, step_tokens=4, prefill_chunk=8)
    assert backend.decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=3, max_queue=4))
    yield backend, backend.decoder, engine
    await engine.aclose()
    assert backend.decoder.closed


def req(prompt: str, max_tokens: int, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
    )


async def test_a_long_prompt_goes_in_chunks_between_the_running_streams_steps(batched) -> None:  # type: ignore[no-untyped-def]
    """Prompt steps (4 tokens each: step_tokens) and the running stream's steps alternate: the
    stream waits for 8 prompt tokens (prefill_chunk) at most between two of its tokens; no step
    mixes the two."""
    backend, decoder, engine = batched
    backend.token_delay_s = 0.002
    backend.enqueue("a" * 200, "b" * 3)
    running = engine.generate(req("hi", 200))
    async with contextlib.aclosing(running) as stream:
        async for event in stream:
            if isinstance(event, TokenDelta):
                break  # the first stream is decoding
        first_long_step = len(decoder.steps)
        long = await collect(engine, req("x" * 39, 3))  # 40 prompt tokens with BOS
        assert final(long).text == "bbb"
        long_steps = decoder.steps[first_long_step:]
    long_slot = long[0].slot if isinstance(long[0], Started) else -1
    prefill = [e for step in long_steps for e in step if e.seq == long_slot and e.pos < 40]
    assert [(e.pos, len(e.tokens)) for e in prefill] == [(p, 4) for p in range(0, 40, 4)]
    assert [e.output for e in prefill] == [False] * 9 + [True]
    # From the prompt's first step to its last: P P S P P S ... (P: 4 prompt tokens alone,
    # S: the stream's token alone).
    start = next(i for i, step in enumerate(long_steps) if step[0] is prefill[0])
    end = next(i for i, step in enumerate(long_steps) if step[0] is prefill[-1])
    kinds = ["P" if step[0].seq == long_slot else "S" for step in long_steps[start : end + 1]]
    assert "".join(kinds) == "PPSPPSPPSPPSPP"
    for step in long_steps:  # a prompt step holds nothing else
        assert not any(e in prefill for e in step) or len(step) == 1


async def test_prompts_admitted_together_share_the_chunk_in_order_of_arrival(batched) -> None:  # type: ignore[no-untyped-def]
    backend, decoder, engine = batched
    backend.token_delay_s = 0.01
    first, second = await asyncio.gather(
        collect(engine, req("a" * 5, 1)), collect(engine, req("b" * 5, 1))
    )
    slots = [e[0].slot for e in (first, second) if isinstance(e[0], Started)]
    prompt_steps = [[(e.seq, len(e.tokens)) for e in step] for step in decoder.steps]
    # 6 tokens each (BOS + 5), 4 a step: the first prompt's tokens go first. Its one token
    # (max_tokens is 1) is never evaluated: nothing is computed ahead of what a request needs.
    assert prompt_steps[:3] == [[(slots[0], 4)], [(slots[0], 2), (slots[1], 2)], [(slots[1], 4)]]
    # Entries are in sequence order within a step (llama.cpp needs consecutive runs).
    for step in decoder.steps:
        assert [e.seq for e in step] == sorted(e.seq for e in step)


async def test_the_step_counts_are_the_steps_the_decoder_evaluated(batched) -> None:  # type: ignore[no-untyped-def]
    _, decoder, engine = batched
    assert engine.step_counts() == {
        "prompt": StepCounts(0, 0, 0.0),
        "decode": StepCounts(0, 0, 0.0),
    }
    await asyncio.gather(collect(engine, req("x" * 9, 5)), collect(engine, req("y" * 2, 7)))
    counts = engine.step_counts()
    assert counts["prompt"].steps + counts["decode"].steps == len(decoder.steps)
    tokens = sum(len(entry.tokens) for step in decoder.steps for entry in step)
    assert counts["prompt"].tokens + counts["decode"].tokens == tokens
    assert counts["prompt"].tokens == 10 + 3  # with BOS
    assert counts["prompt"].steps >= 4  # 4 tokens a step
    assert counts["decode"].tokens == (5 - 1) + (7 - 1)  # every token but the first (sampled
    assert counts["decode"].steps >= 6  # after the prompt), a stream's token a step
    assert counts["prompt"].seconds > 0 and counts["decode"].seconds > 0
    assert FakeBackend().step_counts() == {}  # contexts mode: no batch


async def test_cancelling_a_prefill_stops_it_between_chunks(batched) -> None:  # type: ignore[no-untyped-def]
    backend, decoder, engine = batched
    backend.prefill_delay_s = 0.01  # 4 tokens a step: 40 ms a step, 2 s for the whole prompt
    task = asyncio.create_task(collect(engine, req("p" * 199, 1)))
    async with asyncio.timeout(2):
        while len(decoder.steps) < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(engine.pool.wait_idle(), 1)
    assert len(decoder.steps) < 10
    assert decoder.kv == [[], [], []]
    assert engine.pool_state().free == 3


async def test_a_failed_decode_fails_the_requests_of_its_step_and_nothing_else(batched) -> None:  # type: ignore[no-untyped-def]
    backend, decoder, engine = batched
    backend.token_delay_s = 0.005
    backend.enqueue("a" * 100, "b" * 100)
    streams = [engine.generate(req("one", 100)), engine.generate(req("two", 100))]
    for stream in streams:
        while not isinstance(await anext(stream), TokenDelta):
            pass
    backend.fail_decodes = 1
    ends = []
    for stream in streams:
        async with contextlib.aclosing(stream):
            ends.append([e async for e in stream][-1])
    for end in ends:
        assert isinstance(end, Finished) and end.finish_reason is FinishReason.ERROR
        assert end.error == "fake llama_decode failed"
        assert 0 < end.usage.completion_tokens < 100
    await engine.pool.wait_idle()
    state = engine.pool_state()
    assert (state.free, state.replaced) == (3, 0)
    backend.enqueue("fine")
    assert final(await collect(engine, req("again", 10))).text == "fine"
    assert decoder.kv == [[], [], []]


async def test_a_slot_is_cleared_once_as_its_request_ends(batched) -> None:  # type: ignore[no-untyped-def]
    """The scheduler clears and verifies the sequence in the step the request ends in; the
    pool's reset then finds it done instead of waiting for the scheduler again."""
    backend, decoder, engine = batched
    scheduler = backend.scheduler
    assert scheduler is not None
    await engine.pool.wait_idle()
    queued = []  # the resets the pool had to queue for the scheduler thread
    real_clear = scheduler._clear
    scheduler._clear = lambda slot, future: (queued.append(slot.index), real_clear(slot, future))  # type: ignore[method-assign]
    before = backend.resets
    events = await collect(engine, req("hi", 2))
    await engine.pool.wait_idle()
    slot = events[0].slot if isinstance(events[0], Started) else -1
    assert backend.resets == before + 1 and decoder.kv[slot] == []
    assert queued == []


async def test_a_slot_that_fails_its_reset_is_made_again_on_its_sequence(batched) -> None:  # type: ignore[no-untyped-def]
    backend, decoder, engine = batched
    backend.fail_resets = 2  # the scheduler's clear as the request ends, then the pool's
    events = await collect(engine, req("hi", 2))
    slot = events[0].slot if isinstance(events[0], Started) else -1
    await engine.pool.wait_idle()
    assert engine.pool_state().replaced == 1 and engine.pool_state().free == 3
    # The replacement cleared the sequence before it joined the pool.
    assert decoder.kv[slot] == []
    backend.enqueue("ok")
    assert final(await collect(engine, req("hi", 2))).text == "ok"


async def test_a_slot_lives_once_and_not_after_close() -> None:
    backend = FakeBackend(pool_mode="batched", slots=2)
    scheduler = backend.scheduler
    assert scheduler is not None
    slot = await asyncio.to_thread(scheduler.create_slot, 1)
    with pytest.raises(EngineError, match="in use"):
        scheduler.create_slot(1)
    with pytest.raises(EngineError, match="does not exist"):
        scheduler.create_slot(2)
    slot.close()
    with pytest.raises(EngineError, match="closed"):
        slot.reset()
    again = await asyncio.to_thread(scheduler.create_slot, 1)
    backend.close()
    with pytest.raises(EngineError, match="shutting down"):
        again.reset()


async def test_requests_running_when_the_scheduler_stops_finish_instead_of_hanging() -> None:
    backend = FakeBackend(pool_mode="batched", slots=2, prefill_delay_s=0.05)
    engine = await Engine.start(backend, EngineConfig(pool_size=2))
    scheduler = backend.scheduler
    assert scheduler is not None
    task = asyncio.create_task(collect(engine, req("p" * 63, 4)))  # 64 tokens: 3.2 s
    await asyncio.sleep(0.1)
    await asyncio.to_thread(scheduler.close)
    end = final(await asyncio.wait_for(task, 2))
    assert end.finish_reason is FinishReason.ERROR and end.error == "the engine is shutting down"
    assert backend.samplers[-1].closed and backend.misuse == []
    with pytest.raises(EngineError, match="shutting down"):
        scheduler.create_slot(0)


async def test_a_bug_in_the_scheduler_fails_every_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend(pool_mode="batched", slots=1)
    engine = await Engine.start(backend, EngineConfig(pool_size=1))

    def broken(self: BatchScheduler) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(BatchScheduler, "_step", broken)
    done = await asyncio.wait_for(collect(engine, req("hi", 5)), 2)
    assert final(done).finish_reason is FinishReason.ERROR
    assert "the batch scheduler failed" in (final(done).error or "")
    # The slot could not be cleared either: the pool knows it lost it, nothing hangs.
    await asyncio.wait_for(engine.pool.wait_idle(), 2)
    assert engine.pool_state().size == 0
    with pytest.raises(EngineError, match="broken"):
        await collect(engine, req("hi", 5))
    await engine.aclose()


def test_a_reset_failure_is_a_context_reset_error() -> None:
    backend = FakeBackend(pool_mode="batched", slots=1)
    assert backend.scheduler is not None
    slot = backend.scheduler.create_slot(0)
    backend.fail_resets = 1
    with pytest.raises(ContextResetError, match="refused to clear"):
        slot.reset()
    slot.reset()
    backend.close()


async def test_each_token_is_evaluated_once_in_order_and_nothing_past_the_end() -> None:
    backend = FakeBackend(pool_mode="batched", slots=1, prefill_chunk=8)
    decoder = backend.decoder
    assert decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=1))
    try:
        backend.enqueue("abc")
        first = len(decoder.steps)
        done = await collect(engine, req("hi", 3))
        prompt = backend.tokenize("hi", add_special=True, parse_special=False)
        evaluated = [t for step in decoder.steps[first:] for e in step for t in e.tokens]
        # The prompt, then each sampled token but the last (max_tokens reached: not evaluated).
        assert evaluated == [*prompt, ord("a"), ord("b")]
        assert final(done).text == "abc"
    finally:
        await engine.aclose()


async def test_no_thread_runs_per_request_and_each_step_reaches_the_loop_at_once() -> None:
    """8 streams on the scheduler: while they run, no thread but the engine's fixed ones is
    alive; every stream gets its tokens in order; the event loop is called once per step,
    however many streams the step served."""
    backend = FakeBackend(pool_mode="batched", slots=8, token_delay_s=0.002)
    decoder = backend.decoder
    assert decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=8))
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        if threading.current_thread().name == "llm-batch":
            calls += 1
        return original(*args, **kwargs)

    try:
        await engine.pool.wait_idle()
        before = {t.name for t in threading.enumerate()}
        replies = [f"{i}" + "abcdefghij" * 4 for i in range(8)]
        backend.enqueue(*replies)
        streams = [engine.generate(req(f"p{i}", 100)) for i in range(8)]
        texts = [""] * 8
        names: set[str] = set()
        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        first_step = len(decoder.steps)
        for round_ in range(41):
            for i, stream in enumerate(streams):
                event = await anext(stream)
                while not isinstance(event, TokenDelta):
                    event = await anext(stream)
                texts[i] += event.text
            if round_ == 20:
                names = {t.name for t in threading.enumerate()}
        for stream in streams:
            await stream.aclose()
        steps = len(decoder.steps) - first_step
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        assert texts == replies
        # New since the engine started: only threads of the executor that tokenizes requests
        # before they are admitted (4 at most, idle by now), none that runs one.
        assert all(name.startswith("llm-prepare_") for name in names - before), names - before
        assert "llm-batch" in names
        assert calls <= steps + 8  # one per step (plus each stream's last, as it stops)
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
        await engine.aclose()


async def test_a_consumer_that_stops_reading_holds_up_only_its_own_slot() -> None:
    """Its backlog is bounded: the scheduler pauses it and serves the others; when it reads
    again it goes on from where it was; closing it frees its slot."""
    backend = FakeBackend(pool_mode="batched", slots=2, token_delay_s=0.001)
    decoder = backend.decoder
    assert decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=2))
    try:
        await engine.pool.wait_idle()
        backend.enqueue("s" * 400, "r" * 300)
        stalled = engine.generate(req("stalled", 400))
        assert isinstance(await anext(stalled), Started)
        slot = 0 if decoder.kv[0] else 1
        done = await asyncio.wait_for(collect(engine, req("reader", 300)), 10)
        assert final(done).text == "r" * 300  # the other slot ran to its end meanwhile
        # The stalled stream went no further than its backlog allows (+ the token in flight).
        assert len(decoder.kv[slot]) - 8 <= MAX_BACKLOG + 1
        text = ""
        async for event in stalled:
            if isinstance(event, TokenDelta):
                text += event.text
        assert text == "s" * 400
    finally:
        await engine.aclose()


async def test_a_paused_request_is_still_cancelled_and_its_slot_freed() -> None:
    backend = FakeBackend(pool_mode="batched", slots=1, token_delay_s=0.001)
    engine = await Engine.start(backend, EngineConfig(pool_size=1))
    try:
        backend.enqueue("s" * 400)
        stalled = engine.generate(req("stalled", 400))
        await anext(stalled)
        await asyncio.sleep(0.3)  # it fills its backlog and pauses
        await stalled.aclose()
        await asyncio.wait_for(engine.pool.wait_idle(), 2)
        assert engine.pool_state().free == 1 and backend.samplers[-1].closed
        backend.enqueue("next")
        assert final(await collect(engine, req("next", 10))).text == "next"
    finally:
        await engine.aclose()


class _SchedulerBug(BaseException):
    """What no step catches: the scheduler thread dies of it (a test hook for a bug)."""


async def test_a_dead_scheduler_makes_the_engine_say_it_failed(batched) -> None:  # type: ignore[no-untyped-def]
    _, decoder, engine = batched
    assert engine.failure() is None

    def crash(*args: object) -> None:
        raise _SchedulerBug("boom")

    decoder.decode = crash  # type: ignore[method-assign]
    end = final(await collect(engine, req("hi", 4)))
    assert end.finish_reason is FinishReason.ERROR
    assert end.error == "the batch scheduler failed: _SchedulerBug('boom')"
    assert engine.failure() == "the batch scheduler failed: _SchedulerBug('boom')"


async def test_a_pool_whose_every_reset_fails_makes_the_engine_say_it_failed(batched) -> None:  # type: ignore[no-untyped-def]
    backend, _, engine = batched
    backend.fail_resets = 10**6  # the resets, and those of the replacements too
    for _ in range(3):  # one request on each slot: each slot is lost with its reset
        await collect(engine, req("hi", 2))
        await engine.pool.wait_idle()
        if engine.pool_state().size:
            assert engine.failure() is None
    assert engine.pool_state().size == 0
    assert engine.failure() == (
        "every context of the pool failed its reset and could not be replaced"
    )
    with pytest.raises(EngineError, match="every context of the pool is broken"):
        await collect(engine, req("hi", 2))


async def test_failing_step_after_step_makes_the_engine_say_it_failed(batched) -> None:  # type: ignore[no-untyped-def]
    backend, _, engine = batched
    backend.fail_decodes = 4
    for _ in range(4):
        assert final(await collect(engine, req("hi", 4))).finish_reason is FinishReason.ERROR
    assert engine.failure() is None  # four in a row: not yet
    backend.enqueue("ok")
    assert final(await collect(engine, req("hi", 4))).text == "ok"  # a success: count again
    backend.fail_decodes = 5
    for _ in range(5):
        await collect(engine, req("hi", 4))
    assert engine.failure() == (
        "llama.cpp failed 5 evaluations in a row, none succeeding in between; the last: fake"
        " llama_decode failed"
    )


async def test_one_failed_step_is_one_failure_however_many_requests_it_fails() -> None:
    backend = FakeBackend(pool_mode="batched", slots=6, token_delay_s=0.005)
    engine = await Engine.start(backend, EngineConfig(pool_size=6, max_queue=1))
    try:
        backend.enqueue(*["a" * 100] * 6)
        streams = [engine.generate(req(f"s{i}", 100)) for i in range(6)]
        for stream in streams:
            while not isinstance(await anext(stream), TokenDelta):
                pass
        backend.fail_decodes = 1
        failed = 0
        for stream in streams:
            async with contextlib.aclosing(stream):
                end = [e async for e in stream][-1]
            assert isinstance(end, Finished)
            failed += end.finish_reason is FinishReason.ERROR
        assert failed >= DecodeFailures.LIMIT  # as many requests as would have tripped it
        assert engine.failure() is None
    finally:
        await engine.aclose()


async def test_contexts_failing_decode_after_decode_make_the_engine_say_it_failed() -> None:
    backend = FakeBackend(pool_mode="contexts")
    engine = await Engine.start(backend, EngineConfig(pool_size=2, max_queue=1))
    try:
        backend.fail_decodes = 5
        for _ in range(5):
            assert engine.failure() is None
            end = final(await collect(engine, req("hi", 4)))
            assert end.finish_reason is FinishReason.ERROR and end.error_field is None
        assert engine.failure() == (
            "llama.cpp failed 5 evaluations in a row, none succeeding in between; the last:"
            " fake llama_decode failed"
        )
    finally:
        await engine.aclose()


async def test_a_prompt_takes_whole_steps_and_waits_for_the_streams_past_the_chunk() -> None:
    """Alone, a prompt goes step_tokens (32) a step; beside a decoding stream too, but the
    stream decodes a step after every prefill_chunk (48) prompt tokens."""
    backend = FakeBackend(n_ctx=256, pool_mode="batched", slots=2, step_tokens=32, prefill_chunk=48)
    assert backend.decoder is not None
    decoder = backend.decoder
    engine = await Engine.start(backend, EngineConfig(pool_size=2, max_queue=1))
    try:
        await engine.pool.wait_idle()  # (the slots' first resets)
        backend.enqueue("a", "r" * 100, "b")
        first = len(decoder.steps)
        alone = await collect(engine, req("x" * 79, 1))  # 80 prompt tokens with BOS
        slot = alone[0].slot if isinstance(alone[0], Started) else -1
        steps = [[(e.seq, e.pos, len(e.tokens)) for e in step] for step in decoder.steps[first:]]
        assert steps == [[(slot, 0, 32)], [(slot, 32, 32)], [(slot, 64, 16)]]

        backend.token_delay_s = 0.002
        async with contextlib.aclosing(engine.generate(req("hi", 100))) as running:
            async for event in running:
                if isinstance(event, Started):
                    stream_slot = event.slot
                if isinstance(event, TokenDelta):
                    break  # a stream is decoding
            first = len(decoder.steps)
            beside = await collect(engine, req("y" * 79, 1))  # 80 prompt tokens
        slot = beside[0].slot if isinstance(beside[0], Started) else -1
        steps = [[(e.seq, len(e.tokens)) for e in step] for step in decoder.steps[first:]]
        start = steps.index([(slot, 32)])
        # 32 + 16 prompt tokens (the chunk's 48), the stream's token, then the other 32.
        assert steps[start : start + 4] == [
            [(slot, 32)], [(slot, 16)], [(stream_slot, 1)], [(slot, 32)],
        ]  # fmt: skip
    finally:
        await engine.aclose()


async def test_a_bug_in_one_request_fails_that_request_not_the_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As in contexts mode: the request ends with an internal error, the other runs on."""
    backend = FakeBackend(pool_mode="batched", slots=2, token_delay_s=0.002)
    engine = await Engine.start(backend, EngineConfig(pool_size=2))
    try:
        real = backend.token_bytes

        def token_bytes(token: int) -> bytes:
            if token == ord("!"):
                raise RuntimeError("a bug")
            return real(token)

        monkeypatch.setattr(backend, "token_bytes", token_bytes)
        backend.enqueue("ab!cd", "x" * 40)
        bad, good = await asyncio.gather(
            collect(engine, req("bad", 10)), collect(engine, req("good", 40))
        )
        assert final(bad).finish_reason is FinishReason.ERROR
        assert final(bad).error == "internal engine error" and final(bad).text == "ab"
        assert final(good).text == "x" * 40
        assert engine.failure() is None
    finally:
        await engine.aclose()


async def test_a_paused_stream_does_not_interrupt_the_next_prompt() -> None:
    """A stream whose client stops reading waits on its client, not on the prompts: a prompt
    beside it goes as if alone, step_tokens a step, with no step for the stream between."""
    backend = FakeBackend(
        n_ctx=512, pool_mode="batched", slots=2, step_tokens=32, prefill_chunk=4,
        token_delay_s=0.001,
    )  # fmt: skip
    decoder = backend.decoder
    assert decoder is not None
    engine = await Engine.start(backend, EngineConfig(pool_size=2))
    try:
        backend.enqueue("s" * 400, "a")
        stalled = engine.generate(req("stalled", 400))
        try:
            await anext(stalled)
            # It fills its backlog and pauses: its prompt (8 tokens with BOS) and every token
            # it sampled but the last are in its sequence.
            async with asyncio.timeout(5):
                while len(decoder.kv[0]) < 8 + MAX_BACKLOG - 1:
                    await asyncio.sleep(0.01)
            first = len(decoder.steps)
            alone = await collect(engine, req("x" * 79, 1))  # 80 prompt tokens with BOS
            slot = alone[0].slot if isinstance(alone[0], Started) else -1
            prefill = [e for step in decoder.steps[first:] for e in step if e.seq == slot]
            assert [(e.pos, len(e.tokens)) for e in prefill] == [(0, 32), (32, 32), (64, 16)]
        finally:
            await stalled.aclose()
    finally:
        await engine.aclose()
