"""The gateway's HTTP side: OpenAI routes, health, metrics, and the serving object behind them.

Three layers, as in the rest of the service: thin routes (``create_app``) call ``Gateway``,
which checks the caller, converts the OpenAI body (``openai``), runs it on the replicas
(``backends.RoutedStream``) and writes the answer, whole or as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_service import __version__
from llm_service.client.types import Chunk, ClientOptions, Completion
from llm_service.errors import (
    ConfigurationError,
    LLMServiceError,
    ModelNotFoundError,
    RateLimitedError,
    RequestCancelledError,
)
from llm_service.gateway.backends import BackendPool, RoutedStream
from llm_service.gateway.keys import ANONYMOUS, ApiKeys, RateLimiter
from llm_service.gateway.metrics import GatewayMetrics
from llm_service.gateway.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Generation,
    ResponseBuilder,
    invalid_request,
    to_generation,
)
from llm_service.gateway.status import INTERNAL_MESSAGE, error_body, http_error
from llm_service.log import RequestLogger
from llm_service.settings import GatewaySettings

__all__ = ["Gateway", "build_gateway", "create_app"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
API_PREFIXES = ("/v1/", "/chat/", "/completions", "/models")
# Server-Sent Events, unbuffered by proxies (nginx honours X-Accel-Buffering).
SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
MAX_REQUEST_ID_CHARS = 128


def error_response(exc: LLMServiceError) -> JSONResponse:
    mapping, body, headers = http_error(exc)
    return JSONResponse(body, status_code=mapping.status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _request_id(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    if 0 < len(given) <= MAX_REQUEST_ID_CHARS and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


class Gateway:
    """The serving object: the caller's key and limits, routing, and the OpenAI conversion.

    Args:
        settings: the gateway's settings.
        pool: the replicas.
        keys: accepted API keys (None: no authentication).
        limiter: per-caller rate limits.
        metrics: where requests are counted.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        pool: BackendPool,
        keys: ApiKeys | None,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics
        self.started = int(time.time())

    def admit(self, headers: Headers, path: str) -> str:
        """The caller's name, if its key is good and (for generation) its limits allow.

        Raises:
            AuthenticationError: a key is required and missing or wrong.
            RateLimitedError: the caller is over its requests or tokens per minute.
        """
        caller = ANONYMOUS
        if self.keys is not None:
            caller = self.keys.identify(headers.get("authorization"))
        if path.removeprefix("/v1").rstrip("/") in ("/chat/completions", "/completions"):
            try:
                self.limiter.admit(caller)
            except RateLimitedError:
                self.metrics.rate_limited.inc()
                raise
        return caller

    async def generate(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request
    ) -> Response:
        """Serve one completion request: whole JSON, or an SSE stream.

        Raises:
            LLMServiceError: before anything was sent (the route answers with its HTTP status).
        """
        chat = isinstance(body, ChatCompletionRequest)
        gen = to_generation(body)
        state = request.state
        log = RequestLogger(logger, state.request_id)
        state.model = body.model if body.model in self.pool.models() else "-"
        log.info(
            "%s model=%r stream=%s caller=%s%s",
            "chat" if chat else "completion", body.model, gen.stream, state.caller,
            f" user={body.user!r}" if body.user else "",
        )  # fmt: skip
        stream = RoutedStream(
            self.pool,
            body.model,
            gen.prompt,
            gen.sampling,
            request_id=state.request_id,
            deadline=time.monotonic() + self.settings.request_timeout,
        )
        builder = ResponseBuilder(chat=chat, request_id=state.request_id, model=body.model)
        arrived = time.monotonic()
        if not gen.stream:
            try:
                done = await _unless_disconnected(request, self._collect(stream, arrived))
            except RequestCancelledError:
                self.metrics.disconnects.inc()
                log.info("client went away: backend call cancelled")
                raise
            finally:
                self._account(stream, state.caller, body.model)
            log.info("done: %s, %d tokens", done.finish_reason.value, done.usage.completion_tokens)
            return JSONResponse(builder.completion(done))

        first = asyncio.ensure_future(anext(stream))
        try:
            # A refusal or a bad request before the first token is an HTTP status; a wait longer
            # than the keep-alive interval starts the stream, with pings until the token comes.
            await _unless_disconnected(
                request, asyncio.wait({first}, timeout=self.settings.keepalive_interval)
            )
            if first.done() and first.exception() is not None:
                raise first.exception()  # type: ignore[misc]
        except BaseException as exc:
            first.cancel()
            stream.cancel()
            self._account(stream, state.caller, body.model)
            if isinstance(exc, RequestCancelledError):
                self.metrics.disconnects.inc()
                log.info("client went away before the first token: backend call cancelled")
            raise
        events = self._events(stream, first, builder, gen, log, arrived, state.caller, body.model)
        return StreamingResponse(events, headers=SSE_HEADERS)

    async def _collect(self, stream: RoutedStream, arrived: float) -> Completion:
        text: list[str] = []
        try:
            async for chunk in stream:
                if not text:
                    self._first_token(stream, arrived)
                text.append(chunk.text)
                if chunk.final:
                    assert chunk.finish_reason and chunk.usage and chunk.timings
                    return Completion(
                        "".join(text),
                        chunk.finish_reason,
                        chunk.usage,
                        chunk.timings,
                        stream.request_id,
                    )
        finally:
            stream.cancel()
        raise AssertionError("unreachable: a stream ends with its final chunk")  # pragma: no cover

    async def _events(
        self,
        stream: RoutedStream,
        first: asyncio.Future[Chunk],
        builder: ResponseBuilder,
        gen: Generation,
        log: RequestLogger,
        arrived: float,
        caller: str,
        model: str,
    ) -> AsyncIterator[bytes]:
        """The SSE body: pings until the first token, one event per chunk, then ``[DONE]``.

        An error after the response started is sent as a last ``data: {"error": ...}`` event.
        If the client goes away, Starlette cancels this generator: the ``finally`` cancels the
        backend call synchronously (no await can run in a cancelled scope).
        """
        try:
            while not first.done():
                done, _ = await asyncio.wait({first}, timeout=self.settings.keepalive_interval)
                if not done:
                    yield b": ping\n\n"
            chunk = first.result()
            self._first_token(stream, arrived)
            yield _sse(builder.chunk(chunk, include_usage=gen.include_usage))
            while not chunk.final:
                chunk = await anext(stream)
                if chunk.text or chunk.final:
                    yield _sse(builder.chunk(chunk, include_usage=gen.include_usage))
            if gen.include_usage:
                assert chunk.usage is not None
                yield _sse(builder.usage_chunk(chunk.usage))
            log.info("done: %s, %d tokens", chunk.finish_reason, stream.completion_tokens)
        except LLMServiceError as exc:
            log.warning("stream failed after it started: %s (%s)", exc, exc.kind)
            yield _sse(http_error(exc)[1])
        except asyncio.CancelledError:
            self.metrics.disconnects.inc()
            log.info("client went away mid-stream: backend call cancelled")
            raise
        finally:
            first.cancel()
            stream.cancel()
            self._account(stream, caller, model)
        yield b"data: [DONE]\n\n"

    def _first_token(self, stream: RoutedStream, arrived: float) -> None:
        self.metrics.ttft.labels(stream.model).observe(time.monotonic() - arrived)

    def _account(self, stream: RoutedStream, caller: str, model: str) -> None:
        """Charge the caller's token allowance and count the tokens (once per request)."""
        if stream.accounted:
            return
        stream.accounted = True
        used = stream.prompt_tokens + stream.completion_tokens
        self.limiter.charge(caller, used)
        if stream.prompt_tokens:
            self.metrics.tokens.labels(model, "prompt").inc(stream.prompt_tokens)
        if stream.completion_tokens:
            self.metrics.tokens.labels(model, "completion").inc(stream.completion_tokens)


async def _disconnected(receive: Receive) -> None:
    """Return when the client has closed the connection."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client goes away first: then it is cancelled.

    Raises:
        RequestCancelledError: the client disconnected.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise RequestCancelledError("the client closed the connection")
    return task.result()


class _RequestContext:
    """ASGI middleware: request id, API key and rate limit, access log and request metrics.

    Authentication runs here, before the body is read, so that a request without a good key
    gets 401 whatever its body holds.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        path: str = scope["path"]
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, caller=ANONYMOUS, model="-")
        status = 500
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            if path.startswith(API_PREFIXES):
                try:
                    state["caller"] = self.gateway.admit(headers, path)
                except LLMServiceError as exc:
                    await error_response(exc)(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            route = path if path in _ROUTES else "other"
            elapsed = time.monotonic() - started
            m = self.gateway.metrics
            m.requests.labels(route, str(status), state["model"]).inc()
            m.duration.labels(route).observe(elapsed)
            if route not in ("/healthz", "/readyz", "/metrics"):
                RequestLogger(logger, request_id).info(
                    "%s %s -> %d in %.0f ms", scope["method"], path, status, elapsed * 1000
                )


_ROUTES = {
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/v1/models", "/models", "/healthz", "/readyz", "/metrics",
}  # fmt: skip

_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": 'OpenAI-style error: {"error": {message, type, param, code}}'},
    "5XX": {"description": "OpenAI-style error; 503 when no backend is healthy"},
}


def create_app(gateway: Gateway) -> FastAPI:
    """The ASGI application; ``gateway.pool`` is started and closed by its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.pool.start()
        for backend, state in gateway.pool.states():
            logger.info("backend %s: %s, model %r", backend, state.value, backend.model_id)
        if not gateway.pool.ready:
            logger.warning("no backend is healthy yet: requests get 503 until one is")
        try:
            yield
        finally:
            await gateway.pool.close()

    app = FastAPI(
        title="llm-gateway",
        version=__version__,
        description="OpenAI-compatible API in front of llm_service replicas.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(_RequestContext, gateway=gateway)
    bearer = HTTPBearer(auto_error=False, description="An API key from --api-keys-file.")

    @app.exception_handler(LLMServiceError)
    async def on_error(request: Request, exc: LLMServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc.errors()))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(message, "invalid_request_error", code=code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        RequestLogger(logger, request.state.request_id).error("internal error", exc_info=exc)
        body = error_body(INTERNAL_MESSAGE, "server_error", code="internal_error")
        return JSONResponse(body, status_code=500)

    auth = [Security(bearer)]

    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, whole or streamed (``stream``: Server-Sent Events)."""
        return await gateway.generate(body, request)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion, whole or streamed (``stream``: Server-Sent Events)."""
        return await gateway.generate(body, request)

    async def models() -> dict[str, Any]:
        """Models served by healthy backends."""
        return {"object": "list", "data": [_model(m) for m in gateway.pool.models()]}

    async def model(model_id: str) -> dict[str, Any]:
        """One served model."""
        if model_id not in gateway.pool.models():
            raise ModelNotFoundError("model", f"no model {model_id!r} is served")
        return _model(model_id)

    def _model(name: str) -> dict[str, Any]:
        created = gateway.started
        return {"id": name, "object": "model", "created": created, "owned_by": "llm-service"}

    for prefix, shown in (("/v1", True), ("", False)):
        kw: dict[str, Any] = {"dependencies": auth, "responses": _ERRORS}
        kw["include_in_schema"] = shown
        app.post(f"{prefix}/chat/completions", response_model=None, **kw)(chat)
        app.post(f"{prefix}/completions", response_model=None, **kw)(completions)
        app.get(f"{prefix}/models", **kw)(models)
        app.get(f"{prefix}/models/{{model_id:path}}", **kw)(model)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the gateway's process and event loop answer."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "no backend is healthy"}})
    async def readyz() -> Response:
        """Readiness: at least one backend is healthy; each backend's state."""
        ready = gateway.pool.ready
        body = {"ready": ready, "backends": gateway.pool.describe()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(gateway.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})

    return app


def build_gateway(settings: GatewaySettings) -> Gateway:
    """A gateway from ``settings`` (reads the keys file; connects nothing yet).

    Raises:
        ConfigurationError: no backend, bad TLS material, an unreadable keys file.
    """
    if not settings.backends:
        raise ConfigurationError(
            "no backend: give each llm_service replica with --backend HOST:PORT"
            " (or LLM_GATEWAY_BACKENDS='HOST:PORT HOST:PORT')"
        )
    options = ClientOptions(
        tls_ca=settings.tls_ca,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_server_name=settings.tls_server_name,
        insecure=settings.insecure_backends,
        timeout=None,
    )
    pool = BackendPool(settings, options)
    keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
    return Gateway(settings, pool, keys, limiter, GatewayMetrics(pool))
