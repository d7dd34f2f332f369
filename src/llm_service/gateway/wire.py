"""How an API writes a generation's answer: the seam between the gateway's serving (routing,
retries, cancellation, limits, metrics: ``app.Gateway.serve``) and each API's shapes.

OpenAI's chat and text completions are one ``Wire`` (``openai.OpenAIWire``), Anthropic's
Messages API another (``anthropic.AnthropicWire``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from llm_service.client.types import Chunk, Completion, Usage
from llm_service.errors import LLMServiceError

__all__ = ["Wire", "sse"]


class Wire(Protocol):
    """One request's answer, in its API's shapes."""

    def whole(self, completions: Sequence[Completion]) -> dict[str, Any]:
        """The answer of a request that is not streamed (one completion per choice)."""
        ...

    def begin(self, prompt_tokens: int) -> list[bytes]:
        """The events that open a stream, written once its first chunk came (``prompt_tokens``:
        the prompt's length, as the replica serving the first chunk counted it)."""
        ...

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        """The stream events of ``chunk`` of choice ``index`` (the first call starts the
        stream; a choice's final chunk carries its finish reason and usage)."""
        ...

    def end(self, usage: Usage) -> list[bytes]:
        """The events after every choice's final chunk (``usage``: all choices')."""
        ...

    def failure(self, exc: LLMServiceError) -> list[bytes]:
        """The events that end a stream an error cut short after it started."""
        ...


def sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    """One Server-Sent Event carrying ``obj`` as compact JSON (named ``event``, if given)."""
    data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return (f"event: {event}\n".encode() + data if event else data) + b"\n\n"
