"""Batched mode: the pool's requests share one context, one sequence each, decoded together.

A ``BatchScheduler`` owns one thread, the only one that touches the shared context. Each pool
entry is a ``BatchSlot`` (sequence id = its index) implementing the ``Context`` protocol: the
request's worker thread submits a job (prefill, decode or reset) and blocks on its future. Each
step, the scheduler thread gathers the jobs of every slot into one batch (one token for each
decoding slot, plus chunks of the prompts being admitted: at most ``prefill_chunk`` prompt
tokens in all, or ``lone_prompt_chunk`` when no stream is decoding), evaluates it with one
decode, samples every slot that needs a token with that slot's own sampler (the logits are valid
only until the next step), and resolves the futures.

So a long prompt is evaluated over several steps while the running streams go on producing a
token per step; a cancelled prompt stops between two chunks (in a step of lone prompts, within
it); a failed decode fails the jobs of its step (and only those) with EngineError; a reset runs
between steps, never during one.

The scheduler works one token ahead: once a slot has sampled token t, the next step evaluates t
and samples t+1 without waiting for the request's thread to ask (it always asks for exactly
that, unless it stops), so steps follow each other with no round trip through the worker
threads in between. When the request stops instead (end of generation, max tokens, a stop
string, cancellation), the token computed ahead is dropped with the slot's reset. This is why
a request's sampler must stay open until its slot is reset (the pool closes it then, see
``Lease.close_after_reset``).

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
from llm_service.errors import EngineError
from llm_service.log import plural

__all__ = ["BatchDecoder", "BatchEntry", "BatchScheduler", "BatchSlot"]

logger = logging.getLogger(__name__)

# After a step, how long the scheduler waits for the slots it just gave a token to submit their
# next job (their worker threads need a moment to stream the token), so that the next step holds
# every running stream instead of whichever came back first. A slot later than this joins the
# step after.
GATHER_S = 0.005


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


class _Job:
    """One request of a slot to the scheduler; a slot has at most one at a time."""

    __slots__ = ("future", "slot")

    def __init__(self, slot: BatchSlot) -> None:
        self.slot = slot
        self.future: concurrent.futures.Future[int | None] = concurrent.futures.Future()


class _Prefill(_Job):
    __slots__ = ("done", "sampler", "should_abort", "tokens")

    def __init__(
        self,
        slot: BatchSlot,
        tokens: Sequence[int],
        sampler: Sampler,
        should_abort: Callable[[], bool],
    ) -> None:
        super().__init__(slot)
        self.tokens = tokens
        self.sampler = sampler
        self.should_abort = should_abort
        self.done = 0  # prompt tokens evaluated so far

    def aborted(self) -> bool:
        try:
            return bool(self.should_abort())
        except Exception:
            return True


class _Decode(_Job):
    """Evaluate ``token`` and sample the next one.

    Attributes:
        ahead: made by the scheduler before the worker asked (nobody waits for it yet).
        dropped: the request stopped (its slot is being reset): the outcome goes nowhere.
    """

    __slots__ = ("ahead", "dropped", "sampler", "token")

    def __init__(self, slot: BatchSlot, token: int, sampler: Sampler, *, ahead: bool = False):
        super().__init__(slot)
        self.token = token
        self.sampler = sampler
        self.ahead = ahead
        self.dropped = False


class _Reset(_Job):
    __slots__ = ()


# What a job ended with: a token, None (a reset), or the exception its waiter gets.
_Outcome = tuple[_Job, int | BaseException | None]


class BatchSlot:
    """One sequence of the shared context: a pool entry, leased to one request at a time.

    Attributes:
        index: the slot's number, also its sequence id.
        n_past: tokens in the sequence (touched by the scheduler thread only).
    """

    def __init__(self, scheduler: BatchScheduler, index: int) -> None:
        self.index = index
        self.n_past = 0
        self.closed = False
        self._scheduler = scheduler

    def prefill(
        self, tokens: Sequence[int], sampler: Sampler, should_abort: Callable[[], bool]
    ) -> int:
        if not tokens:
            raise EngineError("an empty prompt cannot be evaluated")
        token = self._scheduler._submit(_Prefill(self, list(tokens), sampler, should_abort))
        assert token is not None
        return token

    def decode(self, token: int, sampler: Sampler) -> int:
        result = self._scheduler._submit(_Decode(self, token, sampler))
        assert result is not None
        return result

    def reset(self) -> None:
        """Clear the slot's sequence (between two steps) and verify it is empty."""
        self._scheduler._submit(_Reset(self))

    def close(self) -> None:
        """Give the sequence up; a new slot can then be made on it (its native memory stays)."""
        self._scheduler._release(self)


class BatchScheduler:
    """Drives one shared context for ``decoder.slots`` slots from one thread.

    Args:
        decoder: the model side (owned: closed by ``close``).
        prefill_chunk: prompt tokens per step at most, over every prompt being admitted, while
            streams are decoding (each step then costs them one inter-token delay).
        lone_prompt_chunk: the same when no stream is decoding (default: ``prefill_chunk``):
            nobody waits on those steps but the prompts themselves, so llama.cpp's own batch
            size evaluates them fastest.
    """

    def __init__(
        self, decoder: BatchDecoder, *, prefill_chunk: int, lone_prompt_chunk: int | None = None
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.slots = decoder.slots
        self._decoder = decoder
        self._prefill_chunk = prefill_chunk
        self._lone_prompt_chunk = max(prefill_chunk, lone_prompt_chunk or 0)
        self._lock = threading.Condition()
        # Jobs by slot, in order of arrival; a job stays here until its future is resolved.
        self._pending: dict[int, _Job] = {}
        # Computed ahead and not asked for yet, by slot: (token evaluated, outcome).
        self._ready: dict[int, tuple[int, int | BaseException]] = {}
        # Slots given a token by the last step: their next job is on its way (see GATHER_S).
        self._expected: set[int] = set()
        self._live: dict[int, BatchSlot] = {}
        self._closing = False
        self._closed = False
        self._stopped: str | None = None  # why the thread ended: jobs submitted now fail
        self._died: str | None = None  # why the thread died, if a bug (not close) ended it
        self._decode_failures = DecodeFailures()
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

    def close(self) -> None:
        """Stop the thread (jobs still waiting fail with EngineError), then close the decoder."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._lock.notify_all()
        self._thread.join()
        self._decoder.close()

    # -- called by the slots (from their worker threads) ------------------------------

    def _release(self, slot: BatchSlot) -> None:
        with self._lock:
            slot.closed = True
            if self._live.get(slot.index) is slot:
                del self._live[slot.index]
                self._expected.discard(slot.index)

    def _submit(self, job: _Job) -> int | None:
        """Submit ``job`` and wait for its outcome (called from the slot's worker thread)."""
        with self._lock:
            if self._stopped is not None or self._closing:
                raise EngineError(self._stopped or "the engine is shutting down")
            if job.slot.closed:
                raise EngineError(f"slot {job.slot.index} is closed")
            future = self._enqueue(job)
        return future.result()

    def _enqueue(self, job: _Job) -> concurrent.futures.Future[int | None]:
        """The future ``job``'s caller waits on (under the lock)."""
        seq = job.slot.index
        current = self._pending.get(seq)
        if isinstance(job, _Decode):
            if (ready := self._ready.pop(seq, None)) is not None:  # computed ahead, done
                self._expected.discard(seq)
                self._expect(job, ready[0])
                answered: concurrent.futures.Future[int | None] = concurrent.futures.Future()
                if isinstance(ready[1], BaseException):
                    answered.set_exception(ready[1])
                else:
                    answered.set_result(ready[1])
                    self._ahead(job.slot, ready[1], job.sampler)
                return answered
            if isinstance(current, _Decode) and current.ahead:  # being computed ahead
                self._expect(job, current.token)
                current.ahead = False  # claimed: its outcome is this caller's
                return current.future
        else:  # a prefill or a reset: what was computed ahead is of no use any more
            self._ready.pop(seq, None)
            self._expected.discard(seq)
            if isinstance(current, _Decode) and current.ahead:
                current.dropped = True
                del self._pending[seq]
                current = None
        if current is not None:
            raise EngineError(f"slot {seq} already has a job in progress")
        self._pending[seq] = job
        self._expected.discard(seq)
        self._lock.notify()
        return job.future

    @staticmethod
    def _expect(job: _Decode, token: int) -> None:
        if job.token != token:  # the protocol makes this impossible: a bug if it happens
            raise EngineError(
                f"slot {job.slot.index}: asked to evaluate token {job.token}, but {token} was"
                " sampled"
            )

    def _ahead(self, slot: BatchSlot, token: int, sampler: Sampler) -> None:
        """Queue the evaluation of ``token`` (just sampled) before the worker asks for it."""
        if slot.index not in self._pending and not slot.closed:
            self._pending[slot.index] = _Decode(slot, token, sampler, ahead=True)
            self._lock.notify()

    # -- the scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        reason = "the engine is shutting down"
        try:
            while (jobs := self._next_jobs()) is not None:
                resets = [job for job in jobs if isinstance(job, _Reset)]
                self._resolve(self._reset(resets) if resets else self._step(jobs))
        except BaseException as exc:  # a bug: nobody may be left waiting
            logger.critical("the batch scheduler failed", exc_info=True)
            reason = f"the batch scheduler failed: {exc!r}"
            self._died = reason
        with self._lock:
            self._stopped = reason
            jobs = list(self._pending.values())
            self._pending.clear()
        for job in jobs:
            job.future.set_exception(EngineError(reason))

    def _next_jobs(self) -> list[_Job] | None:
        """Wait for work: resets at once; steps once the expected slots are back (or late)."""
        with self._lock:
            gather_until: float | None = None
            while not self._closing:
                if not self._pending:
                    self._lock.wait()
                    continue
                jobs = list(self._pending.values())
                if any(isinstance(job, _Reset) for job in jobs):
                    return jobs
                if self._expected.issubset(self._pending):
                    return jobs
                now = time.monotonic()
                if gather_until is None:
                    gather_until = now + GATHER_S
                elif now >= gather_until:
                    self._expected.clear()  # late ones join the step after they arrive
                    return jobs
                self._lock.wait(gather_until - now)
            return None

    def _reset(self, resets: list[_Reset]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for job in resets:
            try:
                self._decoder.clear(job.slot.index)
            except Exception as exc:
                error = exc if isinstance(exc, ContextResetError) else ContextResetError(str(exc))
                outcomes.append((job, error))
            else:
                job.slot.n_past = 0
                outcomes.append((job, None))
        return outcomes

    def _step(self, jobs: list[_Job]) -> list[_Outcome]:
        """One batch: every decode, plus prompt chunks in order of arrival within the budget."""
        outcomes: list[_Outcome] = []
        chunks: list[tuple[_Decode | _Prefill, Sequence[int], bool]] = []  # job, tokens, output
        # A slot past its prompt is a stream (decoding, or about to ask for its next token): a
        # big prompt chunk would hold up its next token. With none, prompts take llama.cpp's
        # batch size.
        prefilling = {job.slot for job in jobs if isinstance(job, _Prefill)}
        with self._lock:  # (slots come and go from other threads; n_past is this thread's)
            live = list(self._live.values())
        streams = any(slot.n_past > 0 and slot not in prefilling for slot in live)
        budget = self._prefill_chunk if streams else self._lone_prompt_chunk
        for job in jobs:
            if isinstance(job, _Decode):
                if not job.dropped:
                    chunks.append((job, (job.token,), True))
            elif isinstance(job, _Prefill):
                if job.aborted():
                    outcomes.append((job, GenerationAborted()))
                elif budget:
                    take = min(budget, len(job.tokens) - job.done)
                    budget -= take
                    end = job.done + take
                    chunks.append((job, job.tokens[job.done : end], end == len(job.tokens)))
        # In sequence order: llama.cpp evaluates a run of consecutive sequences in one ubatch
        # when the KV cache is not unified, and splits the batch wherever the run breaks.
        chunks.sort(key=lambda chunk: chunk[0].slot.index)
        entries: list[BatchEntry] = []
        included = [job for job, _, _ in chunks]
        samples: list[tuple[_Decode | _Prefill, int]] = []  # job, index of its output token
        n_tokens = 0
        for job, tokens, output in chunks:
            entries.append(BatchEntry(job.slot.index, job.slot.n_past, tokens, output))
            n_tokens += len(tokens)
            if output:
                samples.append((job, n_tokens - 1))
        if not entries:
            return outcomes

        # A step of lone prompts may take a while and holds up nobody else: it stops as soon as
        # every prompt in it is cancelled (a step beside streams is short: it runs to its end).
        prefills = [job for job in included if isinstance(job, _Prefill)]

        def every_prompt_aborted() -> bool:
            return all(job.aborted() for job in prefills)

        try:
            self._decoder.decode(entries, None if streams or not prefills else every_prompt_aborted)
        except GenerationAborted:
            return outcomes + [(job, GenerationAborted()) for job in included]
        except Exception as exc:
            message = str(exc) if isinstance(exc, EngineError) else f"decode failed: {exc!r}"
            logger.error(
                "a decode step failed; failing its %s: %s",
                plural(len(included), "request"),
                message,
            )
            self._decode_failures.failed(message)
            return outcomes + [(job, EngineError(message)) for job in included]
        self._decode_failures.succeeded()
        for entry, job in zip(entries, included, strict=True):
            job.slot.n_past += len(entry.tokens)
            if isinstance(job, _Prefill):
                job.done += len(entry.tokens)
        for job, index in samples:
            try:
                outcomes.append((job, self._decoder.sample(job.sampler, index)))
            except NoTokenAllowed as exc:  # the request's own fault: it goes to the request
                outcomes.append((job, exc))
            except Exception as exc:
                outcomes.append((job, EngineError(f"sampling failed: {exc!r}")))
        return outcomes

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        waiting: list[_Outcome] = []
        # The bookkeeping first, under the lock: a woken worker may submit its next job at once.
        with self._lock:
            for job, outcome in outcomes:
                seq = job.slot.index
                if self._pending.get(seq) is job:
                    del self._pending[seq]
                if isinstance(job, _Decode) and job.dropped:
                    continue
                if isinstance(job, _Decode) and job.ahead:  # done before its worker asked
                    self._ready[seq] = (job.token, outcome)  # type: ignore[assignment]
                    self._expected.add(seq)
                    continue
                if isinstance(outcome, int) and not isinstance(job, _Reset):
                    self._ahead(job.slot, outcome, job.sampler)  # type: ignore[attr-defined]
                waiting.append((job, outcome))
        for job, outcome in waiting:
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
