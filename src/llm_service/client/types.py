"""What the client returns: plain frozen dataclasses, never protobuf messages.

Token counts, timings, the pool's state and a stream's start are the engine's own ``Usage``,
``Timings``, ``PoolState`` and ``Started``; the finish reason is the engine's ``FinishReason``
(only ``stop``, ``length`` and ``stop_sequence`` reach a client: other endings are errors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from llm_service.types import (
    ChatMessage,
    FinishReason,
    PoolState,
    Started,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "ChatMessage",
    "Chunk",
    "ClientOptions",
    "Completion",
    "Embeddings",
    "FinishReason",
    "Message",
    "ModelInfo",
    "PoolState",
    "Sampling",
    "ServerStatus",
    "Started",
    "Timings",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Tools",
    "Usage",
]

# A chat message: ``ChatMessage("user", "Hi")``, ``{"role": "user", "content": "Hi"}`` or
# ``("user", "Hi")``. The server checks roles and names the bad one (``messages[1].role``).
# An assistant's tool calls and a tool's answer need a ``ChatMessage``.
Message = ChatMessage | Mapping[str, str] | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Tools:
    """The functions a chat request offers the model, and how it may call them.

    Attributes:
        functions: the tools (``Tool(name, description, parameters_json_schema_text)``).
        choice: "auto" (the model decides), "none" (no call) or "required" (at least one).
        name: the one tool the model must call (``choice`` is then "required").
        parallel: the model may make more than one call in an answer.
    """

    functions: Sequence[Tool]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True


class ClientOptions(TypedDict, total=False):
    """How a client connects (see ``AsyncClient`` for each option)."""

    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_server_name: str | None
    insecure: bool
    timeout: float | None
    max_retries: int


class Sampling(TypedDict, total=False):
    """Sampling options of ``generate`` and ``stream``; what is left out gets the server's default.

    See ``llm.v1.SamplingParams`` for bounds: the server checks them and names the bad field.
    """

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    penalty_last_n: int
    seed: int
    stop: Sequence[str]
    grammar: str
    json_schema: str
    logit_bias: Mapping[int, float]
    logprobs: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a stream: new text; the last chunk also says how the generation ended.

    Attributes:
        text: text produced since the previous chunk (may be empty: a partial character or a
            possible start of a stop string is held back until it is decided).
        token_ids: the tokens this chunk's text came from.
        tool_calls: pieces of tool calls (``Tools``): the first piece of a call has its id and
            name, later ones add to its arguments.
        logprobs: with ``logprobs``: the log probabilities of the tokens ``text`` completes.
        reasoning: the model's reasoning (a chat answer's ``<think>`` block), apart from text.
        finish_reason: set on the last chunk only.
        usage: set on the last chunk only.
        timings: set on the last chunk only (server-side figures).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: str = ""

    @property
    def final(self) -> bool:
        """True on the stream's last chunk."""
        return self.finish_reason is not None

    @property
    def empty(self) -> bool:
        """Nothing new to show: no text, reasoning, tool call or log probability, not final."""
        return not (self.text or self.reasoning or self.tool_calls or self.logprobs or self.final)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished generation.

    Attributes:
        text: the whole output (stop strings excluded; with tools, the answer's content).
        finish_reason: ``stop`` (end of generation), ``length`` (max_tokens),
            ``stop_sequence`` or ``tool_calls``.
        usage: prompt and completion token counts.
        timings: queue wait, prefill, time to first token, decode speed, total (server-side).
        request_id: the id in the server's logs.
        tool_calls: the calls the model made.
        logprobs: with ``logprobs``: one per token generated (reasoning included).
        reasoning: the model's reasoning, apart from ``text``.
    """

    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    request_id: str
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """A unit vector per input, in order, and the inputs' tokens in all."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model a server serves, and how (``GetModelInfo``)."""

    name: str
    path: str
    size_bytes: int
    n_params: int
    context_per_slot: int
    n_ctx_train: int
    n_vocab: int
    pool_size: int
    llama_cpp_commit: str
    description: str
    has_chat_template: bool
    server_version: str
    http_port: int = 0  # the server's health port (0: not said)
    embedding_dimensions: int = 0  # of its embeddings (0: it serves none)


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """A server's state right now (``GetServerStatus``).

    Attributes:
        state: ``loading``, ``serving``, ``draining`` or ``failed``.
    """

    state: str
    pool: PoolState
    uptime_s: float
    requests_in_flight: int
