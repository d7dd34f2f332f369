"""The value types every layer shares: requests, results, events, the pool's state.

Frozen dataclasses, validated on construction. The engine produces and consumes them; the
server converts them to and from its wire messages, and the client hands them to its callers,
so nothing below the transports sees a protobuf or a JSON body. This module is a leaf: it
imports nothing of the package but ``llm_service.errors``.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Literal

from llm_service.errors import InvalidRequestError

__all__ = [
    "ChatMessage",
    "ChatTemplateName",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "PoolMode",
    "PoolState",
    "RequestLimits",
    "SamplingParams",
    "Started",
    "StepCounts",
    "Timings",
    "TokenDelta",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "is_request_id",
    "new_request_id",
]

# How a pool's slots share the model: a context each, or sequences of one batched context.
PoolMode = Literal["batched", "contexts"]
# The chat templates that ship with the package (llm_service/engine/templates/NAME.jinja), which
# LLM_CHAT_TEMPLATE may choose instead of the model's own.
ChatTemplateName = Literal["chatml", "chatml-tools"]

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "random seed" sentinel
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_BIAS = 100.0  # as OpenAI's: -100 keeps a token out, +100 all but forces it
MAX_LOGPROBS = 20  # alternatives listed per token, as OpenAI's top_logprobs
MAX_TOOLS = 128  # functions one request may offer
MAX_EMBED_INPUTS = 2048  # inputs of one embedding request, as OpenAI's
TOOL_CHOICES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


# The one rule for request ids, wherever they come from (a gRPC field or metadata, an HTTP
# header): short, and only characters that cannot forge a log line or break a header.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : -"


def new_request_id() -> str:
    """A fresh, unique request id."""
    return uuid.uuid4().hex


def is_request_id(text: str) -> bool:
    """Whether ``text`` may be used as a request id (``REQUEST_ID_RULE``)."""
    return REQUEST_ID.fullmatch(text) is not None


class FinishReason(enum.StrEnum):
    """Why a generation ended."""

    STOP = "stop"  # the model produced an end-of-generation token
    LENGTH = "length"  # max_tokens reached
    STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings appeared
    TOOL_CALLS = "tool_calls"  # the model called tools (Finished.tool_calls)
    CANCELLED = "cancelled"  # the consumer went away
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the engine failed; Finished.error says why


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(field_name, message)


# The most a JSON schema may repeat one thing (minLength, maxLength, minItems, maxItems, and
# {m,n} in a pattern): its grammar spells each repetition out, so 10**8 would take gigabytes,
# and nests one group per optional one (see llama.MAX_GRAMMAR_NESTING).
MAX_SCHEMA_REPEAT = 2048
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _short(number: float) -> str:
    """A number for a message (an integer of 400 digits has no float to be shown as)."""
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}...({len(text)} digits)"


def _check_schema(schema: object, field_name: str = "sampling.json_schema") -> None:
    """Refuse, before any grammar is built from it: references outside the schema itself (a
    schema must never make the service fetch a URL or read a file), and repetition counts
    whose grammar would be huge."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise InvalidRequestError(
                    field_name,
                    f"$ref {str(ref)[:100]!r} points outside the schema; only local references"
                    " ('#/...') are allowed",
                )
            for key in _COUNTS:
                count = node.get(key)
                if isinstance(count, int | float) and count > MAX_SCHEMA_REPEAT:
                    raise InvalidRequestError(
                        field_name,
                        f"{key} {_short(count)} is over {MAX_SCHEMA_REPEAT}, the most allowed",
                    )
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                for low, high in _REPEAT.findall(pattern):
                    if max(int(low), int(high or 0)) > MAX_SCHEMA_REPEAT:
                        raise InvalidRequestError(
                            field_name,
                            f"pattern repeats {{{low},{high}}}: over {MAX_SCHEMA_REPEAT}, the most"
                            " allowed",
                        )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Size limits on one request, checked before any work is done for it (``LLM_MAX_*``).

    Attributes:
        prompt_chars: characters of the prompt, or of all chat messages together.
        messages: chat messages in one request.
        stop_strings: stop strings in one request.
        stop_chars: characters of one stop string.
        grammar_bytes: UTF-8 bytes of a GBNF grammar.
        schema_bytes: UTF-8 bytes of a JSON schema, or of all tools' descriptions and
            parameter schemas together.
    """

    prompt_chars: int = 1_000_000
    messages: int = 1024
    stop_strings: int = 16
    stop_chars: int = 256
    grammar_bytes: int = 65_536
    schema_bytes: int = 65_536

    def check(self, request: GenerationRequest) -> None:
        """InvalidRequestError naming the first field over its limit (and the setting)."""
        if request.messages is not None:
            _over(len(request.messages), self.messages, "messages", "messages", "MESSAGES")
            chars = sum(len(m.content) for m in request.messages)
            _over(chars, self.prompt_chars, "messages", "characters", "PROMPT_CHARS")
        else:
            _over(len(request.prompt or ""), self.prompt_chars, "prompt", "characters",
                  "PROMPT_CHARS")  # fmt: skip
        sampling = request.sampling
        _over(len(sampling.stop), self.stop_strings, "sampling.stop", "stop strings",
              "STOP_STRINGS")  # fmt: skip
        for s in sampling.stop:
            _over(len(s), self.stop_chars, "sampling.stop", "characters in one stop string",
                  "STOP_CHARS")  # fmt: skip
        tool_bytes = sum(len(t.parameters.encode()) + len(t.description.encode())
                         for t in request.tools)  # fmt: skip
        _over(tool_bytes, self.schema_bytes, "tools", "bytes of descriptions and parameters",
              "SCHEMA_BYTES")  # fmt: skip
        for name, text, limit in (
            ("grammar", sampling.grammar, self.grammar_bytes),
            ("json_schema", sampling.json_schema, self.schema_bytes),
        ):
            if text is not None:
                what = "bytes"
                setting = "GRAMMAR_BYTES" if name == "grammar" else "SCHEMA_BYTES"
                _over(len(text.encode()), limit, f"sampling.{name}", what, setting)


def _over(value: int, limit: int, field_name: str, unit: str, setting: str) -> None:
    _require(
        value <= limit,
        field_name,
        f"has {value} {unit}; at most {limit} are allowed (LLM_MAX_{setting})",
    )


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. Defaults follow llama.cpp's.

    Attributes:
        max_tokens: completion tokens at most; None = as many as the context has room for.
        temperature: 0 = greedy (deterministic); higher = more random.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling, in (0, 1] (1 = off).
        min_p: drop tokens below min_p x the best token's probability, in [0, 1] (0 = off).
        repeat_penalty: > 0, 1 = off.
        presence_penalty: in [-2, 2], 0 = off.
        frequency_penalty: in [-2, 2], 0 = off.
        penalty_last_n: tokens of history the penalties look at (0 = off, -1 = the context).
        seed: random seed for reproducible sampling; None = random.
        stop: strings that end generation; they are not part of the output.
        grammar: a GBNF grammar (root rule ``root``) the output must follow.
        json_schema: a JSON schema (as JSON text) the output must follow.
        logit_bias: (token id, bias) pairs, each bias in [-100, 100], added to the token's logit
            before sampling (the engine checks the ids against the vocabulary).
        logprobs: None = off; 0 to 20 = each generated token's log probability, with that many
            of the most likely alternatives (``TokenDelta.logprobs``).
    """

    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    json_schema: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        p = "sampling."
        if self.logprobs is not None:
            _require(
                0 <= self.logprobs <= MAX_LOGPROBS,
                p + "logprobs",
                f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            )
        if self.max_tokens is not None:
            _require(self.max_tokens > 0, p + "max_tokens", f"must be > 0, got {self.max_tokens}")
        _require(
            math.isfinite(self.temperature) and self.temperature >= 0,
            p + "temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )
        _require(self.top_k >= 0, p + "top_k", f"must be >= 0, got {self.top_k}")
        _require(
            math.isfinite(self.top_p) and 0 < self.top_p <= 1,
            p + "top_p",
            f"must be in (0, 1], got {self.top_p}",
        )
        _require(
            math.isfinite(self.min_p) and 0 <= self.min_p <= 1,
            p + "min_p",
            f"must be in [0, 1], got {self.min_p}",
        )
        _require(
            math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
            p + "repeat_penalty",
            f"must be a finite number > 0, got {self.repeat_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and -2 <= value <= 2,
                p + name,
                f"must be in [-2, 2], got {value}",
            )
        _require(
            self.penalty_last_n >= -1,
            p + "penalty_last_n",
            f"must be >= -1, got {self.penalty_last_n}",
        )
        if self.seed is not None:
            _require(
                0 <= self.seed <= MAX_SEED,
                p + "seed",
                f"must be in [0, {MAX_SEED}], got {self.seed}",
            )
        for s in self.stop:
            _require(isinstance(s, str) and s != "", p + "stop", "stop strings must not be empty")
        _require(
            len(self.logit_bias) <= MAX_LOGIT_BIAS,
            p + "logit_bias",
            f"has {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS}",
        )
        for token, bias in self.logit_bias:
            _require(token >= 0, p + "logit_bias", f"token id {token} is negative")
            _require(
                math.isfinite(bias) and -MAX_BIAS <= bias <= MAX_BIAS,
                p + "logit_bias",
                f"the bias of token {token} must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {bias}",
            )
        _require(
            self.grammar is None or self.json_schema is None,
            p + "grammar",
            "give either grammar or json_schema, not both",
        )
        if self.grammar is not None:
            _require(bool(self.grammar.strip()), p + "grammar", "is empty")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except (ValueError, RecursionError) as exc:
                raise InvalidRequestError(p + "json_schema", f"is not valid JSON: {exc}") from None
            _require(
                isinstance(schema, dict | bool),
                p + "json_schema",
                "must be a JSON object (a JSON schema)",
            )
            _check_schema(schema)

    @property
    def greedy(self) -> bool:
        """True when sampling is deterministic (temperature 0)."""
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call.

    Attributes:
        name: 1 to 64 characters of A-Z a-z 0-9 _ -.
        description: what it does, shown to the model.
        parameters: a JSON schema (JSON text, an object) its arguments must follow.
    """

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'

    def __post_init__(self) -> None:
        _require(
            TOOL_NAME.fullmatch(self.name) is not None,
            "tools.name",
            f"must be 1 to 64 characters of A-Z a-z 0-9 _ -, got {self.name[:80]!r}",
        )
        try:
            schema = json.loads(self.parameters)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequestError("tools.parameters", f"is not valid JSON: {exc}") from None
        _require(isinstance(schema, dict), "tools.parameters", "must be a JSON schema object")
        _check_schema(schema, "tools.parameters")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text (an object)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call (OpenAI's ``delta.tool_calls[]``): the first piece of
    call ``index`` has its ``id`` and ``name``; later ones add to ``arguments``."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn.

    Attributes:
        tool_calls: an assistant's calls (its ``content`` may then be empty).
        tool_call_id: a ``tool`` message's answer to that call.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.role in CHAT_ROLES,
            "messages.role",
            f"must be one of {sorted(CHAT_ROLES)}, got {self.role!r}",
        )
        _require(isinstance(self.content, str), "messages.content", "must be a string")
        _require(
            not self.tool_calls or self.role == "assistant",
            "messages.tool_calls",
            f"only an assistant's message has tool calls, not a {self.role}'s",
        )
        _require(
            self.tool_call_id is None or self.role == "tool",
            "messages.tool_call_id",
            f"only a tool's message answers a tool call, not a {self.role}'s",
        )


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: a raw prompt or chat messages, and how to sample.

    Attributes:
        prompt: raw text, tokenized as is (special-token text in it is not parsed).
        messages: chat turns, rendered with the model's own chat template.
        sampling: sampling parameters.
        request_id: carried into every log line and event.
        deadline: ``time.monotonic()`` value after which generation ends with ``deadline``.
        tools: functions the model may call (chat only).
        tool_choice: "auto" (the model decides), "none" (no call) or "required" (at least one).
        tool_name: the one tool the model must call (with tool_choice "required").
        parallel_tool_calls: the model may make more than one call in an answer.
        split_reasoning: a chat answer's leading ``<think>`` block is reasoning, apart from
            its text (``TokenDelta.reasoning``); False: it stays in the text.
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    deadline: float | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    split_reasoning: bool = True

    def __post_init__(self) -> None:
        _require(
            (self.prompt is None) != (self.messages is None),
            "prompt",
            "give exactly one of prompt or messages",
        )
        if self.prompt is not None:
            _require(bool(self.prompt), "prompt", "must not be empty")
        if self.messages is not None:
            _require(len(self.messages) > 0, "messages", "must not be empty")
        self._check_tools()

    def _check_tools(self) -> None:
        _require(
            self.tool_choice in TOOL_CHOICES,
            "tool_choice",
            f"must be one of {', '.join(TOOL_CHOICES)}, got {self.tool_choice!r}",
        )
        if not self.tools:
            _require(
                self.tool_choice != "required" and self.tool_name is None,
                "tool_choice",
                "asks for a tool call, but the request has no tools",
            )
            return
        _require(self.messages is not None, "tools", "are served with chat messages only")
        _require(
            len(self.tools) <= MAX_TOOLS, "tools", f"has {len(self.tools)}; at most {MAX_TOOLS}"
        )
        names = [t.name for t in self.tools]
        for name in names:
            _require(names.count(name) == 1, "tools", f"two tools are named {name!r}")
        if self.tool_name is not None:
            _require(
                self.tool_name in names,
                "tool_name",
                f"is {self.tool_name[:80]!r}, which is not one of the tools",
            )
            _require(
                self.tool_choice == "required",
                "tool_choice",
                "a named tool must be called: tool_choice is required",
            )
        sampling = self.sampling
        if self.tool_choice != "none":
            _require(
                sampling.grammar is None and sampling.json_schema is None,
                "tools",
                "cannot be combined with a grammar or a JSON schema (the answer's shape is the"
                " tool calls')",
            )
            _require(
                sampling.logprobs is None,
                "sampling.logprobs",
                "log probabilities are not served together with tool calls",
            )


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Inputs to embed: texts, or token ids (exactly one of the two kinds).

    Attributes:
        texts: tokenized as prompts are (BOS added where the model wants it).
        token_inputs: inputs already tokenized.
    """

    texts: tuple[str, ...] = ()
    token_inputs: tuple[tuple[int, ...], ...] = ()
    request_id: str = field(default_factory=new_request_id)

    def __post_init__(self) -> None:
        _require(
            bool(self.texts) != bool(self.token_inputs),
            "input",
            "give texts or token ids (one kind, at least one input)",
        )
        n = len(self.texts) or len(self.token_inputs)
        _require(n <= MAX_EMBED_INPUTS, "input", f"has {n} inputs; at most {MAX_EMBED_INPUTS}")
        for i, text in enumerate(self.texts):
            _require(bool(text), f"input[{i}]", "must not be empty")
        for i, tokens in enumerate(self.token_inputs):
            _require(bool(tokens), f"input[{i}]", "must not be empty")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one request's time went, in milliseconds (tokens/s for decode speed).

    Attributes:
        queue_wait_ms: waiting for a free context.
        prefill_ms: evaluating the prompt.
        time_to_first_token_ms: from the request's arrival to its first generated token
            (None when no token was generated).
        decode_tokens_per_s: completion tokens after the first, per second of decoding.
        total_ms: from arrival to the end.
    """

    queue_wait_ms: float
    prefill_ms: float
    time_to_first_token_ms: float | None
    decode_tokens_per_s: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class Started:
    """First event of a stream: a context was leased and the prompt is known.

    Attributes:
        slot: index of the pool context serving the request.
    """

    request_id: str
    prompt_tokens: int
    queue_wait_ms: float
    slot: int


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log probability (natural log, of the model's distribution before sampling).

    Attributes:
        piece: the token's bytes (a piece of a UTF-8 character is not valid UTF-8 on its own).
        top: the most likely tokens at that position, most likely first (empty unless asked).
    """

    token_id: int
    piece: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New output: the token ids sampled and the text they complete.

    ``text`` is always whole UTF-8 characters; it can be empty while a multi-byte character or
    a possible stop string is held back, and can carry held-back text with no new token.

    Attributes:
        tool_calls: pieces of tool calls (their markup never appears in ``text``).
        logprobs: one per token whose text this delta completes (with ``sampling.logprobs``).
        reasoning: the model's reasoning (``<think>`` text), apart from ``text``.
    """

    token_ids: tuple[int, ...]
    text: str
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event of a stream.

    Attributes:
        text: the whole output, equal to the concatenated delta texts.
        tool_calls: the calls the model made (finish_reason TOOL_CALLS).
        reasoning: the whole reasoning, equal to the concatenated delta reasoning.
        error: what went wrong, when finish_reason is ERROR.
        error_field: the request's field at fault, when the request (not the engine) made it
            fail midway (a grammar that allows no further token).
    """

    request_id: str
    finish_reason: FinishReason
    text: str
    usage: Usage
    timings: Timings
    error: str | None = None
    error_field: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""


GenerationEvent = Started | TokenDelta | Finished


@dataclass(frozen=True, slots=True)
class PoolState:
    """A snapshot of the pool.

    Attributes:
        size: contexts the pool should hold.
        free: contexts ready to lease.
        leased: contexts in use (including ones being scrubbed).
        waiting: requests queued for a context.
        replaced: contexts discarded because they failed their reset check, and replaced.
    """

    size: int
    free: int
    leased: int
    waiting: int
    replaced: int


@dataclass(frozen=True, slots=True)
class StepCounts:
    """Batched mode's steps of one kind (prompt tokens, or one token of every decoding stream)
    since the engine started.

    Attributes:
        steps: steps evaluated (failed and cancelled ones not counted).
        tokens: tokens those steps evaluated.
        seconds: time their evaluation took (filling the batch and ``llama_decode``; not
            sampling).
    """

    steps: int
    tokens: int
    seconds: float
