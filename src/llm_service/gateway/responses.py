"""OpenAI's Responses API (``POST /v1/responses``), stateless: request bodies in, ``response``
objects and their stream of events out.

Nothing is stored: ``previous_response_id``, ``conversation``, ``prompt`` templates, ``store:
true`` and ``background`` are refused by name, and a conversation goes on by sending its items
again (``input``: messages, ``function_call`` and ``function_call_output`` items). As in
``openai``, no field is dropped silently: every field of the request body is served, refused
with a 400 naming it, or accepted and documented as ignored in the OpenAPI document.
``to_generation`` turns a body into what the backend is asked (sharing ``openai``'s tools and
schemas), and ``ResponsesWire`` writes the ``response`` object and its events.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_service.client.types import (
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    Tools,
    Usage,
)
from llm_service.errors import (
    InvalidRequestError,
    LLMServiceError,
    OverloadedError,
    PromptTooLongError,
    RateLimitedError,
)
from llm_service.gateway.openai import (
    IGNORED,
    MAX_LOGPROBS,
    Generation,
    chat_logprob,
    format_schema,
    function_tool,
    offered_tools,
)
from llm_service.gateway.status import http_error
from llm_service.gateway.wire import sse

__all__ = ["ResponsesRequest", "ResponsesWire", "to_generation"]

# The Responses API's message roles; "developer" is the newer name of "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The include value served: the output text's log probabilities (with top_logprobs).
LOGPROBS = "message.output_text.logprobs"
NOT_SERVED = "Not served: only null."
STATELESS = "Not served (nothing is stored: send the conversation's items as input): only null."


def _served(*values: object) -> dict[str, Any]:
    """The values a field is served with, for the OpenAPI document (as ``openai._served``)."""
    return {"enum": list(values)}


def _one_of(required: dict[str, list[str]]) -> dict[str, Any]:
    """The document's shape of an open model: by its ``type``, the fields it needs."""
    return {
        "oneOf": [
            {"properties": {"type": {"const": kind}}, "required": fields}
            for kind, fields in required.items()
        ]
    }


class _Body(BaseModel):
    # Strict types (a string is not a number); an unknown field is refused, never dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """A model with a ``type`` whose other types have fields of their own: the fields are kept
    (``model_extra``) so that an unserved type is refused by its ``type`` first, then a field
    that is not the served type's by its name (``_refuse_extra``)."""

    model_config = ConfigDict(strict=True, extra="allow")


def _refuse_extra(obj: _Open, where: str, what: str, fields: Sequence[str] = ()) -> None:
    """A 400 naming the first field of ``obj`` that is not one of ``what``'s: unknown, or
    (``fields``: the only ones set that ``what`` has) out of place."""
    out_of_place = sorted(obj.model_fields_set - set(fields)) if fields else []
    for name in [*(obj.model_extra or {}), *out_of_place]:
        raise InvalidRequestError(f"{where}.{name}", f"is not a field of {what}")


# Each item's fields beside type, id and status; the first of each, required.
_ITEM_FIELDS = {
    "message": ("role", "content"),
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}
_PART_TEXT = {"input_text": "text", "output_text": "text", "refusal": "refusal"}


class InputPart(_Open):
    """A part of a message's content, or of a function call's output: text only."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra={"required": ["type"]} | _one_of({k: [v] for k, v in _PART_TEXT.items()}),
    )

    type: str = Field(json_schema_extra=_served(*_PART_TEXT))
    text: str | None = Field(None, json_schema_extra={"type": "string"})
    refusal: str | None = Field(None, json_schema_extra={"type": "string"})
    annotations: list[Any] | None = Field(
        None, description="Accepted and ignored: an earlier answer's citations."
    )
    logprobs: list[Any] | None = Field(
        None, description="Accepted and ignored: an earlier answer's log probabilities."
    )


class InputItem(_Open):
    """One item of ``input``: a message (``type`` may be left out), a function call the model
    made, or a function call's output."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra=_one_of({k: list(v) for k, v in _ITEM_FIELDS.items()}),
    )

    type: str = Field("message", json_schema_extra=_served(*_ITEM_FIELDS))
    role: str | None = Field(None, json_schema_extra=_served(*_ROLES))
    content: list[InputPart] | str | None = None
    call_id: str | None = Field(None, description="A function call's id, and the output's.")
    name: str | None = None
    arguments: str | None = Field(None, description="A function call's arguments (JSON text).")
    output: list[InputPart] | str | None = Field(None, description="A function call's output.")
    id: str | None = Field(None, description="Accepted and ignored: an earlier item's id.")
    status: str | None = Field(None, description="Accepted and ignored: an earlier item's status.")


class FunctionTool(_Open):
    """One of ``tools``: function tools only."""

    model_config = ConfigDict(
        strict=True, extra="allow", json_schema_extra={"required": ["type", "name"]}
    )

    type: str = Field(json_schema_extra=_served("function"))
    name: str | None = Field(None, description="1 to 64 characters of A-Z a-z 0-9 _ -.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema; the call's arguments are constrained to it."
    )
    strict: bool | None = Field(
        None,
        description="Always served as true where calls are constrained (tool_choice required or"
        " a named function, or any tool_choice on a template without native tool support).",
    )


class NamedToolChoice(_Open):
    """``tool_choice`` naming the one function to call."""

    model_config = ConfigDict(
        strict=True, extra="allow", json_schema_extra={"required": ["type", "name"]}
    )

    type: str = Field(json_schema_extra=_served("function"))
    name: str | None = None


class TextFormat(_Body):
    """``text.format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, description="Accepted and ignored: a label for the schema.")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(
        None, description="Always served as true: the answer is constrained to the schema."
    )
    description: str | None = Field(
        None, description="Accepted and ignored: the model is not shown the schema's description."
    )


class TextConfig(_Body):
    """``text``."""

    format: TextFormat | None = None
    verbosity: str | None = Field(None, description=NOT_SERVED)


class StreamOptions(_Body):
    """``stream_options``."""

    include_obfuscation: bool | None = Field(
        None, description="Accepted and ignored: this gateway pads no stream events."
    )


class ResponsesRequest(_Body):
    """``POST /v1/responses``."""

    model: str = Field(description="A model id from GET /v1/models.")
    input: list[InputItem] | str = Field(
        description="A user message's text, or the conversation's items: messages (roles user,"
        " system, developer, assistant; text content), function_call and function_call_output."
    )
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    tools: list[FunctionTool] | None = Field(
        None, description="Functions the model may call (at most 128; see docs/api.md)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools), "none", "required", or a function.'
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether an answer may hold more than one call (default true)."
    )
    text: TextConfig | None = None
    include: list[str] | None = Field(
        None,
        description=f'Only "{LOGPROBS}" is served: the output text\'s log probabilities.',
        json_schema_extra={"items": {"type": "string", "enum": [LOGPROBS]}},
    )
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description=f'With include "{LOGPROBS}": the most likely tokens at each position.'
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        None,
        description='Only "disabled" is served: an input longer than the context is refused.',
        json_schema_extra=_served("disabled", None),
    )
    store: bool | None = Field(
        None,
        description="Only false: nothing is stored.",
        json_schema_extra=_served(False, None),
    )
    background: bool | None = Field(
        None,
        description="Only false: a response is served while the request waits.",
        json_schema_extra=_served(False, None),
    )
    previous_response_id: str | None = Field(None, description=STATELESS)
    conversation: Any | None = Field(None, description=STATELESS)
    prompt: Any | None = Field(None, description="Not served (stored prompts): only null.")
    context_management: list[Any] | None = Field(
        None, description="Not served (context compaction): only null or empty."
    )
    reasoning: Any | None = Field(
        None,
        description="Not served: only null. A model's <think> block, if it writes one, stays in"
        " the output text.",
    )
    background_options: Any | None = Field(None, description=NOT_SERVED)
    moderation: Any | None = Field(None, description=NOT_SERVED)
    image: Any | None = Field(None, description="Not served (no image input): only null.")
    max_tool_calls: int | None = Field(
        None, description="Accepted and ignored: it bounds built-in tools, and none is served."
    )
    metadata: dict[str, str] | None = Field(None, description="Echoed in the response; not stored.")
    user: str | None = Field(None, description="Recorded in the gateway's log only.")
    # Labels for OpenAI's own services.
    access_programs: Any | None = Field(None, description=IGNORED)
    service_tier: str | None = Field(None, description=IGNORED)
    safety_identifier: str | None = Field(None, description=IGNORED)
    prompt_cache_key: str | None = Field(None, description=IGNORED)
    prompt_cache_options: Any | None = Field(None, description=IGNORED)
    prompt_cache_retention: str | None = Field(None, description=IGNORED)


def to_generation(body: ResponsesRequest) -> Generation:
    """The backend request for a Responses API body (one choice; a ``<think>`` block stays in
    the text, as the API's reasoning items are not served).

    Raises:
        InvalidRequestError: a value the gateway cannot serve, naming the parameter.
    """
    _refuse_unserved(body)
    sampling: Sampling = {}
    if body.max_output_tokens is not None:
        sampling["max_tokens"] = body.max_output_tokens
    if body.temperature is not None:
        sampling["temperature"] = body.temperature
    if body.top_p is not None:
        sampling["top_p"] = body.top_p
    for value in body.include or ():
        if value != LOGPROBS:
            raise InvalidRequestError("include", f'only "{LOGPROBS}" is served, got {value!r}')
    if body.include:
        sampling["logprobs"] = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise InvalidRequestError("top_logprobs", f'needs include: ["{LOGPROBS}"]')
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        schema = format_schema(fmt.type, fmt.schema_, "text.format.schema")
        if schema is not None:
            sampling["json_schema"] = schema
    tools = _tools(body)
    if tools is not None and tools.choice != "none" and "logprobs" in sampling:
        raise InvalidRequestError(
            "include", "log probabilities are not served together with tool calls"
        )
    system = (ChatMessage("system", body.instructions),) if body.instructions is not None else ()
    prompt = system + _messages(body.input)
    return Generation(prompt, sampling, bool(body.stream), False, tools, 1, split_reasoning=False)


def _refuse_unserved(body: ResponsesRequest) -> None:
    """A 400 naming the first field whose value asks for what is not served."""
    stateless = "nothing is stored: send the conversation's items as input"
    if body.store:
        raise InvalidRequestError("store", f"only store: false is served ({stateless})")
    if body.background:
        raise InvalidRequestError("background", "background responses are not served")
    if body.truncation == "auto":
        raise InvalidRequestError("truncation", 'only "disabled" is served')
    if body.context_management:
        raise InvalidRequestError("context_management", "context compaction is not supported")
    for name, what in (
        ("previous_response_id", stateless),
        ("conversation", stateless),
        ("prompt", "stored prompts are not supported"),
        ("reasoning", "reasoning options are not supported (no reasoning items are served)"),
        ("background_options", "background responses are not served"),
        ("moderation", "moderation is not supported"),
        ("image", "image input is not supported"),
    ):
        if getattr(body, name) is not None:
            raise InvalidRequestError(name, what)
    if body.text is not None and body.text.verbosity is not None:
        raise InvalidRequestError("text.verbosity", "verbosity is not supported")


def _tools(body: ResponsesRequest) -> Tools | None:
    functions: list[Tool] = []
    for i, tool in enumerate(body.tools or ()):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise InvalidRequestError(
                f"{where}.type", f"only function tools are served, got {tool.type!r}"
            )
        _refuse_extra(tool, where, "a function tool")
        if tool.name is None:
            raise InvalidRequestError(f"{where}.name", "is required")
        functions.append(function_tool(where, tool.name, tool.description, tool.parameters))
    choice, parallel = body.tool_choice, body.parallel_tool_calls
    if not isinstance(choice, NamedToolChoice):
        return offered_tools(functions, choice, None, parallel, name_field="")
    if choice.type != "function":
        raise InvalidRequestError(
            "tool_choice.type", f"only function is served, got {choice.type!r}"
        )
    _refuse_extra(choice, "tool_choice", "a function tool choice")
    if choice.name is None:
        raise InvalidRequestError("tool_choice.name", "is required")
    return offered_tools(
        functions, "required", choice.name, parallel, name_field="tool_choice.name"
    )


def _messages(given: list[InputItem] | str) -> tuple[ChatMessage, ...]:
    """``input`` as chat messages: a function call joins the assistant message before it (or
    makes one), and its output is a ``tool`` message."""
    if isinstance(given, str):
        return (ChatMessage("user", given),)
    out: list[ChatMessage] = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        fields = _ITEM_FIELDS.get(item.type)
        if fields is None:
            raise InvalidRequestError(
                f"{where}.type",
                f"items of type {item.type!r} are not served (message, function_call and"
                " function_call_output are)",
            )
        _refuse_extra(item, where, f"a {item.type} item", ("type", "id", "status", *fields))
        for name in fields:
            if getattr(item, name) is None:
                raise InvalidRequestError(f"{where}.{name}", "is required")
        if item.type == "message":
            role = _ROLES.get(item.role or "")
            if role is None:
                raise InvalidRequestError(
                    f"{where}.role",
                    f"unknown role {item.role!r}; expected one of {', '.join(sorted(_ROLES))}",
                )
            out.append(ChatMessage(role, _text(item.content, f"{where}.content")))
        elif item.type == "function_call":
            assert item.call_id is not None and item.name is not None  # required above
            call = ToolCall(item.call_id, item.name, item.arguments or "")
            if out and out[-1].role == "assistant":  # the calls of one answer: one message
                last = out.pop()
                out.append(ChatMessage("assistant", last.content, (*last.tool_calls, call)))
            else:
                out.append(ChatMessage("assistant", "", (call,)))
        else:
            output = _text(item.output, f"{where}.output")
            out.append(ChatMessage("tool", output, tool_call_id=item.call_id))
    return tuple(out)


def _text(content: list[InputPart] | str | None, where: str) -> str:
    """A content's text: a string, or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        text_field = _PART_TEXT.get(part.type)
        text = getattr(part, text_field) if text_field else None
        if text is None:
            raise InvalidRequestError(
                f"{where}[{j}]", f"content of type {part.type!r} is not supported (text only)"
            )
        _refuse_extra(part, f"{where}[{j}]", f"an {part.type} part")
        texts.append(text)
    return "".join(texts)


def usage_object(usage: Usage) -> dict[str, Any]:
    """The Responses API's usage. The replicas report no prompt-cache hits, and reasoning is
    not told apart from the output text: those counts are 0."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _error_code(exc: LLMServiceError) -> str:
    """The Responses API's ``error.code`` of a response that failed (its codes are few)."""
    if isinstance(exc, RateLimitedError | OverloadedError):
        return "rate_limit_exceeded"
    if isinstance(exc, InvalidRequestError | PromptTooLongError):
        return "invalid_prompt"
    return "server_error"


class ResponsesWire:
    """The ``response`` object of one request and its stream of events, as a ``wire.Wire``.

    Streamed: ``response.created`` and ``response.in_progress``; a ``message`` item (opened
    by the first text) and a ``function_call`` item per call, each added, filled by deltas and
    done when the generation ends; then ``response.completed`` (``response.incomplete`` when
    ``max_output_tokens`` cut it) with the whole response, or ``response.failed``. Every
    event is named (``event:``) and numbered (``sequence_number``).

    Args:
        body: the request (its settings are echoed in the response, as OpenAI's are).
        request_id: the request's id; the response is ``resp_<id>``, its message ``msg_<id>``.
        logprobs: the output text carries its log probabilities.
    """

    def __init__(self, body: ResponsesRequest, request_id: str, *, logprobs: bool) -> None:
        self.id = f"resp_{request_id}"
        self.message_id = f"msg_{request_id}"
        self.created_at = int(time.time())
        self.logprobs = logprobs
        self._head = self._echo(body)
        self._sequence = 0
        self._started = False
        self._output: list[dict[str, Any]] = []  # the items, by output index
        self._message: int | None = None  # the message item's output index
        self._calls: dict[int, int] = {}  # a call's index -> its item's output index
        self._token_logprobs: list[dict[str, Any]] = []
        self._finish: FinishReason | None = None

    def _echo(self, body: ResponsesRequest) -> dict[str, Any]:
        """The request's settings, as a response repeats them."""
        fmt = body.text.format if body.text is not None else None
        choice = body.tool_choice
        if isinstance(choice, NamedToolChoice):
            tool_choice: str | dict[str, Any] = {"type": choice.type, "name": choice.name}
        else:
            tool_choice = choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": body.model,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "temperature": body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)}
            if fmt is not None
            else {"format": {"type": "text"}},
            "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
            "top_logprobs": body.top_logprobs,
            "top_p": body.top_p,
            "truncation": "disabled",
            "user": body.user,
        }

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object in ``status``."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return self._head | {
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            "usage": usage_object(usage) if usage is not None else None,
        }

    def _status(self, reason: FinishReason | None) -> str:
        return "incomplete" if reason is FinishReason.LENGTH else "completed"

    # -- the whole answer -------------------------------------------------------------------

    def whole(self, completions: Sequence[Completion]) -> dict[str, Any]:
        [done] = completions  # one choice: the API has no n
        status = self._status(done.finish_reason)
        output = []
        if done.text:
            part = self._part(done.text, done.logprobs)
            output.append(self._message_item(status, [part]))
        output += [self._call_item(call, status) for call in done.tool_calls]
        return self.response(status, output, done.usage)

    def _part(self, text: str, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = [chat_logprob(lp) for lp in logprobs]
        return part

    def _message_item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": content}  # fmt: skip

    @staticmethod
    def _call_item(call: ToolCall, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": _item_id(call.id), "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": status}  # fmt: skip

    # -- the stream -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence} | fields
        self._sequence += 1
        return sse(event, event=kind)

    def begin(self, prompt_tokens: int) -> list[bytes]:
        return self._start()

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        created = self.response("in_progress", [])
        return [
            self._event("response.created", response=created),
            self._event("response.in_progress", response=created),
        ]

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        out = self._start()
        if chunk.text or chunk.logprobs:
            out += self._text_delta(chunk.text, chunk.logprobs)
        for piece in chunk.tool_calls:
            out += self._call_delta(piece)
        if chunk.final:
            self._finish = chunk.finish_reason
            out += self._close()
        return out

    def _text_delta(self, text: str, logprobs: Sequence[TokenLogprob]) -> list[bytes]:
        out = []
        if self._message is None:
            self._message = len(self._output)
            self._output.append(self._message_item("in_progress", []))
            out.append(self._event("response.output_item.added", output_index=self._message,
                                   item=self._output[self._message]))  # fmt: skip
            out.append(self._event("response.content_part.added", **self._where(),
                                   part=self._part("", ())))  # fmt: skip
            self._output[self._message]["content"].append(self._part("", ()))
        self._output[self._message]["content"][0]["text"] += text
        listed = [chat_logprob(lp) for lp in logprobs] if self.logprobs else []
        self._token_logprobs += listed
        out.append(self._event("response.output_text.delta", **self._where(), delta=text,
                               logprobs=listed))  # fmt: skip
        return out

    def _where(self) -> dict[str, Any]:
        """Where an event of the message's text goes."""
        return {"item_id": self.message_id, "output_index": self._message, "content_index": 0}

    def _call_delta(self, piece: ToolCallDelta) -> list[bytes]:
        out = []
        if piece.id:  # a call's first piece
            self._calls[piece.index] = len(self._output)
            self._output.append(self._call_item(ToolCall(piece.id, piece.name, ""), "in_progress"))
            out.append(self._event("response.output_item.added", output_index=len(self._output) - 1,
                                   item=self._output[-1]))  # fmt: skip
        position = self._calls[piece.index]
        item = self._output[position]
        if piece.arguments:
            item["arguments"] += piece.arguments
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=position, delta=piece.arguments))  # fmt: skip
        return out

    def _close(self) -> list[bytes]:
        """The events that finish every item, in output order."""
        status = self._status(self._finish)
        out = []
        for position, item in enumerate(self._output):
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                if self.logprobs:
                    part["logprobs"] = self._token_logprobs
                text = {"text": part["text"], "logprobs": self._token_logprobs}
                out.append(self._event("response.output_text.done", **self._where(), **text))
                out.append(self._event("response.content_part.done", **self._where(), part=part))
            else:
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item["id"], output_index=position,
                                       arguments=item["arguments"]))  # fmt: skip
            out.append(self._event("response.output_item.done", output_index=position, item=item))
        return out

    def end(self, usage: Usage) -> list[bytes]:
        status = self._status(self._finish)
        return [
            self._event(f"response.{status}", response=self.response(status, self._output, usage))
        ]

    def failure(self, exc: LLMServiceError) -> list[bytes]:
        out = self._start()  # (an error may come before the first token)
        for item in self._output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        message = http_error(exc)[1]["error"]["message"]
        error = {"code": _error_code(exc), "message": message}
        failed = self.response("failed", self._output, error=error)
        return [*out, self._event("response.failed", response=failed)]


def _item_id(call_id: str) -> str:
    """A function call item's id, from its call's (``call_<hex>`` -> ``fc_<hex>``)."""
    return "fc_" + call_id.removeprefix("call_")
