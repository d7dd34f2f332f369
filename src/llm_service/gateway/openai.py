"""The OpenAI wire format: request bodies in, completion objects and stream chunks out.

Requests are pydantic models. No field is dropped silently: every field of OpenAI's request
bodies is either served, refused with a 400 naming it (``to_generation``), or, for the few that
only label a request for OpenAI's own services, accepted and documented as ignored in the
OpenAPI document; a field that is none of these is refused as unknown. Wrong types are refused.
``to_generation`` turns a body into what the backend is asked, and ``ResponseBuilder`` writes
the OpenAI objects (``chat.completion``, ``chat.completion.chunk``, ``text_completion``) from
the backend's chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
from llm_service.errors import InvalidRequestError, LLMServiceError
from llm_service.gateway.status import http_error
from llm_service.gateway.wire import sse

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "Generation",
    "OpenAIWire",
    "ResponseBuilder",
    "chat_logprob",
    "chat_message",
    "format_schema",
    "function_tool",
    "invalid_request",
    "offered_tools",
    "to_generation",
]

# llama.cpp seeds are in [0, 2**32 - 2] (2**32 - 1 means "random").
MAX_SEED = 2**32 - 1
MAX_N = 8  # choices of one request (each is a generation of its own on a replica)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
# OpenAI's role names; "developer" is the newer name of "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ROLES |= {"tool": "tool", "function": "tool"}


class _Body(BaseModel):
    # Strict types (a string is not a number); an unknown field is refused, never dropped.
    model_config = ConfigDict(strict=True, extra="forbid")


# Fields that only label a request for OpenAI's own services (caching, storage, abuse checks,
# billing tiers): accepted so that clients which always send them work, and ignored.
IGNORED = "Accepted and ignored: it labels a request for OpenAI's own services."


# The values a field is served with, for the OpenAPI document only (``json_schema_extra``):
# validation stays in ``to_generation``, so that a refusal says what is served and why. Without
# them the document accepts what the gateway refuses (any role, any n), and a client or a fuzzer
# built from it never gets an answer.
def _served(*values: object) -> dict[str, Any]:
    return {"enum": list(values)}


def _one_prompt(schema: dict[str, Any]) -> None:
    """A list of prompts holds exactly one (``_prompt`` refuses others)."""
    for member in schema.get("anyOf", ()):
        if member.get("type") == "array":
            member.update(minItems=1, maxItems=1)


class ContentPart(_Body):
    """Any content part; ``text`` and ``refusal`` parts are served as their text, others are
    refused with 400. Keys of a part other than these (cache hints) are accepted and ignored."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra={
            "required": ["type"],
            "oneOf": [
                {"properties": {"type": {"const": kind}}, "required": [kind]}
                for kind in ("text", "refusal")
            ],
        },
    )

    type: str = Field(json_schema_extra=_served("text", "refusal"))
    text: str | None = Field(None, json_schema_extra={"type": "string"})
    refusal: str | None = Field(None, json_schema_extra={"type": "string"})


class CalledFunction(_Body):
    """``tool_calls[].function`` of an assistant message."""

    name: str
    arguments: str = Field(description="The arguments, JSON text (an object).")


class MessageToolCall(_Body):
    """One of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class FunctionDefinition(_Body):
    """``tools[].function``."""

    name: str = Field(description="1 to 64 characters of A-Z a-z 0-9 _ -.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema; the call's arguments are constrained to it."
    )
    strict: bool | None = Field(
        None,
        description="Always served as true where calls are constrained (tool_choice required or"
        " a named tool, or any tool_choice on a template without native tool support).",
    )


class ToolDefinition(_Body):
    """One of ``tools``: function tools only."""

    type: str = Field(json_schema_extra=_served("function"))
    function: FunctionDefinition | None = None
    custom: Any | None = Field(None, description="Not served (custom tools): only null.")


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    """``tool_choice`` naming the one function to call."""

    type: str = Field(json_schema_extra=_served("function"))
    function: NamedFunction


class Message(_Body):
    """One chat message (a ``tool`` message names the call it answers)."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
            "then": {"required": ["tool_call_id"]},
        },
    )

    role: str = Field(json_schema_extra=_served(*sorted(_ROLES)))
    content: str | list[ContentPart] | None = None
    name: str | None = Field(
        None, description="Accepted and ignored: the model's template has no participant names."
    )
    refusal: str | None = Field(
        None, description="An assistant's refusal: its text, when the message has no content."
    )
    annotations: list[Any] | None = Field(
        None, description="Accepted and ignored: citations of OpenAI's own web search."
    )
    tool_calls: list[MessageToolCall] | None = Field(
        None, description="An assistant's tool calls, for a conversation that goes on after them."
    )
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")
    function_call: Any | None = Field(
        None, description="Not served (the deprecated function calling; use tool_calls)."
    )
    audio: Any | None = Field(None, description="Not served (audio): only null.")


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``."""

    name: str = Field("response", description="Accepted and ignored: a label for the schema.")
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(
        None, description="Always served as true: the answer is constrained to the schema."
    )
    description: str | None = Field(
        None, description="Accepted and ignored: the model is not shown the schema's description."
    )


class ResponseFormat(_Body):
    """``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    """``stream_options``."""

    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        None, description="Accepted and ignored: this gateway pads no stream events."
    )


class _Sampling(_Body):
    """The parameters both endpoints share."""

    model: str = Field(description="A model id from GET /v1/models.")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(
        None, description="Reproducible sampling; negative: random (as llama.cpp's -1)."
    )
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = Field(
        None,
        description=f"Choices to generate, each its own generation (seed + i when a seed is"
        f" given), at most {MAX_N}.",
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, description="Recorded in the gateway's log only.")
    logit_bias: (
        dict[
            Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,9})$")],
            Annotated[float, Field(ge=-100, le=100)],
        ]
        | None
    ) = Field(
        None,
        max_length=1024,
        description="Token id (as a string) -> bias in [-100, 100], added to the token's logit"
        " before sampling: -100 keeps a token out. At most 1024 tokens.",
    )
    # llama.cpp's own sampling parameters, as llama-server and vLLM accept them.
    top_k: Annotated[int, Field(ge=0)] | None = Field(
        None, description="llama.cpp: sample from the k most likely tokens; 0 = off."
    )
    min_p: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="llama.cpp: drop tokens below min_p x the most likely one's probability."
    )
    repeat_penalty: Annotated[float, Field(gt=0)] | None = Field(
        None, description="llama.cpp: penalty on repeated tokens; 1 = off."
    )
    grammar: str | None = Field(
        None, description="llama.cpp: a GBNF grammar the answer must follow."
    )
    # Labels for OpenAI's own services.
    metadata: dict[str, str] | None = Field(None, description=IGNORED)
    service_tier: str | None = Field(None, description=IGNORED)
    store: bool | None = Field(None, description=IGNORED)
    prompt_cache_key: str | None = Field(None, description=IGNORED)
    safety_identifier: str | None = Field(None, description=IGNORED)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = Field(
        None, description="Each output token's log probability (choices[].logprobs.content)."
    )
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None, description="With logprobs: the most likely tokens at each position, 0 to 20."
    )
    tools: list[ToolDefinition] | None = Field(
        None, description="Functions the model may call (at most 128; see docs/api.md)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools), "none", "required", or a function.'
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether an answer may hold more than one call (default true)."
    )
    functions: list[Any] | None = Field(
        None, description="Not served (deprecated function calling; use tools): only null or empty."
    )
    function_call: Any | None = Field(None, description='Not served: only null or "none".')
    modalities: list[str] | None = Field(None, description='Only ["text"] is served.')
    audio: Any | None = Field(None, description="Not served: only null.")
    prediction: Any | None = Field(None, description="Not served: only null.")
    web_search_options: Any | None = Field(None, description="Not served: only null.")
    reasoning_effort: str | None = Field(
        None, description="Not served (how long a model reasons is its template's): only null."
    )
    reasoning_format: Literal["auto", "deepseek", "none"] | None = Field(
        None,
        description="llama-server's: a <think> block at the start of the answer is sent as"
        ' reasoning_content (auto, deepseek: the default), or left in content ("none").',
    )
    verbosity: str | None = Field(None, description="Not served: only null.")
    moderation: Any | None = Field(None, description="Not served: only null.")
    prompt_cache_retention: str | None = Field(None, description=IGNORED)
    prompt_cache_options: Any | None = Field(None, description=IGNORED)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(
        description="The prompt, or a list of exactly one.", json_schema_extra=_one_prompt
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        None,
        description="Each output token's log probability and this many alternatives (0 to 20),"
        " in the legacy form (tokens, token_logprobs, top_logprobs, text_offset).",
    )
    echo: bool | None = Field(
        None,
        description="Not served: only false or absent.",
        json_schema_extra=_served(False, None),
    )
    suffix: str | None = Field(
        None, description="Not served: only null or absent.", json_schema_extra=_served(None)
    )
    best_of: int | None = Field(
        None, description="Only 1 is served.", json_schema_extra=_served(1, None)
    )


@dataclass(frozen=True, slots=True)
class Generation:
    """What the backend is asked: a prompt or chat messages, the sampling options, the tools
    (chat), and how many choices (``n`` generations, choice i seeded with seed + i)."""

    prompt: str | tuple[ChatMessage, ...]
    sampling: Sampling
    stream: bool
    include_usage: bool
    tools: Tools | None = None
    n: int = 1
    split_reasoning: bool = True

    def choice_sampling(self, index: int) -> Sampling:
        """Choice ``index``'s sampling: its own seed, when the request has one."""
        seed = self.sampling.get("seed")
        if index == 0 or seed is None:
            return self.sampling
        return self.sampling | {"seed": (seed + index) % MAX_SEED}


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> InvalidRequestError:
    """The first of a body's validation errors, naming the field (``messages[0].role``)."""
    if not errors:
        return InvalidRequestError("body", "is not valid")
    err = errors[0]
    param = _param(err["loc"])
    detail = err["msg"]
    if err["type"] == "missing":
        detail = "is required"
    elif err["type"] == "extra_forbidden":
        detail = "is not a parameter of this endpoint (no field is ignored silently)"
    elif err["type"] == "json_invalid":
        return InvalidRequestError("body", f"is not valid JSON: {err['ctx'].get('error', detail)}")
    return InvalidRequestError(param or "body", detail[0].lower() + detail[1:])


def _param(loc: Sequence[int | str]) -> str:
    # FastAPI puts "body" first; pydantic adds the member a union tried ("str", "list[...]").
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or p in ("str", "int", "float", "bool", "dict", "list", "function-after"):
            continue
        else:
            out += f".{p}" if out else p
    return out


def to_generation(body: ChatCompletionRequest | CompletionRequest) -> Generation:
    """The backend request for an OpenAI body.

    Raises:
        InvalidRequestError: a value the gateway cannot serve (``n`` > 1, image content, an
            unknown role, logprobs, ...), naming the parameter.
    """
    _refuse_unserved(body)
    sampling: Sampling = {}
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    for name in (
        "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
        "repeat_penalty", "grammar",
    ):  # fmt: skip
        value = getattr(body, name)
        if value is not None:
            sampling[name] = value
    if body.seed is not None and body.seed >= 0:
        sampling["seed"] = body.seed % MAX_SEED  # any integer, folded into llama.cpp's range
    if body.stop:
        sampling["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if body.logit_bias:
        sampling["logit_bias"] = _logit_bias(body.logit_bias)
    logprobs = _logprobs(body)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    schema = _schema(body.response_format)
    if schema is not None:
        if body.grammar is not None:
            raise InvalidRequestError(
                "grammar", "give a grammar or a response_format with a schema, not both"
            )
        sampling["json_schema"] = schema
    prompt: str | tuple[ChatMessage, ...]
    tools = None
    if isinstance(body, ChatCompletionRequest):
        prompt = tuple(chat_message(i, m) for i, m in enumerate(body.messages))
        tools = _tools(body)
        if tools is not None and tools.choice != "none" and "logprobs" in sampling:
            raise InvalidRequestError(
                "logprobs", "log probabilities are not served together with tool calls"
            )
    else:
        prompt = _prompt(body)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    split_reasoning = not (
        isinstance(body, ChatCompletionRequest) and body.reasoning_format == "none"
    )
    return Generation(
        prompt, sampling, bool(body.stream), include_usage, tools, body.n or 1, split_reasoning
    )


def _refuse_unserved(body: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 naming the first field whose value asks for what is not served."""
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != 1:
            raise InvalidRequestError("best_of", f"only best_of=1 is supported, got {body.best_of}")
        return
    functions = "the deprecated function calling is not served: use tools and tool_choice"
    if body.functions:
        raise InvalidRequestError("functions", functions)
    if body.function_call not in (None, "none"):
        raise InvalidRequestError("function_call", functions)
    if body.modalities is not None and body.modalities != ["text"]:
        raise InvalidRequestError("modalities", 'only ["text"] is served')
    for name, what in (
        ("audio", "audio output"),
        ("prediction", "predicted outputs"),
        ("web_search_options", "web search"),
        ("reasoning_effort", "reasoning effort (no reasoning model is served)"),
        ("verbosity", "verbosity"),
        ("moderation", "moderation"),
    ):
        if getattr(body, name) is not None:
            raise InvalidRequestError(name, f"{what} is not supported")
    for i, message in enumerate(body.messages):
        if message.function_call is not None:
            raise InvalidRequestError(f"messages[{i}].function_call", functions)
        if message.audio is not None:
            raise InvalidRequestError(f"messages[{i}].audio", "audio is not supported")


def _logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives per token, if log probabilities are asked for."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    return (body.top_logprobs or 0) if body.logprobs else None


def _tools(body: ChatCompletionRequest) -> Tools | None:
    """The request's tools and how they may be called (None: no tools offered)."""
    functions = []
    for i, tool in enumerate(body.tools or ()):
        if tool.type != "function" or tool.custom is not None:
            raise InvalidRequestError(
                f"tools[{i}].type", f"only function tools are served, got {tool.type!r}"
            )
        f = tool.function
        if f is None:
            raise InvalidRequestError(f"tools[{i}].function", "is required")
        functions.append(function_tool(f"tools[{i}].function", f.name, f.description, f.parameters))
    choice, parallel = body.tool_choice, body.parallel_tool_calls
    if not isinstance(choice, NamedToolChoice):
        return offered_tools(functions, choice, None, parallel, name_field="")
    if functions and choice.type != "function":
        raise InvalidRequestError("tool_choice.type", f"must be function, got {choice.type!r}")
    named = choice.function.name
    return offered_tools(
        functions, "required", named, parallel, name_field="tool_choice.function.name"
    )


def function_tool(
    field: str, name: str, description: str | None, parameters: dict[str, Any] | None
) -> Tool:
    """A function tool as the backend takes it.

    Raises:
        InvalidRequestError: a bad name or parameter schema, naming ``field`` (``tools[2]``).
    """
    try:
        if parameters is None:
            return Tool(name, description or "")
        return Tool(name, description or "", json.dumps(parameters))
    except InvalidRequestError as exc:
        raise InvalidRequestError(exc.field.replace("tools", field, 1), exc.detail) from None


def offered_tools(
    functions: list[Tool],
    choice: str | None,
    name: str | None,
    parallel: bool | None,
    *,
    name_field: str,
) -> Tools | None:
    """How ``functions`` may be called (None: no tools offered).

    Args:
        choice: "auto" (the default), "none" or "required".
        name: the one function to call, if one is named (``name_field`` names it in an error).
        parallel: ``parallel_tool_calls`` (default true).

    Raises:
        InvalidRequestError: a call is asked for without tools, or ``name`` is not a tool's.
    """
    if not functions:
        if name is not None or choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice", "asks for a tool call, but tools is empty")
        return None
    if name is not None and name not in {t.name for t in functions}:
        raise InvalidRequestError(name_field, f"{name[:80]!r} is not the name of one of the tools")
    return Tools(functions, choice or "auto", name, parallel is not False)


def _logit_bias(given: dict[str, float]) -> dict[int, float]:
    """OpenAI's token-id strings (checked by the model: digits, no leading zero) as ids; the
    service checks them against its vocabulary, naming the field."""
    return {int(key): bias for key, bias in given.items()}


def _schema(fmt: ResponseFormat | None) -> str | None:
    if fmt is None:
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    return format_schema(fmt.type, schema, "response_format.json_schema")


def format_schema(kind: str, schema: dict[str, Any] | None, field: str) -> str | None:
    """The JSON schema (JSON text) an answer of format ``kind`` follows: none for ``text``,
    any object for ``json_object``, ``schema`` for ``json_schema``.

    Raises:
        InvalidRequestError: ``json_schema`` without a schema, naming ``field``.
    """
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if not schema:
        raise InvalidRequestError(field, "is required when type is json_schema")
    return json.dumps(schema)


def chat_message(i: int, m: Message) -> ChatMessage:
    role = _ROLES.get(m.role)
    if role is None:
        raise InvalidRequestError(
            f"messages[{i}].role",
            f"unknown role {m.role!r}; expected one of {', '.join(sorted(_ROLES))}",
        )
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    if calls and role != "assistant":
        raise InvalidRequestError(f"messages[{i}].tool_calls", "only an assistant makes tool calls")
    call_id = m.tool_call_id
    if role == "tool" and call_id is None and m.role == "tool":
        raise InvalidRequestError(f"messages[{i}].tool_call_id", "is required in a tool message")
    if call_id is not None and role != "tool":
        raise InvalidRequestError(
            f"messages[{i}].tool_call_id", "only a tool message answers a tool call"
        )
    if m.content is None or isinstance(m.content, str):
        return ChatMessage(role, m.content or m.refusal or "", calls, call_id)
    texts = []
    for j, part in enumerate(m.content):
        text = part.text if part.type == "text" else part.refusal
        if part.type not in ("text", "refusal") or text is None:
            raise InvalidRequestError(
                f"messages[{i}].content[{j}]",
                f"content of type {part.type!r} is not supported (text only)",
            )
        texts.append(text)
    return ChatMessage(role, "".join(texts), calls, call_id)


def _prompt(body: CompletionRequest) -> str:
    if body.echo:
        raise InvalidRequestError("echo", "echoing the prompt is not supported")
    if body.suffix:
        raise InvalidRequestError("suffix", "suffixes (insertion) are not supported")
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise InvalidRequestError(
            "prompt", f"exactly one prompt per request is supported, got {len(body.prompt)}"
        )
    return body.prompt[0]


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish reason: a stop string counts as ``stop``."""
    if reason is None:
        return None
    if reason is FinishReason.TOOL_CALLS:
        return "tool_calls"
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage_object(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _token_text(piece: bytes) -> str:
    # A piece of a multi-byte character is not text on its own: "bytes" carries it exactly.
    return piece.decode("utf-8", "replace")


def chat_logprob(lp: TokenLogprob, *, top: bool = True) -> dict[str, Any]:
    """One token's log probability in OpenAI's chat shape (and the Responses API's)."""
    out = {"token": _token_text(lp.piece), "logprob": lp.logprob, "bytes": list(lp.piece)}
    if top:
        out["top_logprobs"] = [chat_logprob(t, top=False) for t in lp.top]
    return out


class ResponseBuilder:
    """The OpenAI objects of one request: same ``id``, ``created`` and ``model`` in every one.

    Args:
        chat: chat completions (else text completions).
        request_id: the request's id; the object id is ``chatcmpl-<id>`` / ``cmpl-<id>``.
        model: the model id the client asked for.
        logprobs: the request asked for log probabilities.
    """

    def __init__(self, *, chat: bool, request_id: str, model: str, logprobs: bool = False) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs
        self._role_sent: set[int] = set()
        self._text_offset: dict[int, int] = {}  # completions' logprobs: characters so far
        # The fields every stream chunk repeats, made once rather than per token.
        self._chunk_head = self._head("chat.completion.chunk" if chat else "text_completion")

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, choices: Sequence[Completion]) -> dict[str, Any]:
        """The whole answer (``stream`` false): one choice per completion; the usage is the
        prompt once and every choice's completion tokens."""
        out = []
        for index, done in enumerate(choices):
            reason = finish_reason(done.finish_reason)
            choice: dict[str, Any]
            if self.chat:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": done.text if done.text or not done.tool_calls else None,
                    "refusal": None,
                }
                if done.reasoning:
                    message["reasoning_content"] = done.reasoning
                if done.tool_calls:
                    message["tool_calls"] = [_tool_call(c) for c in done.tool_calls]
                logprobs = self._logprobs(index, done.logprobs)
                choice = {"index": index, "message": message, "logprobs": logprobs,
                          "finish_reason": reason}  # fmt: skip
            else:
                logprobs = self._logprobs(index, done.logprobs)
                choice = {"index": index, "text": done.text, "logprobs": logprobs,
                          "finish_reason": reason}  # fmt: skip
            out.append(choice)
        # (The choices share their prompt: counted once, as OpenAI's usage does.)
        usage = Usage(
            choices[0].usage.prompt_tokens, sum(c.usage.completion_tokens for c in choices)
        )
        head = self._head("chat.completion" if self.chat else "text_completion")
        return head | {"choices": out, "usage": usage_object(usage)}

    def chunk(self, chunk: Chunk, *, include_usage: bool, index: int = 0) -> dict[str, Any]:
        """One stream event for ``chunk`` of choice ``index``; a choice's first one carries the
        assistant role."""
        reason = finish_reason(chunk.finish_reason)
        logprobs = self._logprobs(index, chunk.logprobs) if chunk.logprobs else None
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or not chunk.final else {}
            if index not in self._role_sent:
                delta = {"role": "assistant", "content": chunk.text}
                self._role_sent.add(index)
            if chunk.reasoning:
                delta["reasoning_content"] = chunk.reasoning
                if not chunk.text and "role" not in delta:
                    delta.pop("content", None)
            if chunk.tool_calls:
                if not chunk.text:  # as OpenAI's: null beside the role, absent after it
                    if "role" in delta:
                        delta["content"] = None
                    else:
                        delta.pop("content", None)
                delta["tool_calls"] = [_tool_call_delta(c) for c in chunk.tool_calls]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": chunk.text, "logprobs": logprobs,
                      "finish_reason": reason}  # fmt: skip
        out = self._chunk_head | {"choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last event with ``stream_options.include_usage``: no choices, the usage."""
        return self._chunk_head | {"choices": [], "usage": usage_object(usage)}

    def _logprobs(self, index: int, listed: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """A choice's ``logprobs``: chat's ``content`` list, or completions' legacy columns
        (``text_offset`` counts on from the choice's earlier chunks)."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [chat_logprob(lp) for lp in listed], "refusal": None}
        tokens = [_token_text(lp.piece) for lp in listed]
        offsets = []
        offset = self._text_offset.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._text_offset[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in listed],
            "top_logprobs": [{_token_text(t.piece): t.logprob for t in lp.top} for lp in listed],
            "text_offset": offsets,
        }


def _tool_call(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def _tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """A call's first piece has its id, type and name; later ones only add arguments."""
    if piece.id:
        function = {"name": piece.name, "arguments": piece.arguments}
        return {"index": piece.index, "id": piece.id, "type": "function", "function": function}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


class OpenAIWire:
    """OpenAI's chat and text completions as a ``wire.Wire``: the objects of
    ``ResponseBuilder``, streamed as ``data:`` events ending with ``data: [DONE]``.

    Args:
        include_usage: ``stream_options.include_usage``: a last event with the usage.
    """

    def __init__(
        self, *, chat: bool, request_id: str, model: str, logprobs: bool, include_usage: bool
    ) -> None:
        self.builder = ResponseBuilder(
            chat=chat, request_id=request_id, model=model, logprobs=logprobs
        )
        self.include_usage = include_usage
        self._started = False

    def whole(self, completions: Sequence[Completion]) -> dict[str, Any]:
        return self.builder.completion(completions)

    def begin(self, prompt_tokens: int) -> list[bytes]:
        return []  # the first chunk opens an OpenAI stream

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        if self._started and chunk.empty:
            return []
        self._started = True  # (the first chunk goes out even if empty: it has the role)
        return [sse(self.builder.chunk(chunk, include_usage=self.include_usage, index=index))]

    def end(self, usage: Usage) -> list[bytes]:
        last = [sse(self.builder.usage_chunk(usage))] if self.include_usage else []
        return [*last, DONE]

    def failure(self, exc: LLMServiceError) -> list[bytes]:
        return [sse(http_error(exc)[1]), DONE]


DONE = b"data: [DONE]\n\n"
