"""The client's half of the error table: a failed call becomes the error the server raised.

The server names its error in the call's trailing metadata (``llm_service.api.v1.metadata``),
so the client raises the same class of ``llm_service.errors``, with the same message and details.
A status without that name (a transport failure, another server) is mapped by its code.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from llm_service.api.v1 import metadata as md
from llm_service.errors import (
    AuthenticationError,
    ConnectionFailedError,
    ConnectionLostError,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    LLMServiceError,
    OverloadedError,
    PermissionDeniedError,
    PromptTooLongError,
    RequestCancelledError,
    UnavailableError,
    UnsupportedError,
)

__all__ = ["ERRORS_BY_CODE", "RETRYABLE", "error_for", "error_from_rpc"]

# Every non-OK status code, for a status that does not name its error.
ERRORS_BY_CODE: dict[grpc.StatusCode, type[LLMServiceError]] = {
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNKNOWN: InternalServerError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: UnsupportedError,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequestError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.ABORTED: UnavailableError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    # Our server names its own UNAVAILABLE errors; an unnamed one is the transport's: nothing
    # listening, the TLS handshake refused, the connection lost.
    grpc.StatusCode.UNAVAILABLE: ConnectionFailedError,
    grpc.StatusCode.DATA_LOSS: InternalServerError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}

# Codes worth trying again (on a fresh call), as long as no token was received.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _kinds() -> dict[str, type[LLMServiceError]]:
    found: dict[str, type[LLMServiceError]] = {}
    todo: list[type[LLMServiceError]] = [LLMServiceError]
    while todo:
        cls = todo.pop()
        found[cls.kind] = cls
        todo.extend(cls.__subclasses__())
    return found


_BY_KIND = _kinds()


def error_for(
    code: grpc.StatusCode,
    message: str,
    trailing: Iterable[tuple[str, str | bytes]] = (),
    *,
    request_id: str | None = None,
) -> LLMServiceError:
    """The error for a failed call's status (never OK), with ``request_id`` and ``status`` set."""
    meta = {k: v for k, v in trailing if isinstance(v, str)}
    cls = _BY_KIND.get(meta.get(md.ERROR_KIND, ""), ERRORS_BY_CODE[code])
    error: LLMServiceError
    if issubclass(cls, InvalidRequestError):
        field = meta.get(md.ERROR_FIELD, "request")
        detail = message.removeprefix(f"{field}: ")
        if issubclass(cls, PromptTooLongError) and _has_numbers(meta):
            error = PromptTooLongError(
                field,
                prompt_tokens=int(meta[md.PROMPT_TOKENS]),
                requested_tokens=int(meta[md.REQUESTED_TOKENS]),
                limit=int(meta[md.CONTEXT_SIZE]),
            )
        elif issubclass(cls, PromptTooLongError):
            error = InvalidRequestError(field, detail)
        else:
            error = cls(field, detail)
    elif issubclass(cls, OverloadedError):
        retry_ms = meta.get(md.RETRY_AFTER_MS, "")
        retry_after_s = int(retry_ms) / 1000 if retry_ms.isdigit() else 1.0
        error = cls(message, retry_after_s=retry_after_s)
    else:
        error = cls(message)
    error.request_id = request_id
    error.status = code.name
    return error


def error_from_rpc(
    exc: grpc.aio.AioRpcError, request_id: str | None, *, answered: bool = False
) -> LLMServiceError:
    """The error for a failed call; ``answered``: the service had sent part of its answer."""
    code = exc.code()
    trailing = tuple(exc.trailing_metadata() or ())
    message = exc.details() or code.name.lower().replace("_", " ")
    if code is grpc.StatusCode.UNAVAILABLE and not _named(trailing) and answered:
        # Reached, then lost (the service died or the network broke): not a connection problem.
        error = ConnectionLostError(f"the connection to the service broke mid-answer ({message})")
        error.request_id, error.status = request_id, code.name
        return error
    if code is grpc.StatusCode.UNAVAILABLE and not _named(trailing):
        message = f"cannot reach the service: {_transport_reason(message)}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED and not _named(trailing):
        message = f"the call's deadline passed before it finished ({message})"
    return error_for(code, message, trailing, request_id=request_id)


def _named(trailing: Iterable[tuple[str, str | bytes]]) -> bool:
    return any(k == md.ERROR_KIND for k, _ in trailing)


def _has_numbers(meta: dict[str, str]) -> bool:
    keys = (md.PROMPT_TOKENS, md.REQUESTED_TOKENS, md.CONTEXT_SIZE)
    return all(meta.get(k, "").isdigit() for k in keys)


def _transport_reason(details: str) -> str:
    """gRPC's connection error, with what a person can act on in front (a hint, not a rule)."""
    lowered = details.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return f"the TLS handshake failed: the server's certificate is not trusted ({details})"
    if "handshake" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"the TLS handshake failed ({details})"
    if "connection refused" in lowered:
        return f"nothing is listening there ({details})"
    if "socket closed" in lowered:
        return (
            "the service closed the connection during the handshake: it may have refused this"
            " client's certificate (none given, signed by another CA, or expired), or one side"
            f" uses TLS and the other does not ({details})"
        )
    return details
