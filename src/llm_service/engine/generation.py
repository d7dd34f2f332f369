"""One request as it runs on a context: its tokens, text, limits and events.

A ``Generation`` is driven by whoever owns its context: batched mode's scheduler thread (every
running request of the shared context, one step at a time, see ``batching.py``), or in
contexts mode the context's own thread (``ThreadContext``, one request at a time). The driver
feeds it sampled tokens (``accept``); it turns them into text (whole UTF-8 characters, stop
strings never half-emitted), applies the limits, and queues the request's events, which the
driver hands to the event loop in bulk (``deliver``: one ``call_soon_threadsafe`` for every
request's events of a step). The request's consumer reads them with ``next_event``.

The consumer's backlog is bounded: past ``MAX_BACKLOG`` unread events the driver stops
evaluating that request (``paused``) until it reads again, so a client that stops reading holds
up only its own slot, until the server's stall timeout cuts it.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from llm_service.engine.backend import (
    Backend,
    GenerationAborted,
    Logprobs,
    NoTokenAllowed,
    Sampler,
)
from llm_service.engine.text import ReasoningSplitter, StreamDecoder
from llm_service.engine.tools import ToolCallParser
from llm_service.errors import EngineError
from llm_service.log import RequestLogger, plural
from llm_service.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = ["MAX_BACKLOG", "Generation", "ThreadContext", "deliver"]

logger = logging.getLogger("llm_service.engine.engine")

# Events a request's consumer may leave unread before its generation pauses.
MAX_BACKLOG = 64

Event = TokenDelta | Finished


class Generation:
    """A request's state from its first prompt token to its ``Finished`` event.

    The driver thread calls ``accept``, ``finish``, ``fail`` and ``take_events``; the event
    loop calls ``next_event`` and ``cancel``. The sampler is the generation's: it is closed
    with the last event, by the driver, the only thread that samples with it.

    Attributes:
        prompt_tokens: the tokens to evaluate first.
        sampler: the request's sampler (closed when the generation finishes).
        finished: the ``Finished`` event is queued; the driver must not touch it any more.
    """

    def __init__(
        self,
        backend: Backend,
        request: GenerationRequest,
        prompt_tokens: list[int],
        max_tokens: int,
        sampler: Sampler,
        *,
        arrived: float,
        queue_wait_s: float,
        loop: asyncio.AbstractEventLoop,
        tool_calls: ToolCallParser | None = None,
        reasoning: ReasoningSplitter | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.sampler = sampler
        self.loop = loop
        self.finished = False
        self._backend = backend
        self._request = request
        self._max_tokens = max_tokens
        self._arrived = arrived
        self._queue_wait_s = queue_wait_s
        self._decoder = StreamDecoder(request.sampling.stop)
        self._tool_calls = tool_calls  # the request has tools: its answer may hold calls
        self._reasoning = reasoning  # a chat answer: it may start with its reasoning
        self._text: list[str] = []
        self._thought: list[str] = []
        # Log probabilities of tokens whose text is still held back, and bytes released
        # beyond the first of them (see _released_logprobs).
        self._held_logprobs: collections.deque[TokenLogprob] = collections.deque()
        self._released_bytes = 0
        self._n_generated = 0
        self._started_at = time.monotonic()
        self._first_token_at: float | None = None
        self._outbox: list[Event] = []
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = False
        self._sent = 0  # events handed to the loop (the driver's count)
        self._taken = 0  # events the consumer read (the loop's count)
        self._paused = False
        self._wake: Callable[[], None] = _nothing

    # -- the event loop's side -----------------------------------------------------------

    async def next_event(self) -> Event:
        event = await self._events.get()
        self._taken += 1
        # (the driver sets _paused, then looks at the backlog again: one of us sees the other)
        if self._paused and self._sent - self._taken < MAX_BACKLOG:
            self._paused = False
            self._wake()
        return event

    def cancel(self) -> None:
        """Stop at the next token (or between two prompt chunks); safe from any thread."""
        if not self._cancelled and not self.finished:
            self._cancelled = True
            self._wake()

    # -- the driver's side ---------------------------------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when the driver may have something new to do: the request was
        cancelled, or its consumer made room after a pause."""
        self._wake = wake

    @property
    def deadline(self) -> float | None:
        """When the request must end (``time.monotonic()``), if it has a deadline."""
        return self._request.deadline

    def should_abort(self) -> bool:
        """Cancelled, or past its deadline."""
        deadline = self._request.deadline
        return self._cancelled or (deadline is not None and time.monotonic() >= deadline)

    def paused(self) -> bool:
        """Its consumer has ``MAX_BACKLOG`` events unread: evaluate nothing more for it yet."""
        if self._sent - self._taken < MAX_BACKLOG:
            return False
        self._paused = True
        if self._sent - self._taken < MAX_BACKLOG:  # read in between: no wake would come
            self._paused = False
            return False
        return True

    def accept(self, token: int) -> bool:
        """A sampled token: its text and the limits. True: evaluate it and sample the next;
        False: the generation finished (end of generation, a stop string, max tokens)."""
        if self._backend.is_end_of_generation(token):
            self.finish(FinishReason.STOP)
            return False
        self._n_generated += 1
        if self._first_token_at is None:
            self._first_token_at = time.monotonic()
        piece = self._backend.token_bytes(token)
        text = self._decoder.push(piece)
        logprobs = self.sampler.take_logprobs()
        released: tuple[TokenLogprob, ...] = ()
        if logprobs is not None:
            self._held_logprobs.append(self._logprob(token, piece, logprobs))
            released = self._released_logprobs(text)
        self._outbox.append(self._delta((token,), text, released))
        if self._decoder.stopped:
            self.finish(FinishReason.STOP_SEQUENCE)
        elif self._n_generated >= self._max_tokens:
            self.finish(FinishReason.LENGTH)
        return not self.finished

    def abort(self) -> None:
        """Finish as cancelled or past the deadline (see ``should_abort``)."""
        self.finish(FinishReason.CANCELLED if self._cancelled else FinishReason.DEADLINE)

    def fail(self, exc: BaseException) -> None:
        """Finish with what stopped the generation: an abort, the request's grammar allowing
        no token, llama.cpp failing, or a bug (logged with its traceback)."""
        log = RequestLogger(logger, self._request.request_id)
        if isinstance(exc, GenerationAborted):
            self.abort()
        elif isinstance(exc, NoTokenAllowed):
            request = self._request
            field = "sampling.json_schema" if request.sampling.json_schema else "sampling.grammar"
            if request.tools and request.tool_choice != "none":  # the tool calls' grammar
                field = "tools"
            error = f"allows no token after {plural(self._n_generated, 'token')} of output: {exc}"
            log.info("%s %s", field, error)
            self.finish(FinishReason.ERROR, error, field)
        elif isinstance(exc, EngineError):
            log.error("generation failed: %s", exc)
            self.finish(FinishReason.ERROR, str(exc))
        else:
            log.error("generation failed", exc_info=exc)
            self.finish(FinishReason.ERROR, "internal engine error")

    def finish(
        self, reason: FinishReason, error: str | None = None, error_field: str | None = None
    ) -> None:
        """Queue the held-back text and the ``Finished`` event, and close the sampler."""
        if self.finished:
            return
        self.finished = True
        calls: tuple[ToolCall, ...] = ()
        try:
            # Text held back (a partial character, a possible start of a stop string that
            # never completed) belongs to the output, with its tokens' log probabilities; a
            # stop string's tokens are not part of it.
            tail = self._decoder.finish()
            held = () if self._decoder.stopped else tuple(self._held_logprobs)
            # Only an answer the model ended is whole; any other may end inside a call.
            complete = reason is FinishReason.STOP
            delta = self._delta((), tail, held, final=True, complete=complete)
            if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs:
                self._outbox.append(delta)
            if self._tool_calls is not None:
                calls = tuple(self._tool_calls.calls)
                if calls and complete:
                    reason = FinishReason.TOOL_CALLS
        except Exception:  # a bug: the request still ends, with what it has
            logger.exception("could not flush a request's held-back text")
        self._outbox.append(self._finished(reason, error, error_field, calls))
        try:
            self.sampler.close()
        except Exception:
            logger.exception("could not close a request's sampler")

    def _delta(
        self,
        tokens: tuple[int, ...],
        text: str,
        logprobs: tuple[TokenLogprob, ...],
        *,
        final: bool = False,
        complete: bool = True,
    ) -> TokenDelta:
        """The delta of released ``text``: its reasoning split off, then its tool calls
        (``final``: the answer ends, flush what they hold; ``complete``: the model ended it)."""
        reasoning = ""
        calls: list[ToolCallDelta] = []
        if self._reasoning is not None:
            text, reasoning = self._reasoning.feed(text)
            if final:
                more, thought = self._reasoning.finish()
                text, reasoning = text + more, reasoning + thought
        if self._tool_calls is not None:
            text, calls = self._tool_calls.feed(text)
            if final:
                more, last = self._tool_calls.finish(complete=complete)
                text, calls = text + more, calls + last
        self._text.append(text)
        self._thought.append(reasoning)
        return TokenDelta(tokens, text, tuple(calls), logprobs, reasoning)

    def _logprob(self, token: int, piece: bytes, logprobs: Logprobs) -> TokenLogprob:
        logprob, top = logprobs
        piece_of = self._backend.token_bytes
        alternatives = tuple(TokenLogprob(t, piece_of(t), lp) for t, lp in top)
        return TokenLogprob(token, piece, logprob, alternatives)

    def _released_logprobs(self, text: str) -> tuple[TokenLogprob, ...]:
        """The held log probabilities whose tokens' bytes ``text`` (just released) completes."""
        self._released_bytes += len(text.encode("utf-8", "surrogatepass"))
        out = []
        held = self._held_logprobs
        while held and len(held[0].piece) <= self._released_bytes:
            self._released_bytes -= len(held[0].piece)
            out.append(held.popleft())
        return tuple(out)

    def take_events(self) -> list[Event]:
        """The events queued since the last call, counted as sent (see ``deliver``)."""
        events, self._outbox = self._outbox, []
        self._sent += len(events)
        return events

    def _receive(self, events: Sequence[Event]) -> None:
        for event in events:
            self._events.put_nowait(event)

    def _finished(
        self,
        reason: FinishReason,
        error: str | None,
        error_field: str | None,
        tool_calls: tuple[ToolCall, ...],
    ) -> Finished:
        n_generated, first_token_at = self._n_generated, self._first_token_at
        now = time.monotonic()
        decode_s = now - first_token_at if first_token_at is not None else 0.0
        rate = (n_generated - 1) / decode_s if n_generated > 1 and decode_s > 0 else 0.0
        return Finished(
            request_id=self._request.request_id,
            finish_reason=reason,
            text="".join(self._text),
            usage=Usage(len(self.prompt_tokens), n_generated),
            timings=Timings(
                queue_wait_ms=self._queue_wait_s * 1000,
                prefill_ms=((first_token_at or now) - self._started_at) * 1000,
                time_to_first_token_ms=(
                    (first_token_at - self._arrived) * 1000 if first_token_at is not None else None
                ),
                decode_tokens_per_s=rate,
                total_ms=(now - self._arrived) * 1000,
            ),
            error=error,
            error_field=error_field,
            tool_calls=tool_calls,
            reasoning="".join(self._thought),
        )


def deliver(generations: Iterable[Generation]) -> None:
    """Hand the queued events of ``generations`` to their event loops: one
    ``call_soon_threadsafe`` per loop (in a server, one), whatever the number of requests."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, list[Event]]]] = {}
    for generation in generations:
        if events := generation.take_events():
            by_loop.setdefault(generation.loop, []).append((generation, events))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_receive, batch)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            for generation, _ in batch:
                generation.cancel()


def _receive(batch: list[tuple[Generation, list[Event]]]) -> None:
    for generation, events in batch:
        generation._receive(events)


def _nothing() -> None:
    pass


class ThreadContext(abc.ABC):
    """A context of contexts mode: one sequence, and a thread of its own that runs one request
    at a time, token by token, handing each token's events to the event loop as it comes.

    Subclasses evaluate (``prefill``, ``decode``) and call ``_stop_thread`` when closed.
    """

    index: int
    _thread: concurrent.futures.ThreadPoolExecutor | None = None

    @abc.abstractmethod
    def prefill(
        self, tokens: Sequence[int], sampler: Sampler, should_abort: Callable[[], bool]
    ) -> int:
        """Evaluate the prompt, then sample the first token.

        Raises:
            GenerationAborted: ``should_abort()`` turned true before the prompt was evaluated.
            EngineError: llama.cpp failed.
        """

    @abc.abstractmethod
    def decode(self, token: int, sampler: Sampler) -> int:
        """Evaluate one generated token, then sample the next one. Raises EngineError."""

    def start(self, generation: Generation) -> concurrent.futures.Future[None]:
        """Run ``generation`` on this context; the future is done once the thread is out."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, f"llm-context-{self.index}")
        return self._thread.submit(self._run, generation)

    def _run(self, generation: Generation) -> None:
        room = threading.Event()  # set when the consumer makes room, or cancels
        generation.attach(room.set)
        try:
            token = self.prefill(
                generation.prompt_tokens, generation.sampler, generation.should_abort
            )
            while generation.accept(token):
                deliver((generation,))
                while generation.paused() and not generation.should_abort():
                    deadline = generation.deadline
                    left = 0.25 if deadline is None else deadline - time.monotonic()
                    room.wait(min(0.25, max(0.0, left)))  # (a deadline passes with no wake)
                    room.clear()
                if generation.should_abort():
                    generation.abort()
                    break
                token = self.decode(token, generation.sampler)
        except BaseException as exc:
            generation.fail(exc)
        deliver((generation,))

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None
