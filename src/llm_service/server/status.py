"""The one table from llm_service's errors to gRPC status codes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from llm_service.api.v1 import metadata as md
from llm_service.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionFailedError,
    ConnectionLostError,
    DeadlineExceededError,
    EngineError,
    InternalServerError,
    InvalidRequestError,
    LLMServiceError,
    ModelFetchError,
    ModelLoadError,
    ModelNotFoundError,
    OverloadedError,
    PermissionDeniedError,
    PromptTooLongError,
    RateLimitedError,
    RequestCancelledError,
    UnavailableError,
    UnsupportedError,
)
from llm_service.log import RequestLogger

__all__ = ["RETRY_AFTER_MS", "STATUS_CODES", "GrpcStatus", "status_for"]

logger = logging.getLogger(__name__)

RETRY_AFTER_MS = md.RETRY_AFTER_MS
INTERNAL_MESSAGE = "internal error; the server's log has the details"

STATUS_CODES: dict[type[LLMServiceError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    PromptTooLongError: grpc.StatusCode.INVALID_ARGUMENT,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestCancelledError: grpc.StatusCode.CANCELLED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    EngineError: grpc.StatusCode.UNAVAILABLE,
    # These three stop a server from starting; a client meets them only as "not serving".
    ConfigurationError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    ModelFetchError: grpc.StatusCode.UNAVAILABLE,
    # Raised by the client only, mapped here so that the table covers the whole tree.
    ConnectionFailedError: grpc.StatusCode.UNAVAILABLE,
    ConnectionLostError: grpc.StatusCode.UNAVAILABLE,
    UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    InternalServerError: grpc.StatusCode.INTERNAL,
    # Raised by the gateway only (it speaks HTTP), mapped here for the same reason.
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True, slots=True)
class GrpcStatus:
    """What a failed call ends with."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """End the call with this status (raises, as ``context.abort`` does)."""
        await context.abort(self.code, self.message, self.trailing_metadata)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def status_for(exc: BaseException, request_id: str | None = None) -> GrpcStatus:
    """The status for ``exc``: from the table for our errors, INTERNAL (logged) for the rest.

    The trailing metadata names the error's kind and details (``llm_service.api.v1.metadata``),
    for the client to raise the same error.
    """
    code = next((STATUS_CODES[c] for c in type(exc).__mro__ if c in STATUS_CODES), None)
    if isinstance(exc, LLMServiceError) and code is not None:
        return GrpcStatus(code, str(exc), error_metadata(exc))
    RequestLogger(logger, request_id or "-").error("internal error", exc_info=exc)
    return GrpcStatus(
        grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ((md.ERROR_KIND, InternalServerError.kind),)
    )


def error_metadata(exc: LLMServiceError) -> tuple[tuple[str, str], ...]:
    """What the client needs to rebuild ``exc``, as trailing metadata."""
    metadata = [(md.ERROR_KIND, exc.kind)]
    if isinstance(exc, InvalidRequestError):
        metadata.append((md.ERROR_FIELD, exc.field))
    if isinstance(exc, PromptTooLongError):
        metadata += [
            (md.PROMPT_TOKENS, str(exc.prompt_tokens)),
            (md.REQUESTED_TOKENS, str(exc.requested_tokens)),
            (md.CONTEXT_SIZE, str(exc.limit)),
        ]
    if isinstance(exc, OverloadedError):
        metadata.append((md.RETRY_AFTER_MS, str(round(exc.retry_after_s * 1000))))
    return tuple(metadata)
