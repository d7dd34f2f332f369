"""The client's error table mirrors the server's: every error comes back as itself."""

from __future__ import annotations

import grpc
import pytest

from llm_service import errors
from llm_service.client.status import ERRORS_BY_CODE, error_for
from llm_service.server.status import status_for
from tests.support import all_error_classes

EXAMPLES: list[errors.LLMServiceError] = [
    errors.InvalidRequestError("sampling.top_p", "must be in (0, 1], got 1.5"),
    errors.PromptTooLongError(
        "sampling.max_tokens", prompt_tokens=5000, requested_tokens=5100, limit=4096
    ),
    errors.OverloadedError("queue full", retry_after_s=2.5),
    errors.RateLimitedError("60 requests per minute", retry_after_s=0.75),
    errors.ModelNotFoundError("model", "no model 'gpt-4'"),
    errors.AuthenticationError("no API key"),
    errors.DeadlineExceededError("late"),
    errors.RequestCancelledError("gone"),
    errors.UnavailableError("draining"),
    errors.ConnectionFailedError("refused"),
    errors.ConnectionLostError("reset mid-answer"),
    errors.PermissionDeniedError("not on the list"),
    errors.UnsupportedError("no such method"),
    errors.InternalServerError("bug"),
    errors.ConfigurationError("bad setting"),
    errors.ModelLoadError("not GGUF"),
    errors.ModelFetchError("checksum"),
    errors.EngineError("decode failed"),
]


def test_examples_cover_the_whole_tree() -> None:
    assert {type(e) for e in EXAMPLES} == all_error_classes()


def test_every_status_code_is_mapped() -> None:
    assert set(ERRORS_BY_CODE) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_an_error_crosses_the_wire_as_itself(error: errors.LLMServiceError) -> None:
    status = status_for(error)
    back = error_for(status.code, status.message, status.trailing_metadata, request_id="rq-1")
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.request_id == "rq-1"
    assert back.status == status.code.name
    assert vars(back) == vars(error) | {"request_id": "rq-1", "status": status.code.name}


def test_an_unnamed_status_maps_by_code() -> None:
    back = error_for(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert isinstance(back, errors.ConnectionFailedError)
    back = error_for(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert isinstance(back, errors.InvalidRequestError) and back.field == "request"
    back = error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    assert isinstance(back, errors.OverloadedError) and back.retry_after_s == 1.0


def test_an_internal_error_is_named_too() -> None:
    status = status_for(KeyError("secret"))
    back = error_for(status.code, status.message, status.trailing_metadata)
    assert isinstance(back, errors.InternalServerError)
    assert "secret" not in str(back)
