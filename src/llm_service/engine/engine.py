"""The engine: turns a GenerationRequest into a stream of events, on a leased context."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from llm_service.engine.backend import (
    Backend,
    Context,
    LoadedModel,
    PoolMode,
    Sampler,
)
from llm_service.engine.generation import Generation, deliver
from llm_service.engine.pool import LlamaContextPool, PoolState
from llm_service.engine.text import THINK_OPEN, ReasoningSplitter
from llm_service.engine.tools import ToolPlan, plan, syntax_of, system_as_user
from llm_service.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    PromptTooLongError,
)
from llm_service.log import RequestLogger, plural
from llm_service.types import (
    ChatMessage,
    EmbeddingRequest,
    Finished,
    GenerationEvent,
    GenerationRequest,
    RequestLimits,
    SamplingParams,
    Started,
    StepCounts,
)

__all__ = ["Engine", "EngineConfig"]

NO_TOOLS = ToolPlan(messages=[], template_tools=None, grammar=None, parser=None)  # a raw prompt

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits.

    Attributes:
        pool_size: contexts in the pool (``LLM_LLAMA_SERVICE_THREADS``).
        max_queue: requests allowed to wait for a context.
        queue_timeout_s: longest wait for a context before OverloadedError.
        limits: size limits on each request.
    """

    pool_size: int = 1
    max_queue: int = 16
    queue_timeout_s: float = 30.0
    limits: RequestLimits = field(default_factory=RequestLimits)


class Engine:
    """Generation over a pool of contexts on one backend (llama.cpp, or the fake).

    Build one with ``Engine.start(backend, config)`` (or ``llm_service.engine.start_engine``),
    use ``generate()``, and ``await engine.aclose()`` at the end.

    Example:
        >>> async for event in engine.generate(GenerationRequest(prompt="Hi")):  # doctest: +SKIP
        ...     if isinstance(event, TokenDelta):
        ...         print(event.text, end="")
    """

    def __init__(
        self,
        backend: Backend,
        pool: LlamaContextPool[Context],
        *,
        prep: concurrent.futures.ThreadPoolExecutor,
        pool_executor: concurrent.futures.ThreadPoolExecutor,
        limits: RequestLimits,
    ) -> None:
        self.backend = backend
        # How tools are offered and calls recognised: by the template's own syntax if it has
        # one the engine knows, else the generic JSON form (see tools.py).
        self._tool_syntax = syntax_of(backend.info.chat_template)
        self.pool = pool
        self._limits = limits
        self._prep = prep
        self._pool_executor = pool_executor
        # Embedding batches, one at a time (the backend's embedding context is one).
        self._embedding = concurrent.futures.ThreadPoolExecutor(1, "llm-embed")
        self._closing = False
        self._closed = False

    @classmethod
    async def start(cls, backend: Backend, config: EngineConfig) -> Engine:
        """Create the pool's contexts on ``backend`` and return a ready engine."""
        # Two executors, so that neither kind of work waits behind the other: tokenizing,
        # templates and grammar compilation for requests not yet admitted; and the pool's
        # resets and replacements. (Requests run on the contexts themselves: the batch
        # scheduler's thread, or in contexts mode each context's own.)
        prep = concurrent.futures.ThreadPoolExecutor(4, "llm-prepare")
        pool_executor = concurrent.futures.ThreadPoolExecutor(2, "llm-pool")
        loop = asyncio.get_running_loop()
        contexts: list[Context] = []
        try:
            for i in range(config.pool_size):
                contexts.append(
                    await loop.run_in_executor(pool_executor, backend.create_context, i)
                )
                logger.info("context %d/%d ready", i + 1, config.pool_size)
        except BaseException:
            for c in contexts:
                c.close()
            for executor in (prep, pool_executor):
                executor.shutdown(wait=False)
            raise
        n_ctx = backend.info.n_ctx
        if backend.pool_mode == "batched":
            layout = (
                f"batched mode, {plural(config.pool_size, 'slot')} of {n_ctx} tokens each, as"
                f" sequences of one shared context ({config.pool_size * n_ctx} tokens), decoded"
                " together"
            )
        else:
            layout = f"contexts mode, {plural(config.pool_size, 'context')} of {n_ctx} tokens each"
        logger.info(
            "pool ready: %s (queue %d, wait at most %g s)",
            layout,
            config.max_queue,
            config.queue_timeout_s,
        )
        pool: LlamaContextPool[Context] = LlamaContextPool(
            contexts,
            factory=backend.create_context,
            executor=pool_executor,
            max_queue=config.max_queue,
            acquire_timeout_s=config.queue_timeout_s,
        )
        return cls(
            backend,
            pool,
            prep=prep,
            pool_executor=pool_executor,
            limits=config.limits,
        )

    @property
    def info(self) -> LoadedModel:
        return self.backend.info

    @property
    def pool_mode(self) -> PoolMode:
        return self.backend.pool_mode

    def pool_state(self) -> PoolState:
        return self.pool.state()

    def step_counts(self) -> dict[str, StepCounts]:
        """Batched mode's steps so far, by kind (see ``BatchScheduler.step_counts``); empty in
        contexts mode."""
        return self.backend.step_counts()

    def failure(self) -> str | None:
        """Why this engine can serve no more requests, or None while it can: batched mode's
        scheduler died, llama.cpp failed its last evaluations (``DecodeFailures``), or no
        context of the pool is left (each failed its reset and could not be replaced). Cheap:
        call it from the event loop as often as needed."""
        if (why := self.backend.failure()) is not None:
            return why
        if self.pool.state().size == 0:
            return "every context of the pool failed its reset and could not be replaced"
        return None

    async def aclose(self) -> None:
        """Refuse new requests, wait for running ones to end, then free contexts and model.

        Requests still waiting for a context are refused with EngineError. Cancel the tasks of
        running requests first if they must not run to their end.
        """
        self._closing = True
        self.pool.refuse_new_leases()
        await self.pool.wait_idle()
        if self._closed:
            return
        self._closed = True

        def free_everything() -> None:
            self.pool.close()
            for executor in (self._prep, self._pool_executor, self._embedding):
                executor.shutdown(wait=True)
            self.backend.close()

        await asyncio.to_thread(free_everything)

    # -- text utilities ------------------------------------------------------------------

    async def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        return await self._run(
            self.backend.tokenize, text, add_special=add_special, parse_special=parse_special
        )

    async def detokenize(self, tokens: Sequence[int]) -> str:
        n_vocab = self.backend.info.n_vocab
        for t in tokens:
            if not 0 <= t < n_vocab:
                raise InvalidRequestError("tokens", f"token id {t} is outside [0, {n_vocab})")
        return await self._run(self.backend.detokenize, list(tokens))

    @property
    def embedding_dimensions(self) -> int:
        """Dimensions of ``embed``'s vectors; 0: embeddings are not served."""
        return self.backend.embedding_dimensions

    async def embed(self, request: EmbeddingRequest) -> tuple[list[list[float]], int]:
        """A unit vector per input, in order, and the inputs' tokens in all.

        Raises:
            InvalidRequestError: embeddings are not served (``model``), an input is too long
                (``PromptTooLongError``) or has a token outside the vocabulary (``input[i]``).
        """
        if self._closing:
            raise EngineError("the engine is shutting down")
        if not self.backend.embedding_dimensions:
            raise InvalidRequestError(
                "model",
                "this model is not served for embeddings: start its service with"
                " LLM_EMBEDDINGS=1 (an embedding model's GGUF turns them on by itself)",
            )
        n_ctx, n_vocab = self.backend.info.n_ctx, self.backend.info.n_vocab
        if request.texts:
            chars = sum(len(t) for t in request.texts)
            limit = self._limits.prompt_chars
            if chars > limit:
                raise InvalidRequestError(
                    "input", f"has {chars} characters; at most {limit} (LLM_MAX_PROMPT_CHARS)"
                )
            inputs = [
                await self.tokenize(text, add_special=True, parse_special=False)
                for text in request.texts
            ]
        else:
            inputs = [list(tokens) for tokens in request.token_inputs]
        for i, tokens in enumerate(inputs):
            if len(tokens) > n_ctx:
                raise PromptTooLongError(
                    f"input[{i}]", prompt_tokens=len(tokens), requested_tokens=len(tokens),
                    limit=n_ctx,
                )  # fmt: skip
            for t in tokens:
                if not 0 <= t < n_vocab:
                    raise InvalidRequestError(
                        f"input[{i}]", f"token id {t} is outside [0, {n_vocab})"
                    )
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._embedding, self.backend.embed, inputs)
        RequestLogger(logger, request.request_id).info(
            "embedded %s, %s", plural(len(inputs), "input"),
            plural(sum(len(t) for t in inputs), "token"),
        )  # fmt: skip
        return vectors, sum(len(t) for t in inputs)

    async def apply_chat_template(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt ``messages`` make (as ``generate`` renders them, offering no tools)."""
        request = GenerationRequest(messages=tuple(messages))
        return await self._run(lambda: self._chat_prompt(request)[0])

    # -- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Run one request.

        Yields:
            ``Started`` once a context is leased, ``TokenDelta``s as tokens are produced, then
            exactly one ``Finished``. Stopping iteration (or cancelling the task) stops
            generation within one token; the context is then cleared and returned.

        Raises (before the first event):
            InvalidRequestError, PromptTooLongError: bad input; no context was leased.
            OverloadedError: no context became free (queue full, or wait timed out).
            DeadlineExceededError: the deadline passed while waiting for a context.
        """
        if self._closing:
            raise EngineError("the engine is shutting down")
        arrived = time.monotonic()
        self._limits.check(request)
        log = RequestLogger(logger, request.request_id)
        prompt_tokens, tools, reasoning = await self._run(self._prompt, request)
        max_tokens = self._check_fits(request, len(prompt_tokens))
        sampling = request.sampling
        if tools.grammar is None:
            sampler = await self._create_sampler(sampling)
        else:  # the tool calls' shape
            try:
                sampler = await self._create_sampler(
                    dataclasses.replace(sampling, grammar=tools.grammar)
                )
            except InvalidRequestError as exc:  # the tools' schemas made a bad grammar
                raise InvalidRequestError("tools", exc.detail) from None
        handed_over = False  # once the context runs the generation, it closes the sampler
        try:
            async with self.pool.lease(self._lease_timeout(request)) as lease:
                context = lease.context
                run = Generation(
                    self.backend,
                    request,
                    prompt_tokens,
                    max_tokens,
                    sampler,
                    arrived=arrived,
                    queue_wait_s=lease.queue_wait_s,
                    loop=asyncio.get_running_loop(),
                    tool_calls=tools.parser,
                    reasoning=reasoning,
                )
                # The context starts before Started is yielded: the prompt is evaluated while
                # Started goes out.
                try:
                    lease.hold(context.start(run))
                except EngineError as exc:  # the context cannot run anything any more
                    run.fail(exc)
                    deliver((run,))
                handed_over = True
                try:
                    log.info(
                        "started on context %d: %s, max %d new, queued %.1f ms%s",
                        context.index,
                        plural(len(prompt_tokens), "prompt token"),
                        max_tokens,
                        lease.queue_wait_s * 1000,
                        f", {plural(len(request.tools), 'tool')} ({self._tool_syntax} syntax,"
                        f" tool_choice {request.tool_name or request.tool_choice})"
                        if request.tools
                        else "",
                    )
                    yield Started(
                        request.request_id,
                        len(prompt_tokens),
                        lease.queue_wait_s * 1000,
                        context.index,
                    )
                    while True:
                        event = await run.next_event()
                        yield event
                        if isinstance(event, Finished):
                            log.info(
                                "finished: %s, %s%s",
                                event.finish_reason.value,
                                plural(event.usage.completion_tokens, "token"),
                                f", {event.timings.decode_tokens_per_s:.1f} tokens/s"
                                if event.usage.completion_tokens > 1
                                else "",
                            )
                            return
                finally:
                    run.cancel()
        except OverloadedError:
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise DeadlineExceededError(
                    "the deadline passed while waiting for a free context"
                ) from None
            raise
        finally:
            if not handed_over:
                sampler.close()

    async def _create_sampler(self, sampling: SamplingParams) -> Sampler:
        """Build a request's sampler; never leak it, even if cancelled while it is built."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._prep, self.backend.create_sampler, sampling)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_result)
            raise

    def _prompt(
        self, request: GenerationRequest
    ) -> tuple[list[int], ToolPlan, ReasoningSplitter | None]:
        """The prompt's tokens; for a chat request, how its tools shape its answer, and how
        its reasoning is told from its text (the template may open the <think> block)."""
        if request.messages is not None:
            text, tools = self._chat_prompt(request)
            reasoning = None
            if request.split_reasoning:
                # (A grammar for tool calls holds the whole answer: no reasoning before it.)
                opened = tools.grammar is None and text.rstrip().endswith(THINK_OPEN)
                reasoning = ReasoningSplitter(inside=opened)
            # The template wrote BOS and the turn markers itself: parse them, add nothing.
            tokens = self.backend.tokenize(text, add_special=False, parse_special=True)
            return tokens, tools, reasoning
        assert request.prompt is not None
        # A raw prompt gets BOS if the model wants it; special-token text in it stays text.
        tokens = self.backend.tokenize(request.prompt, add_special=True, parse_special=False)
        return tokens, NO_TOOLS, None

    def _chat_prompt(self, request: GenerationRequest) -> tuple[str, ToolPlan]:
        """A chat request rendered with the template (and its tools, see ``tools.plan``)."""
        tools = plan(request, self._tool_syntax, self.backend.schema_to_gbnf)
        try:
            return self.backend.render_chat(tools.messages, tools.template_tools), tools
        except InvalidRequestError:
            assert request.messages is not None
            added = tools.messages[0]["role"] == "system" != request.messages[0].role
            if not added:  # the request's own messages were refused: say so
                raise
            # The template refused the system message the tools added (as Gemma 2's refuses
            # any): the text goes at the start of the first user turn instead.
            messages = system_as_user(tools.messages)
            text = self.backend.render_chat(messages, tools.template_tools)
            return text, dataclasses.replace(tools, messages=messages)

    def _check_fits(self, request: GenerationRequest, n_prompt: int) -> int:
        n_ctx = self.backend.info.n_ctx
        last_n = request.sampling.penalty_last_n
        if last_n > n_ctx:  # llama.cpp keeps a ring buffer of that many tokens
            raise InvalidRequestError(
                "sampling.penalty_last_n",
                f"must be at most the context size, {n_ctx}; got {last_n}",
            )
        field = "messages" if request.messages is not None else "prompt"
        if n_prompt == 0:
            raise InvalidRequestError(field, "tokenizes to nothing")
        if n_prompt >= n_ctx:
            raise PromptTooLongError(
                field, prompt_tokens=n_prompt, requested_tokens=n_prompt, limit=n_ctx
            )
        asked = request.sampling.max_tokens
        if asked is None:
            return n_ctx - n_prompt
        if n_prompt + asked > n_ctx:
            raise PromptTooLongError(
                "sampling.max_tokens",
                prompt_tokens=n_prompt,
                requested_tokens=n_prompt + asked,
                limit=n_ctx,
            )
        return asked

    def _lease_timeout(self, request: GenerationRequest) -> float | None:
        if request.deadline is None:
            return None
        remaining = max(0.0, request.deadline - time.monotonic())
        return min(remaining, self.pool.acquire_timeout_s)

    async def _run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking backend call in the engine's threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, functools.partial(fn, *args, **kwargs))


def _close_result(future: asyncio.Future[Sampler]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
