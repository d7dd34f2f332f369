"""The seam between the engine and a model runtime (llama.cpp, or the fake).

Everything here is synchronous and blocking: the engine calls it from its threads (and a
context's work runs in the context's own thread, or the batch scheduler's), never from the
event loop, and never touches one context from two threads at once.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llm_service.types import PoolMode, SamplingParams, StepCounts

if TYPE_CHECKING:
    from llm_service.engine.generation import Generation

__all__ = [
    "Backend",
    "Context",
    "ContextResetError",
    "GenerationAborted",
    "LoadedModel",
    "Logprobs",
    "PoolMode",
    "Sampler",
]

# A sampled token's log probability, and the most likely tokens' (id, log probability).
Logprobs = tuple[float, tuple[tuple[int, float], ...]]


class GenerationAborted(Exception):
    """A decode was stopped by the abort check (cancellation or deadline)."""


class NoTokenAllowed(Exception):
    """The request's grammar allows no token of the vocabulary at this point of the output."""


class ContextResetError(Exception):
    """Clearing a context's KV cache failed or left state behind; the context must go."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What the loaded model is.

    Attributes:
        name: the GGUF's ``general.name`` or the file stem.
        n_ctx: tokens one context holds (per slot, never divided between slots).
        n_ctx_train: context length the model was trained with.
        llama_cpp_commit: the llama.cpp commit the bindings vendor.
    """

    name: str
    path: str
    size_bytes: int
    n_params: int
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    description: str
    chat_template: str | None
    llama_cpp_commit: str


class DecodeFailures:
    """llama.cpp's failed evaluations in a row (a batched step, or one context's decode), none
    succeeding in between: past ``LIMIT``, llama.cpp fails everything and the engine is broken.

    One failed step fails every request in it: this counts the step once. Thread-safe.
    """

    LIMIT = 5

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._last = ""

    def failed(self, message: str) -> None:
        with self._lock:
            self._in_a_row += 1
            self._last = message

    def succeeded(self) -> None:
        if self._in_a_row:  # (read without the lock: a stale value only delays this write)
            with self._lock:
                self._in_a_row = 0

    def failure(self) -> str | None:
        """Why the engine is broken, once ``LIMIT`` evaluations failed in a row."""
        with self._lock:
            if self._in_a_row < self.LIMIT:
                return None
            return (
                f"llama.cpp failed {self._in_a_row} evaluations in a row, none succeeding in"
                f" between; the last: {self._last}"
            )


class Sampler(Protocol):
    """A per-request token sampler (owns its state: RNG, grammar, penalty history)."""

    def take_logprobs(self) -> Logprobs | None:
        """The last sample's log probabilities, once (None unless ``SamplingParams.logprobs``)."""
        ...

    def close(self) -> None: ...


class Context(Protocol):
    """One inference context (or one slot of a shared one), leased to one request at a time."""

    index: int

    def start(self, generation: Generation) -> concurrent.futures.Future[None]:
        """Run ``generation`` on this context, from its prompt to its ``Finished`` event, in
        the context's own thread (contexts mode) or the batch scheduler's (batched mode).

        Returns at once: the future is done once that thread is done with the generation, and
        the context may be reset. Raises EngineError if the context can run nothing any more.
        """
        ...

    def reset(self) -> None:
        """Clear the KV cache and verify it is empty. Raises ContextResetError."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A loaded model: tokenizer, chat template, samplers, and a factory of contexts.

    Attributes:
        pool_mode: what ``create_context`` makes: a context of its own, or a slot of the one
            shared, batched context (chosen when the backend is loaded).
    """

    info: LoadedModel
    pool_mode: PoolMode

    @property
    def embedding_dimensions(self) -> int:
        """Dimensions of ``embed``'s vectors; 0: the backend serves no embeddings."""
        ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """A unit vector per input (each 1 to ``info.n_ctx`` tokens), in order; called only
        when ``embedding_dimensions`` is not 0 (the engine refuses the request otherwise).

        Raises:
            EngineError: llama.cpp failed.
        """
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Tokenize.

        Args:
            add_special: add BOS (and EOS) where the model's vocabulary asks for them.
            parse_special: turn special-token text (``<|im_start|>``) into its token.
        """
        ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (may be part of a multi-byte character)."""
        ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """Render messages (and the template's ``tools``) with the chat template, ready for the
        assistant's turn (see ``tools.plan`` for what they hold).

        Raises:
            InvalidRequestError: the model has no chat template, or the template refused them.
        """
        ...

    def schema_to_gbnf(self, schema: str) -> str:
        """A GBNF grammar (start rule ``root``) for a JSON schema (JSON text).

        Raises:
            ValueError, RecursionError: the schema cannot be turned into a grammar.
        """
        ...

    def create_sampler(self, params: SamplingParams) -> Sampler:
        """Build a fresh sampler. Raises InvalidRequestError for a bad grammar or schema."""
        ...

    def create_context(self, index: int) -> Context:
        """The pool's entry ``index``, empty (a replacement for a broken one has the same index).

        Raises:
            EngineError: llama.cpp could not make it, or (batched) ``index`` is not a slot.
            ContextResetError: (batched) the slot's sequence could not be cleared.
        """
        ...

    def failure(self) -> str | None:
        """Why the backend can serve no more requests (batched mode's scheduler thread died,
        llama.cpp failed ``DecodeFailures.LIMIT`` evaluations in a row), or None while it can."""
        ...

    def step_counts(self) -> dict[str, StepCounts]:
        """Batched mode's steps so far, by kind (``prompt``, ``decode``); empty in contexts
        mode. Cheap, callable from any thread."""
        ...

    def close(self) -> None:
        """Free everything (call after every context is closed): the batch scheduler and the
        shared context if any, then the model."""
        ...
