"""Every error of llm_service maps, from one table, to an HTTP status and an OpenAI error body."""

from __future__ import annotations

import pytest

from llm_service import errors
from llm_service.gateway.status import HTTP_ERRORS, INTERNAL_MESSAGE, error_body, http_error
from tests.support import all_error_classes


def instance(cls: type[errors.LLMServiceError]) -> errors.LLMServiceError:
    """An error of class ``cls``, whatever its constructor takes."""
    if issubclass(cls, errors.PromptTooLongError):
        return cls("prompt", prompt_tokens=5000, requested_tokens=5100, limit=4096)
    if issubclass(cls, errors.InvalidRequestError):
        return cls("field", "is wrong")
    if issubclass(cls, errors.OverloadedError):
        return cls("too much", retry_after_s=2.5)
    return cls("went wrong")


def test_every_error_class_has_its_own_row() -> None:
    assert set(HTTP_ERRORS) == all_error_classes()


@pytest.mark.parametrize("cls", sorted(all_error_classes(), key=lambda c: c.__name__))
def test_every_error_resolves_to_its_row(cls: type[errors.LLMServiceError]) -> None:
    mapping, body, _ = http_error(instance(cls))
    assert mapping is HTTP_ERRORS[cls]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == mapping.type
    assert body["error"]["code"] == mapping.code


def test_a_bad_request_names_its_param() -> None:
    mapping, body, headers = http_error(errors.InvalidRequestError("temperature", "too hot"))
    assert mapping.status == 400
    assert body == error_body(
        "temperature: too hot", "invalid_request_error", param="temperature", code=None
    )
    assert headers == {}


def test_a_prompt_too_long_is_context_length_exceeded() -> None:
    error = errors.PromptTooLongError(
        "messages", prompt_tokens=5000, requested_tokens=5100, limit=4096
    )
    mapping, body, _ = http_error(error)
    assert mapping.status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages"
    assert body["error"]["message"] == str(error)
    assert "4096" in body["error"]["message"]


@pytest.mark.parametrize(("seconds", "header"), [(2.1, "3"), (30.0, "30"), (0.2, "1"), (0, "1")])
def test_a_rate_limit_says_when_to_retry(seconds: float, header: str) -> None:
    error = errors.RateLimitedError("key-1 used its 2 requests per minute", retry_after_s=seconds)
    mapping, body, headers = http_error(error)
    assert mapping.status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert headers == {"retry-after": header}


def test_overload_is_429_with_a_retry_hint() -> None:
    mapping, body, headers = http_error(errors.OverloadedError("queue full", retry_after_s=1.5))
    assert mapping.status == 429
    assert body["error"]["code"] == "overloaded"
    assert body["error"]["message"] == "queue full"
    assert headers == {"retry-after": "2"}


def test_no_key_is_401() -> None:
    mapping, body, headers = http_error(errors.AuthenticationError("the API key is not valid"))
    assert mapping.status == 401
    assert body["error"]["type"] == "authentication_error"
    assert headers == {}


def test_an_unknown_model_is_404() -> None:
    mapping, body, _ = http_error(errors.ModelNotFoundError("model", "no model 'gpt-4'"))
    assert mapping.status == 404
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("error", "status", "retry"),
    [
        (errors.UnavailableError("no healthy backend"), 503, None),
        (errors.ConnectionFailedError("ipv4:10.0.0.5:50051: Connection refused"), 503, None),
        (errors.DeadlineExceededError("late"), 504, "false"),
        (errors.EngineError("decode failed"), 502, None),
        (errors.RequestCancelledError("cancelled by the server"), 503, None),
        (errors.PermissionDeniedError("CN=gateway not allowed"), 502, "false"),
    ],
)
def test_backend_failures(error: errors.LLMServiceError, status: int, retry: str | None) -> None:
    mapping, body, headers = http_error(error)
    assert mapping.status == status
    assert headers.get("x-should-retry") == retry  # OpenAI's clients retry 5xx unless told
    if mapping.message is None:
        assert body["error"]["message"] == str(error)
    else:  # backend internals (addresses, certificate names) stay in the gateway's log
        assert body["error"]["message"] == mapping.message
        assert str(error) not in body["error"]["message"]


def test_backend_field_names_become_openai_params() -> None:
    for field, param in [
        ("sampling.json_schema", "response_format"),
        ("sampling.max_tokens", "max_tokens"),
        ("messages[1].role", "messages[1].role"),
    ]:
        _, body, _ = http_error(errors.InvalidRequestError(field, "is bad"))
        assert body["error"]["param"] == param
        assert body["error"]["message"] == f"{param}: is bad"


@pytest.mark.parametrize(
    "cls",
    [
        errors.InternalServerError,
        errors.ConfigurationError,
        errors.ModelLoadError,
        errors.ModelFetchError,
    ],
)
def test_internal_errors_hide_their_message(cls: type[errors.LLMServiceError]) -> None:
    mapping, body, _ = http_error(cls("secret detail at /etc/llm/key.pem"))
    assert mapping.status == 500
    assert body["error"]["message"] == INTERNAL_MESSAGE
    assert "secret" not in str(body)
    assert body["error"]["type"] == "server_error"


def test_only_5xx_hide_their_message() -> None:
    for cls in all_error_classes():
        error = instance(cls)
        mapping, body, _ = http_error(error)
        if mapping.status == 500:
            assert body["error"]["message"] == INTERNAL_MESSAGE
        if mapping.status < 500:
            assert body["error"]["message"] == str(error), cls
