"""Python clients of llm_service: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both speak ``llm.v1.Inference`` over gRPC with mutual TLS, return plain dataclasses
(``Completion``, ``Chunk``, ``ModelInfo``, ``ServerStatus``) and raise the errors of
``llm_service.errors`` that the server raised (each with ``request_id`` and ``status``).

Example (with the service ``./scripts/run`` starts, and the certificates it wrote):
    >>> from llm_service.client import Client
    >>> with Client.from_settings() as client:  # doctest: +SKIP
    ...     print(client.generate("Say hello", max_tokens=16).text)
"""

from llm_service.client.aio import AsyncClient, AsyncStream
from llm_service.client.sync import Client, Stream
from llm_service.client.types import (
    ChatMessage,
    Chunk,
    ClientOptions,
    Completion,
    Embeddings,
    FinishReason,
    Message,
    ModelInfo,
    PoolState,
    Sampling,
    ServerStatus,
    Started,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    Tools,
    Usage,
)

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "ChatMessage",
    "Chunk",
    "Client",
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
    "Stream",
    "Timings",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "Tools",
    "Usage",
]
