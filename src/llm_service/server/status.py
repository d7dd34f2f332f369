"""The one table from llm_service's errors to gRPC status codes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from llm_service.errors import (
    ConfigurationError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    LLMServiceError,
    ModelFetchError,
    ModelLoadError,
    OverloadedError,
    PermissionDeniedError,
    PromptTooLongError,
    RequestCancelledError,
    UnavailableError,
)
from llm_service.log import RequestLogger

__all__ = ["RETRY_AFTER_MS", "STATUS_CODES", "GrpcStatus", "status_for"]

logger = logging.getLogger(__name__)

# Trailing metadata key of RESOURCE_EXHAUSTED: milliseconds to wait before retrying.
RETRY_AFTER_MS = "retry-after-ms"
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
    """The status for ``exc``: from the table for our errors, INTERNAL (logged) for the rest."""
    code = next((STATUS_CODES[c] for c in type(exc).__mro__ if c in STATUS_CODES), None)
    if code is not None:
        metadata: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, OverloadedError):
            metadata = ((RETRY_AFTER_MS, str(round(exc.retry_after_s * 1000))),)
        return GrpcStatus(code, str(exc), metadata)
    RequestLogger(logger, request_id or "-").error("internal error", exc_info=exc)
    return GrpcStatus(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
