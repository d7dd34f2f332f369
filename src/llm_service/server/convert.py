"""Protobuf <-> engine types. The only module where ``llm.v1`` messages meet the engine's types."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llm_service import __version__
from llm_service.api.v1 import llm_pb2 as pb
from llm_service.engine import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    LoadedModel,
    PoolMode,
    PoolState,
    SamplingParams,
    Started,
    TokenDelta,
)
from llm_service.errors import InvalidRequestError
from llm_service.types import REQUEST_ID_RULE, TokenLogprob, Tool, ToolCall, is_request_id

__all__ = [
    "FINISH_REASONS",
    "event_message",
    "generation_request",
    "messages",
    "model_info_message",
    "pool_message",
]


# Finish reasons that end a stream with `done`; the others end it with a status.
FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}

# SamplingParams fields carried by `optional` proto fields of the same name.
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_last_n",
    "seed",
    "logprobs",
)


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """``request_id`` if it follows the request-id rule; else InvalidRequestError."""
    if not is_request_id(request_id):
        raise InvalidRequestError(field, f"must be {REQUEST_ID_RULE}")
    return request_id


def messages(items: Sequence[pb.ChatMessage]) -> tuple[ChatMessage, ...]:
    """Chat messages from their protobuf form (validated; at least one)."""
    if not items:
        raise InvalidRequestError("messages", "must not be empty")
    converted = []
    for i, m in enumerate(items):
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
        try:
            converted.append(ChatMessage(m.role, m.content, calls, m.tool_call_id or None))
        except InvalidRequestError as exc:
            # Say which message: "messages[2].role", not "messages.role".
            field = exc.field.replace("messages", f"messages[{i}]", 1)
            raise InvalidRequestError(field, exc.detail) from None
    return tuple(converted)


def tools(items: Sequence[pb.Tool]) -> tuple[Tool, ...]:
    """Tools from their protobuf form (validated)."""
    converted = []
    for i, t in enumerate(items):
        try:
            if t.parameters:
                converted.append(Tool(t.name, t.description, t.parameters))
            else:
                converted.append(Tool(t.name, t.description))
        except InvalidRequestError as exc:
            field = exc.field.replace("tools", f"chat.tools[{i}]", 1)
            raise InvalidRequestError(field, exc.detail) from None
    return tuple(converted)


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Sampling parameters: set fields override the engine's defaults."""
    given: dict[str, object] = {
        name: getattr(msg, name)
        for name in _OPTIONAL_SAMPLING_FIELDS
        if msg.HasField(name)  # type: ignore[arg-type]
    }
    if msg.stop:
        given["stop"] = tuple(msg.stop)
    constraint = msg.WhichOneof("constraint")
    if constraint is not None:
        given[constraint] = getattr(msg, constraint)
    if msg.logit_bias:
        given["logit_bias"] = tuple(sorted(msg.logit_bias.items()))
    return SamplingParams(**given)  # type: ignore[arg-type]


def generation_request(
    msg: pb.GenerateRequest, *, request_id: str, deadline: float | None
) -> GenerationRequest:
    """The engine request for a GenerateRequest (InvalidRequestError names the bad field)."""
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("input", "give a prompt or chat messages")
    if which == "prompt":
        return GenerationRequest(
            prompt=msg.prompt,
            sampling=sampling_params(msg.sampling),
            request_id=request_id,
            deadline=deadline,
        )
    chat = msg.chat
    try:
        return GenerationRequest(
            messages=messages(chat.messages),
            sampling=sampling_params(msg.sampling),
            request_id=request_id,
            deadline=deadline,
            tools=tools(chat.tools),
            tool_choice=chat.tool_choice or ("required" if chat.tool_name else "auto"),
            tool_name=chat.tool_name or None,
            parallel_tool_calls=(
                chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
            ),
            split_reasoning=chat.split_reasoning if chat.HasField("split_reasoning") else True,
        )
    except InvalidRequestError as exc:
        if exc.field.startswith("tool"):  # the request's own tool fields are the chat's
            raise InvalidRequestError(f"chat.{exc.field}", exc.detail) from None
        raise


def event_message(event: GenerationEvent) -> pb.GenerateResponse:
    """The stream message for an engine event (a Finished must have a success reason)."""
    if isinstance(event, Started):
        return pb.GenerateResponse(
            started=pb.Started(
                request_id=event.request_id,
                prompt_tokens=event.prompt_tokens,
                queue_wait_ms=event.queue_wait_ms,
                slot=event.slot,
            )
        )
    if isinstance(event, TokenDelta):
        delta = pb.Delta(token_ids=event.token_ids, text=event.text, reasoning=event.reasoning)
        for c in event.tool_calls:
            delta.tool_calls.add(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
        delta.logprobs.extend(_logprob(lp) for lp in event.logprobs)
        return pb.GenerateResponse(delta=delta)
    assert isinstance(event, Finished)
    usage, t = event.usage, event.timings
    timings = pb.Timings(
        queue_wait_ms=t.queue_wait_ms,
        prefill_ms=t.prefill_ms,
        decode_tokens_per_s=t.decode_tokens_per_s,
        total_ms=t.total_ms,
    )
    if t.time_to_first_token_ms is not None:
        timings.time_to_first_token_ms = t.time_to_first_token_ms
    return pb.GenerateResponse(
        done=pb.Done(
            finish_reason=FINISH_REASONS[event.finish_reason],
            usage=pb.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            timings=timings,
            text=event.text,
            reasoning=event.reasoning,
            tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                        for c in event.tool_calls],
        )
    )  # fmt: skip


def _logprob(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        piece=lp.piece,
        logprob=lp.logprob,
        top=[pb.TokenLogprob(token_id=t.token_id, piece=t.piece, logprob=t.logprob)
             for t in lp.top],
    )  # fmt: skip


def pool_message(state: PoolState) -> pb.PoolStatus:
    return pb.PoolStatus(**dataclasses.asdict(state))


_POOL_MODES: dict[PoolMode, pb.PoolMode.ValueType] = {
    "batched": pb.POOL_MODE_BATCHED,
    "contexts": pb.POOL_MODE_CONTEXTS,
}


def model_info_message(
    info: LoadedModel,
    *,
    pool_size: int,
    pool_mode: PoolMode,
    http_port: int = 0,
    embedding_dimensions: int = 0,
) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        path=info.path,
        size_bytes=info.size_bytes,
        n_params=info.n_params,
        context_per_slot=info.n_ctx,
        n_ctx_train=info.n_ctx_train,
        n_vocab=info.n_vocab,
        pool_size=pool_size,
        pool_mode=_POOL_MODES[pool_mode],
        llama_cpp_commit=info.llama_cpp_commit,
        description=info.description,
        has_chat_template=info.chat_template is not None,
        server_version=__version__,
        http_port=http_port,
        embedding_dimensions=embedding_dimensions,
    )
