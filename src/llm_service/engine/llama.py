"""The llama.cpp backend: the only module that imports ``llama_cpp``.

It uses the pinned bindings' low-level C API directly: one ``llama_model`` loaded once, a fresh
sampler chain per request, and either one ``llama_context`` per pool entry (``contexts`` mode) or
one shared ``llama_context`` with a sequence per entry, driven by a ``BatchScheduler``
(``batched`` mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_service.engine.cpu import check_build_fits_cpu, loaded_ggml_backends

# Before the library is loaded: a build for another CPU dies with SIGILL in it, with no message.
check_build_fits_cpu()

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llm_service.engine.backend import (
    ContextResetError,
    DecodeFailures,
    GenerationAborted,
    LoadedModel,
    Logprobs,
    NoTokenAllowed,
    PoolMode,
    Sampler,
)
from llm_service.engine.batching import BatchEntry, BatchScheduler, BatchSlot
from llm_service.engine.generation import ThreadContext
from llm_service.errors import EngineError, InvalidRequestError, ModelLoadError
from llm_service.log import plural
from llm_service.types import SamplingParams, StepCounts

__all__ = [
    "LLAMA_CPP_COMMIT",
    "LlamaBackend",
    "LlamaBatchDecoder",
    "LlamaContext",
    "LlamaSampler",
]

logger = logging.getLogger(__name__)
native_logger = logging.getLogger("llm_service.llama_cpp")

PINNED_BINDINGS = "0.3.36"
LLAMA_CPP_COMMIT = (
    "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    if llama_cpp.__version__ == PINNED_BINDINGS
    else f"unknown (llama-cpp-python {llama_cpp.__version__}, pinned is {PINNED_BINDINGS})"
)
GGUF_MAGIC = b"GGUF"
# llama_decode's return codes (llama.h).
_DECODE_ERRORS = {
    1: "no room in the KV cache",
    2: "aborted",
    -1: "invalid batch",
}
# The physical batch (tokens per graph evaluation) at most: llama.cpp's own default.
MAX_UBATCH = 512
MAX_EMBED_INPUTS = 32  # inputs one embedding batch evaluates together (sequences of a context)
# llama_token_data, as numpy lays it out (the candidates a constrained sample is checked on).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# Groups "( ... )" nested deeper than this in a GBNF grammar are refused: llama.cpp's parser
# recurses once per group, and ~20,000 levels overflow a thread's stack (SIGSEGV).
MAX_GRAMMAR_NESTING = 2048
# A repetition {m,n} is spelled out m-n times (nested for the optional ones): the same bound.
MAX_GRAMMAR_REPEAT = 2048

# enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
_NATIVE_LEVELS = {
    0: logging.INFO,
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
_GGML_LOG_CONT = 5


class _NativeLog:
    """Forwards llama.cpp's log (a process-wide C callback) to Python logging.

    llama.cpp logs in fragments (level CONT continues the previous line), so lines are assembled
    per thread. Inside ``held()``, a thread's warnings and errors are collected instead of logged,
    for the caller to judge: an aborted decode or a user's bad grammar is an expected outcome
    that is reported to the caller, not an error in the service's log.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        # Referenced for the life of the process: llama.cpp keeps calling it, and a collected
        # ctypes callback crashes the process at its next call.
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user_data: Any) -> None:
        try:
            local = self._local
            if level != _GGML_LOG_CONT:
                local.level = _NATIVE_LEVELS.get(level, logging.DEBUG)
            local.buffer = getattr(local, "buffer", "") + (text or b"").decode("utf-8", "replace")
            while "\n" in local.buffer:
                line, local.buffer = local.buffer.split("\n", 1)
                lvl = getattr(local, "level", logging.DEBUG)
                held = getattr(local, "held", None)
                if not line.strip():
                    continue
                if held is not None and lvl >= logging.WARNING:
                    held.append((lvl, line.strip()))
                else:
                    native_logger.log(lvl, "%s", line.rstrip())
        except Exception:  # never raise into C
            pass

    @contextlib.contextmanager
    def held(self) -> Iterator[list[tuple[int, str]]]:
        """Collect this thread's llama.cpp warnings and errors instead of logging them."""
        held: list[tuple[int, str]] = []
        self._local.held = held
        try:
            yield held
        finally:
            self._local.held = None

    @staticmethod
    def emit(held: list[tuple[int, str]], level: int | None = None) -> None:
        """Log held lines, at their own level or at ``level``."""
        for lvl, line in held:
            native_logger.log(lvl if level is None else level, "%s", line)


_NATIVE_LOG = _NativeLog()
_NO_ABORT_CALLBACK = llama_cpp.ggml_abort_callback()  # a NULL function pointer
llama_cpp.llama_log_set(_NATIVE_LOG.callback, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class _AbortHook:
    """llama.cpp's abort callback on one context, armed for one ``llama_decode`` at a time.

    ggml calls it after every graph node (hundreds per decode), each call taking the GIL: worth
    it inside a long prompt's decode, far too costly per token, so it is armed only when asked.
    """

    def __init__(self) -> None:
        self._should_abort: Callable[[], bool] = _never
        # Referenced for as long as the context lives (see _NativeLog).
        self._callback = llama_cpp.ggml_abort_callback(self._check)

    def _check(self, _data: Any) -> bool:
        try:
            return self._should_abort()
        except Exception:
            return True

    @contextlib.contextmanager
    def armed(self, ctx: Any, should_abort: Callable[[], bool] | None) -> Iterator[None]:
        """Within the block, a decode on ``ctx`` stops (returns 2) once ``should_abort()``."""
        if should_abort is None:
            yield
            return
        self._should_abort = should_abort
        llama_cpp.llama_set_abort_callback(ctx, self._callback, None)
        try:
            yield
        finally:
            llama_cpp.llama_set_abort_callback(ctx, _NO_ABORT_CALLBACK, None)
            self._should_abort = _never


def logprobs_of(logits: np.ndarray[Any, Any], token: int, n: int) -> Logprobs:
    """``token``'s log probability under ``logits`` (a log-softmax over the vocabulary, before
    any sampler changed them, as llama-server's ``n_probs``), and the ``n`` most likely tokens'.

    The alternatives are looked for among the tokens near the most likely one first (a
    whole-vocabulary partition takes 0.4 ms): with the log-softmax, 0.15 to 0.25 ms a token for
    49,152 tokens on a 2-core EPYC.
    """
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        for margin in (8.0, 16.0, math.inf):  # e**-8: 0.03 % of the best token's probability
            near = np.flatnonzero(logits >= peak - margin)
            if len(near) >= n:
                break
        best = near[np.argpartition(logits[near], -n)[-n:]] if len(near) > n else near
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple((int(t), float(logits[t]) - log_total) for t in best)
    return float(logits[token]) - log_total, top


class LlamaSampler:
    """A llama.cpp sampler chain built for one request (freed by ``close``, or when collected).

    Sampling and closing exclude each other, and sampling a closed chain raises EngineError: a
    chain freed under a running sample would crash the process. A request's sampler is closed
    by the thread that samples with it, with the request's last event, so this guards only
    against misuse.
    """

    def __init__(
        self,
        chain: Any,
        n_vocab: int | None = None,
        *,
        logprobs: int | None = None,
        vocab_size: int = 0,
    ) -> None:
        """``n_vocab``: the chain has a grammar, and every sample is checked against it.
        ``logprobs``: each sample's log probabilities are kept, with that many alternatives
        (``take_logprobs``), from the ``vocab_size`` logits."""
        self.chain = chain
        self._lock = threading.Lock()
        self._free = weakref.finalize(self, llama_cpp.llama_sampler_free, chain)
        self._n_vocab = n_vocab
        self._candidates: np.ndarray[Any, Any] = np.empty(0, dtype=_TOKEN_DATA)
        self._ids: np.ndarray[Any, Any] = np.empty(0, dtype=np.int32)
        self._n_logprobs = logprobs
        self._vocab_size = vocab_size
        self._logprobs: Logprobs | None = None

    def take_logprobs(self) -> Logprobs | None:
        """The last sample's log probabilities (once), if the request asked for them."""
        out, self._logprobs = self._logprobs, None
        return out

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits of ``ctx``'s output ``index`` (-1: the last).

        Raises:
            NoTokenAllowed: the grammar allows no token here (llama.cpp would take one all the
                same, and its grammar then throws through ctypes: the process aborts).
        """
        with self._lock:
            if self.chain is None:
                raise EngineError("the request's sampler is closed")
            if self._n_vocab is None:
                token = int(llama_cpp.llama_sampler_sample(self.chain, ctx, index))
                if self._n_logprobs is not None:
                    logits = llama_cpp.llama_get_logits_ith(ctx, index)
                    array = np.ctypeslib.as_array(logits, shape=(self._vocab_size,))
                    self._logprobs = logprobs_of(array, token, self._n_logprobs)
                return token
            logits = llama_cpp.llama_get_logits_ith(ctx, index)
            return self._choose(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)))

    def sample_logits(self, logits: np.ndarray[Any, Any]) -> int:
        """The next token from ``logits`` (one per token of the vocabulary), through the whole
        chain, as ``sample`` does for a grammar's: the chain on logits made up by a test."""
        with self._lock:
            if self.chain is None:
                raise EngineError("the request's sampler is closed")
            return self._choose(logits)

    def _choose(self, logits: np.ndarray[Any, Any]) -> int:
        """llama_sampler_sample's steps, with a look at the chosen token before it is accepted."""
        n_vocab = len(logits)
        if len(self._candidates) != n_vocab:
            self._candidates = np.empty(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
        data = self._candidates
        data["id"] = self._ids  # (samplers may sort the array in place)
        data["logit"] = logits
        data["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise NoTokenAllowed("no token was selected")
        chosen = array.data[array.selected]
        if not math.isfinite(chosen.logit):  # every candidate was ruled out
            raise NoTokenAllowed("no token of the vocabulary can continue it here")
        llama_cpp.llama_sampler_accept(self.chain, chosen.id)
        if self._n_logprobs is not None:
            self._logprobs = logprobs_of(logits, int(chosen.id), self._n_logprobs)
        return int(chosen.id)

    def close(self) -> None:
        with self._lock:
            self._free()
            self.chain = None


class LlamaContext(ThreadContext):
    """One ``llama_context`` on the shared model (one sequence, ``n_ctx`` positions), with a
    thread of its own that runs its requests."""

    def __init__(self, backend: LlamaBackend, index: int) -> None:
        self.index = index
        self._backend = backend
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = backend.n_ctx
        params.n_batch = backend.n_batch
        params.n_ubatch = min(backend.n_batch, MAX_UBATCH)
        params.n_seq_max = 1
        params.n_threads = backend.n_threads
        params.n_threads_batch = backend.n_threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(backend.model, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create context {index} (n_ctx={backend.n_ctx})")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._abort = _AbortHook()

    def _decode(self, tokens: Sequence[int], should_abort: Callable[[], bool] | None) -> None:
        """One llama_decode; with ``should_abort``, llama.cpp checks it between graph nodes."""
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        batch = llama_cpp.llama_batch_get_one(array, len(tokens))
        with self._abort.armed(self._ctx, should_abort), _NATIVE_LOG.held() as held:
            rc = llama_cpp.llama_decode(self._ctx, batch)
        # An abort we asked for makes llama.cpp log three errors: expected, so debug only.
        _NATIVE_LOG.emit(held, logging.DEBUG if rc == 2 else None)
        if rc == 2:
            raise GenerationAborted()
        if rc != 0:
            message = f"llama_decode failed on context {self.index}: {_decode_error(rc)}"
            self._backend.decode_failures.failed(message)
            raise EngineError(message)
        self._backend.decode_failures.succeeded()

    def _sample(self, sampler: Sampler) -> int:
        assert isinstance(sampler, LlamaSampler)
        return sampler.sample(self._ctx, -1)

    def prefill(
        self, tokens: Sequence[int], sampler: Sampler, should_abort: Callable[[], bool]
    ) -> int:
        step = self._backend.n_batch
        for start in range(0, len(tokens), step):
            if should_abort():
                raise GenerationAborted()
            self._decode(tokens[start : start + step], should_abort)
        return self._sample(sampler)

    def decode(self, token: int, sampler: Sampler) -> int:
        # One token decodes in milliseconds; the engine checks for cancellation between tokens.
        self._decode((token,), None)
        return self._sample(sampler)

    def reset(self) -> None:
        """Clear the whole KV cache (every sequence) and verify nothing is left."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, -1, 0, -1):
            raise ContextResetError(f"llama_memory_seq_rm refused to clear context {self.index}")
        for seq in range(llama_cpp.llama_n_seq_max(self._ctx)):
            pos_max = llama_cpp.llama_memory_seq_pos_max(self._memory, seq)
            if pos_max != -1:
                raise ContextResetError(
                    f"context {self.index} sequence {seq} still holds positions up to {pos_max}"
                )

    def close(self) -> None:
        self._stop_thread()
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class LlamaBatchDecoder:
    """The shared ``llama_context`` of batched mode: ``slots`` sequences of ``n_ctx`` positions.

    The KV cache is not unified, so each sequence has its own ``n_ctx`` positions and cannot
    crowd out another. The scheduler thread drives it; ``pos_max`` may be called from anywhere.
    """

    def __init__(self, backend: LlamaBackend, slots: int) -> None:
        self.slots = slots
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = backend.n_ctx * slots
        # Room for a step: a token per slot, or n_batch prompt tokens (BatchScheduler._plan).
        self._capacity = max(slots, backend.n_batch)
        params.n_batch = self._capacity
        params.n_ubatch = min(self._capacity, MAX_UBATCH)
        params.n_seq_max = slots
        params.kv_unified = False
        params.n_threads = backend.n_threads
        params.n_threads_batch = backend.n_threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(backend.model, params)
        if not self._ctx:
            raise EngineError(
                f"llama.cpp could not create the shared context ({slots} sequences of"
                f" {backend.n_ctx} tokens)"
            )
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        n_seq = int(llama_cpp.llama_n_seq_max(self._ctx))
        if n_ctx_seq < backend.n_ctx or n_seq != slots:
            llama_cpp.llama_free(self._ctx)
            raise EngineError(
                f"llama.cpp made {n_seq} sequences of {n_ctx_seq} positions, not {slots} of"
                f" {backend.n_ctx}"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        # Uncontended in service (one thread drives the context); lets pos_max look in safely.
        self._lock = threading.Lock()
        self._abort = _AbortHook()

    def decode(
        self, entries: Sequence[BatchEntry], should_abort: Callable[[], bool] | None = None
    ) -> None:
        n_tokens = sum(len(e.tokens) for e in entries)
        if n_tokens > self._capacity:  # llama.cpp would abort the process, not fail
            raise EngineError(f"a step of {n_tokens} tokens exceeds the batch ({self._capacity})")
        batch = self._batch
        i = 0
        for entry in entries:
            for offset, token in enumerate(entry.tokens):
                batch.token[i] = token
                batch.pos[i] = entry.pos + offset
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = entry.seq
                batch.logits[i] = 0
                i += 1
            if entry.output:
                batch.logits[i - 1] = 1
        batch.n_tokens = n_tokens
        with self._lock, self._abort.armed(self._ctx, should_abort), _NATIVE_LOG.held() as held:
            rc = llama_cpp.llama_decode(self._ctx, batch)
        # An abort asked for makes llama.cpp log errors: expected, so debug only.
        _NATIVE_LOG.emit(held, logging.DEBUG if rc == 2 else None)
        if rc == 2:
            raise GenerationAborted()
        if rc != 0:
            raise EngineError(
                f"llama_decode failed: {_decode_error(rc)} (a step of {n_tokens} tokens over"
                f" {plural(len(entries), 'slot')})"
            )

    def sample(self, sampler: Sampler, index: int) -> int:
        assert isinstance(sampler, LlamaSampler)
        return sampler.sample(self._ctx, index)

    def clear(self, seq: int) -> None:
        with self._lock:
            if not llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1):
                raise ContextResetError(f"llama_memory_seq_rm refused to clear slot {seq}")
        pos_max = self.pos_max(seq)
        if pos_max != -1:
            raise ContextResetError(f"slot {seq} still holds positions up to {pos_max}")

    def pos_max(self, seq: int) -> int:
        """The last position ``seq`` holds in the KV cache (-1: none)."""
        with self._lock:
            if not self._ctx:
                raise EngineError("the shared context is closed")
            return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq))

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                llama_cpp.llama_batch_free(self._batch)
                llama_cpp.llama_free(self._ctx)
                self._ctx = None


def _decode_error(rc: int) -> str:
    return f"code {rc} ({_DECODE_ERRORS.get(rc, 'fatal error')})"


def _never() -> bool:
    return False


class LlamaEmbedder:
    """A ``llama_context`` of the model with embeddings on: a request's inputs are sequences of
    one batch (as many as fit), each pooled (the model's pooling type; mean for a model that
    has none, such as a chat model) and L2-normalised. Its KV cache is cleared, and checked
    empty, after every batch. One batch at a time (``embed`` holds a lock).
    """

    def __init__(self, backend: LlamaBackend, n_ctx: int, max_inputs: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # an input is evaluated in one go: pooling sees all of it
        params.n_ubatch = n_ctx
        params.n_seq_max = max_inputs
        params.kv_unified = True  # inputs share the context's n_ctx positions
        params.embeddings = True
        if backend.pooling is None:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.n_threads = backend.n_threads
        params.n_threads_batch = backend.n_threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(backend.model, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create the embedding context ({n_ctx} tokens)")
        self.n_ctx = n_ctx
        self.max_inputs = max_inputs
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(backend.model))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._lock = threading.Lock()

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One unit vector per input (each 1 to ``n_ctx`` tokens), in order."""
        out: list[list[float]] = []
        with self._lock:
            start = 0
            while start < len(inputs):
                end, tokens = start, 0
                while (
                    end < len(inputs)
                    and end - start < self.max_inputs
                    and tokens + len(inputs[end]) <= self.n_ctx
                ):
                    tokens += len(inputs[end])
                    end += 1
                out.extend(self._embed_batch(inputs[start:end]))
                start = end
        return out

    def _embed_batch(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        batch = self._batch
        i = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True  # (pooling reads every token's output)
                i += 1
        batch.n_tokens = i
        try:
            with _NATIVE_LOG.held() as held:
                rc = llama_cpp.llama_decode(self._ctx, batch)
            _NATIVE_LOG.emit(held, None if rc == 0 else logging.DEBUG)
            if rc != 0:
                raise EngineError(f"llama_decode failed with {rc} on {len(inputs)} inputs")
            vectors = []
            for seq in range(len(inputs)):
                pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
                if not pointer:
                    raise EngineError(f"llama.cpp gave no embedding for input {seq}")
                vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(vector))
                vectors.append((vector / norm if norm > 0 else vector).tolist())
            return vectors
        finally:
            self._clear(len(inputs))

    def _clear(self, n_seq: int) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        for seq in range(n_seq):
            if llama_cpp.llama_memory_seq_pos_max(self._memory, seq) != -1:
                raise EngineError(f"the embedding context still holds sequence {seq}")

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class LlamaBackend:
    """A GGUF model loaded once through llama.cpp; makes contexts and samplers on it.

    Use ``LlamaBackend.load(...)``. In batched mode it also holds the shared context and the
    scheduler thread driving it, and ``create_context`` makes slots on them.
    """

    def __init__(
        self,
        model: Any,
        path: Path,
        *,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        chat_template: str | None = None,
    ) -> None:
        """``chat_template``: Jinja source to use instead of the GGUF's own template."""
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.pool_mode: PoolMode = "contexts"
        self.decoder: LlamaBatchDecoder | None = None  # batched mode: the shared context
        self.scheduler: BatchScheduler | None = None  # batched mode: its thread
        self.decode_failures = DecodeFailures()  # contexts mode's (the scheduler counts its own)
        self.embedder: LlamaEmbedder | None = None  # loaded for embeddings
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # Each generated token's bytes and whether it ends generation, looked up once per token
        # id: every llama.cpp call releases and takes back the GIL, and the scheduler makes two
        # per stream and step otherwise.
        self._pieces: dict[int, bytes] = {}
        self._ends: dict[int, bool] = {}
        template_ptr = llama_cpp.llama_model_chat_template(model, None)
        template = template_ptr.decode("utf-8") if template_ptr else None
        if chat_template is not None:
            template = chat_template
        self._chat_formatter = (
            Jinja2ChatFormatter(
                template,
                eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
                bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
            )
            if template
            else None
        )
        self.info = LoadedModel(
            name=self._meta("general.name") or path.stem,
            path=str(path),
            size_bytes=path.stat().st_size,
            n_params=int(llama_cpp.llama_model_n_params(model)),
            n_ctx=n_ctx,
            n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(model)),
            n_vocab=self._n_vocab,
            description=self._desc(),
            chat_template=template,
            llama_cpp_commit=LLAMA_CPP_COMMIT,
        )

    @property
    def pooling(self) -> str | None:
        """The GGUF's pooling type for embeddings (an embedding model's), or None (a chat
        model's: none given, or "none")."""
        arch = self._meta("general.architecture") or ""
        value = self._meta(f"{arch}.pooling_type")
        names = {"1": "mean", "2": "cls", "3": "last", "4": "rank"}
        return names.get(value or "")

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_threads: int = 2,
        n_gpu_layers: int = 0,
        pool_mode: PoolMode = "contexts",
        slots: int = 1,
        prefill_chunk: int = 512,
        chat_template: str | None = None,
        embeddings: bool | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> LlamaBackend:
        """Load a GGUF model file.

        Args:
            n_ctx: tokens of one pool entry (a context, or a slot of the shared context).
            n_batch: prompt tokens per llama_decode, in either mode.
            pool_mode: ``batched`` also creates the shared context, of ``slots`` sequences,
                and its scheduler, under which the decoding streams wait for ``prefill_chunk``
                prompt tokens at most between two of their tokens.
            chat_template: Jinja source of the chat template to use instead of the GGUF's
                own (None: the GGUF's, if it has one).
            embeddings: also serve embeddings (an embedding context beside the pool); None:
                if the GGUF says how to pool them (an embedding model).

        Raises:
            ModelLoadError: the file is missing, unreadable, not GGUF, or rejected by llama.cpp.
            EngineError: (batched) llama.cpp could not create the shared context.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {path}: {exc}") from None
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF model file (it starts with {magic!r}, not {GGUF_MAGIC!r})"
            )
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers

        def on_progress(fraction: float, _data: Any) -> bool:
            if progress is not None:
                with contextlib.suppress(Exception):
                    progress(fraction)
            return True

        callback = llama_cpp.llama_progress_callback(on_progress)  # referenced until load returns
        params.progress_callback = callback
        started = time.monotonic()
        with _NATIVE_LOG.held() as held:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        _NATIVE_LOG.emit(held, None if model else logging.DEBUG)
        if not model:
            why = "; ".join(line for _, line in held[-3:]) or "no reason given"
            raise ModelLoadError(f"llama.cpp could not load {path}: {why}")
        logger.info("loaded model %s in %.2f s", path, time.monotonic() - started)
        if loaded := loaded_ggml_backends():  # which CPU variant ggml picked here, if it picks
            logger.info("llama.cpp backends loaded at run time: %s", ", ".join(loaded))
        backend = cls(
            model,
            path,
            n_ctx=n_ctx,
            n_batch=min(n_batch, n_ctx),
            n_threads=n_threads,
            chat_template=chat_template,
        )
        if embeddings is None:
            embeddings = backend.pooling is not None
        if embeddings:
            try:
                backend.embedder = LlamaEmbedder(backend, n_ctx, MAX_EMBED_INPUTS)
            except BaseException:
                backend.close()
                raise
            logger.info(
                "embeddings: %d dimensions, %s pooling, up to %d inputs of %d tokens a batch",
                backend.embedder.n_embd, backend.pooling or "mean", MAX_EMBED_INPUTS, n_ctx,
            )  # fmt: skip
        if pool_mode == "batched":
            try:
                decoder = LlamaBatchDecoder(backend, slots)
            except BaseException:
                backend.close()
                raise
            backend.pool_mode = "batched"
            backend.decoder = decoder
            backend.scheduler = BatchScheduler(
                decoder, step_tokens=backend.n_batch, prefill_chunk=prefill_chunk
            )
            logger.info(
                "batched mode: one context of %d tokens, %s of %d tokens each",
                decoder.n_ctx,
                plural(slots, "slot"),
                n_ctx,
            )
        return backend

    def create_context(self, index: int) -> LlamaContext | BatchSlot:
        if self.scheduler is not None:
            return self.scheduler.create_slot(index)
        return LlamaContext(self, index)

    def failure(self) -> str | None:
        if self.scheduler is not None:
            return self.scheduler.failure()
        return self.decode_failures.failure()

    def step_counts(self) -> dict[str, StepCounts]:
        return self.scheduler.step_counts() if self.scheduler is not None else {}

    @property
    def embedding_dimensions(self) -> int:
        return self.embedder.n_embd if self.embedder is not None else 0

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        assert self.embedder is not None, "embed() without embeddings (embedding_dimensions 0)"
        return self.embedder.embed(inputs)

    def close(self) -> None:
        """Stop the scheduler and free the shared context (batched), then free the model."""
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.scheduler is not None:
            self.scheduler.close()  # joins its thread, then frees the shared context
            self.scheduler = self.decoder = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def detokenize(self, tokens: Sequence[int]) -> str:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        capacity = max(64, len(tokens) * 8)
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = llama_cpp.llama_detokenize(
                self._vocab, array, len(tokens), buf, capacity, False, False
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            capacity = -n

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token, special=False)
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        ends = self._ends.get(token)
        if ends is None:
            ends = self._ends[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return ends

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        if self._chat_formatter is None:
            raise InvalidRequestError(
                "messages",
                "this model has no chat template: send a prompt, or start the service with"
                " --chat-template or --chat-template-file",
            )
        try:
            rendered = self._chat_formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        except Exception as exc:  # the template's raise_exception() and Jinja errors
            raise InvalidRequestError(
                "messages", f"the chat template rejected them: {exc}"
            ) from None
        return str(rendered.prompt)

    def schema_to_gbnf(self, schema: str) -> str:
        return str(json_schema_to_gbnf(schema))

    # -- sampling --------------------------------------------------------------------------

    def create_sampler(self, params: SamplingParams) -> LlamaSampler:
        grammar = params.grammar
        if params.json_schema is not None:
            try:
                grammar = json_schema_to_gbnf(params.json_schema)
            except RecursionError:
                raise InvalidRequestError(
                    "sampling.json_schema", "is nested too deeply or refers to itself"
                ) from None
            except Exception as exc:
                raise InvalidRequestError(
                    "sampling.json_schema", f"cannot be turned into a grammar: {exc}"
                ) from None
        if grammar is not None:
            field = "sampling.json_schema" if params.json_schema else "sampling.grammar"
            for low, high in grammar_repetitions(grammar):
                # llama.cpp computes high - low unchecked: {1,0} allocates without end.
                if high is not None and high < low:
                    raise InvalidRequestError(field, f"repetition {{{low},{high}}}: max < min")
                if max(low, high or 0) > MAX_GRAMMAR_REPEAT:
                    raise InvalidRequestError(
                        field, f"repeats {max(low, high or 0)} times; at most {MAX_GRAMMAR_REPEAT}"
                    )
            depth = grammar_nesting(grammar)
            if depth > MAX_GRAMMAR_NESTING:
                # llama.cpp's parser recurses once per group: deeper overflows the stack.
                raise InvalidRequestError(
                    field,
                    f"nests groups {depth} deep (its grammar); at most {MAX_GRAMMAR_NESTING}",
                )
        for token, _ in params.logit_bias:
            if token >= self._n_vocab:
                raise InvalidRequestError(
                    "sampling.logit_bias", f"token id {token} is outside [0, {self._n_vocab})"
                )
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        sampler = LlamaSampler(
            chain,
            self._n_vocab if grammar is not None else None,
            logprobs=params.logprobs,
            vocab_size=self._n_vocab,
        )
        try:
            if params.logit_bias:  # first: every later sampler sees the biased logits
                biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                    *(llama_cpp.llama_logit_bias(t, b) for t, b in params.logit_bias)
                )
                llama_cpp.llama_sampler_chain_add(
                    chain,
                    llama_cpp.llama_sampler_init_logit_bias(
                        self._n_vocab, len(params.logit_bias), biases
                    ),
                )
            if grammar is not None:
                with _NATIVE_LOG.held() as held:
                    g = llama_cpp.llama_sampler_init_grammar(
                        self._vocab, grammar.encode("utf-8"), b"root"
                    )
                # A bad grammar is the caller's error, reported to them: not a service error.
                _NATIVE_LOG.emit(held, None if g else logging.DEBUG)
                if not g:
                    field = "sampling.json_schema" if params.json_schema else "sampling.grammar"
                    why = "; ".join(line for _, line in held[-2:]) or "llama.cpp rejected it"
                    raise InvalidRequestError(field, f"invalid grammar: {why}")
                llama_cpp.llama_sampler_chain_add(chain, g)
            if (
                params.repeat_penalty != 1.0
                or params.presence_penalty != 0.0
                or params.frequency_penalty != 0.0
            ):
                last_n = self.n_ctx if params.penalty_last_n == -1 else params.penalty_last_n
                llama_cpp.llama_sampler_chain_add(
                    chain,
                    llama_cpp.llama_sampler_init_penalties(
                        self._n_vocab,  # this llama.cpp's signature starts with n_vocab
                        last_n,
                        params.repeat_penalty,
                        params.frequency_penalty,
                        params.presence_penalty,
                    ),
                )
            if params.greedy:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                add = llama_cpp.llama_sampler_chain_add
                if params.top_k > 0:
                    add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
                add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
                add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
                add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
                seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
                add(chain, llama_cpp.llama_sampler_init_dist(seed))
        except BaseException:
            sampler.close()
            raise
        return sampler

    # -- helpers ---------------------------------------------------------------------------

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token, special=True).decode("utf-8", "replace")

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")


def grammar_nesting(grammar: str) -> int:
    """How deep groups ``( ... )`` nest in a GBNF grammar (strings, classes, comments skipped)."""
    depth = deepest = 0
    for c in _grammar_syntax(grammar):
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    return deepest


def grammar_repetitions(grammar: str) -> list[tuple[int, int | None]]:
    """The ``{m}``, ``{m,}``, ``{,n}`` and ``{m,n}`` repetitions of a GBNF grammar, as
    (m, n or None)."""
    syntax = "".join(_grammar_syntax(grammar))
    found = []
    for low, comma, high in _REPETITION.findall(syntax):
        if not (low or high):
            continue  # "{}" or "{,}": not a repetition; llama.cpp's parser says so
        m = int(low or 0)
        found.append((m, int(high) if high else (None if comma else m)))
    return found


_REPETITION = re.compile(r"\{\s*(\d*)\s*(,)?\s*(\d*)\s*\}")


def _grammar_syntax(grammar: str) -> Iterator[str]:
    """The characters of a GBNF grammar outside its strings, classes and comments."""
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
            yield " "
        elif c == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        else:
            yield c
        i += 1
