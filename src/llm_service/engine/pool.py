"""LlamaContextPool: leases inference contexts to requests, and always scrubs them on return."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

from llm_service.errors import EngineError, OverloadedError
from llm_service.types import PoolState

__all__ = ["Lease", "LlamaContextPool", "PoolState"]

logger = logging.getLogger(__name__)


class Poolable(Protocol):
    index: int

    def reset(self) -> None: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Poolable)


class Lease(Generic[C]):
    """A leased context. Work on it in threads must be registered with ``hold``."""

    def __init__(self, context: C, queue_wait_s: float) -> None:
        self.context = context
        self.queue_wait_s = queue_wait_s
        self._holds: list[concurrent.futures.Future[None]] = []

    def hold(self, future: concurrent.futures.Future[None]) -> None:
        """Keep the context from being reset until ``future`` is done.

        Guarantees one thread at a time per context even when the lease holder is cancelled
        while the thread running its request (the context's own, or the batch scheduler) is
        still inside llama.cpp.
        """
        self._holds.append(future)


class LlamaContextPool(Generic[C]):
    """A fixed set of contexts, leased one request at a time.

    ``lease()`` hands out the free context with the lowest index, or waits in a bounded FIFO
    queue. When the lease ends, for whatever reason, the context is reset (KV cache cleared and
    verified empty) in the pool's executor before anyone else can lease it. A context whose reset
    fails is closed and replaced by a new one from ``factory``.

    Args:
        contexts: the initial contexts.
        factory: makes a replacement context for a given index.
        executor: where blocking resets and replacements run.
        max_queue: requests allowed to wait for a context; one more is refused at once.
        acquire_timeout_s: how long a request may wait before it is refused.
    """

    def __init__(
        self,
        contexts: list[C],
        *,
        factory: Callable[[int], C],
        executor: concurrent.futures.Executor,
        max_queue: int,
        acquire_timeout_s: float,
    ) -> None:
        if not contexts:
            raise ValueError("a pool needs at least one context")
        self._size = len(contexts)
        self._free: list[C] = list(contexts)
        self._waiters: collections.deque[asyncio.Future[C]] = collections.deque()
        self._factory = factory
        self._executor = executor
        self._max_queue = max_queue
        self._acquire_timeout_s = acquire_timeout_s
        self._leased = 0
        self._replaced = 0
        self._refusing = False
        self._recycling: set[asyncio.Task[None]] = set()
        self._all_free = asyncio.Event()
        self._all_free.set()

    @property
    def acquire_timeout_s(self) -> float:
        """The default longest wait for a context."""
        return self._acquire_timeout_s

    def state(self) -> PoolState:
        """Current counts; cheap, callable at any time from the event loop."""
        return PoolState(
            size=self._size,
            free=len(self._free),
            leased=self._leased,
            waiting=sum(1 for w in self._waiters if not w.done()),
            replaced=self._replaced,
        )

    @contextlib.asynccontextmanager
    async def lease(self, timeout_s: float | None = None) -> AsyncIterator[Lease[C]]:
        """Lease a context for the body of an ``async with``.

        Args:
            timeout_s: longest wait for a free context (default: the pool's acquire timeout).

        Yields:
            the lease; ``lease.context`` is yours until the block exits.

        Raises:
            OverloadedError: the queue is full (at once) or the wait timed out.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        context = await self._acquire(self._acquire_timeout_s if timeout_s is None else timeout_s)
        lease = Lease(context, loop.time() - started)
        try:
            yield lease
        finally:
            # The recycle task owns the rest: waiting for the context's thread, the reset and the
            # return. Shielded, so a second cancellation cannot leave the context half-returned.
            task = loop.create_task(self._reset_and_return(lease))
            self._recycling.add(task)
            task.add_done_callback(self._recycling.discard)
            await asyncio.shield(task)

    async def wait_idle(self) -> None:
        """Wait until every context is back in the pool."""
        await self._all_free.wait()

    def refuse_new_leases(self) -> None:
        """Start shutting down: waiting and future lease requests fail with EngineError."""
        self._refusing = True
        self._fail_waiters(EngineError("the engine is shutting down"))

    def close(self) -> None:
        """Close the free contexts. Call after every lease has ended (see ``wait_idle``)."""
        if self._leased:
            logger.warning("closing the pool with %d contexts still leased", self._leased)
        while self._free:
            self._free.pop().close()

    async def _acquire(self, timeout_s: float) -> C:
        if self._refusing:
            raise EngineError("the engine is shutting down")
        if self._size == 0:
            raise EngineError("every context of the pool is broken")
        if self._free and not self._waiters:
            # The lowest-numbered free context: in batched mode, running requests then sit on
            # consecutive sequences, which llama.cpp evaluates together (a gap splits the step).
            lowest = min(range(len(self._free)), key=lambda i: self._free[i].index)
            return self._take(self._free.pop(lowest))
        if self.state().waiting >= self._max_queue:
            raise OverloadedError(
                f"every context ({self._size}) is busy and the queue is full"
                f" ({self._max_queue} waiting)",
                retry_after_s=1.0,
            )
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waiter)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a context in the same instant we gave up: pass it straight on.
                self._hand_over(waiter.result())
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise OverloadedError(
                    f"no context became free within {timeout_s:g} s", retry_after_s=1.0
                ) from None
            raise

    def _take(self, context: C) -> C:
        self._leased += 1
        self._all_free.clear()
        return context

    def _hand_over(self, context: C) -> None:
        """End a lease: give the clean context to the first live waiter, or put it back."""
        self._leased -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._take(context))
                return
        self._free.append(context)
        if self._leased == 0:
            self._all_free.set()

    async def _reset_and_return(self, lease: Lease[C]) -> None:
        context = lease.context
        loop = asyncio.get_running_loop()
        if lease._holds:
            await asyncio.wait([asyncio.wrap_future(f) for f in lease._holds])
        try:
            await loop.run_in_executor(self._executor, context.reset)
        except Exception:
            logger.exception("context %d failed its reset check; replacing it", context.index)
            try:
                await loop.run_in_executor(self._executor, context.close)
                context = await loop.run_in_executor(self._executor, self._factory, context.index)
            except Exception:
                logger.critical("could not replace context %d", context.index, exc_info=True)
                self._size -= 1
                self._leased -= 1
                if self._size == 0:
                    self._fail_waiters(EngineError("every context of the pool is broken"))
                if self._leased == 0:
                    self._all_free.set()
                return
            self._replaced += 1
        self._hand_over(context)

    def _fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
