"""LlamaContextPool on fake contexts: leasing, queueing, refusal, cancellation, replacement."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator

import pytest

from llm_service.engine.fake import FakeBackend, FakeContext
from llm_service.engine.pool import LlamaContextPool, PoolState
from llm_service.errors import EngineError, OverloadedError


@pytest.fixture
async def backend_pool() -> AsyncIterator[tuple[FakeBackend, LlamaContextPool[FakeContext]]]:
    backend = FakeBackend()
    executor = concurrent.futures.ThreadPoolExecutor(4)
    pool = LlamaContextPool(
        [backend.create_context(i) for i in range(2)],
        factory=backend.create_context,
        executor=executor,
        max_queue=1,
        acquire_timeout_s=5,
    )
    yield backend, pool
    await pool.wait_idle()
    pool.close()
    executor.shutdown()


async def test_lease_resets_context_on_return(backend_pool) -> None:  # type: ignore[no-untyped-def]
    backend, pool = backend_pool
    async with pool.lease() as lease:
        lease.context.kv.extend([1, 2, 3])
        assert pool.state().leased == 1
        assert pool.state().free == 1
    assert lease.context.kv == []
    assert backend.resets == 1
    assert pool.state().free == 2


async def test_reset_even_when_body_raises(backend_pool) -> None:  # type: ignore[no-untyped-def]
    _, pool = backend_pool
    with pytest.raises(RuntimeError):
        async with pool.lease() as lease:
            lease.context.kv.append(7)
            raise RuntimeError("boom")
    assert lease.context.kv == []
    assert pool.state().free == 2


async def test_third_waits_fourth_refused_at_once(backend_pool) -> None:  # type: ignore[no-untyped-def]
    _, pool = backend_pool
    release = asyncio.Event()
    got: list[int] = []

    async def hold() -> None:
        async with pool.lease() as lease:
            got.append(lease.context.index)
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert len(got) == 2
    assert pool.state().waiting == 1
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(OverloadedError, match="queue is full"):
        async with pool.lease():
            pass
    assert loop.time() - t0 < 0.1
    release.set()
    await asyncio.gather(*holders)
    assert len(got) == 3
    assert pool.state().free == 2 and pool.state().leased == 0


async def test_wait_times_out_with_overload(backend_pool) -> None:  # type: ignore[no-untyped-def]
    _, pool = backend_pool
    async with pool.lease(), pool.lease():
        with pytest.raises(OverloadedError, match=r"within 0\.05 s"):
            async with pool.lease(timeout_s=0.05):
                pass
        assert pool.state().waiting == 0
    assert pool.state().free == 2


async def test_cancelled_waiter_leaves_queue(backend_pool) -> None:  # type: ignore[no-untyped-def]
    _, pool = backend_pool
    async with pool.lease(), pool.lease():
        waiter = asyncio.create_task(pool.lease().__aenter__())
        await asyncio.sleep(0.02)
        assert pool.state().waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.state().waiting == 0
    assert pool.state().free == 2 and pool.state().leased == 0


async def test_reset_waits_for_held_work(backend_pool) -> None:  # type: ignore[no-untyped-def]
    """A cancelled lease holder must not get its context reset while a thread still uses it."""
    backend, pool = backend_pool
    gate = concurrent.futures.Future[object]()

    async def body() -> None:
        async with pool.lease() as lease:
            lease.hold(gate)
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.05)
    assert backend.resets == 0, "reset ran while the worker still held the context"
    assert pool.state().leased == 1
    gate.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await task
    await pool.wait_idle()
    assert backend.resets == 1 and pool.state().free == 2


async def test_failed_reset_replaces_the_context(backend_pool) -> None:  # type: ignore[no-untyped-def]
    backend, pool = backend_pool
    backend.fail_resets = 1
    async with pool.lease() as lease:
        broken = lease.context
    state = pool.state()
    assert state.replaced == 1
    assert state.free == 2 and state.size == 2
    assert broken.closed
    assert len(backend.contexts) == 3  # the two originals and one replacement
    async with pool.lease() as a, pool.lease() as b:
        assert broken not in (a.context, b.context)


async def test_failed_replacement_shrinks_the_pool_and_stays_drainable(  # type: ignore[no-untyped-def]
    backend_pool,
) -> None:
    backend, pool = backend_pool
    backend.fail_resets = 1

    def broken_factory(index: int) -> FakeContext:
        raise RuntimeError("no memory for a new context")

    pool._factory = broken_factory
    async with pool.lease():
        pass
    await asyncio.wait_for(pool.wait_idle(), 1)
    assert pool.state() == PoolState(size=1, free=1, leased=0, waiting=0, replaced=0)


async def test_refusing_fails_waiters_and_new_leases(backend_pool) -> None:  # type: ignore[no-untyped-def]
    _, pool = backend_pool
    async with pool.lease(), pool.lease():
        waiter = asyncio.create_task(pool.lease().__aenter__())
        await asyncio.sleep(0.02)
        pool.refuse_new_leases()
        with pytest.raises(EngineError, match="shutting down"):
            await waiter
        with pytest.raises(EngineError, match="shutting down"):
            async with pool.lease():
                pass
    assert pool.state().free == 2
