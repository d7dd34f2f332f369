"""Python clients of llm_service: ``AsyncClient`` (asyncio) and ``Client`` (blocking).

Both speak ``llm.v1.Inference`` over gRPC with mutual TLS, return plain dataclasses
(``Completion``, ``Chunk``, ``ModelInfo``, ``ServerStatus``) and raise the errors of
``llm_service.errors`` that the server raised (each with ``request_id`` and ``status``).

Example:
    >>> from llm_service.client import Client
    >>> from pathlib import Path
    >>> certs = Path("certs")
    >>> client = Client(
    ...     "127.0.0.1:50051",
    ...     tls_ca=certs / "ca.crt",
    ...     tls_cert=certs / "client.crt",
    ...     tls_key=certs / "client.key",
    ... )  # doctest: +SKIP
    >>> print(client.generate("Say hello", max_tokens=16).text)  # doctest: +SKIP
"""

from llm_service.client.aio import AsyncClient, AsyncStream
from llm_service.client.sync import Client, Stream
from llm_service.client.types import (
    ChatMessage,
    Chunk,
    ClientOptions,
    Completion,
    FinishReason,
    Message,
    ModelInfo,
    PoolState,
    Sampling,
    ServerStatus,
    Started,
    Timings,
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
    "FinishReason",
    "Message",
    "ModelInfo",
    "PoolState",
    "Sampling",
    "ServerStatus",
    "Started",
    "Stream",
    "Timings",
    "Usage",
]
