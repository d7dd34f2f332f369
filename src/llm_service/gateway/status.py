"""The one table from llm_service's errors to HTTP statuses and error bodies: OpenAI's, and
Anthropic's for the Messages API (same statuses, its own error types)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

__all__ = [
    "ANTHROPIC_ERROR_TYPES",
    "HTTP_ERRORS",
    "INTERNAL_MESSAGE",
    "HttpError",
    "anthropic_error_body",
    "error_body",
    "http_error",
]

INTERNAL_MESSAGE = "internal error; the gateway's log has the details"


@dataclass(frozen=True, slots=True)
class HttpError:
    """How one error class goes out.

    Attributes:
        status: the HTTP status.
        type: OpenAI's error ``type``.
        code: OpenAI's error ``code``.
        message: said instead of the error's own message, which names backend internals
            (addresses, certificates) that the gateway's log keeps for the operator.
        retry: False to tell OpenAI's clients not to retry (``x-should-retry: false``): a
            request that ran out of time, or a gateway the backends refuse, fails again.
    """

    status: int
    type: str
    code: str | None = None
    message: str | None = None
    retry: bool | None = None


_BACKEND_DOWN = "no backend could be reached to serve the request; retry later"
HTTP_ERRORS: dict[type[LLMServiceError], HttpError] = {
    InvalidRequestError: HttpError(400, "invalid_request_error"),
    PromptTooLongError: HttpError(400, "invalid_request_error", "context_length_exceeded"),
    ModelNotFoundError: HttpError(404, "invalid_request_error", "model_not_found"),
    AuthenticationError: HttpError(401, "authentication_error", "invalid_api_key"),
    RateLimitedError: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    OverloadedError: HttpError(429, "rate_limit_error", "overloaded"),
    DeadlineExceededError: HttpError(504, "timeout_error", "deadline_exceeded", retry=False),
    UnavailableError: HttpError(503, "service_unavailable_error", "no_backend_available"),
    ConnectionFailedError: HttpError(
        503, "service_unavailable_error", "no_backend_available", _BACKEND_DOWN
    ),
    ConnectionLostError: HttpError(
        502,
        "server_error",
        "backend_lost",
        "the backend serving this request failed mid-answer; retry",
    ),
    # A backend cancelled the call (it drained past its grace), as the client never does here.
    RequestCancelledError: HttpError(
        503, "service_unavailable_error", "backend_cancelled", "the backend stopped the request"
    ),
    EngineError: HttpError(
        502, "server_error", "backend_error", "the backend failed while generating; retry"
    ),
    # The backend refused the gateway's own certificate, or speaks another API: the gateway's
    # deployment is wrong, not the request.
    PermissionDeniedError: HttpError(
        502, "server_error", "backend_refused_gateway", "a backend refused the gateway", False
    ),
    UnsupportedError: HttpError(
        502, "server_error", "backend_unsupported", "a backend does not serve this API", False
    ),
    InternalServerError: HttpError(500, "server_error", "internal_error", INTERNAL_MESSAGE),
    ConfigurationError: HttpError(500, "server_error", "internal_error", INTERNAL_MESSAGE),
    ModelLoadError: HttpError(500, "server_error", "internal_error", INTERNAL_MESSAGE),
    ModelFetchError: HttpError(500, "server_error", "internal_error", INTERNAL_MESSAGE),
}
# The backend's names of request fields, as OpenAI's parameters.
# (The gateway sends a response_format as a JSON schema, and its own grammar field as a grammar;
# the chat's tool fields are OpenAI's top-level ones.)
_PARAMS = {"sampling.json_schema": "response_format", "sampling.grammar": "grammar"}
_PREFIXES = ("sampling.", "chat.")


def error_body(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Anthropic's error types by HTTP status (its own: 400, 401, 403, 404, 413, 429, 500, 529);
# another 5xx is ``api_error``. An ``OverloadedError`` is ``overloaded_error`` whatever its status.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str, *, overloaded: bool = False) -> dict[str, Any]:
    """Anthropic's error object for an answer with HTTP ``status``:
    ``{"type": "error", "error": {"type", "message"}}``."""
    kind = "overloaded_error" if overloaded else ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def http_error(
    exc: LLMServiceError, *, anthropic: bool = False
) -> tuple[HttpError, dict[str, Any], dict[str, str]]:
    """The status, error body (OpenAI's, or with ``anthropic`` Anthropic's) and extra headers
    (``retry-after``) for ``exc``."""
    mapping = next(HTTP_ERRORS[c] for c in type(exc).__mro__ if c in HTTP_ERRORS)
    param, message = None, mapping.message or str(exc)
    if isinstance(exc, InvalidRequestError):
        param = _PARAMS.get(exc.field, exc.field)
        for prefix in _PREFIXES:
            param = param.removeprefix(prefix)
        message = f"{param}: {exc.detail}"
    if anthropic:
        overloaded = isinstance(exc, OverloadedError)
        body = anthropic_error_body(mapping.status, message, overloaded=overloaded)
    else:
        body = error_body(message, mapping.type, param=param, code=mapping.code)
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    if mapping.retry is False:
        headers["x-should-retry"] = "false"
    return mapping, body, headers
