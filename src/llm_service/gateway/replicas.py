"""The llm_service replicas behind the gateway: health, load, ejection, and routing.

Each replica (``Replica``) is checked every ``health_interval`` seconds on both of its ports
(gRPC health of ``llm.v1.Inference`` and HTTP ``/readyz``). A replica enters rotation after
``healthy_after`` passed checks in a row and leaves it after ``unhealthy_after`` failures in a
row (its first check decides at once, and a replica never in rotation yet, still starting,
joins at its first passed check). Independently, ``eject_after`` failed requests in a row
(refused connections, unavailable, engine failures) eject it for ``ejection_time``, doubled at
each ejection in a row; at most half of the replicas are ejected at once.

A request goes to the less loaded of two random healthy replicas serving its model (load:
requests in flight / pool size), and, while it has sent no token to the client, is retried on
another replica when one refuses it (``RoutedStream``), within a fleet-wide retry budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import PurePosixPath
from typing import Any, TypeVar

import aiohttp

from llm_service.client import AsyncClient, AsyncStream, Chunk, Completion, ModelInfo
from llm_service.client.types import ClientOptions, Message, Sampling, Tools
from llm_service.errors import (
    EngineError,
    InternalServerError,
    LLMServiceError,
    ModelNotFoundError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
)
from llm_service.gateway.discovery import DiscoveryError, Resolver, target
from llm_service.log import RequestLogger
from llm_service.settings import GatewaySettings, ReplicaAddress, split_host_port

T = TypeVar("T")

__all__ = ["Replica", "ReplicaPool", "ReplicaState", "RetryBudget", "RoutedStream"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "llm.v1.Inference"
# Ejections double in length each time in a row, up to this many times the first one.
MAX_EJECTION_FACTOR = 60


class ReplicaState(enum.Enum):
    """Where a replica stands; only ``HEALTHY`` replicas get requests."""

    UNKNOWN = "unknown"  # not checked yet
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failing its health checks
    EJECTED = "ejected"  # failing requests: out for a while, whatever its checks say


class Replica:
    """One llm_service replica, its client, and what the gateway knows of it.

    Attributes:
        address: its gRPC (and perhaps health) address.
        client: the gRPC client (no retries of its own: the gateway retries on other replicas).
        model: what it serves, from ``GetModelInfo`` (None until it first answered).
        outstanding: requests the gateway has in flight on it.
    """

    def __init__(
        self, address: ReplicaAddress, options: ClientOptions, discovered_by: str | None = None
    ) -> None:
        self.address = address
        self.discovered_by = discovered_by  # the --discover name it was found under
        self.client = AsyncClient(address.target, **(options | {"max_retries": 0}))
        self.model: ModelInfo | None = None
        self.outstanding = 0
        self.healthy: bool | None = None  # the health checks' verdict; None: not checked yet
        self.joined = False  # whether it has ever been in rotation
        self.passes = 0
        self.fails = 0
        self.request_failures = 0
        self.ejections_in_row = 0
        self.ejected_until = 0.0
        self.ejection_timer: asyncio.TimerHandle | None = None  # to log the ejection's end
        self.last_error = ""

    def __str__(self) -> str:
        return self.address.target

    @property
    def pool_size(self) -> int:
        return self.model.pool_size if self.model is not None and self.model.pool_size else 1

    @property
    def load(self) -> float:
        return self.outstanding / self.pool_size

    def state(self, now: float | None = None) -> ReplicaState:
        if self.ejected_until > (time.monotonic() if now is None else now):
            return ReplicaState.EJECTED
        if self.healthy is None:
            return ReplicaState.UNKNOWN
        return ReplicaState.HEALTHY if self.healthy else ReplicaState.UNHEALTHY

    @property
    def model_id(self) -> str | None:
        """The id clients name its model by: the model file's name without ``.gguf``."""
        return model_id(self.model) if self.model is not None else None

    def serves(self, model: str) -> bool:
        return self.model_id == model

    def health_url(self) -> str | None:
        if self.address.health is not None:
            return f"http://{self.address.health}/readyz"
        if self.model is None or not self.model.http_port:
            return None
        host = self.address.target.rsplit(":", 1)[0]
        return f"http://{host}:{self.model.http_port}/readyz"


class RetryBudget:
    """Retries allowed: ``ratio`` x the requests of the last ``window`` seconds, plus ``floor``.

    Bounds the extra load retries put on a fleet that is failing (Finagle's retry budget).
    """

    def __init__(self, ratio: float, *, floor: int = 10, window: float = 10.0) -> None:
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _prune(self, now: float) -> None:
        for times in (self._requests, self._retries):
            while times and times[0] < now - self.window:
                times.popleft()

    def request(self) -> None:
        now = time.monotonic()
        self._prune(now)
        self._requests.append(now)

    def try_retry(self) -> bool:
        """Spend one retry if the budget has one."""
        now = time.monotonic()
        self._prune(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True


class ReplicaPool:
    """The replicas, their health checks, and the choice of one for each request."""

    def __init__(self, settings: GatewaySettings, options: ClientOptions) -> None:
        self.settings = settings
        self.options = options
        self.backends = [Replica(a, options) for a in settings.backends]
        self.budget = RetryBudget(settings.retry_budget)
        self.retries: dict[str, int] = {}  # by reason, for the metrics
        self.ejections: dict[str, int] = {}  # by backend
        self.resolver = Resolver(settings.dns_server, timeout=settings.health_timeout)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._leaving: set[asyncio.Task[None]] = set()  # replicas gone from DNS, draining

    async def start(self) -> None:
        """Resolve the --discover names and check every replica once, then keep doing both in
        the background."""
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout)
        await asyncio.gather(*(self.discover(name) for name in self.settings.discover))
        await self.check_all()
        self._tasks.append(asyncio.create_task(self._check_forever(), name="health-checks"))
        if self.settings.discover:
            self._tasks.append(asyncio.create_task(self._discover_forever(), name="discovery"))

    async def close(self) -> None:
        for task in self._tasks + list(self._leaving):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for backend in self.backends:
            await backend.client.close()
        if self._http is not None:
            await self._http.close()

    # -- discovery ------------------------------------------------------------------------

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            await asyncio.gather(*(self.discover(name) for name in self.settings.discover))

    async def discover(self, name_port: str) -> None:
        """Resolve ``name_port`` (NAME:PORT) once: add the replicas at new addresses (checked
        at once), and let those at addresses gone finish their requests, then drop them."""
        name, port = split_host_port(name_port)
        try:
            addresses = await self.resolver.resolve(name)
        except DiscoveryError as exc:
            logger.warning("cannot resolve %s (keeping its %d replica(s)): %s", name,
                           self._count_discovered(name_port), exc)  # fmt: skip
            return
        except Exception:  # a bug here must not stop discovery
            logger.exception("resolving %s failed", name)
            return
        wanted = {target(ip, port) for ip in addresses}
        known = {str(b): b for b in self.backends if b.discovered_by == name_port}
        added = [
            Replica(ReplicaAddress(t), self.options, discovered_by=name_port)
            for t in sorted(wanted - known.keys())
        ]
        for backend in added:
            logger.info("backend %s found under %s", backend, name)
        for gone in sorted(known.keys() - wanted):
            backend = known[gone]
            logger.info("backend %s left %s: no new requests; dropped once its %d end",
                        backend, name, backend.outstanding)  # fmt: skip
            self.backends.remove(backend)
            task = asyncio.create_task(self._drop(backend), name=f"drop {backend}")
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)
        if not wanted:
            logger.warning("%s resolves to no address: no replica there", name)
        self.backends.extend(added)
        await asyncio.gather(*(self._check(b) for b in added))

    def _count_discovered(self, name_port: str) -> int:
        return sum(b.discovered_by == name_port for b in self.backends)

    async def _drop(self, backend: Replica) -> None:
        """Close a departed replica's client once the requests it still serves have ended."""
        deadline = time.monotonic() + self.settings.request_timeout
        # Polled: a departing replica is rare, and its count is decremented in several places.
        while backend.outstanding and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        if backend.ejection_timer is not None:
            backend.ejection_timer.cancel()
        await backend.client.close()

    # -- health ---------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for b in self.backends))

    async def _check(self, backend: Replica) -> None:
        try:
            async with asyncio.timeout(self.settings.health_timeout):
                reason = await self._probe(backend)
        except TimeoutError:
            reason = f"no answer within {self.settings.health_timeout:g} s"
        except Exception as exc:  # a bug here must not stop the checks of every replica
            logger.exception("health check of backend %s failed", backend)
            reason = f"health check failed: {exc!r}"
        self._record_check(backend, reason)

    async def _probe(self, backend: Replica) -> str | None:
        """None if the replica serves; else why not."""
        client = backend.client
        try:
            # What it serves, at every check: a replica restarted quicker than the checks notice
            # may serve another model (or another pool size) on the same address.
            model = await client.model_info()
            if backend.model is not None and model_id(model) != backend.model_id:
                logger.warning("backend %s now serves %r (was %r)", backend, model_id(model),
                               backend.model_id)  # fmt: skip
            backend.model = model
            status = await client.health(SERVICE_NAME)
            if status != "SERVING":
                return f"gRPC health is {status}"
        except LLMServiceError as exc:
            return str(exc)
        url = backend.health_url()
        if url is None:
            return None  # an older replica that does not say where its health port is
        assert self._http is not None
        try:
            async with self._http.get(url) as response:
                if response.status != 200:
                    return f"{url} answered {response.status}"
                body = json.loads(await response.read())
        except (aiohttp.ClientConnectionError, OSError) as exc:
            return (
                f"{url}: {exc or type(exc).__name__} (the replica's --http-addr must be reachable"
                " from the gateway; or give --backend HOST:PORT,health=HOST:PORT)"
            )
        except (aiohttp.ClientError, ValueError) as exc:
            return f"{url}: {exc or type(exc).__name__}"
        pool = body.get("pool") if isinstance(body, dict) else None
        if isinstance(pool, dict) and isinstance(pool.get("size"), int) and backend.model:
            # The pool may shrink when a context fails and cannot be replaced.
            backend.model = _with_pool_size(backend.model, pool["size"])
        return None

    def _record_check(self, backend: Replica, failure: str | None) -> None:
        before = backend.state()
        if failure is None:
            backend.passes, backend.fails = backend.passes + 1, 0
            # A replica that has never been in rotation was starting, not flapping: it joins at
            # once (a request refused by the others' last replica would find none else).
            if not backend.joined or backend.passes >= self.settings.healthy_after:
                backend.healthy = backend.joined = True
        else:
            backend.passes, backend.fails = 0, backend.fails + 1
            backend.last_error = failure
            if backend.healthy is None or backend.fails >= self.settings.unhealthy_after:
                backend.healthy = False
        self._state_changed(backend, before)

    def _state_changed(self, backend: Replica, before: ReplicaState) -> None:
        after = backend.state()
        if after is before:
            return
        name = backend.model_id
        if after is ReplicaState.HEALTHY:
            logger.info("backend %s is healthy (model %r, pool of %d)", backend, name,
                        backend.pool_size)  # fmt: skip
        elif after is ReplicaState.EJECTED:
            seconds = backend.ejected_until - time.monotonic()
            logger.warning(
                "backend %s ejected for %.0f s: %s", backend, seconds, backend.last_error
            )
        else:
            logger.warning("backend %s is %s: %s", backend, after.value, backend.last_error)

    # -- passive outlier detection ----------------------------------------------------------

    def record_result(self, backend: Replica, error: LLMServiceError | None) -> None:
        """Account a request's outcome on ``backend``; eject it after failures in a row."""
        if error is None or not _is_backend_failure(error):
            backend.request_failures = 0
            if error is None and backend.state() is ReplicaState.HEALTHY:
                backend.ejections_in_row = 0
            return
        now = time.monotonic()
        if backend.state(now) is ReplicaState.EJECTED:
            return  # calls sent before the ejection, failing now: already accounted for
        backend.request_failures += 1
        backend.last_error = str(error)
        if backend.request_failures < self.settings.eject_after:
            return
        peers = [b for b in self.backends if b.model_id == backend.model_id and b is not backend]
        ejected = sum(b.state(now) is ReplicaState.EJECTED for b in peers)
        if ejected + 1 > (len(peers) + 1) // 2:
            return  # never more than half of a model's replicas out at once
        if not any(b.state(now) is ReplicaState.HEALTHY for b in peers):
            return  # nor its last healthy one: a failing replica serves better than none
        before = backend.state(now)
        factor = min(MAX_EJECTION_FACTOR, 2**backend.ejections_in_row)
        backend.ejected_until = now + self.settings.ejection_time * factor
        backend.ejections_in_row += 1
        backend.request_failures = 0
        self.ejections[str(backend)] = self.ejections.get(str(backend), 0) + 1
        self._state_changed(backend, before)
        self._ejection_over(backend)

    def _ejection_over(self, backend: Replica) -> None:
        """Log the end of an ejection when it comes (the event loop's clock may run early)."""
        if backend.ejection_timer is not None:
            backend.ejection_timer.cancel()
            backend.ejection_timer = None
        left = backend.ejected_until - time.monotonic()
        if left > 0:
            loop = asyncio.get_running_loop()
            backend.ejection_timer = loop.call_later(left + 0.001, self._ejection_over, backend)
        else:
            self._state_changed(backend, ReplicaState.EJECTED)

    # -- routing ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The ids of the models healthy replicas serve, sorted."""
        healthy = (b for b, s in self.states() if s is ReplicaState.HEALTHY)
        return sorted({b.model_id for b in healthy if b.model_id is not None})

    @property
    def ready(self) -> bool:
        return any(b.state() is ReplicaState.HEALTHY for b in self.backends)

    def choose(self, model: str, exclude: set[Replica]) -> Replica:
        """The replica for a request: the less loaded of two random healthy ones serving
        ``model``, leaving out ``exclude`` (the ones that already refused it).

        Raises:
            ModelNotFoundError: no replica serves ``model``.
            UnavailableError: no replica is healthy, none that serves ``model`` is, or all
                that serve it were tried.
        """
        healthy = [b for b in self.backends if b.state() is ReplicaState.HEALTHY]
        if not healthy:
            raise UnavailableError(
                f"no healthy backend: all {len(self.backends)} are unhealthy or ejected"
            )
        serving = [b for b in healthy if b.serves(model)]
        if not serving:
            if any(b.serves(model) for b in self.backends):
                raise UnavailableError(f"no healthy backend serves {model!r} now")
            names = ", ".join(repr(m) for m in self.models()) or "none"
            raise ModelNotFoundError("model", f"no model {model!r} is served; served: {names}")
        left = self._candidates(model, exclude)
        if not left:
            raise UnavailableError(f"every backend serving {model!r} refused the request")
        if len(left) == 1:
            return left[0]
        a, b = random.sample(left, 2)
        if a.load == b.load:
            return a
        return a if a.load < b.load else b

    def may_retry(
        self,
        exc: LLMServiceError,
        model: str,
        tried: set[Replica],
        deadline: float,
        log: RequestLogger,
    ) -> bool:
        """Whether a request that ``tried`` replicas refused with ``exc`` goes to another one:
        a refusal another may not give, replicas and time left, within the retry budget."""
        if not _retryable(exc) or len(tried) >= self.settings.max_attempts:
            return False
        if not self.has_other(model, tried) or time.monotonic() >= deadline:
            return False
        if not self.budget.try_retry():
            log.warning("retry budget spent: not retrying after %s", exc.kind)
            return False
        self.retries[exc.kind] = self.retries.get(exc.kind, 0) + 1
        log.info("a backend refused (%s): trying another one", exc)
        return True

    async def call(
        self,
        model: str,
        call: Callable[[AsyncClient, float], Awaitable[T]],
        *,
        request_id: str,
        deadline: float,
    ) -> T:
        """A unary call (``call(client, timeout)``) on a replica serving ``model``; refused,
        it goes to another one as a stream's first attempt does (``may_retry``)."""
        log = RequestLogger(logger, request_id)
        tried: set[Replica] = set()
        self.budget.request()
        refused: LLMServiceError | None = None
        while True:
            try:
                backend = self.choose(model, tried)
            except LLMServiceError:
                if refused is not None:
                    raise refused from None  # no replica left to try: say why
                raise
            tried.add(backend)
            backend.outstanding += 1
            try:
                result = await call(backend.client, max(0.001, deadline - time.monotonic()))
            except LLMServiceError as exc:
                self.record_result(backend, exc)
                if not self.may_retry(exc, model, tried, deadline, log):
                    raise
                refused = exc
                continue
            finally:
                backend.outstanding -= 1
            self.record_result(backend, None)
            return result

    def has_other(self, model: str, exclude: set[Replica]) -> bool:
        """Whether a healthy replica serving ``model`` is left besides ``exclude``."""
        return bool(self._candidates(model, exclude))

    def _candidates(self, model: str, exclude: set[Replica]) -> list[Replica]:
        return [
            b for b, state in self.states()
            if state is ReplicaState.HEALTHY and b.serves(model) and b not in exclude
        ]  # fmt: skip

    def states(self) -> Iterator[tuple[Replica, ReplicaState]]:
        now = time.monotonic()
        for b in self.backends:
            yield b, b.state(now)

    def describe(self) -> list[dict[str, Any]]:
        """The replicas, for ``/readyz``."""
        return [
            {
                "target": str(b),
                "state": state.value,
                "model": b.model_id,
                "pool_size": b.pool_size,
                "outstanding": b.outstanding,
                "last_error": b.last_error if state is not ReplicaState.HEALTHY else None,
            }
            | ({"discovered_by": b.discovered_by} if b.discovered_by else {})
            for b, state in self.states()
        ]


def model_id(model: ModelInfo) -> str:
    """A model's id in the OpenAI API: its file's name without ``.gguf``
    (``SmolLM2-135M-Instruct.Q4_1``), as the GGUF's own name is often a training run's."""
    return PurePosixPath(model.path).name.removesuffix(".gguf") or model.name


def _with_pool_size(model: ModelInfo, size: int) -> ModelInfo:
    return model if model.pool_size == size else dataclasses.replace(model, pool_size=size)


def _is_backend_failure(error: LLMServiceError) -> bool:
    """Errors that say the replica, not the request, is at fault (overload is not one)."""
    return isinstance(error, UnavailableError | EngineError | InternalServerError)


def _retryable(error: LLMServiceError) -> bool:
    """Errors another replica may not give: refused, unavailable, overloaded, failed engine,
    or a call the replica cancelled (a drain that ran out of grace)."""
    return isinstance(
        error, UnavailableError | OverloadedError | EngineError | RequestCancelledError
    )


class RoutedStream:
    """One generation through the pool: the chunks of whichever replica serves it.

    Until a chunk has been returned, a replica that refuses the request (``_retryable``) is left
    for another one, up to ``max_attempts`` replicas and within the retry budget; after that, an
    error ends the stream. ``cancel()`` (synchronous, safe in ``finally`` under cancellation)
    cancels the call on the replica.

    Attributes:
        backend: the replica serving (or last tried).
        prompt_tokens: tokens in the prompt, once a replica started on it.
        completion_tokens: tokens received so far.
        completion: the whole result, once the final chunk was returned.
    """

    def __init__(
        self,
        pool: ReplicaPool,
        model: str,
        prompt: str | tuple[Message, ...],
        sampling: Sampling,
        *,
        request_id: str,
        deadline: float,
        tools: Tools | None = None,
        split_reasoning: bool = True,
    ) -> None:
        self.pool = pool
        self.model = model
        self.prompt = prompt
        self.sampling = sampling
        self.tools = tools
        self.split_reasoning = split_reasoning
        self.request_id = request_id
        self.deadline = deadline
        self.backend: Replica | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.completion: Completion | None = None
        self._stream: AsyncStream | None = None  # the current attempt
        self._tried: set[Replica] = set()
        self._delivered = False
        self._finished = False
        self._log = RequestLogger(logger, request_id)
        pool.budget.request()

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> Chunk:
        refused: LLMServiceError | None = None  # the last refusal, when retrying
        while not self._finished:
            stream = self._stream
            if stream is None:
                try:
                    stream = self._open()
                except LLMServiceError:
                    if refused is not None:
                        raise refused from None  # no replica left to try: say why
                    raise
            try:
                chunk: Chunk = await stream.__anext__()
            except StopAsyncIteration:
                self._finished = True
                self._release(None)
                raise
            except LLMServiceError as exc:
                self._release(exc)
                if not self._may_retry(exc):
                    self._finished = True
                    raise
                refused = exc
                continue
            if not self._delivered and stream.started is not None:
                self.prompt_tokens = stream.started.prompt_tokens
            self.completion_tokens += len(chunk.token_ids)
            self._delivered = True
            if chunk.final:
                self.completion = stream.completion
                self._finished = True
                self._release(None)
            return chunk
        raise StopAsyncIteration

    def _open(self) -> AsyncStream:
        backend = self.pool.choose(self.model, self._tried)
        self._tried.add(backend)
        self.backend = backend
        remaining = max(0.001, self.deadline - time.monotonic())
        stream = self._stream = backend.client.stream(
            list(self.prompt) if isinstance(self.prompt, tuple) else self.prompt,
            timeout=remaining,
            request_id=self.request_id,
            tools=self.tools,
            split_reasoning=self.split_reasoning,
            **self.sampling,
        )
        backend.outstanding += 1
        self._log.debug("sent to backend %s (load %.2f)", backend, backend.load)
        return stream

    def _may_retry(self, exc: LLMServiceError) -> bool:
        if self._finished or self._delivered:
            return False
        return self.pool.may_retry(exc, self.model, self._tried, self.deadline, self._log)

    def _release(self, error: LLMServiceError | None, *, judged: bool = True) -> None:
        """End the current attempt; ``judged``: its outcome counts for outlier detection."""
        if self._stream is None:
            return
        self._stream = None
        assert self.backend is not None
        self.backend.outstanding -= 1
        if judged:
            self.pool.record_result(self.backend, error)

    def cancel(self) -> None:
        """Stop: cancel the call on the replica, if one is running (idempotent)."""
        self._finished = True
        stream = self._stream
        if stream is not None:
            stream.cancel()
            self._release(None, judged=False)  # a cancelled call says nothing of the replica
