"""The gateway's HTTP side: OpenAI and Anthropic routes, health, metrics, and the serving
object behind them.

Three layers, as in the rest of the service: thin routes (``create_app``) call ``Gateway``,
which checks the caller, converts the body (``openai``, ``anthropic``), runs it on the replicas
(``replicas.RoutedStream``) and writes the answer, whole or as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_service import __version__
from llm_service.client.aio import AsyncClient, TlsOptionNames, channel_credentials
from llm_service.client.types import Chunk, ClientOptions, Completion, Embeddings, Usage
from llm_service.errors import (
    ConfigurationError,
    InvalidRequestError,
    LLMServiceError,
    ModelNotFoundError,
    RateLimitedError,
)
from llm_service.gateway import anthropic
from llm_service.gateway.embeddings import (
    EmbeddingRequest,
    embedding_inputs,
    embeddings_object,
)
from llm_service.gateway.keys import ANONYMOUS, ApiKeys, RateLimiter
from llm_service.gateway.metrics import GatewayMetrics
from llm_service.gateway.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Generation,
    OpenAIWire,
    chat_message,
    invalid_request,
    to_generation,
)
from llm_service.gateway.replicas import ReplicaPool, RoutedStream
from llm_service.gateway.responses import ResponsesRequest, ResponsesWire
from llm_service.gateway.responses import to_generation as responses_generation
from llm_service.gateway.status import (
    INTERNAL_MESSAGE,
    anthropic_error_body,
    error_body,
    http_error,
)
from llm_service.gateway.tokenize import (
    ApplyTemplateRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from llm_service.gateway.wire import Wire
from llm_service.log import RequestLogger
from llm_service.settings import GatewaySettings
from llm_service.types import is_request_id, new_request_id

__all__ = ["Gateway", "build_gateway", "create_app"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Paths behind the API key (unknown ones too: a 401 comes before a 404).
API_PREFIXES = (
    "/v1/", "/chat/", "/completions", "/models", "/responses", "/embeddings", "/messages",
    "/tokenize", "/detokenize", "/apply-template",
)  # fmt: skip
# The routes that use a replica, and so count against a caller's rate limits.
GENERATION_ROUTES = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
     "/v1/responses", "/responses", "/v1/embeddings", "/embeddings",
     "/v1/messages", "/messages", "/v1/messages/count_tokens", "/messages/count_tokens"}
)  # fmt: skip
# Paths whose errors are Anthropic's (``{"type": "error", "error": {type, message}}``).
_ANTHROPIC_PATHS = re.compile(r"(/v1)?/messages(/.*)?")
# Server-Sent Events, unbuffered by proxies (nginx honours X-Accel-Buffering).
SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
# The gateway's names of its TLS settings, for the errors of ``channel_credentials``.
GATEWAY_TLS = TlsOptionNames(
    ca="--tls-ca / LLM_GATEWAY_TLS_CA",
    cert="--tls-cert / LLM_GATEWAY_TLS_CERT",
    key="--tls-key / LLM_GATEWAY_TLS_KEY",
    insecure="--insecure-backends / LLM_GATEWAY_INSECURE_BACKENDS",
)


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's Messages API (its errors are Anthropic's)."""
    return _ANTHROPIC_PATHS.fullmatch(path) is not None


def error_response(exc: LLMServiceError, path: str) -> JSONResponse:
    """The answer to a request for ``path`` that failed with ``exc``, in the path's API's
    error shape."""
    mapping, body, headers = http_error(exc, anthropic=is_anthropic(path))
    return JSONResponse(body, status_code=mapping.status, headers=headers)


def _error_json(
    path: str, status: int, message: str, type: str, code: str, headers: Any = None
) -> JSONResponse:
    """An error the table does not map (an unknown route, an internal failure), in the path's
    API's shape (``type`` and ``code``: OpenAI's)."""
    if is_anthropic(path):
        body = anthropic_error_body(status, message)
    else:
        body = error_body(message, type, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    # A request id the caller sends is used only if it is safe to put in logs and headers.
    return given if is_request_id(given) else new_request_id()


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
        pool: ReplicaPool,
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

    def admit(self, headers: Headers, route: str) -> str:
        """The caller's name, if its key is good and (for generation) its limits allow.

        Raises:
            AuthenticationError: a key is required and missing or wrong.
            RateLimitedError: the caller is over its requests or tokens per minute.
        """
        caller = ANONYMOUS
        if self.keys is not None:
            caller = self.keys.identify(headers.get("authorization"), headers.get("x-api-key"))
        if route in GENERATION_ROUTES:
            try:
                self.limiter.admit(caller)
            except RateLimitedError:
                self.metrics.rate_limited.inc()
                raise
        return caller

    async def generate(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request
    ) -> Response:
        """Serve one OpenAI completion request (chat or text): whole JSON, or an SSE stream."""
        gen = to_generation(body)
        chat = isinstance(body, ChatCompletionRequest)
        wire = OpenAIWire(
            chat=chat,
            request_id=request.state.request_id,
            model=body.model,
            logprobs="logprobs" in gen.sampling,
            include_usage=gen.include_usage,
        )
        what = "chat" if chat else "completion"
        user = f" user={body.user!r}" if body.user else ""
        return await self.serve(gen, wire, body.model, request, f"{what}{user}")

    async def respond(self, body: ResponsesRequest, request: Request) -> Response:
        """Serve one Responses API request: the ``response`` object, or its events."""
        gen = responses_generation(body)
        logprobs = "logprobs" in gen.sampling
        wire = ResponsesWire(body, request.state.request_id, logprobs=logprobs)
        user = f" user={body.user!r}" if body.user else ""
        return await self.serve(gen, wire, body.model, request, f"response{user}")

    async def messages(self, body: anthropic.MessagesRequest, request: Request) -> Response:
        """Serve one Anthropic Messages request: the whole message, or its event stream."""
        gen = anthropic.to_generation(body)
        wire = anthropic.AnthropicWire(
            request_id=request.state.request_id,
            model=body.model,
            stop_sequences=body.stop_sequences or (),
        )
        user = body.metadata.user_id if body.metadata else None
        what = "messages" + (f" user={user!r}" if user else "")
        return await self.serve(gen, wire, body.model, request, what)

    async def count_tokens(
        self, body: anthropic.CountTokensRequest, request: Request
    ) -> dict[str, int]:
        """The prompt tokens of an Anthropic Messages request, rendered by a replica.

        ``ApplyChatTemplate`` renders no tools: with tools, their definitions (JSON) are
        tokenized apart and added, which leaves out the template's own words around them.

        Raises:
            LLMServiceError: a bad body, no replica for the model, a replica's failure.
        """
        messages = anthropic.chat_messages(body)
        tools = anthropic.tool_list(body)
        request.state.model = body.model if body.model in self.pool.models() else "-"
        replica = self.pool.choose(body.model, set())
        timeout = self.settings.request_timeout
        _, tokens = await replica.client.apply_chat_template(messages, timeout=timeout)
        if tools:
            definitions = json.dumps(
                [{"name": t.name, "description": t.description,
                  "parameters": json.loads(t.parameters)} for t in tools]
            )  # fmt: skip
            ids = await replica.client.tokenize(definitions, add_special=False, timeout=timeout)
            tokens += len(ids)
        return {"input_tokens": tokens}

    async def serve(
        self, gen: Generation, wire: Wire, model: str, request: Request, what: str
    ) -> Response:
        """Serve one generation request, whatever its API: ``gen`` on the replicas, the answer
        written by ``wire``; whole JSON, or an SSE stream. ``what`` names it in the log.

        Raises:
            LLMServiceError: before anything was sent (the route answers with its HTTP status).
        """
        state = request.state
        state.model = model if model in self.pool.models() else "-"
        exchange = _Exchange(self, gen, wire, model, state.request_id, state.caller)
        exchange.log.info("%s model=%r stream=%s caller=%s", what, model, gen.stream, state.caller)
        try:
            if not gen.stream:
                done = await _unless_disconnected(request, exchange.collect())
                return JSONResponse(wire.whole(done))
            # A refusal or a bad request before the first token is an HTTP status; a wait longer
            # than the keep-alive interval starts the stream, with pings until the token comes.
            first = exchange.first = asyncio.ensure_future(exchange.choices.next())
            wait = asyncio.wait({first}, timeout=self.settings.keepalive_interval)
            await _unless_disconnected(request, wait)
            if first.done() and (error := first.exception()) is not None:
                raise error
        except _ClientGone:
            exchange.close()
            self.metrics.disconnects.inc()
            exchange.log.info("client went away: backend call cancelled")
            return Response(status_code=499)  # nobody reads it; logged and counted as 499
        except BaseException:
            exchange.close()
            raise
        return _EventStream(exchange)

    async def embed(self, body: EmbeddingRequest, request: Request) -> Response:
        """Serve one embedding request on a replica serving its model."""
        state = request.state
        state.model = body.model if body.model in self.pool.models() else "-"
        if body.dimensions is not None:
            raise InvalidRequestError(
                "dimensions", "is not served: the model's embeddings have its own size"
            )
        inputs = embedding_inputs(body)
        log = RequestLogger(logger, state.request_id)
        log.info("embeddings model=%r inputs=%d caller=%s%s", body.model, len(inputs),
                 state.caller, f" user={body.user!r}" if body.user else "")  # fmt: skip

        async def call(client: AsyncClient, seconds: float) -> Embeddings:
            return await client.embed(inputs, timeout=seconds, request_id=state.request_id)

        deadline = time.monotonic() + self.settings.request_timeout
        result = await _unless_disconnected(
            request,
            self.pool.call(body.model, call, request_id=state.request_id, deadline=deadline),
        )
        self.limiter.charge(state.caller, result.prompt_tokens)
        self.metrics.tokens.labels(body.model, "prompt").inc(result.prompt_tokens)
        return JSONResponse(embeddings_object(result, body.model, body.encoding_format))

    async def on_replica(
        self,
        model: str | None,
        request: Request,
        call: Callable[[AsyncClient, float], Awaitable[T]],
    ) -> T:
        """A unary call on a replica serving ``model`` (None: the one model served)."""
        if model is None:
            served = self.pool.models()
            if len(served) != 1:
                raise InvalidRequestError(
                    "model", f"is required: the gateway serves {len(served)} models"
                )
            model = served[0]
        request.state.model = model if model in self.pool.models() else "-"
        deadline = time.monotonic() + self.settings.request_timeout
        work = self.pool.call(model, call, request_id=request.state.request_id, deadline=deadline)
        return await _unless_disconnected(request, work)

    def account(self, stream: RoutedStream, caller: str, model: str) -> None:
        """Charge the caller's token allowance and count the tokens of a finished request."""
        self.limiter.charge(caller, stream.prompt_tokens + stream.completion_tokens)
        if stream.prompt_tokens:
            self.metrics.tokens.labels(model, "prompt").inc(stream.prompt_tokens)
        if stream.completion_tokens:
            self.metrics.tokens.labels(model, "completion").inc(stream.completion_tokens)


class _Choices:
    """The chunks of a request's ``n`` routed streams (one per choice), as they come, each with
    its choice's index. ``cancel()`` (synchronous) stops them all."""

    def __init__(self, streams: list[RoutedStream]) -> None:
        self.streams = streams
        self._reading: dict[asyncio.Future[Chunk], int] = {}
        self._ready: collections.deque[tuple[int, Chunk]] = collections.deque()
        self._started = False

    async def next(self) -> tuple[int, Chunk]:
        """The next chunk of any choice (call no more once every choice had its final one)."""
        if len(self.streams) == 1:
            return 0, await anext(self.streams[0])
        if not self._started:
            self._started = True
            for i in range(len(self.streams)):
                self._read(i)
        while not self._ready:
            done, _ = await asyncio.wait(self._reading, return_when=asyncio.FIRST_COMPLETED)
            errors = [e for f in done if (e := f.exception()) is not None]  # (all read)
            if errors:
                raise errors[0]
            for future in sorted(done, key=self._reading.__getitem__):
                self._ready.append((self._reading.pop(future), future.result()))
        index, chunk = self._ready.popleft()
        if not chunk.final:
            self._read(index)
        return index, chunk

    def _read(self, index: int) -> None:
        self._reading[asyncio.ensure_future(anext(self.streams[index]))] = index

    def cancel(self) -> None:
        for future in self._reading:
            future.cancel()
        for stream in self.streams:
            stream.cancel()


class _Exchange:
    """One generation request, from arrival to its last byte: the routed streams (one per
    choice), the OpenAI objects they become, and its clean-up, done once however the request
    ends."""

    def __init__(
        self,
        gateway: Gateway,
        gen: Generation,
        wire: Wire,
        model: str,
        request_id: str,
        caller: str,
    ) -> None:
        self.gateway = gateway
        self.gen = gen
        self.wire = wire
        self.caller = caller
        self.model = model
        self.log = RequestLogger(logger, request_id)
        self.arrived = time.monotonic()
        self.streams = [
            RoutedStream(
                gateway.pool,
                model,
                gen.prompt,
                gen.choice_sampling(i),
                tools=gen.tools,
                split_reasoning=gen.split_reasoning,
                request_id=request_id,
                deadline=self.arrived + gateway.settings.request_timeout,
            )
            for i in range(gen.n)
        ]
        self.choices = _Choices(self.streams)
        self.first: asyncio.Future[tuple[int, Chunk]] | None = None  # a stream's first chunk
        self.ended = False  # the whole response was written
        self._closed = False

    def close(self) -> None:
        """Cancel the backend calls still running, and account the tokens (synchronous, so
        that it runs in a ``finally`` under cancellation; idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.first is not None:
            self.first.cancel()
        self.choices.cancel()
        for stream in self.streams:
            self.gateway.account(stream, self.caller, self.model)

    def _first_token(self, first: tuple[int, Chunk]) -> tuple[int, Chunk]:
        """``first``, the first chunk, its arrival timed."""
        elapsed = time.monotonic() - self.arrived
        self.gateway.metrics.ttft.labels(self.model).observe(elapsed)
        return first

    def _tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    async def collect(self) -> list[Completion]:
        """The whole answer, a completion per choice (a request without ``stream``)."""
        try:
            _, chunk = self._first_token(await self.choices.next())
            left = len(self.streams) - chunk.final
            while left:
                _, chunk = await self.choices.next()
                left -= chunk.final
        finally:
            self.close()
        done = [s.completion for s in self.streams]
        assert all(d is not None for d in done)  # every stream ended with its final chunk
        reasons = ",".join(d.finish_reason.value for d in done if d is not None)
        self.log.info("done: %s, %d tokens", reasons, self._tokens())
        return [d for d in done if d is not None]

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE body: pings until the first token, one event per chunk, then ``[DONE]``.

        An error after the response started is sent as a last ``data: {"error": ...}`` event.
        If the client goes away, Starlette cancels the response; ``_EventStream`` then calls
        ``close()`` and counts the disconnect, whether or not this generator ever ran.
        """
        assert self.first is not None
        interval = self.gateway.settings.keepalive_interval
        try:
            if not self.first.done():
                yield b": ping\n\n"  # the response starts only because the token is late
            while not self.first.done():
                done, _ = await asyncio.wait({self.first}, timeout=interval)
                if not done:
                    yield b": ping\n\n"
            index, chunk = self._first_token(self.first.result())
            for event in self.wire.begin(self.streams[index].prompt_tokens):
                yield event
            for event in self.wire.events(index, chunk):
                yield event
            left = len(self.streams) - chunk.final
            usage = [chunk.usage] if chunk.usage is not None else []
            while left:
                index, chunk = await self.choices.next()
                for event in self.wire.events(index, chunk):
                    yield event
                if chunk.final:
                    left -= 1
                    if chunk.usage is not None:
                        usage.append(chunk.usage)
            # (The choices share their prompt: counted once, as OpenAI's usage does.)
            total = Usage(usage[0].prompt_tokens, sum(u.completion_tokens for u in usage))
            self.log.info("done: %s, %d tokens", chunk.finish_reason, self._tokens())
            ending = self.wire.end(total)
        except LLMServiceError as exc:
            self.log.warning("stream failed after it started: %s (%s)", exc, exc.kind)
            ending = self.wire.failure(exc)
        finally:
            self.close()
        for event in ending:
            yield event
        self.ended = True


class _EventStream(StreamingResponse):
    """The SSE response of an exchange; closes it however the response ends (even when the
    client left before the body was first iterated)."""

    def __init__(self, exchange: _Exchange) -> None:
        super().__init__(exchange.events(), headers=SSE_HEADERS)
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.exchange.close()
            if not self.exchange.ended:  # cancelled while reading a token or writing one
                self.exchange.gateway.metrics.disconnects.inc()
                self.exchange.log.info("client went away mid-stream: backend call cancelled")


class _ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _disconnected(receive: Receive) -> None:
    """Return when the client has closed the connection."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client goes away first: then it is cancelled.

    Raises:
        _ClientGone: the client disconnected.
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
        raise _ClientGone
    return task.result()


class _RequestContext:
    """ASGI middleware: request id, API key and rate limit, access log and request metrics.

    Authentication runs here, before the body is read, so that a request without a good key
    gets 401 whatever its body holds.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway, routes: list[BaseRoute]) -> None:
        self.app = app
        self.gateway = gateway
        self.routes = routes  # the application's, filled in as routes are added

    def _route(self, scope: Scope) -> str:
        """The template of the route ``scope`` goes to (a bounded metrics label), or "other"."""
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        path: str = scope["path"]
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, caller=ANONYMOUS, model="-")
        status, responded = 500, False
        started = time.monotonic()
        route = self._route(scope)

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        log = RequestLogger(logger, request_id)
        try:
            if path.startswith(API_PREFIXES):
                try:
                    state["caller"] = self.gateway.admit(headers, route)
                    receive = self._limited(headers, receive)
                except LLMServiceError as exc:
                    await error_response(exc, path)(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if responded:
                raise  # the response started: the server ends it (and logs the error)
            log.error("internal error", exc_info=exc)
            response = _error_json(path, 500, INTERNAL_MESSAGE, "server_error", "internal_error")
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.monotonic() - started
            m = self.gateway.metrics
            m.requests.labels(route, str(status), state["model"]).inc()
            m.duration.labels(route).observe(elapsed)
            if route not in ("/healthz", "/readyz", "/metrics"):
                log.info("%s %s -> %d in %.0f ms", scope["method"], path, status, elapsed * 1000)

    def _limited(self, headers: Headers, receive: Receive) -> Receive:
        """``receive``, refusing a body over ``max_request_bytes`` (declared or sent).

        Raises:
            InvalidRequestError: the declared ``content-length`` is over the limit (the body
                read by the route raises it too, when more is sent than the limit).
        """
        limit = self.gateway.settings.max_request_bytes
        declared = headers.get("content-length", "")
        too_large = InvalidRequestError("body", f"is larger than the limit of {limit} bytes")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        return receive_limited


_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": 'OpenAI-style error: {"error": {message, type, param, code}}'},
    "5XX": {"description": "OpenAI-style error; 503 when no backend is healthy"},
}
# A generation answers with JSON, or with Server-Sent Events when the body says ``stream``.
_GENERATED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion object; with ``stream``, Server-Sent Events of chunks",
        "content": {
            "application/json": {},
            # Each event: its data is one chunk object as JSON, then the last one "[DONE]".
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
    },
}


# The Responses API's events are named: each has an ``event:`` line and its JSON ``data``.
_RESPONDED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response object; with ``stream``, Server-Sent Events, from"
        " response.created to response.completed (or response.incomplete, response.failed)",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["event", "data"],
                }
            },
        },
    },
}
_ANTHROPIC: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": 'Anthropic-style error: {"type": "error", "error": {type, message}}'},
    "5XX": {"description": "Anthropic-style error; 503 when no backend is healthy"},
}
_MESSAGE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The message object; with ``stream``, Server-Sent Events named by type"
        " (message_start, content_block_start, content_block_delta, content_block_stop,"
        " message_delta, message_stop; error)",
        "content": _GENERATED[200]["content"],
    },
}


def _unreadable_body(cause: BaseException) -> InvalidRequestError:
    """The error for a body FastAPI could not parse as JSON (it says only that it could not)."""
    if isinstance(cause, UnicodeDecodeError):
        return InvalidRequestError(
            "body", f"is not valid UTF-8: {cause.reason} at byte {cause.start}"
        )
    if isinstance(cause, RecursionError):
        return InvalidRequestError("body", "is not valid JSON: nested too deeply")
    return InvalidRequestError("body", f"is not valid JSON: {type(cause).__name__}")


def create_app(gateway: Gateway) -> FastAPI:
    """The ASGI application; ``gateway.pool`` is started and closed by its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.pool.start()  # logs each backend's state
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
    app.add_middleware(_RequestContext, gateway=gateway, routes=app.router.routes)
    bearer = HTTPBearer(auto_error=False, description="An API key from --api-keys-file.")

    @app.exception_handler(LLMServiceError)
    async def on_error(request: Request, exc: LLMServiceError) -> Response:
        response = error_response(exc, request.url.path)
        if response.status_code >= 500:  # the client gets a generic message: the log has more
            RequestLogger(logger, request.state.request_id).warning(
                "%d: %s (%s)", response.status_code, exc, exc.kind
            )
        return response

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(invalid_request(exc.errors()), request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if isinstance(exc.__cause__, LLMServiceError):  # raised while FastAPI read the body
            return error_response(exc.__cause__, path)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse it
            return error_response(_unreadable_body(exc.__cause__), path)
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"{request.method} {path}: {exc.detail}"
        return _error_json(
            path, exc.status_code, message, "invalid_request_error", code, exc.headers
        )

    auth = [Security(bearer)]
    api_key = APIKeyHeader(
        name="x-api-key",
        auto_error=False,
        description="An API key, as Anthropic's clients send it.",
    )

    async def messages(body: anthropic.MessagesRequest, request: Request) -> Response:
        """Anthropic Messages API: a message, whole or streamed (``stream``: its events)."""
        return await gateway.messages(body, request)

    async def count_tokens(body: anthropic.CountTokensRequest, request: Request) -> dict[str, int]:
        """Anthropic Messages API: the tokens of a request's prompt (see docs/gateway.md)."""
        return await gateway.count_tokens(body, request)

    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, whole or streamed (``stream``: Server-Sent Events)."""
        return await gateway.generate(body, request)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion, whole or streamed (``stream``: Server-Sent Events)."""
        return await gateway.generate(body, request)

    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        """Embeddings of texts or token-id lists (a model served for embeddings)."""
        return await gateway.embed(body, request)

    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """A response (OpenAI's Responses API, stateless), whole or streamed (``stream``:
        Server-Sent Events)."""
        return await gateway.respond(body, request)

    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        """llama-server's: the model's token ids for ``content``."""

        async def call(client: AsyncClient, seconds: float) -> dict[str, Any]:
            ids = await client.tokenize(
                body.content,
                add_special=body.add_special,
                parse_special=body.parse_special,
                timeout=seconds,
            )
            if not body.with_pieces:
                return {"tokens": ids}
            pieces = [await client.detokenize([i], timeout=seconds) for i in ids]
            return {"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]}

        return await gateway.on_replica(body.model, request, call)

    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        """llama-server's: the text of ``tokens``."""

        async def call(client: AsyncClient, seconds: float) -> dict[str, Any]:
            return {"content": await client.detokenize(body.tokens, timeout=seconds)}

        return await gateway.on_replica(body.model, request, call)

    async def apply_template(body: ApplyTemplateRequest, request: Request) -> dict[str, Any]:
        """llama-server's: the prompt the model's chat template makes of ``messages``."""
        messages = [chat_message(i, m) for i, m in enumerate(body.messages)]

        async def call(client: AsyncClient, seconds: float) -> dict[str, Any]:
            prompt, _ = await client.apply_chat_template(messages, timeout=seconds)
            return {"prompt": prompt}

        return await gateway.on_replica(body.model, request, call)

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
        generation = kw | {"responses": _GENERATED | _ERRORS}
        app.post(f"{prefix}/chat/completions", response_model=None, **generation)(chat)
        app.post(f"{prefix}/completions", response_model=None, **generation)(completions)
        app.post(f"{prefix}/embeddings", response_model=None, **kw)(embeddings)
        responded = kw | {"responses": _RESPONDED | _ERRORS}
        app.post(f"{prefix}/responses", response_model=None, **responded)(responses)
        app.get(f"{prefix}/models", **kw)(models)
        app.get(f"{prefix}/models/{{model_id:path}}", **kw)(model)
        anthropic_kw = kw | {"dependencies": [*auth, Security(api_key)], "responses": _ANTHROPIC}
        app.post(f"{prefix}/messages", response_model=None, **anthropic_kw | {
            "responses": _MESSAGE | _ANTHROPIC})(messages)  # fmt: skip
        app.post(f"{prefix}/messages/count_tokens", **anthropic_kw)(count_tokens)

    for path, utility in (("/tokenize", tokenize), ("/detokenize", detokenize),
                          ("/apply-template", apply_template)):  # fmt: skip
        app.post(path, dependencies=auth, responses=_ERRORS)(utility)

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
    if not settings.backends and not settings.discover:
        raise ConfigurationError(
            "no backend: give each llm_service replica with --backend HOST:PORT"
            " (or LLM_GATEWAY_BACKENDS='HOST:PORT HOST:PORT'), or a DNS name that resolves to"
            " them with --discover NAME:PORT"
        )
    # Checked here, to name the gateway's options; each backend's client reads the files again.
    channel_credentials(
        settings.tls_ca, settings.tls_cert, settings.tls_key, settings.insecure_backends,
        GATEWAY_TLS,
    )  # fmt: skip
    options = ClientOptions(
        tls_ca=settings.tls_ca,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_server_name=settings.tls_server_name,
        insecure=settings.insecure_backends,
        timeout=None,
    )
    pool = ReplicaPool(settings, options)
    keys = ApiKeys.load(settings.api_keys_file) if settings.api_keys_file else None
    limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
    return Gateway(settings, pool, keys, limiter, GatewayMetrics(pool))
