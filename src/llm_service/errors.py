"""The one error tree of llm_service.

Every error a caller can see is one of these. Each transport (gRPC, HTTP) maps them once, from
a table, to its own status codes; nothing else decides a status from an exception.

```
LLMServiceError
 ├── InvalidRequestError        bad input; ``field`` names the offending field
 │    └── PromptTooLongError    prompt (+ max_tokens) does not fit the context; both numbers kept
 ├── OverloadedError            no context free: the waiting queue is full, or the wait timed out
 ├── DeadlineExceededError      the request's deadline passed before it could finish
 ├── RequestCancelledError      the client went away
 ├── UnavailableError           the service is not serving now (loading, draining); try elsewhere
 ├── PermissionDeniedError      the client's certificate is not on the allow-list
 ├── ConfigurationError         a setting is missing or wrong (TLS material, addresses)
 ├── ModelLoadError             the model file is missing, not GGUF, or llama.cpp refused it
 ├── ModelFetchError            the default model could not be fetched or failed its checksum
 └── EngineError                the engine itself failed (decode error, broken context)
```
"""

from __future__ import annotations

from llm_service.log import plural

__all__ = [
    "ConfigurationError",
    "DeadlineExceededError",
    "EngineError",
    "InvalidRequestError",
    "LLMServiceError",
    "ModelFetchError",
    "ModelLoadError",
    "OverloadedError",
    "PermissionDeniedError",
    "PromptTooLongError",
    "RequestCancelledError",
    "UnavailableError",
]


class LLMServiceError(Exception):
    """Base of every error llm_service raises on purpose."""


class InvalidRequestError(LLMServiceError):
    """The request is malformed or out of bounds.

    Attributes:
        field: the request field at fault (``"sampling.temperature"``, ``"prompt"``, ...).
    """

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


class OverloadedError(LLMServiceError):
    """No context could be leased: the queue is full or the wait timed out.

    Attributes:
        retry_after_s: a hint for when to try again.
    """

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(LLMServiceError):
    """The request's deadline passed before generation could start."""


class RequestCancelledError(LLMServiceError):
    """The caller cancelled the request."""


class UnavailableError(LLMServiceError):
    """The service is not serving right now (still loading, or draining); try another replica."""


class PermissionDeniedError(LLMServiceError):
    """The client is authenticated but not allowed (its certificate is not on the allow-list)."""


class ConfigurationError(LLMServiceError):
    """A setting is missing or wrong; the message says which and how to fix it."""


class ModelLoadError(LLMServiceError):
    """The model could not be loaded (missing file, not GGUF, rejected by llama.cpp)."""


class ModelFetchError(LLMServiceError):
    """The default model could not be downloaded, extracted or verified."""


class EngineError(LLMServiceError):
    """The engine failed while serving a request (llama.cpp error, broken context)."""
