"""Checks that run before every handler on the gRPC port, whatever the service.

- ``RequestParseInterceptor``: a request that does not parse (invalid UTF-8 in a string, a
  truncated message) is INVALID_ARGUMENT naming the message type, not gRPC's bare UNKNOWN.
- ``AllowListInterceptor``: a client whose certificate names none of the allowed names gets
  PERMISSION_DENIED, on every service (health and reflection included).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from llm_service.errors import InvalidRequestError, PermissionDeniedError
from llm_service.server.status import status_for
from llm_service.server.tls import client_names

__all__ = ["AllowListInterceptor", "RequestParseInterceptor"]

logger = logging.getLogger(__name__)

ServicerContext = grpc.aio.ServicerContext[Any, Any]
Guard = Callable[[Any, ServicerContext], Awaitable[None]]
Behavior = Callable[..., Any]
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _guarded(behavior: Behavior, guard: Guard) -> Behavior:
    """``behavior`` preceded by ``await guard(request, context)`` (which aborts to refuse)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: ServicerContext) -> Any:
            await guard(request, context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def call(request: Any, context: ServicerContext) -> Any:
        await guard(request, context)
        return await behavior(request, context)

    return call


def _guard_handler(handler: Any, guard: Guard, **replace: Any) -> Any:
    behaviors = {k: _guarded(getattr(handler, k), guard) for k in _KINDS if getattr(handler, k)}
    return handler._replace(**behaviors, **replace)


class _HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Rewrites each method's handler once it is found; subclasses say how in ``rewrite``."""

    def rewrite(self, handler: Any, method: str) -> Any:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        return None if handler is None else self.rewrite(handler, handler_call_details.method)


class _Unparsable:
    """Stands in for a request message that failed to parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RequestParseInterceptor(_HandlerInterceptor):
    """Unparsable unary requests become INVALID_ARGUMENT (field ``request``)."""

    def rewrite(self, handler: Any, method: str) -> Any:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # protobuf's DecodeError, and whatever a parser raises
                return _Unparsable(str(exc))

        async def check(request: Any, context: ServicerContext) -> None:
            if isinstance(request, _Unparsable):
                error = InvalidRequestError(
                    "request", f"not a valid request for {method}: {request.reason}"
                )
                await status_for(error).abort(context)

        return _guard_handler(handler, check, request_deserializer=lenient)


class AllowListInterceptor(_HandlerInterceptor):
    """Refuses, with PERMISSION_DENIED, clients whose certificate names none of ``allowed``.

    A name matches the certificate's common name or one of its subject alternative names (or
    its whole subject, ``CN=...,O=...``, when given programmatically).
    """

    def __init__(self, allowed: Sequence[str]) -> None:
        self._allowed = frozenset(allowed)

    async def _check(self, request: Any, context: ServicerContext) -> None:
        names = client_names(context)
        if self._allowed.isdisjoint(names):
            logger.warning("refused client %s: certificate %s not on the allow-list",
                           context.peer(), names[0] if names else "(none)")  # fmt: skip
            refused = PermissionDeniedError("this client certificate is not allowed")
            await status_for(refused).abort(context)

    def rewrite(self, handler: Any, method: str) -> Any:
        return _guard_handler(handler, self._check)
