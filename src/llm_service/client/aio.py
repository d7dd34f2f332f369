"""``AsyncClient``: llm_service over gRPC (grpc.aio), with mutual TLS, deadlines and retries."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Unpack, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_service.api.v1 import MAX_MESSAGE_BYTES, llm_pb2_grpc
from llm_service.api.v1 import llm_pb2 as pb
from llm_service.api.v1 import metadata as md
from llm_service.client.status import RETRYABLE, error_for, error_from_rpc
from llm_service.client.types import (
    ChatMessage,
    Chunk,
    ClientOptions,
    Completion,
    Embeddings,
    FinishReason,
    Message,
    ModelInfo,
    PoolState,
    Sampling,
    ServerStatus,
    Started,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Tools,
    Usage,
)
from llm_service.errors import (
    ConfigurationError,
    InvalidRequestError,
    LLMServiceError,
    UnsupportedError,
)
from llm_service.settings import DEFAULT_TARGET, ClientSettings, read_pem
from llm_service.types import new_request_id

__all__ = ["AsyncClient", "AsyncStream", "TlsOptionNames", "channel_credentials", "options_from"]

T = TypeVar("T")

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    pb.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS,
}
_STATES = {
    pb.SERVING_STATE_LOADING: "loading",
    pb.SERVING_STATE_SERVING: "serving",
    pb.SERVING_STATE_DRAINING: "draining",
    pb.SERVING_STATE_FAILED: "failed",
}
# Back-off between attempts: the first wait is about BACKOFF_BASE_S, doubling up to BACKOFF_MAX_S,
# each one jittered (x0.5 to x1.5) so that clients refused together do not come back together;
# never shorter than the service's retry-after-ms hint.
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 5.0


class AsyncClient:
    """A client of one llm_service (``llm.v1.Inference``), for asyncio code.

    Mutual TLS by default: give the CA that signed the server's certificate and this client's
    certificate and key (``insecure=True`` connects in plaintext, only to a service started with
    ``--insecure``). ``AsyncClient.from_settings()`` takes everything from the ``LLM_*``
    environment instead (``LLM_TARGET``, ``LLM_TLS_CA``, ``LLM_TLS_CERT``, ``LLM_TLS_KEY``, ...).

    Every call takes a ``timeout`` (seconds; default: the client's). A call refused with
    UNAVAILABLE or RESOURCE_EXHAUSTED is retried with jittered back-off, up to ``max_retries``
    times, but a stream only until its first token arrived. Failures raise the error the server
    raised (``llm_service.errors``), with ``request_id`` and ``status`` set.

    Example:
        >>> import asyncio
        >>> from llm_service.client import AsyncClient
        >>> async def main() -> None:  # doctest: +SKIP
        ...     async with AsyncClient.from_settings() as client:
        ...         async for chunk in client.stream("Once upon a time", max_tokens=32):
        ...             print(chunk.text, end="", flush=True)
        ...         done = await client.generate([("user", "Hi!")], temperature=0)
        ...         print(done.text, done.usage.completion_tokens)
        >>> asyncio.run(main())  # doctest: +SKIP

    Args:
        target: the service's gRPC address, ``HOST:PORT``.
        tls_ca: CA certificate (PEM file) that signed the server's certificate.
        tls_cert: this client's certificate (PEM file).
        tls_key: this client's private key (PEM file).
        tls_server_name: name to expect in the server's certificate (default: the target's host).
        insecure: plaintext, no TLS.
        timeout: default deadline of each call, in seconds (None: no deadline).
        max_retries: retries of a refused call (0: none).

    Raises:
        ConfigurationError: TLS material missing, unreadable, or given together with insecure.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        self.target = target
        self.timeout = options.get("timeout")
        self.max_retries = options.get("max_retries", 3)
        self._credentials = channel_credentials(
            options.get("tls_ca"),
            options.get("tls_cert"),
            options.get("tls_key"),
            options.get("insecure", False),
        )
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # Reconnect within seconds once a service is back (gRPC's default backs off to 120 s,
            # and fails calls at once meanwhile).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if server_name := options.get("tls_server_name"):
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None) -> AsyncClient:
        """A client configured from ``settings`` (default: from the ``LLM_*`` environment)."""
        s = settings if settings is not None else ClientSettings.model_validate({})
        return cls(s.target, **options_from(s))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (running calls are cancelled)."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def _stub(self) -> llm_pb2_grpc.InferenceAsyncStub:
        return llm_pb2_grpc.InferenceStub(self._connection())

    def _connection(self) -> grpc.aio.Channel:
        # Made on first use, inside the event loop that will use it (grpc.aio binds to it).
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
        return self._channel

    # -- generation ----------------------------------------------------------------------

    def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        tools: Tools | None = None,
        split_reasoning: bool = True,
        **sampling: Unpack[Sampling],
    ) -> AsyncStream:
        """Stream a completion of ``prompt`` (text), or of chat ``messages`` (a sequence),
        which may offer the model ``tools`` to call. A chat answer's leading ``<think>`` block
        comes as ``Chunk.reasoning``, apart from its text, unless ``split_reasoning`` is False.

        Returns:
            an async iterator of ``Chunk``s; the last one carries the finish reason, usage and
            timings. Leaving it early (``break``, ``aclose()``, task cancellation, garbage
            collection) cancels generation on the server.

        Raises (while iterating):
            InvalidRequestError, PromptTooLongError, OverloadedError, DeadlineExceededError,
            UnavailableError, ConnectionFailedError, PermissionDeniedError, ...
        """
        request = _generate_request(prompt, sampling, tools, split_reasoning)
        return AsyncStream(self, request, self._deadline(timeout), request_id or new_request_id())

    async def generate(
        self,
        prompt: str | Sequence[Message],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        tools: Tools | None = None,
        split_reasoning: bool = True,
        **sampling: Unpack[Sampling],
    ) -> Completion:
        """Generate a completion and return it whole (see ``stream`` for the arguments)."""
        async with self.stream(
            prompt,
            timeout=timeout,
            request_id=request_id,
            tools=tools,
            split_reasoning=split_reasoning,
            **sampling,
        ) as stream:
            async for _ in stream:
                pass
            assert stream.completion is not None
            return stream.completion

    # -- unary calls ---------------------------------------------------------------------

    async def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        parse_special: bool = False,
        timeout: float | None = None,
    ) -> list[int]:
        """The model's token ids for ``text`` (``add_special``: BOS where the model wants it)."""
        with _field("text"):
            request = pb.TokenizeRequest(
                text=text, add_special=add_special, parse_special=parse_special
            )
        response = await self._unary(self._stub().Tokenize, request, timeout)
        return list(response.tokens)

    async def detokenize(self, tokens: Sequence[int], *, timeout: float | None = None) -> str:
        """The text of ``tokens``."""
        with _field("tokens"):
            request = pb.DetokenizeRequest(tokens=tokens)
        return (await self._unary(self._stub().Detokenize, request, timeout)).text

    async def apply_chat_template(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> tuple[str, int]:
        """The prompt the server renders for ``messages``, and its token count."""
        request = pb.ApplyChatTemplateRequest(messages=_messages(messages))
        response = await self._unary(self._stub().ApplyChatTemplate, request, timeout)
        return response.text, response.prompt_tokens

    async def embed(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Embeddings:
        """A unit vector per input (texts, or token id lists), in order.

        Raises:
            InvalidRequestError: the server serves no embeddings (``model``), a bad input.
        """
        request = pb.EmbedRequest(request_id=request_id or "")
        for i, item in enumerate(inputs):
            with _field(f"input[{i}]"):
                if isinstance(item, str):
                    request.texts.append(item)
                else:
                    request.token_inputs.add(tokens=item)
        response = await self._unary(self._stub().Embed, request, timeout)
        vectors = tuple(tuple(e.values) for e in response.embeddings)
        return Embeddings(vectors, response.prompt_tokens)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What model the server serves, and how."""
        m = await self._unary(self._stub().GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return ModelInfo(
            name=m.name,
            path=m.path,
            size_bytes=m.size_bytes,
            n_params=m.n_params,
            context_per_slot=m.context_per_slot,
            n_ctx_train=m.n_ctx_train,
            n_vocab=m.n_vocab,
            pool_size=m.pool_size,
            llama_cpp_commit=m.llama_cpp_commit,
            description=m.description,
            has_chat_template=m.has_chat_template,
            server_version=m.server_version,
            http_port=m.http_port,
            embedding_dimensions=m.embedding_dimensions,
        )

    async def status(self, *, timeout: float | None = None) -> ServerStatus:
        """The server's state, pool and load right now."""
        s = await self._unary(self._stub().GetServerStatus, pb.GetServerStatusRequest(), timeout)
        p = s.pool
        return ServerStatus(
            state=_STATES.get(s.state, "unknown"),
            pool=PoolState(p.size, p.free, p.leased, p.waiting, p.replaced),
            uptime_s=s.uptime_s,
            requests_in_flight=s.requests_in_flight,
        )

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard gRPC health check: ``SERVING``, ``NOT_SERVING`` or ``SERVICE_UNKNOWN``.

        Args:
            service: ``""`` for the server as a whole, ``"llm.v1.Inference"`` for the API.
        """
        stub = health_pb2_grpc.HealthStub(self._connection())
        request = health_pb2.HealthCheckRequest(service=service)
        # grpcio-health-checking's type stubs leave the stub's methods out.
        check: Callable[..., Awaitable[health_pb2.HealthCheckResponse]] = stub.Check  # type: ignore[attr-defined]
        try:
            response = await self._unary(check, request, timeout)
        except UnsupportedError as exc:
            if exc.status == grpc.StatusCode.NOT_FOUND.name:  # the service has no such name
                return "SERVICE_UNKNOWN"
            raise
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- plumbing ------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        seconds = timeout if timeout is not None else self.timeout
        return None if seconds is None else time.monotonic() + seconds

    async def _unary(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> T:
        deadline = self._deadline(timeout)
        request_id = new_request_id()
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=_remaining(deadline), metadata=((md.REQUEST_ID, request_id),)
                )
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc, request_id)
                await self._before_retry(exc.code(), error, attempt, deadline)
                attempt += 1

    async def _before_retry(
        self,
        code: grpc.StatusCode,
        error: LLMServiceError,
        attempt: int,
        deadline: float | None,
    ) -> None:
        """Sleep before attempt ``attempt + 1``, or raise ``error`` if it may not be retried."""
        if code not in RETRYABLE or attempt >= self.max_retries:
            raise error from None
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.5)
        # Never sooner than the service asked (RESOURCE_EXHAUSTED's retry-after-ms), jittered.
        delay = max(delay, getattr(error, "retry_after_s", 0.0) * random.uniform(1.0, 1.25))
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise error from None
        await asyncio.sleep(delay)


class AsyncStream:
    """The chunks of one Generate call (from ``AsyncClient.stream``).

    Use it as an async iterator, ideally inside ``async with`` so that leaving early cancels
    the call at once. After the last chunk, ``completion`` holds the whole result.

    Attributes:
        request_id: the id the server logs this request under.
        started: the server's ``Started`` event (prompt tokens, queue wait, slot), once received.
        completion: the whole result, once the stream is finished.
    """

    def __init__(
        self,
        client: AsyncClient,
        request: pb.GenerateRequest,
        deadline: float | None,
        request_id: str,
    ) -> None:
        self.request_id = request_id
        self.started: Started | None = None
        self.completion: Completion | None = None
        self._client = client
        self._request = request
        self._deadline = deadline
        self._call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._attempt = 0
        self._token_received = False
        self._finished = False
        self._logprobs: list[TokenLogprob] = []

    def __aiter__(self) -> AsyncStream:
        return self

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Chunk:
        while not self._finished:
            if self._call is None:
                self._loop = asyncio.get_running_loop()
                self._call = self._client._stub().Generate(
                    self._request,
                    timeout=_remaining(self._deadline),
                    metadata=((md.REQUEST_ID, self.request_id),),
                )
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._finished and task is not None and not task.cancelling():
                    # Not this task's cancellation: the stream was closed (from another task
                    # or thread) while this one was reading. The stream just ends.
                    raise StopAsyncIteration from None
                self.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                await self._failed(exc)
                continue
            if response is grpc.aio.EOF:
                self._finished = True
                error = error_for(
                    grpc.StatusCode.INTERNAL,
                    "the stream ended without its `done` event",
                    request_id=self.request_id,
                )
                raise error
            chunk = self._event(response)  # type: ignore[arg-type]  # not EOF: a response
            if chunk is not None and chunk.final:
                # The status follows `done` at once: take it, so that the call is over before
                # anyone closes the stream or the channel (which would cancel it on the server).
                await self._call.code()
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    def _event(self, response: pb.GenerateResponse) -> Chunk | None:
        which = response.WhichOneof("event")
        if which == "started":
            s = response.started
            self.started = Started(s.request_id, s.prompt_tokens, s.queue_wait_ms, s.slot)
            return None
        if which == "delta":
            self._token_received = True
            delta = response.delta
            calls = tuple(
                ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in delta.tool_calls
            )
            logprobs = tuple(_logprob(lp) for lp in delta.logprobs)
            self._logprobs.extend(logprobs)
            return Chunk(
                delta.text, tuple(delta.token_ids), tool_calls=calls, logprobs=logprobs,
                reasoning=delta.reasoning,
            )  # fmt: skip
        done = response.done
        t = done.timings
        reason = _FINISH_REASONS.get(done.finish_reason, FinishReason.STOP)
        usage = Usage(done.usage.prompt_tokens, done.usage.completion_tokens)
        timings = Timings(
            queue_wait_ms=t.queue_wait_ms,
            prefill_ms=t.prefill_ms,
            time_to_first_token_ms=(
                t.time_to_first_token_ms if t.HasField("time_to_first_token_ms") else None
            ),
            decode_tokens_per_s=t.decode_tokens_per_s,
            total_ms=t.total_ms,
        )
        made = tuple(ToolCall(c.id, c.name, c.arguments) for c in done.tool_calls)
        self.completion = Completion(
            done.text, reason, usage, timings, self.request_id, made, tuple(self._logprobs),
            done.reasoning,
        )  # fmt: skip
        self._finished = True
        return Chunk("", (), reason, usage, timings)

    async def _failed(self, exc: grpc.aio.AioRpcError) -> None:
        """Retry a refused call that produced no token yet; else end the stream with the error."""
        self._call = None
        answered = self.started is not None or self._token_received
        error = error_from_rpc(exc, self.request_id, answered=answered)
        if self._token_received:
            self._finished = True
            raise error from None
        try:
            await self._client._before_retry(exc.code(), error, self._attempt, self._deadline)
        except BaseException:
            self._finished = True
            raise
        self._attempt += 1
        self.started = None

    def cancel(self) -> None:
        """Cancel the call on the server (safe to call from any thread, and more than once)."""
        call, self._call = self._call, None
        self._finished = True
        if call is not None and not call.done() and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the call
                self._loop.call_soon_threadsafe(call.cancel)

    async def aclose(self) -> None:
        """Stop reading; if the stream is not finished, cancel generation on the server."""
        self.cancel()

    def __del__(self) -> None:
        self.cancel()


def options_from(settings: ClientSettings) -> ClientOptions:
    """The client options ``settings`` hold."""
    return cast(ClientOptions, settings.model_dump(include=set(ClientOptions.__optional_keys__)))


@dataclass(frozen=True, slots=True)
class TlsOptionNames:
    """How a program names its TLS settings, for the errors of ``channel_credentials``."""

    ca: str = "--tls-ca / LLM_TLS_CA"
    cert: str = "--tls-cert / LLM_TLS_CERT"
    key: str = "--tls-key / LLM_TLS_KEY"
    insecure: str = "--insecure / LLM_INSECURE"


def channel_credentials(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    insecure: bool,
    names: TlsOptionNames = TlsOptionNames(),
) -> grpc.ChannelCredentials | None:
    """The channel credentials for these TLS settings (None: plaintext).

    Raises:
        ConfigurationError: no CA, a certificate without its key, TLS files with insecure,
            or a file unreadable or not PEM; the message uses ``names``.
    """
    if insecure:
        if ca or cert or key:
            raise ConfigurationError(f"{names.insecure} cannot be combined with TLS files")
        return None
    if ca is None:
        raise ConfigurationError(
            f"no TLS material: give the CA ({names.ca}) and the client certificate and key"
            f" ({names.cert}, {names.key}), write development certificates with"
            f" `llm_service certs`, or use {names.insecure} for a plaintext service"
        )
    if (cert is None) != (key is None):
        raise ConfigurationError(
            f"give both the client certificate ({names.cert}) and its key ({names.key}), or neither"
        )
    return grpc.ssl_channel_credentials(
        read_pem(ca, names.ca, "CA certificate"),
        read_pem(key, names.key, "client key", secret=True) if key else None,
        read_pem(cert, names.cert, "client certificate") if cert else None,
    )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextlib.contextmanager
def _field(name: str) -> Iterator[None]:
    """Values protobuf cannot carry (out of range, not UTF-8) become InvalidRequestError."""
    try:
        yield
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidRequestError(name, f"cannot be sent: {exc}") from None


def _logprob(lp: pb.TokenLogprob) -> TokenLogprob:
    top = tuple(TokenLogprob(t.token_id, t.piece, t.logprob) for t in lp.top)
    return TokenLogprob(lp.token_id, lp.piece, lp.logprob, top)


def _messages(messages: Sequence[Message]) -> list[pb.ChatMessage]:
    converted = []
    for i, m in enumerate(messages):
        calls: Sequence[ToolCall] = ()
        call_id = None
        if isinstance(m, ChatMessage):
            role, content, calls, call_id = m.role, m.content, m.tool_calls, m.tool_call_id
        elif isinstance(m, tuple):
            role, content = m
        else:
            role, content = m.get("role", ""), m.get("content", "")
        with _field(f"messages[{i}]"):
            converted.append(pb.ChatMessage(
                role=role,
                content=content,
                tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                            for c in calls],
                tool_call_id=call_id or "",
            ))  # fmt: skip
    return converted


def _chat(messages: Sequence[Message], tools: Tools | None, split_reasoning: bool) -> pb.Chat:
    chat = pb.Chat(messages=_messages(messages))
    if not split_reasoning:
        chat.split_reasoning = False
    if tools is None:
        return chat
    for i, tool in enumerate(tools.functions):
        with _field(f"tools[{i}]"):
            chat.tools.add(name=tool.name, description=tool.description,
                           parameters=tool.parameters)  # fmt: skip
    chat.tool_choice = tools.choice
    chat.tool_name = tools.name or ""
    chat.parallel_tool_calls = tools.parallel
    return chat


def _sampling(sampling: Sampling) -> pb.SamplingParams:
    unknown = sorted(set(sampling) - Sampling.__optional_keys__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    params = pb.SamplingParams()
    for name, value in sampling.items():
        with _field(f"sampling.{name}"):
            if name == "stop":
                params.stop.extend([value] if isinstance(value, str) else value)  # type: ignore[arg-type]
            elif name == "logit_bias":
                params.logit_bias.update(value)  # type: ignore[call-overload]
            else:
                setattr(params, name, value)
    return params


def _generate_request(
    prompt: str | Sequence[Message], sampling: Sampling, tools: Tools | None, split_reasoning: bool
) -> pb.GenerateRequest:
    params = _sampling(sampling)
    if isinstance(prompt, str):
        if tools is not None:
            raise InvalidRequestError("tools", "are served with chat messages only")
        with _field("prompt"):
            return pb.GenerateRequest(prompt=prompt, sampling=params)
    return pb.GenerateRequest(chat=_chat(prompt, tools, split_reasoning), sampling=params)
