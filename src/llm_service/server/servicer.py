"""The ``llm.v1.Inference`` servicer: converts protobuf to engine calls and errors to statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.api.v1 import llm_pb2_grpc
from llm_service.api.v1 import metadata as md
from llm_service.engine import Engine, Finished, FinishReason, Started, TokenDelta
from llm_service.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    LLMServiceError,
    RequestCancelledError,
    UnavailableError,
)
from llm_service.log import RequestLogger
from llm_service.server import convert
from llm_service.server.metrics import ServiceMetrics
from llm_service.server.state import ServerState
from llm_service.server.status import GrpcStatus, status_for
from llm_service.types import EmbeddingRequest, new_request_id

__all__ = ["InferenceServicer"]

logger = logging.getLogger(__name__)
ServicerContext = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# A cancel this close to the call's deadline is the deadline, seen first by the client.
DEADLINE_SLACK_S = 0.25


def _request_id(given: str, context: ServicerContext) -> str:
    if given:
        return convert.check_request_id(given)
    for key, value in context.invocation_metadata() or ():
        if key == md.REQUEST_ID and isinstance(value, str):
            return convert.check_request_id(value, md.REQUEST_ID)
    return new_request_id()


class _ClientStalled(Exception):
    """The client stopped reading its stream."""


_CANCEL_LOG = {
    FinishReason.CANCELLED.value: "cancelled by the client",
    FinishReason.DEADLINE.value: "deadline passed",
}

# Finish reasons that end a started stream with a status instead of `done`.
_FAILED_FINISH: dict[FinishReason, tuple[type[LLMServiceError], str]] = {
    FinishReason.DEADLINE: (DeadlineExceededError, "the deadline passed during generation"),
    FinishReason.CANCELLED: (RequestCancelledError, "generation was cancelled"),
}


class InferenceServicer(llm_pb2_grpc.InferenceServicer):
    """Serves ``llm.v1.Inference`` on the engine in ``state``.

    Each Generate runs in its own task; ``cancel_all()`` ends the ones still running when the
    drain period is over, with UNAVAILABLE.
    """

    def __init__(
        self, state: ServerState, metrics: ServiceMetrics, *, stall_timeout: float = 30.0
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._stall_timeout = stall_timeout
        self._shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- Generate ------------------------------------------------------------------------

    # Written with context.write rather than as an async generator, so that cancellation (client
    # gone, deadline, shutdown) is always raised inside this coroutine, never between yields.
    async def Generate(  # type: ignore[override]
        self, request: pb.GenerateRequest, context: ServicerContext
    ) -> None:
        arrived = time.monotonic()
        log = RequestLogger(logger, "-")
        task = asyncio.current_task()
        assert task is not None
        self._state.calls.add(task)
        self._idle.clear()
        # How the call ended, counted once at the end: a finish reason once started, or the
        # status code of a refusal before that.
        outcome: str | None = None
        started = False
        try:
            request_id = _request_id(request.request_id, context)
            log = RequestLogger(logger, request_id)
            await context.send_initial_metadata(((md.REQUEST_ID, request_id),))
            engine = self._state.serving_engine()
            remaining = context.time_remaining()
            generation = convert.generation_request(
                request,
                request_id=request_id,
                deadline=arrived + remaining if remaining is not None else None,
            )
            log.info("Generate from %s", context.peer())
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request: %s", generation)
            last_token_at: float | None = None
            async with contextlib.aclosing(engine.generate(generation)) as events:
                async for event in events:
                    if isinstance(event, Started):
                        started = True
                    elif isinstance(event, TokenDelta) and event.token_ids:
                        now = time.monotonic()
                        if last_token_at is not None:
                            self._metrics.inter_token.observe(now - last_token_at)
                        last_token_at = now
                    elif isinstance(event, Finished):
                        outcome = event.finish_reason.value
                        self._metrics.finished(event)
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug("output: %r", event.text)
                        self._raise_if_failed(event)
                    await self._send(context, convert.event_message(event))
        except _ClientStalled:
            # Leaving the loop above closed the generation: its context is already free.
            outcome = "stalled"
            self._metrics.cancelled.inc()
            log.warning(
                "the client read nothing for %g s (LLM_STALL_TIMEOUT): stream cut off, context"
                " freed",
                self._stall_timeout,
            )
            stalled = RequestCancelledError(
                f"the client did not read the stream for {self._stall_timeout:g} s"
            )
            await self._end(context, status_for(stalled), log)
        except asyncio.CancelledError:
            if not self._shutting_down:
                if outcome is None:
                    # gRPC cancels the call both when the client goes and when its deadline
                    # passes; the client's clock started first, so its cancel can come first.
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= DEADLINE_SLACK_S:
                        outcome = FinishReason.DEADLINE.value
                    else:
                        outcome = FinishReason.CANCELLED.value
                        self._metrics.cancelled.inc()
                log.info(_CANCEL_LOG.get(outcome, f"call cancelled as it ended ({outcome})"))
                raise
            outcome = outcome or FinishReason.CANCELLED.value
            shutdown = UnavailableError("the server shut down before this request finished")
            await self._end(context, status_for(shutdown), log)
        except Exception as exc:
            status = status_for(exc, log.request_id)
            if started:
                outcome = outcome or FinishReason.ERROR.value
            else:
                self._metrics.rejected.labels(status.code.name).inc()
            await self._end(context, status, log)
        finally:
            if outcome is not None:
                self._metrics.requests.labels(outcome).inc()
            self._state.calls.discard(task)
            if not self._state.calls:
                self._idle.set()

    async def _send(self, context: ServicerContext, message: pb.GenerateResponse) -> None:
        """Write one message; _ClientStalled if the client leaves it unread too long (flow
        control holds the write while the client's window is full)."""
        # asyncio.timeout, not wait_for: the write must stay in this call's own task, so that a
        # client's cancel reaches it as CancelledError (wait_for's inner task would fail first,
        # with gRPC's ExecuteBatchError).
        try:
            async with asyncio.timeout(self._stall_timeout):
                await context.write(message)
        except TimeoutError:
            raise _ClientStalled from None

    @staticmethod
    def _raise_if_failed(event: Finished) -> None:
        if event.finish_reason is FinishReason.ERROR and event.error_field is not None:
            raise InvalidRequestError(event.error_field, event.error or "cannot be followed")
        if event.finish_reason is FinishReason.ERROR:
            raise EngineError(event.error or "generation failed")
        if event.finish_reason in _FAILED_FINISH:
            error, message = _FAILED_FINISH[event.finish_reason]
            raise error(message)

    @staticmethod
    async def _end(context: ServicerContext, status: GrpcStatus, log: RequestLogger) -> NoReturn:
        if status.code is not grpc.StatusCode.INTERNAL:  # INTERNAL was logged with its traceback
            log.info("ended with %s: %s", status.code.name, status.message)
        await status.abort(context)

    @property
    def in_flight(self) -> int:
        """Generate calls being served or waiting for a context."""
        return self._state.in_flight

    async def wait_idle(self, grace_s: float) -> bool:
        """Wait until no Generate call is in flight; False if ``grace_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            return False
        return True

    async def cancel_all(self) -> int:
        """End every Generate still running with UNAVAILABLE; return how many there were."""
        self._shutting_down = True
        tasks = list(self._state.calls)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    # -- unary calls ---------------------------------------------------------------------

    async def _unary(
        self,
        context: ServicerContext,
        call: Callable[[Engine], Awaitable[T]],
        *,
        while_draining: bool = False,
        request_id_given: str = "",
    ) -> T:
        request_id = "-"
        try:
            request_id = _request_id(request_id_given, context)
            await context.send_initial_metadata(((md.REQUEST_ID, request_id),))
            return await call(self._state.serving_engine(while_draining=while_draining))
        except Exception as exc:
            await status_for(exc, request_id).abort(context)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: ServicerContext
    ) -> pb.TokenizeResponse:
        async def call(engine: Engine) -> pb.TokenizeResponse:
            tokens = await engine.tokenize(
                request.text,
                add_special=request.add_special if request.HasField("add_special") else True,
                parse_special=request.parse_special,
            )
            return pb.TokenizeResponse(tokens=tokens)

        return await self._unary(context, call)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: ServicerContext
    ) -> pb.DetokenizeResponse:
        async def call(engine: Engine) -> pb.DetokenizeResponse:
            return pb.DetokenizeResponse(text=await engine.detokenize(list(request.tokens)))

        return await self._unary(context, call)

    async def ApplyChatTemplate(
        self, request: pb.ApplyChatTemplateRequest, context: ServicerContext
    ) -> pb.ApplyChatTemplateResponse:
        async def call(engine: Engine) -> pb.ApplyChatTemplateResponse:
            text = await engine.apply_chat_template(convert.messages(request.messages))
            tokens = await engine.tokenize(text, add_special=False, parse_special=True)
            return pb.ApplyChatTemplateResponse(text=text, prompt_tokens=len(tokens))

        return await self._unary(context, call)

    async def Embed(self, request: pb.EmbedRequest, context: ServicerContext) -> pb.EmbedResponse:
        async def call(engine: Engine) -> pb.EmbedResponse:
            embedding = EmbeddingRequest(
                texts=tuple(request.texts),
                token_inputs=tuple(tuple(t.tokens) for t in request.token_inputs),
                request_id=_request_id(request.request_id, context),
            )
            vectors, tokens = await engine.embed(embedding)
            return pb.EmbedResponse(
                embeddings=[pb.Embedding(values=v) for v in vectors], prompt_tokens=tokens
            )

        return await self._unary(context, call, request_id_given=request.request_id)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: ServicerContext
    ) -> pb.ModelInfo:
        async def call(engine: Engine) -> pb.ModelInfo:
            return convert.model_info_message(
                engine.info,
                pool_size=self._state.pool_size,
                pool_mode=engine.pool_mode,
                http_port=self._state.http_port,
                embedding_dimensions=engine.embedding_dimensions,
            )

        return await self._unary(context, call, while_draining=True)

    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: ServicerContext
    ) -> pb.ServerStatus:
        # Answers in every phase: it is how an operator sees a server loading or draining.
        state = self._state
        pool = state.pool_state()
        return pb.ServerStatus(
            state=state.phase.value,
            pool=convert.pool_message(pool) if pool is not None else None,
            uptime_s=time.monotonic() - state.started_at,
            requests_in_flight=state.in_flight,
        )
