"""The engine: requests in, token streams out, over a pool of llama.cpp contexts.

Public names are re-exported here; ``llm_service.engine.llama`` (the only module importing
``llama_cpp``) is imported only when a real model is loaded. The engine reads no settings:
``llm_service.wiring`` builds it from them.
"""

from __future__ import annotations

from llm_service.engine.backend import Backend, LoadedModel, PoolMode
from llm_service.engine.chat_template import ChatTemplate
from llm_service.engine.engine import Engine, EngineConfig
from llm_service.engine.fake import FakeBackend
from llm_service.engine.pool import LlamaContextPool
from llm_service.types import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    PoolState,
    RequestLimits,
    SamplingParams,
    Started,
    StepCounts,
    Timings,
    TokenDelta,
    Usage,
)

__all__ = [
    "Backend",
    "ChatMessage",
    "ChatTemplate",
    "Engine",
    "EngineConfig",
    "FakeBackend",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "LlamaContextPool",
    "LoadedModel",
    "PoolMode",
    "PoolState",
    "RequestLimits",
    "SamplingParams",
    "Started",
    "StepCounts",
    "Timings",
    "TokenDelta",
    "Usage",
]
