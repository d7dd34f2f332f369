"""Settings to a running engine, in one place: settings → model file → backend → engine.

The engine reads no settings; the server (``llm_service serve``) and the engine demo
(``llm_service generate``) build theirs here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from llm_service.engine import Backend, ChatTemplate, Engine, EngineConfig, FakeBackend
from llm_service.errors import ModelLoadError
from llm_service.log import plural
from llm_service.settings import ServiceSettings, read_text
from llm_service.types import RequestLimits

__all__ = ["chosen_chat_template", "load_backend", "resolve_model_path", "start_engine"]

logger = logging.getLogger("llm_service.engine")

# LLM_BACKEND=fake: what every reply says (as long as max_tokens lets it), and how fast.
FAKE_REPLY = ", ".join(str(n) for n in range(1, 10_000))
FAKE_TOKEN_DELAY_S = 0.01


def resolve_model_path(settings: ServiceSettings, *, progress: bool = True) -> Path:
    """The configured model file, or the default model (fetched into the cache if missing)."""
    if settings.model_path is not None:
        return settings.model_path.expanduser()
    from llm_service.default_model import fetch_default_model

    return fetch_default_model(settings.model_cache, progress=progress)


def chosen_chat_template(settings: ServiceSettings) -> ChatTemplate | None:
    """The chat template chosen instead of the model's own (``LLM_CHAT_TEMPLATE`` or
    ``LLM_CHAT_TEMPLATE_FILE``), read and compiled; None: the model's own.

    Raises:
        ConfigurationError: the file cannot be read or is not UTF-8 (the message names it), or
            the template is not valid Jinja (it names the file or built-in, and the line).
    """
    if settings.chat_template is not None:
        template = ChatTemplate.builtin(settings.chat_template)
    elif settings.chat_template_file is not None:
        path = settings.chat_template_file.expanduser()
        source = read_text(path, "--chat-template-file", "chat template")
        template = ChatTemplate(source, f"file {path}")
    else:
        return None
    template.compile()
    return template


def load_backend(settings: ServiceSettings, *, progress: bool = True) -> Backend:
    """Load the configured model through llama.cpp (blocking: call it off the event loop).

    With ``LLM_BACKEND=fake``, the fake backend instead (a testing aid: no model, no
    llama.cpp). A chat template chosen in the settings replaces the model's own (the fake's
    too); it is checked before the model is loaded.

    Raises:
        ConfigurationError: the chosen chat template cannot be read or compiled.
        ModelLoadError: among others, llama-cpp-python is not installed (the "server" extra).
    """
    template = chosen_chat_template(settings)
    backend = _load(settings, template, progress=progress)
    if template is not None:
        used = template.origin
    elif settings.backend == "fake":
        used = "the fake backend's own (<role>content lines)"
    elif backend.info.chat_template is not None:
        used = "the model's own (GGUF)"
    else:
        used = "none: the model's GGUF has none, so chat requests are refused (prompts only)"
    logger.info("chat template: %s", used)
    return backend


def _load(settings: ServiceSettings, template: ChatTemplate | None, *, progress: bool) -> Backend:
    source = None if template is None else template.source
    if settings.backend == "fake":
        logger.warning(
            "LLM_BACKEND=fake: serving the fake backend, a testing aid: no model, every reply"
            " counts%s",
            f" (LLM_MODEL_PATH={settings.model_path} is not used)" if settings.model_path else "",
        )
        return FakeBackend(
            n_ctx=settings.n_ctx,
            token_delay_s=FAKE_TOKEN_DELAY_S,
            default_reply=FAKE_REPLY,
            pool_mode=settings.pool_mode,
            slots=settings.llama_service_threads,
            step_tokens=settings.n_batch,
            prefill_chunk=settings.prefill_chunk,
            chat_template=source,
            embeddings=bool(settings.embeddings),
        )
    try:
        from llm_service.engine.llama import LlamaBackend
    except ModuleNotFoundError as exc:
        if exc.name not in ("llama_cpp", "numpy"):
            raise
        raise ModelLoadError(
            f"{exc.name} is not installed: serving a model needs the server extra,"
            ' pip install "llm-service[server]" (or ./scripts/setup from a source checkout)'
        ) from None

    show = progress and sys.stderr.isatty()
    path = resolve_model_path(settings, progress=show)
    threads = settings.threads_per_context
    logger.info(
        "loading model %s (%s mode, %s per context)",
        path,
        settings.pool_mode,
        plural(threads, "CPU thread"),
    )

    def report(fraction: float) -> None:
        if show:
            sys.stderr.write(f"\rloading model: {fraction:4.0%}")
            if fraction >= 1:
                sys.stderr.write("\n")

    return LlamaBackend.load(
        path,
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_threads=threads,
        n_gpu_layers=settings.n_gpu_layers,
        pool_mode=settings.pool_mode,
        slots=settings.llama_service_threads,
        prefill_chunk=settings.prefill_chunk,
        chat_template=source,
        embeddings=settings.embeddings,
        progress=report,
    )


async def start_engine(backend: Backend, settings: ServiceSettings) -> Engine:
    """Create the pool of ``LLM_LLAMA_SERVICE_THREADS`` contexts (or slots, in batched mode:
    the backend was loaded for that many) and return a ready engine."""
    return await Engine.start(
        backend,
        EngineConfig(
            pool_size=settings.llama_service_threads,
            max_queue=settings.max_queue,
            queue_timeout_s=settings.queue_timeout,
            limits=RequestLimits(
                prompt_chars=settings.max_prompt_chars,
                messages=settings.max_messages,
                stop_strings=settings.max_stop_strings,
                stop_chars=settings.max_stop_chars,
                grammar_bytes=settings.max_grammar_bytes,
                schema_bytes=settings.max_schema_bytes,
            ),
        ),
    )
