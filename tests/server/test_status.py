"""Every error of llm_service maps, from one table, to the gRPC status the API documents."""

from __future__ import annotations

import logging

import grpc
import pytest

from llm_service import errors
from llm_service.server.status import RETRY_AFTER_MS, STATUS_CODES, status_for
from tests.support import all_error_classes


def test_every_error_class_has_its_own_row() -> None:
    exported = {getattr(errors, n) for n in errors.__all__} - {errors.LLMServiceError}
    assert exported <= all_error_classes()
    assert set(STATUS_CODES) == all_error_classes()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequestError("sampling.top_p", "must be in (0, 1]"), "INVALID_ARGUMENT"),
        (
            errors.PromptTooLongError(
                "prompt", prompt_tokens=5000, requested_tokens=5100, limit=4096
            ),
            "INVALID_ARGUMENT",
        ),
        (errors.OverloadedError("queue full", retry_after_s=2.5), "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceededError("late"), "DEADLINE_EXCEEDED"),
        (errors.RequestCancelledError("gone"), "CANCELLED"),
        (errors.EngineError("decode failed"), "UNAVAILABLE"),
        (errors.UnavailableError("draining"), "UNAVAILABLE"),
        (errors.PermissionDeniedError("not allowed"), "PERMISSION_DENIED"),
    ],
)
def test_domain_errors_keep_their_message(error: Exception, code: str) -> None:
    status = status_for(error)
    assert status.code is getattr(grpc.StatusCode, code)
    assert status.message == str(error)


def test_prompt_too_long_names_both_numbers_and_the_field() -> None:
    error = errors.PromptTooLongError(
        "sampling.max_tokens", prompt_tokens=5000, requested_tokens=5100, limit=4096
    )
    message = status_for(error).message
    assert message.startswith("sampling.max_tokens:")
    assert "5100" in message and "4096" in message


def test_overload_carries_a_retry_hint() -> None:
    status = status_for(errors.OverloadedError("queue full", retry_after_s=2.5))
    assert dict(status.trailing_metadata) == {RETRY_AFTER_MS: "2500", "llm-error": "overloaded"}


def test_anything_else_is_internal_with_a_generic_message_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise KeyError("secret detail")
    except KeyError as exc:
        with caplog.at_level(logging.ERROR):
            status = status_for(exc, "req-1")
    assert status.code is grpc.StatusCode.INTERNAL
    assert "secret" not in status.message
    assert "req-1" in caplog.text and "secret detail" in caplog.text
    assert "Traceback" in caplog.text
