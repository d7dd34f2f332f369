"""Batched mode: the pool's requests share one context, one sequence each, decoded together.

A ``BatchScheduler`` owns one thread, the only one that touches the shared context, and every
request running on it (its ``Generation``: sampler, text, limits, events). Each pool entry is a
``BatchSlot`` (sequence id = its index); ``start`` hands it a request and returns at once. Each
step, the scheduler thread:

1. finishes the requests that were cancelled or passed their deadline (the flag is set from
   the event loop; it is read here, between steps);
2. builds one batch: either prompt tokens of the requests being admitted, in order of arrival
   (up to ``step_tokens``), or the last sampled token of every decoding request; prompts go
   first, but the decoding streams wait for ``prefill_chunk`` prompt tokens at most between two
   of their tokens (``_plan``);
3. evaluates it with one decode;
4. samples every request that needs a token with its own sampler (the logits are valid only
   until the next step), and advances each request's text and finish state (``accept``);
5. hands every request's new events to the event loop at once (``deliver``: one
   ``call_soon_threadsafe`` per step).

So no thread runs per request, and a token crosses threads once, on its way to the event loop.
A request whose consumer stops reading pauses (``Generation.paused``) without holding up the
others. A failed decode fails the requests of its step (and only those) with EngineError;
resets (``llama_memory_seq_rm`` and the check that the sequence is empty) run between steps, on
the same thread. A step of prompts may be long: it stops as soon as every prompt in it is
cancelled (llama.cpp's abort callback).

This module knows nothing of llama.cpp: the model side is a ``BatchDecoder``
(``llm_service.engine.llama.LlamaBatchDecoder``, or the fake backend's).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from llm_service.engine.backend import (
    ContextResetError,
    DecodeFailures,
    GenerationAborted,
    NoTokenAllowed,
    Sampler,
)
from llm_service.engine.generation import Generation, deliver
from llm_service.errors import EngineError
from llm_service.log import plural
from llm_service.types import StepCounts

__all__ = ["BatchDecoder", "BatchEntry", "BatchScheduler", "BatchSlot"]

logger = logging.getLogger(__name__)

# With requests running but every one of them paused (their consumers not reading), how often
# the scheduler looks at their deadlines.
PAUSED_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """Consecutive tokens of one sequence in a step.

    Attributes:
        seq: the sequence (the slot's index).
        pos: position of the first token in its sequence.
        tokens: the tokens.
        output: whether the last token's logits are wanted, to sample from.
    """

    seq: int
    pos: int
    tokens: Sequence[int]
    output: bool


class BatchDecoder(Protocol):
    """The model side of batched mode: one context holding ``slots`` sequences.

    Only the scheduler thread calls it, one call at a time.
    """

    slots: int

    def decode(
        self, entries: Sequence[BatchEntry], should_abort: Callable[[], bool] | None = None
    ) -> None:
        """Evaluate one step; with ``should_abort``, stop early once it turns true.

        Raises:
            EngineError: the step failed (its sequences are then undefined).
            GenerationAborted: ``should_abort`` stopped it (its sequences are then undefined).
        """
        ...

    def sample(self, sampler: Sampler, index: int) -> int:
        """Sample with ``sampler`` from the logits of the last step's token number ``index``
        (counted over the step's entries in order)."""
        ...

    def clear(self, seq: int) -> None:
        """Remove every position of ``seq`` and verify none is left. Raises ContextResetError."""
        ...

    def close(self) -> None: ...


class _Running:
    """A request on its slot, as the scheduler thread sees it.

    Attributes:
        evaluated: prompt tokens evaluated so far.
        token: the last token sampled, to evaluate next (None while the prompt is evaluated).
        done: resolved once the scheduler is done with the request (its slot may be reset).
    """

    __slots__ = ("done", "evaluated", "generation", "slot", "token")

    def __init__(self, slot: BatchSlot, generation: Generation) -> None:
        self.slot = slot
        self.generation = generation
        self.evaluated = 0
        self.token: int | None = None
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()


class BatchSlot:
    """One sequence of the shared context: a pool entry, leased to one request at a time.

    Attributes:
        index: the slot's number, also its sequence id.
        n_past: tokens in the sequence (touched by the scheduler thread only).
        cleared: the scheduler cleared the sequence and verified it empty as its last request
            ended, and nothing ran on it since (under the scheduler's lock).
    """

    def __init__(self, scheduler: BatchScheduler, index: int) -> None:
        self.index = index
        self.n_past = 0
        self.closed = False
        self.cleared = False
        self._scheduler = scheduler

    def start(self, generation: Generation) -> concurrent.futures.Future[None]:
        """Run ``generation`` on this slot; the future is done once the scheduler is done
        with it. Raises EngineError (the scheduler stopped, or the slot is closed)."""
        if not generation.prompt_tokens:
            raise EngineError("an empty prompt cannot be evaluated")
        return self._scheduler._start(self, generation)

    def reset(self) -> None:
        """Clear the slot's sequence (between two steps) and verify it is empty; at once if
        the scheduler did as the last request ended."""
        self._scheduler._reset(self)

    def close(self) -> None:
        """Give the sequence up; a new slot can then be made on it (its native memory stays)."""
        self._scheduler._release(self)


class BatchScheduler:
    """Drives one shared context for ``decoder.slots`` slots from one thread.

    Args:
        decoder: the model side (owned: closed by ``close``).
        step_tokens: prompt tokens one step evaluates at most (llama.cpp's batch size).
        prefill_chunk: prompt tokens the decoding streams wait for at most between two of their
            tokens (see ``_plan``).
    """

    def __init__(self, decoder: BatchDecoder, *, step_tokens: int, prefill_chunk: int) -> None:
        if step_tokens < 1 or prefill_chunk < 1:
            raise ValueError("step_tokens and prefill_chunk must be at least 1")
        self.slots = decoder.slots
        self._decoder = decoder
        self._step_tokens = step_tokens
        self._prefill_chunk = prefill_chunk
        # Prompt tokens evaluated since the decoding streams' last step (the scheduler's own).
        self._held = 0
        self._lock = threading.Condition()
        # Handed over by other threads, taken by the scheduler thread between steps.
        self._arrivals: list[_Running] = []
        self._resets: list[tuple[BatchSlot, concurrent.futures.Future[None]]] = []
        self._live: dict[int, BatchSlot] = {}
        self._closing = False
        self._closed = False
        self._stopped: str | None = None  # why the thread ended: what comes now fails
        self._died: str | None = None  # why the thread died, if a bug (not close) ended it
        # The scheduler thread's own: the requests on their slots, in order of arrival.
        self._running: dict[int, _Running] = {}
        self._decode_failures = DecodeFailures()
        # Steps evaluated, by kind (the scheduler thread replaces an entry after each step;
        # other threads read them without the lock).
        self._counts = {kind: StepCounts(0, 0, 0.0) for kind in ("prompt", "decode")}
        self._thread = threading.Thread(target=self._loop, name="llm-batch", daemon=True)
        self._thread.start()

    def create_slot(self, index: int) -> BatchSlot:
        """A slot on sequence ``index``, cleared and verified empty.

        Raises:
            EngineError: no such sequence, it already has a live slot, or the scheduler stopped.
            ContextResetError: the sequence could not be cleared.
        """
        if not 0 <= index < self.slots:
            raise EngineError(f"slot {index} does not exist (the shared context has {self.slots})")
        slot = BatchSlot(self, index)
        with self._lock:
            if index in self._live:
                raise EngineError(f"slot {index} is in use")
            self._live[index] = slot
        try:
            slot.reset()
        except BaseException:
            slot.close()
            raise
        return slot

    def failure(self) -> str | None:
        """Why no request can be served any more (the thread died of a bug, or the last steps
        all failed), or None."""
        return self._died or self._decode_failures.failure()

    def step_counts(self) -> dict[str, StepCounts]:
        """The steps evaluated so far, by kind: ``prompt`` (prompt tokens of the requests being
        admitted) and ``decode`` (one token of every decoding stream)."""
        return dict(self._counts)

    def close(self) -> None:
        """Stop the thread (requests still running finish with EngineError), then close the
        decoder."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._lock.notify_all()
        self._thread.join()
        self._decoder.close()

    # -- called from other threads --------------------------------------------------------

    def _check_open(self, slot: BatchSlot) -> None:
        """(under the lock)"""
        if self._stopped is not None or self._closing:
            raise EngineError(self._stopped or "the engine is shutting down")
        if slot.closed:
            raise EngineError(f"slot {slot.index} is closed")

    def _start(self, slot: BatchSlot, generation: Generation) -> concurrent.futures.Future[None]:
        running = _Running(slot, generation)
        generation.attach(self._wake)
        with self._lock:
            self._check_open(slot)
            slot.cleared = False
            self._arrivals.append(running)
            self._lock.notify()
        return running.done

    def _reset(self, slot: BatchSlot) -> None:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._check_open(slot)
            if slot.cleared:
                return
            self._resets.append((slot, future))
            self._lock.notify()
        future.result()

    def _release(self, slot: BatchSlot) -> None:
        with self._lock:
            slot.closed = True
            if self._live.get(slot.index) is slot:
                del self._live[slot.index]

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # -- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        reason = "the engine is shutting down"
        try:
            while self._next_step():
                pass
        except BaseException as exc:  # a bug: nobody may be left waiting
            logger.critical("the batch scheduler failed", exc_info=True)
            reason = f"the batch scheduler failed: {exc!r}"
            self._died = reason
        with self._lock:
            self._stopped = reason
            running = [*self._running.values(), *self._arrivals]
            resets = self._resets
            self._running, self._arrivals, self._resets = {}, [], []
        for _, future in resets:
            if not future.done():
                future.set_exception(EngineError(reason))
        for request in running:  # each on its own: one that fails must not strand the others
            try:
                request.generation.fail(EngineError(reason))
                deliver((request.generation,))
            except Exception:
                logger.exception("could not end a request as the scheduler stopped")
            finally:
                if not request.done.done():
                    request.done.set_result(None)

    def _next_step(self) -> bool:
        """Wait for work, then do it: resets, arrivals, one step. False once closing."""
        with self._lock:
            while not self._closing:
                arrivals, resets = self._arrivals, self._resets
                if arrivals or resets or self._can_step():
                    self._arrivals, self._resets = [], []
                    break
                self._lock.wait(self._idle_wait())
            else:
                return False
        for slot, future in resets:
            self._clear(slot, future)
        for request in arrivals:
            if request.slot.index in self._running:  # the pool makes this impossible
                request.generation.fail(EngineError(f"slot {request.slot.index} is busy"))
                deliver((request.generation,))
                request.done.set_result(None)
            else:
                self._running[request.slot.index] = request
        if self._running:
            self._step()
        return True

    def _idle_wait(self) -> float | None:
        """How long to wait for news with every running request paused: until the nearest
        deadline (a paused request still ends at it), PAUSED_POLL_S at most."""
        if not self._running:
            return None
        now = time.monotonic()
        waits = [PAUSED_POLL_S]
        waits += [
            max(0.0, deadline - now)
            for request in self._running.values()
            if (deadline := request.generation.deadline) is not None
        ]
        return min(waits)

    def _can_step(self) -> bool:
        return any(
            request.token is None
            or not request.generation.paused()
            or request.generation.should_abort()
            for request in self._running.values()
        )

    def _clear(self, slot: BatchSlot, future: concurrent.futures.Future[None]) -> None:
        """A reset the pool queued: ``future`` gets its outcome."""
        try:
            self._clear_sequence(slot)
        except ContextResetError as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)

    def _clear_sequence(self, slot: BatchSlot) -> None:
        """Clear the slot's sequence and verify it is empty. Raises ContextResetError."""
        try:
            if slot.index in self._running:  # the pool makes this impossible
                raise ContextResetError(f"slot {slot.index} is still running a request")
            self._decoder.clear(slot.index)
        except ContextResetError:
            raise
        except Exception as exc:
            raise ContextResetError(str(exc)) from exc
        slot.n_past = 0

    def _step(self) -> None:
        """One batch (``_plan``), then sampling, and every request's events to the event
        loop."""
        touched: list[_Running] = []  # whose events go out after this step
        decoding: list[_Running] = []
        prompts: list[_Running] = []
        for request in self._running.values():
            generation = request.generation
            if generation.should_abort():
                _guarded(generation, generation.abort)
                touched.append(request)
            elif request.token is None:
                prompts.append(request)
            elif not generation.paused():
                decoding.append(request)
        chunks = self._plan(decoding, prompts)
        if chunks:
            self._evaluate(chunks, prompts_only=chunks[0][0].token is None)
            touched.extend(request for request, _, _ in chunks)
        deliver(request.generation for request in touched)
        for request in touched:
            if request.generation.finished:
                del self._running[request.slot.index]
                self._clear_ended(request.slot)
                request.done.set_result(None)

    def _clear_ended(self, slot: BatchSlot) -> None:
        """Clear the sequence of a request that ended, and verify it is empty, here and now: the
        pool's reset then has nothing to wait for, and the next request on the slot (often
        waiting in the queue) starts with the others that ended in this step. If it fails, the
        pool's reset tries again (and replaces the slot if that fails too)."""
        try:
            self._clear_sequence(slot)
        except ContextResetError as exc:
            logger.debug("slot %d: clearing it as its request ended failed: %s", slot.index, exc)
            return
        with self._lock:
            slot.cleared = True

    def _plan(
        self, decoding: list[_Running], prompts: list[_Running]
    ) -> list[tuple[_Running, Sequence[int], bool]]:
        """This step's chunks (request, tokens, whether to sample after them): prompts, or the
        decoding streams' tokens, never both.

        On a CPU a step costs about the sum of its tokens' costs (with the KV cache not
        unified, llama.cpp evaluates a prompt beside the streams in a ubatch of its own), so
        mixing a prompt into the streams' step saves nothing, and a stream waits for the same
        prompt tokens either way. Prompts first, in steps of ``step_tokens``: requests that
        arrive together start together, in the same step, and then decode in step with each
        other (and with the streams already running, which a mixed step would put a token
        ahead of them). The streams wait for ``prefill_chunk`` prompt tokens at most between
        two of their tokens: past it they decode a step, and the prompts go on after it, so a
        long prompt stretches their inter-token time instead of stalling them for its whole
        evaluation. A paused stream waits on its client, not on the prompts.
        """
        chunks: list[tuple[_Running, Sequence[int], bool]] = []
        if not decoding:
            self._held = 0
        if prompts and self._held < self._prefill_chunk:
            budget = self._step_tokens
            if decoding:
                budget = min(budget, self._prefill_chunk - self._held)
            for request in prompts:
                if not budget:
                    break
                tokens = request.generation.prompt_tokens
                take = min(budget, len(tokens) - request.evaluated)
                budget -= take
                end = request.evaluated + take
                chunks.append((request, tokens[request.evaluated : end], end == len(tokens)))
                if decoding:
                    self._held += take
            # In sequence order: llama.cpp evaluates a run of consecutive sequences in one
            # ubatch when the KV cache is not unified, and splits the batch where it breaks.
            chunks.sort(key=lambda chunk: chunk[0].slot.index)
        else:
            self._held = 0
            for request in decoding:
                assert request.token is not None
                chunks.append((request, (request.token,), True))
        return chunks

    def _evaluate(
        self, chunks: list[tuple[_Running, Sequence[int], bool]], *, prompts_only: bool
    ) -> None:
        entries: list[BatchEntry] = []
        samples: list[tuple[_Running, int]] = []  # request, index of its output token
        n_tokens = 0
        for request, tokens, output in chunks:
            entries.append(BatchEntry(request.slot.index, request.slot.n_past, tokens, output))
            n_tokens += len(tokens)
            if output:
                samples.append((request, n_tokens - 1))
        included = [request.generation for request, _, _ in chunks]

        # A step of prompts may take a while: it stops as soon as every prompt in it is
        # cancelled (a step of streams is short: it runs to its end).
        def every_prompt_aborted() -> bool:
            return all(generation.should_abort() for generation in included)

        started = time.perf_counter()
        try:
            self._decoder.decode(entries, every_prompt_aborted if prompts_only else None)
        except GenerationAborted as exc:
            for generation in included:
                generation.fail(exc)
            return
        except Exception as exc:
            message = str(exc) if isinstance(exc, EngineError) else f"decode failed: {exc!r}"
            logger.error(
                "a decode step failed; failing its %s: %s",
                plural(len(included), "request"),
                message,
                exc_info=not isinstance(exc, EngineError),  # a bug: its traceback
            )
            self._decode_failures.failed(message)
            for generation in included:
                generation.fail(EngineError(message))
            return
        self._decode_failures.succeeded()
        kind = "prompt" if prompts_only else "decode"
        seconds = time.perf_counter() - started
        counts = self._counts[kind]
        self._counts[kind] = StepCounts(
            counts.steps + 1, counts.tokens + n_tokens, counts.seconds + seconds
        )
        for request, tokens, _ in chunks:
            request.slot.n_past += len(tokens)
            if request.token is None:
                request.evaluated += len(tokens)
        for request, index in samples:
            generation = request.generation
            try:
                token = self._decoder.sample(generation.sampler, index)
            except NoTokenAllowed as exc:  # the request's own fault: it goes to the request
                generation.fail(exc)
            except Exception as exc:
                logger.error("sampling failed", exc_info=True)
                generation.fail(EngineError(f"sampling failed: {exc!r}"))
            else:
                if _guarded(generation, generation.accept, token):
                    request.token = token


def _guarded(generation: Generation, step: Callable[..., bool | None], *args: int) -> bool:
    """``step(*args)`` of one request; a bug in it fails that request, not the scheduler."""
    try:
        return bool(step(*args))
    except Exception as exc:
        generation.fail(exc)
        return False
