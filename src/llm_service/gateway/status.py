"""The one table from llm_service's errors to HTTP statuses and OpenAI error bodies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm_service.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionFailedError,
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

__all__ = ["HTTP_ERRORS", "HttpError", "error_body", "http_error"]

INTERNAL_MESSAGE = "internal error; the gateway's log has the details"


@dataclass(frozen=True, slots=True)
class HttpError:
    """How one error class goes out: status, OpenAI ``type`` and ``code``."""

    status: int
    type: str
    code: str | None = None


# Backend errors the gateway could not hide (it retries what another replica may serve).
# 499 is the de-facto "client closed request": logged and counted, never received by anyone.
HTTP_ERRORS: dict[type[LLMServiceError], HttpError] = {
    InvalidRequestError: HttpError(400, "invalid_request_error"),
    PromptTooLongError: HttpError(400, "invalid_request_error", "context_length_exceeded"),
    ModelNotFoundError: HttpError(404, "invalid_request_error", "model_not_found"),
    AuthenticationError: HttpError(401, "authentication_error", "invalid_api_key"),
    RateLimitedError: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    OverloadedError: HttpError(429, "rate_limit_error", "overloaded"),
    RequestCancelledError: HttpError(499, "invalid_request_error", "cancelled"),
    DeadlineExceededError: HttpError(504, "timeout_error", "deadline_exceeded"),
    UnavailableError: HttpError(503, "service_unavailable_error", "no_backend_available"),
    ConnectionFailedError: HttpError(503, "service_unavailable_error", "no_backend_available"),
    EngineError: HttpError(502, "server_error", "backend_error"),
    # The backend refused the gateway's own certificate, or speaks another API: the gateway's
    # deployment is wrong, not the request.
    PermissionDeniedError: HttpError(502, "server_error", "backend_refused_gateway"),
    UnsupportedError: HttpError(502, "server_error", "backend_unsupported"),
    InternalServerError: HttpError(500, "server_error", "internal_error"),
    ConfigurationError: HttpError(500, "server_error", "internal_error"),
    ModelLoadError: HttpError(500, "server_error", "internal_error"),
    ModelFetchError: HttpError(500, "server_error", "internal_error"),
}


def error_body(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def http_error(exc: LLMServiceError) -> tuple[HttpError, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error body and extra headers (``retry-after``) for ``exc``."""
    mapping = next(HTTP_ERRORS[c] for c in type(exc).__mro__ if c in HTTP_ERRORS)
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    message = str(exc) if mapping.status != 500 else INTERNAL_MESSAGE
    body = error_body(message, mapping.type, param=param, code=mapping.code)
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    return mapping, body, headers
