"""The one error tree of llm_service.

Every error a caller can see is one of these. Each transport (gRPC, HTTP) maps them once, from
a table, to its own status codes; nothing else decides a status from an exception.

```
LLMServiceError
 ├── InvalidRequestError        bad input; ``field`` names the offending field
 │    ├── PromptTooLongError    prompt (+ max_tokens) does not fit the context; both numbers kept
 │    └── ModelNotFoundError    the gateway serves no model of that name
 ├── AuthenticationError        the gateway got no API key, or an unknown one
 ├── OverloadedError            no context free: the waiting queue is full, or the wait timed out
 │    └── RateLimitedError      an API key went over its requests or tokens per minute
 ├── DeadlineExceededError      the request's deadline passed before it could finish
 ├── RequestCancelledError      the client went away
 ├── UnavailableError           the service is not serving now (loading, draining); try elsewhere
 │    ├── ConnectionFailedError the client could not reach the service (refused, TLS handshake)
 │    └── ConnectionLostError   the connection broke mid-answer (the service died, the network)
 ├── PermissionDeniedError      the client's certificate is not on the allow-list
 ├── UnsupportedError           the server does not implement the call (another API version)
 ├── InternalServerError        a bug in the server; its log has the details
 ├── ConfigurationError         a setting is missing or wrong (TLS material, addresses)
 ├── ModelLoadError             the model file is missing, not GGUF, or llama.cpp refused it
 ├── ModelFetchError            the default model could not be fetched or failed its checksum
 └── EngineError                the engine itself failed (decode error, broken context)
```

``kind`` names each class on the wire (gRPC trailing metadata ``llm-error``), so that the
client (``llm_service.client``) raises the same class the server raised. Errors raised by the
client also carry the ``request_id`` of the call and its gRPC ``status`` name. The gateway maps
the same tree to HTTP statuses and OpenAI error bodies (``llm_service.gateway.status``).
"""

from __future__ import annotations

from typing import ClassVar

from llm_service.log import plural

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConnectionFailedError",
    "ConnectionLostError",
    "DeadlineExceededError",
    "EngineError",
    "InternalServerError",
    "InvalidRequestError",
    "LLMServiceError",
    "ModelFetchError",
    "ModelLoadError",
    "ModelNotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "PromptTooLongError",
    "RateLimitedError",
    "RequestCancelledError",
    "UnavailableError",
    "UnsupportedError",
]


class LLMServiceError(Exception):
    """Base of every error llm_service raises on purpose.

    Attributes:
        kind: the class's stable name on the wire.
        request_id: the request it is about, when known (always set by the client).
        status: the gRPC status code's name, when the error came back from a server.
    """

    kind: ClassVar[str] = "error"
    request_id: str | None = None
    status: str | None = None


class InvalidRequestError(LLMServiceError):
    """The request is malformed or out of bounds.

    Attributes:
        field: the request field at fault (``"sampling.temperature"``, ``"prompt"``, ...).
    """

    kind = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class PromptTooLongError(InvalidRequestError):
    """The prompt, with the tokens asked for, does not fit the per-context window.

    Attributes:
        prompt_tokens: tokens in the prompt.
        requested_tokens: prompt tokens plus the completion tokens asked for.
        limit: tokens one context holds (``n_ctx``).
    """

    kind = "prompt_too_long"

    def __init__(
        self, field: str, *, prompt_tokens: int, requested_tokens: int, limit: int
    ) -> None:
        if requested_tokens > prompt_tokens:
            message = (
                f"prompt ({plural(prompt_tokens, 'token')}) + max_tokens"
                f" ({requested_tokens - prompt_tokens}) = {requested_tokens} tokens exceeds the"
                f" context size of {limit} tokens"
            )
        else:
            message = (
                f"prompt is {plural(prompt_tokens, 'token')}, the context size is {limit} tokens"
                " (and at least one token must be left to generate)"
            )
        super().__init__(field, message)
        self.prompt_tokens = prompt_tokens
        self.requested_tokens = requested_tokens
        self.limit = limit


class ModelNotFoundError(InvalidRequestError):
    """The request names a model that no healthy backend serves (``field`` is ``model``)."""

    kind = "model_not_found"


class AuthenticationError(LLMServiceError):
    """The request carries no API key, or one that is not accepted."""

    kind = "authentication"


class OverloadedError(LLMServiceError):
    """No context could be leased: the queue is full or the wait timed out.

    Attributes:
        retry_after_s: a hint for when to try again.
    """

    kind = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitedError(OverloadedError):
    """An API key used up its requests or tokens per minute; ``retry_after_s`` says when more
    are available."""

    kind = "rate_limited"


class DeadlineExceededError(LLMServiceError):
    """The request's deadline passed before generation could start."""

    kind = "deadline_exceeded"


class RequestCancelledError(LLMServiceError):
    """The caller cancelled the request."""

    kind = "cancelled"


class UnavailableError(LLMServiceError):
    """The service is not serving right now (still loading, or draining); try another replica."""

    kind = "unavailable"


class ConnectionFailedError(UnavailableError):
    """The client could not reach the service: nothing listens, or the TLS handshake failed."""

    kind = "connection_failed"


class ConnectionLostError(UnavailableError):
    """The service answered, then the connection broke before the answer's end (the service
    process died, the network failed)."""

    kind = "connection_lost"


class PermissionDeniedError(LLMServiceError):
    """The client is authenticated but not allowed (its certificate is not on the allow-list)."""

    kind = "permission_denied"


class ConfigurationError(LLMServiceError):
    """A setting is missing or wrong; the message says which and how to fix it."""

    kind = "configuration"


class ModelLoadError(LLMServiceError):
    """The model could not be loaded (missing file, not GGUF, rejected by llama.cpp)."""

    kind = "model_load"


class ModelFetchError(LLMServiceError):
    """The default model could not be downloaded, extracted or verified."""

    kind = "model_fetch"


class EngineError(LLMServiceError):
    """The engine failed while serving a request (llama.cpp error, broken context)."""

    kind = "engine"


class UnsupportedError(LLMServiceError):
    """The server does not implement the call (it speaks another version of the API)."""

    kind = "unsupported"


class InternalServerError(LLMServiceError):
    """The server failed in a way it did not expect (a bug); its log has the details."""

    kind = "internal"
