"""A fake backend: scripted output, recorded calls, no model. For tests and ``--backend fake``.

Its tokenizer is byte-level (token id = byte value), so multi-byte characters span several
tokens just as they do with a real BPE vocabulary, and the engine's UTF-8 handling is exercised.
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_service.engine.backend import (
    ContextResetError,
    DecodeFailures,
    GenerationAborted,
    LoadedModel,
    Logprobs,
    PoolMode,
    Sampler,
)
from llm_service.engine.batching import BatchEntry, BatchScheduler, BatchSlot
from llm_service.engine.chat_template import ChatTemplate, render_messages
from llm_service.engine.generation import ThreadContext
from llm_service.errors import EngineError, InvalidRequestError
from llm_service.types import SamplingParams, StepCounts

__all__ = ["FakeBackend", "FakeBatchDecoder", "FakeCall", "FakeContext"]

EOS = 256
BOS = 257
FAKE_EMBEDDING_DIMENSIONS = 8


@dataclass
class FakeCall:
    """One prompt the backend was asked to evaluate, and on which context."""

    context: int
    prompt: str


@dataclass
class FakeSampler:
    """Samples its script's tokens. With ``params.logprobs``, the sampled token had
    probability 1/2 and the next ids (mod 256) 1/4, 1/8, ... (a distribution, most likely first)."""

    params: SamplingParams
    script: collections.deque[int] = field(default_factory=collections.deque)
    closed: bool = False
    last: int | None = None

    def take_logprobs(self) -> Logprobs | None:
        token, self.last = self.last, None
        n = self.params.logprobs
        if n is None or token is None:
            return None
        top = tuple(((token + i) % 256, -(i + 1) * math.log(2)) for i in range(n))
        return -math.log(2), top

    def close(self) -> None:
        self.closed = True


def _next_token(backend: FakeBackend, sampler: Sampler, where: str) -> int:
    assert isinstance(sampler, FakeSampler)
    if sampler.closed:
        backend.misuse.append(f"{where} sampled with a closed sampler")
    sampler.last = sampler.script.popleft() if sampler.script else EOS
    return sampler.last


class FakeContext(ThreadContext):
    """A context whose "KV cache" is the list of tokens it was fed."""

    def __init__(self, backend: FakeBackend, index: int) -> None:
        self.index = index
        self._backend = backend
        self.kv: list[int] = []
        self.closed = False

    def prefill(
        self, tokens: Sequence[int], sampler: Sampler, should_abort: Callable[[], bool]
    ) -> int:
        with self._backend._lock:
            self._backend.history.append(FakeCall(self.index, self._backend.detokenize(tokens)))
        for t in tokens:
            if should_abort():
                raise GenerationAborted()
            if self._backend.prefill_delay_s:
                time.sleep(self._backend.prefill_delay_s)
            self.kv.append(t)
        return self._sample(sampler)

    def decode(self, token: int, sampler: Sampler) -> int:
        backend = self._backend
        if backend.fail_decodes > 0:
            backend.fail_decodes -= 1
            backend.decode_failures.failed("fake llama_decode failed")
            raise EngineError("fake llama_decode failed")
        backend.decode_failures.succeeded()
        self.kv.append(token)
        return self._sample(sampler)

    def _sample(self, sampler: Sampler) -> int:
        if self._backend.token_delay_s:
            time.sleep(self._backend.token_delay_s)
        return _next_token(self._backend, sampler, f"context {self.index}")

    def reset(self) -> None:
        if self._backend.fail_resets > 0:
            self._backend.fail_resets -= 1
            raise ContextResetError(f"fake context {self.index} refused to clear")
        self.kv.clear()
        self._backend.resets += 1

    def close(self) -> None:
        self._stop_thread()
        self.closed = True


class FakeBatchDecoder:
    """The fake's shared context for batched mode: one token list per sequence.

    Attributes:
        kv: the tokens of each sequence.
        steps: every step evaluated, as its entries.
    """

    def __init__(self, backend: FakeBackend, slots: int) -> None:
        self.slots = slots
        self.kv: list[list[int]] = [[] for _ in range(slots)]
        self.steps: list[list[BatchEntry]] = []
        self.closed = False
        self._backend = backend
        self._prompts: dict[int, tuple[FakeCall, list[int]]] = {}  # sequences being prefilled

    def decode(
        self, entries: Sequence[BatchEntry], should_abort: Callable[[], bool] | None = None
    ) -> None:
        backend = self._backend
        if should_abort is not None and should_abort():
            raise GenerationAborted()
        if backend.fail_decodes > 0:
            backend.fail_decodes -= 1
            raise EngineError("fake llama_decode failed")
        for entry in entries:
            if entry.pos != len(self.kv[entry.seq]):
                raise EngineError(f"sequence {entry.seq} is at {len(self.kv[entry.seq])}")
        self.steps.append(list(entries))
        n_prompt = 0
        for entry in entries:
            self.kv[entry.seq].extend(entry.tokens)
            if entry.pos == 0:  # a prompt's first chunk; its last one asks for an output
                call = FakeCall(entry.seq, "")
                with backend._lock:
                    backend.history.append(call)
                self._prompts[entry.seq] = (call, [])
            if entry.seq in self._prompts:
                call, prompt = self._prompts[entry.seq]
                prompt.extend(entry.tokens)
                call.prompt = backend.detokenize(prompt)
                n_prompt += len(entry.tokens)
                if entry.output:
                    del self._prompts[entry.seq]
        time.sleep(backend.token_delay_s + n_prompt * backend.prefill_delay_s)

    def sample(self, sampler: Sampler, index: int) -> int:
        return _next_token(self._backend, sampler, f"batch token {index}")

    def clear(self, seq: int) -> None:
        if self._backend.fail_resets > 0:
            self._backend.fail_resets -= 1
            raise ContextResetError(f"fake slot {seq} refused to clear")
        self.kv[seq].clear()
        self._prompts.pop(seq, None)
        self._backend.resets += 1

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Scripted backend. ``enqueue(text)`` sets the next reply; ``history`` records prompts and
    ``samplers`` the sampling parameters of each request, in order.

    Args:
        n_ctx: context size to report and enforce.
        token_delay_s: sleep per generated token (to hold a context busy); per step, batched.
        prefill_delay_s: sleep per prompt token (to test cancellation during prefill).
        default_reply: the reply when nothing is enqueued.
        pool_mode: ``batched`` runs the pool's slots on the real ``BatchScheduler``, over a
            ``FakeBatchDecoder`` of ``slots`` sequences (see ``decoder``).
        step_tokens: batched mode: prompt tokens per step at most (llama.cpp's batch size).
        prefill_chunk: batched mode: prompt tokens the decoding streams wait for at most
            between two of their tokens.
        chat_template: Jinja source of a chat template, rendered as the llama backend renders
            it (with no BOS or EOS text: the fake has none), instead of the fake's own
            ``<role>content`` lines.
        embeddings: serve embeddings: 8 numbers per input, from its bytes (equal inputs have
            equal vectors), of length 1.

    Raises:
        ConfigurationError: ``chat_template`` is not valid Jinja.
    """

    def __init__(
        self,
        *,
        n_ctx: int = 512,
        token_delay_s: float = 0.0,
        prefill_delay_s: float = 0.0,
        default_reply: str = "Hello from the fake backend.",
        pool_mode: PoolMode = "contexts",
        slots: int = 2,
        step_tokens: int = 8,
        prefill_chunk: int = 8,
        chat_template: str | None = None,
        embeddings: bool = False,
    ) -> None:
        self.pool_mode: PoolMode = pool_mode
        self.embedding_dimensions = FAKE_EMBEDDING_DIMENSIONS if embeddings else 0
        self.decoder: FakeBatchDecoder | None = None
        self.scheduler: BatchScheduler | None = None
        if pool_mode == "batched":
            self.decoder = FakeBatchDecoder(self, slots)
            self.scheduler = BatchScheduler(
                self.decoder, step_tokens=step_tokens, prefill_chunk=prefill_chunk
            )
        self.token_delay_s = token_delay_s
        self.prefill_delay_s = prefill_delay_s
        self.default_reply = default_reply
        self.history: list[FakeCall] = []
        self.contexts: list[FakeContext] = []
        self.closed = False  # close() was called
        self.samplers: list[FakeSampler] = []
        self.resets = 0
        self.misuse: list[str] = []  # what a real backend would crash on (use after close)
        self.fail_resets = 0  # make this many resets fail (to test replacement)
        self.fail_decodes = 0  # make this many decodes fail (batched: steps)
        self.decode_failures = DecodeFailures()  # contexts mode's (the scheduler counts its own)
        self._replies: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._template = (
            None
            if chat_template is None
            else ChatTemplate(chat_template, "given to FakeBackend").compile()
        )
        self.info = LoadedModel(
            name="fake",
            path="fake.gguf",
            size_bytes=0,
            n_params=0,
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            n_vocab=258,
            description="scripted fake backend",
            chat_template="(fake)" if chat_template is None else chat_template,
            llama_cpp_commit="(none)",
        )

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        assert self.embedding_dimensions, "embed() without embeddings (embedding_dimensions 0)"
        vectors = []
        for tokens in inputs:
            vector = [0.0] * self.embedding_dimensions
            for i, token in enumerate(tokens):
                vector[(token + i) % len(vector)] += 1.0
            norm = math.sqrt(sum(x * x for x in vector))
            vectors.append([x / norm for x in vector])
        return vectors

    def enqueue(self, *replies: str) -> None:
        """Script the replies of the next requests, in order."""
        self._replies.extend(replies)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return ([BOS] if add_special else []) + list(text.encode("utf-8"))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        if self._template is None:
            return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        try:
            return render_messages(self._template, messages, tools)
        except Exception as exc:  # as the llama backend: raise_exception() and Jinja errors
            raise InvalidRequestError(
                "messages", f"the chat template rejected them: {exc}"
            ) from None

    def schema_to_gbnf(self, schema: str) -> str:
        """Not a grammar: the fake samples its script whatever the grammar says."""
        json.loads(schema)
        return "root ::= [^\\x00]*  # (fake) " + " ".join(schema.split())

    def create_sampler(self, params: SamplingParams) -> FakeSampler:
        if params.grammar is not None and "root" not in params.grammar:
            raise InvalidRequestError("sampling.grammar", "invalid grammar: no root rule")
        for token, _ in params.logit_bias:  # (checked as llama.cpp's is; not applied)
            if token >= self.info.n_vocab:
                raise InvalidRequestError(
                    "sampling.logit_bias", f"token id {token} is outside [0, {self.info.n_vocab})"
                )
        with self._lock:
            reply = self._replies.popleft() if self._replies else self.default_reply
        sampler = FakeSampler(params, collections.deque(reply.encode("utf-8")))
        self.samplers.append(sampler)
        return sampler

    def create_context(self, index: int) -> FakeContext | BatchSlot:
        if self.scheduler is not None:
            return self.scheduler.create_slot(index)
        context = FakeContext(self, index)
        self.contexts.append(context)
        return context

    def failure(self) -> str | None:
        if self.scheduler is not None:
            return self.scheduler.failure()
        return self.decode_failures.failure()

    def step_counts(self) -> dict[str, StepCounts]:
        return self.scheduler.step_counts() if self.scheduler is not None else {}

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.closed = True
