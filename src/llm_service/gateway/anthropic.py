"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

As in ``openai``, no field is dropped silently: each field of the request is served, refused
with a 400 naming it, or (``service_tier``, ``cache_control``) accepted and documented as
ignored; an unknown field is refused. ``to_generation`` turns a body into the same
``openai.Generation`` the OpenAI routes run; ``AnthropicWire`` writes the ``message`` object,
or its stream of named events (``message_start``, ``content_block_*``, ``message_delta``,
``message_stop``).

What is not served: images, documents and other non-text blocks, extended thinking, a last
assistant message to continue (prefill), server tools. A model's own ``<think>`` text stays in
the text (no ``thinking`` blocks without ``thinking`` enabled).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_service.client.types import (
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    Sampling,
    Tool,
    ToolCall,
    Tools,
    Usage,
)
from llm_service.errors import InvalidRequestError, LLMServiceError
from llm_service.gateway.openai import Generation, function_tool
from llm_service.gateway.status import http_error
from llm_service.gateway.wire import sse

__all__ = [
    "AnthropicWire",
    "CountTokensRequest",
    "MessagesRequest",
    "chat_messages",
    "stop_reason",
    "to_generation",
    "tool_list",
]

logger = logging.getLogger(__name__)

CACHE_CONTROL = "Accepted and ignored: prompt caching is the replica's own (its prefix cache)."
# The keys each served block type may have (``type`` and ``cache_control`` besides).
_BLOCK_KEYS = {
    "text": {"text", "citations"},
    "tool_use": {"id", "name", "input"},
    "tool_result": {"tool_use_id", "content", "is_error"},
}

# The block types served, for the OpenAPI document (``_check_block`` refuses others, naming them).
_SERVED_BLOCKS: dict[str, Any] = {"enum": sorted(_BLOCK_KEYS)}


class _Body(BaseModel):
    # Strict types (a string is not a number); an unknown field is refused, never dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


class ContentBlock(_Body):
    """A content block: ``text``, ``tool_use`` (an assistant's) or ``tool_result`` (a user's)
    are served; another type (image, document, thinking, ...) is refused with 400 naming it."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",  # so that a refused type is named as such, not by its first key
        json_schema_extra={"required": ["type"]},
    )

    type: str = Field(json_schema_extra=_SERVED_BLOCKS)
    text: str | None = None
    citations: list[Any] | None = Field(None, description="Only null or empty: no citations.")
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = Field(
        None, description="A tool_result's content: text, or text blocks."
    )
    is_error: bool | None = Field(
        None, description='A failed tool: its content is shown to the model after "Error: ".'
    )
    cache_control: dict[str, Any] | None = Field(None, description=CACHE_CONTROL)


class TextBlock(_Body):
    """A text block of ``system``."""

    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = Field(None, description=CACHE_CONTROL)
    citations: list[Any] | None = Field(None, description="Only null or empty: no citations.")


class MessageParam(_Body):
    """One turn: ``user`` or ``assistant``."""

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(_Body):
    """A client tool the model may call."""

    name: str = Field(description="1 to 64 characters of A-Z a-z 0-9 _ -.")
    description: str | None = None
    input_schema: dict[str, Any] = Field(
        description="A JSON schema; a call's input is constrained to it where calls are."
    )
    type: Literal["custom"] | None = Field(
        None, description="Client tools only (server tools are not served)."
    )
    cache_control: dict[str, Any] | None = Field(None, description=CACHE_CONTROL)


class ToolChoice(_Body):
    """How the model may call tools: ``auto``, ``any`` (at least one call), ``tool`` (the one
    named) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="With type tool: the tool to call.")
    disable_parallel_tool_use: bool | None = Field(None, description="At most one call per answer.")


class Metadata(_Body):
    user_id: str | None = Field(None, description="Recorded in the gateway's log only.")


class ThinkingParam(_Body):
    """Extended thinking: only ``disabled`` is served."""

    type: str = Field(json_schema_extra={"enum": ["disabled"]})
    budget_tokens: int | None = None


class _Conversation(_Body):
    model: str = Field(description="A model id from GET /v1/models.")
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingParam | None = Field(None, description="Not served: only disabled.")


class MessagesRequest(_Conversation):
    """``POST /v1/messages``."""

    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool | None = False
    metadata: Metadata | None = None
    cache_control: dict[str, Any] | None = Field(None, description=CACHE_CONTROL)
    service_tier: str | None = Field(
        None, description="Accepted and ignored: every request is served alike."
    )


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``."""


def to_generation(body: MessagesRequest) -> Generation:
    """The backend request for a Messages API body.

    Raises:
        InvalidRequestError: a value the gateway cannot serve, naming the field.
    """
    sampling: Sampling = {"max_tokens": body.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            sampling[name] = value
    if body.stop_sequences:
        sampling["stop"] = tuple(body.stop_sequences)
    prompt = chat_messages(body)
    # A <think> block stays in the text: this API has it only as thinking, which is not served.
    return Generation(prompt, sampling, bool(body.stream), False, _tools(body), 1, False)


def chat_messages(body: _Conversation) -> tuple[ChatMessage, ...]:
    """The conversation as chat messages: ``system`` first, a ``tool_result`` as a ``tool``
    message, an assistant's ``tool_use`` blocks as its tool calls.

    Raises:
        InvalidRequestError: a block that is not served, in the wrong turn or order, a last
            assistant message (prefill), thinking enabled; naming the field.
    """
    if body.thinking is not None and body.thinking.type != "disabled":
        raise InvalidRequestError("thinking", "extended thinking is not supported")
    out: list[ChatMessage] = []
    if isinstance(body.system, str):
        if body.system:
            out.append(ChatMessage("system", body.system))
    elif body.system:
        for j, block in enumerate(body.system):
            _no_citations(f"system[{j}]", block.citations)
        out.append(ChatMessage("system", "\n".join(b.text for b in body.system)))
    for i, message in enumerate(body.messages):
        out.extend(_turn(i, message))
    if body.messages[-1].role == "assistant":
        raise InvalidRequestError(
            f"messages[{len(body.messages) - 1}].role",
            "the last message must be a user's: continuing an assistant's message (prefill)"
            " is not supported",
        )
    return tuple(out)


def _turn(i: int, message: MessageParam) -> list[ChatMessage]:
    """One turn's messages: a user's tool results (each a ``tool`` message) then its text; an
    assistant's text and calls."""
    if isinstance(message.content, str):
        return [ChatMessage(message.role, message.content)]
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(message.content):
        field = f"messages[{i}].content[{j}]"
        _check_block(field, block)
        if block.type == "text":
            assert block.text is not None
            texts.append(block.text)
        elif block.type == "tool_use":
            if message.role != "assistant":
                raise InvalidRequestError(f"{field}.type", "only an assistant's turn has tool_use")
            assert block.id is not None and block.name is not None and block.input is not None
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input)))
        else:
            if message.role != "user":
                raise InvalidRequestError(f"{field}.type", "only a user's turn has tool_result")
            if texts:
                raise InvalidRequestError(field, "tool_result blocks come before any text")
            assert block.tool_use_id is not None
            text = _result_text(field, block.content)
            results.append(
                ChatMessage(
                    "tool", f"Error: {text}" if block.is_error else text, (), block.tool_use_id
                )
            )
    if message.role == "assistant":
        return [ChatMessage("assistant", "\n".join(texts), tuple(calls))]
    return results + ([ChatMessage("user", "\n".join(texts))] if texts or not results else [])


def _check_block(field: str, block: ContentBlock) -> None:
    """A served block type, with its required keys and no others.

    Raises:
        InvalidRequestError: naming the block, or its key.
    """
    keys = _BLOCK_KEYS.get(block.type)
    if keys is None:
        raise InvalidRequestError(
            field, f"content of type {block.type!r} is not supported (text, tool_use, tool_result)"
        )
    # (A key given as null is absent: SDKs write a block's unset fields so.)
    given = {k for k, v in block if v is not None}
    given |= {k for k, v in (block.model_extra or {}).items() if v is not None}
    if unknown := sorted(given - keys - {"type", "cache_control"}):
        raise InvalidRequestError(
            f"{field}.{unknown[0]}", f"is not a field of a {block.type} block"
        )
    required = {"text": ("text",), "tool_use": ("id", "name", "input")}.get(
        block.type, ("tool_use_id",)
    )
    for key in required:
        if getattr(block, key) is None:
            raise InvalidRequestError(f"{field}.{key}", "is required")
    _no_citations(field, block.citations)


def _no_citations(field: str, citations: list[Any] | None) -> None:
    if citations:
        raise InvalidRequestError(f"{field}.citations", "citations are not supported")


def _result_text(field: str, content: str | list[ContentBlock] | None) -> str:
    """A tool_result's content as text (text blocks only)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for k, block in enumerate(content):
        if block.type != "text":
            raise InvalidRequestError(
                f"{field}.content[{k}]",
                f"content of type {block.type!r} is not supported in a tool_result (text only)",
            )
        _check_block(f"{field}.content[{k}]", block)
        assert block.text is not None
        texts.append(block.text)
    return "\n".join(texts)


def tool_list(body: _Conversation) -> list[Tool]:
    """The request's tools.

    Raises:
        InvalidRequestError: a bad name or schema, naming ``tools[i]``'s field.
    """
    out = []
    for i, tool in enumerate(body.tools or ()):
        try:
            out.append(function_tool(f"tools[{i}]", tool.name, tool.description, tool.input_schema))
        except InvalidRequestError as exc:
            field = exc.field.replace(".parameters", ".input_schema", 1)
            raise InvalidRequestError(field, exc.detail) from None
    return out


def _tools(body: _Conversation) -> Tools | None:
    """The request's tools and how they may be called (None: no tools offered)."""
    choice = body.tool_choice
    functions = tool_list(body)
    if choice is not None and choice.type != "tool" and choice.name is not None:
        raise InvalidRequestError("tool_choice.name", "is only given with type tool")
    if not functions:
        if choice is not None and choice.type in ("any", "tool"):
            raise InvalidRequestError("tool_choice", "asks for a tool call, but tools is empty")
        return None
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    if choice is None or choice.type == "auto":
        return Tools(functions, "auto", None, parallel)
    if choice.type == "none":
        return Tools(functions, "none", None, parallel)
    if choice.type == "any":
        return Tools(functions, "required", None, parallel)
    if choice.name is None:
        raise InvalidRequestError("tool_choice.name", "is required with type tool")
    if choice.name not in {t.name for t in functions}:
        raise InvalidRequestError(
            "tool_choice.name", f"{choice.name[:80]!r} is not the name of one of the tools"
        )
    return Tools(functions, "required", choice.name, parallel)


def stop_reason(reason: FinishReason | None) -> str | None:
    """Anthropic's ``stop_reason``."""
    return {
        FinishReason.STOP: "end_turn",
        FinishReason.LENGTH: "max_tokens",
        FinishReason.STOP_SEQUENCE: "stop_sequence",
        FinishReason.TOOL_CALLS: "tool_use",
        None: None,
    }.get(reason, "end_turn")


def _tool_input(call: ToolCall, log_id: str) -> dict[str, Any]:
    """A call's arguments as an object. A call cut short by max_tokens has incomplete JSON:
    its input is then ``{}`` (logged), as the stop reason says it was cut."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        logger.warning(
            "[%s] tool call %s (%s): arguments are not a JSON object (cut short?): input {}",
            log_id, call.id, call.name,
        )  # fmt: skip
        return {}
    return value


class AnthropicWire:
    """The Messages API's answer as a ``wire.Wire``: the ``message`` object, or its events.

    Args:
        request_id: the request's id; the message's is ``msg_<id>``.
        model: the model id the client asked for.
        stop_sequences: the request's; with one, ``stop_sequence`` names it (the replica does
            not say which of several matched: then it is null).
    """

    def __init__(self, *, request_id: str, model: str, stop_sequences: Sequence[str]) -> None:
        self.request_id = request_id
        self.id = f"msg_{request_id}"
        self.model = model
        self.stop_sequence = stop_sequences[0] if len(stop_sequences) == 1 else None
        self._block = -1  # the open block's index (-1: none yet)
        self._open: str | None = None  # its type: "text" or "tool_use"; None: closed
        self._calls: dict[int, int] = {}  # a tool call's index -> its block's index
        self._reason: FinishReason | None = None

    def _stop(self, reason: FinishReason | None) -> dict[str, Any]:
        sequence = self.stop_sequence if reason is FinishReason.STOP_SEQUENCE else None
        return {"stop_reason": stop_reason(reason), "stop_sequence": sequence}

    def whole(self, completions: Sequence[Completion]) -> dict[str, Any]:
        [done] = completions  # n is 1
        content: list[dict[str, Any]] = []
        if done.text:
            content.append({"type": "text", "text": done.text})
        for call in done.tool_calls:
            tool_input = _tool_input(call, self.request_id)
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input}
            )
        usage = {
            "input_tokens": done.usage.prompt_tokens,
            "output_tokens": done.usage.completion_tokens,
        }
        return self._message(content, usage) | self._stop(done.finish_reason)

    def _message(self, content: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        head = {"id": self.id, "type": "message", "role": "assistant", "model": self.model}
        return head | {"content": content, "stop_reason": None, "stop_sequence": None,
                       "usage": usage}  # fmt: skip

    def begin(self, prompt_tokens: int) -> list[bytes]:
        message = self._message([], {"input_tokens": prompt_tokens, "output_tokens": 0})
        return [_event("message_start", message=message)]

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        out: list[bytes] = []
        if chunk.text:
            if self._open != "text":
                out += self._start({"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": chunk.text}
            out.append(_event("content_block_delta", index=self._block, delta=delta))
        for piece in chunk.tool_calls:
            if piece.id:
                block = {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}}
                out += self._start(block)
                self._calls[piece.index] = self._block
            if piece.arguments:
                delta = {"type": "input_json_delta", "partial_json": piece.arguments}
                at = self._calls[piece.index]
                out.append(_event("content_block_delta", index=at, delta=delta))
        if chunk.final:
            out += self._close()
            self._reason = chunk.finish_reason
        return out

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._block += 1
        self._open = block["type"]
        return [*out, _event("content_block_start", index=self._block, content_block=block)]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", index=self._block)]

    def end(self, usage: Usage) -> list[bytes]:
        delta = self._stop(self._reason)
        tokens = {"output_tokens": usage.completion_tokens}
        return [
            _event("message_delta", delta=delta, usage=tokens),
            _event("message_stop"),
        ]

    def failure(self, exc: LLMServiceError) -> list[bytes]:
        return [sse(http_error(exc, anthropic=True)[1], event="error")]


def _event(kind: str, **fields: Any) -> bytes:
    """A named event whose data's ``type`` is its name, as Anthropic's are."""
    return sse({"type": kind} | fields, event=kind)
