"""Routing in the gateway without a network: choice, health hysteresis, ejection, retries.

The pool's clients open no channel until a call is made, and these tests make none: the routed
streams' replicas are fakes that play a script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from llm_service.client import (
    ChatMessage,
    Chunk,
    ClientOptions,
    Completion,
    FinishReason,
    ModelInfo,
    Started,
    Timings,
    Usage,
)
from llm_service.errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    LLMServiceError,
    ModelNotFoundError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
)
from llm_service.gateway import replicas
from llm_service.gateway.replicas import (
    Replica,
    ReplicaPool,
    ReplicaState,
    RetryBudget,
    RoutedStream,
    model_id,
)
from llm_service.settings import GatewaySettings, ReplicaAddress

MODEL = "SmolLM2"
OPTIONS = ClientOptions(insecure=True)


def model_info(path: str = f"/m/{MODEL}.gguf", pool_size: int = 1, http_port: int = 0) -> ModelInfo:
    return ModelInfo(
        name="a training run",
        path=path,
        size_bytes=1,
        n_params=1,
        context_per_slot=512,
        n_ctx_train=2048,
        n_vocab=49152,
        pool_size=pool_size,
        llama_cpp_commit="0",
        description="",
        has_chat_template=True,
        server_version="0",
        http_port=http_port,
    )


MakePool = Callable[..., ReplicaPool]


@pytest.fixture
def make_pool() -> MakePool:
    """A pool of ``n`` healthy replicas serving MODEL (pool size 1), with ``settings``."""

    def make(n: int = 2, **settings: Any) -> ReplicaPool:
        addresses = tuple(f"127.0.0.1:{port}" for port in range(1, n + 1))
        pool = ReplicaPool(
            GatewaySettings(backends=addresses, insecure_backends=True, **settings), OPTIONS
        )
        for backend in pool.backends:
            backend.model = model_info()
            backend.healthy = backend.joined = True
        return pool

    return make


# -- choosing a replica ----------------------------------------------------------------------


def test_only_healthy_replicas_serving_the_model_are_chosen(make_pool: MakePool) -> None:
    pool = make_pool(4)
    unhealthy, other_model, unknown, good = pool.backends
    unhealthy.healthy = False
    other_model.model = model_info("/m/Other.gguf")
    unknown.healthy = None
    for _ in range(50):
        assert pool.choose(MODEL, set()) is good
    assert pool.choose("Other", set()) is other_model
    assert pool.models() == ["Other", MODEL]


def test_an_ejected_replica_is_not_chosen(make_pool: MakePool) -> None:
    pool = make_pool(2)
    ejected, good = pool.backends
    ejected.ejected_until = time.monotonic() + 60
    assert ejected.state() is ReplicaState.EJECTED
    for _ in range(50):
        assert pool.choose(MODEL, set()) is good


def test_a_model_no_replica_serves_is_not_found(make_pool: MakePool) -> None:
    pool = make_pool(2)
    with pytest.raises(ModelNotFoundError) as info:
        pool.choose("gpt-4", set())
    assert info.value.field == "model"
    assert "gpt-4" in str(info.value) and MODEL in str(info.value)


def test_no_healthy_replica_is_unavailable(make_pool: MakePool) -> None:
    pool = make_pool(2)
    for backend in pool.backends:
        backend.healthy = False
    with pytest.raises(UnavailableError) as info:
        pool.choose(MODEL, set())
    assert not isinstance(info.value, ModelNotFoundError)
    assert not pool.ready


def test_a_model_whose_replicas_are_all_down_is_unavailable_not_unknown(
    make_pool: MakePool,
) -> None:
    pool = make_pool(2)
    down, other = pool.backends
    down.healthy = False
    other.model = dataclasses.replace(other.model, path="/m/Other.gguf")  # type: ignore[type-var]
    with pytest.raises(UnavailableError) as info:
        pool.choose(MODEL, set())
    assert not isinstance(info.value, ModelNotFoundError)
    assert MODEL in str(info.value)


def test_replicas_already_tried_are_left_out(make_pool: MakePool) -> None:
    pool = make_pool(3)
    a, b, c = pool.backends
    for _ in range(50):
        assert pool.choose(MODEL, {a, b}) is c
    with pytest.raises(UnavailableError) as info:
        pool.choose(MODEL, {a, b, c})
    assert not isinstance(info.value, ModelNotFoundError)


def test_the_less_loaded_of_two_wins(make_pool: MakePool) -> None:
    pool = make_pool(2)
    busy, idle = pool.backends
    busy.outstanding, idle.outstanding = 2, 1
    for _ in range(50):
        assert pool.choose(MODEL, set()) is idle


def test_load_counts_the_pool_size(make_pool: MakePool) -> None:
    pool = make_pool(2)
    big, small = pool.backends
    big.model = model_info(pool_size=4)
    big.outstanding = 2  # load 0.5
    small.outstanding = 1  # load 1.0
    assert (big.load, small.load) == (0.5, 1.0)
    for _ in range(50):
        assert pool.choose(MODEL, set()) is big


def test_equal_loads_spread_the_requests(make_pool: MakePool) -> None:
    pool = make_pool(2)
    chosen = {pool.choose(MODEL, set()) for _ in range(200)}
    assert chosen == set(pool.backends)


def test_an_unknown_pool_size_counts_as_one(make_pool: MakePool) -> None:
    backend = make_pool(1).backends[0]
    backend.model = model_info(pool_size=0)
    backend.outstanding = 3
    assert (backend.pool_size, backend.load) == (1, 3.0)
    backend.model = None
    assert backend.pool_size == 1
    assert backend.model_id is None and not backend.serves(MODEL)


def test_model_id_is_the_file_name_without_gguf() -> None:
    assert model_id(model_info("/x/SmolLM2-135M-Instruct.Q4_1.gguf")) == (
        "SmolLM2-135M-Instruct.Q4_1"
    )
    assert model_id(model_info("relative/model.bin")) == "model.bin"
    assert model_id(model_info("")) == "a training run"


def test_the_health_url(make_pool: MakePool) -> None:
    settings = GatewaySettings(
        backends=("10.0.0.1:50051", "10.0.0.2:50051,health=10.0.0.2:9000"), insecure_backends=True
    )
    reported, named = ReplicaPool(settings, OPTIONS).backends
    assert reported.health_url() is None  # port not known yet
    reported.model = model_info(http_port=8081)
    assert reported.health_url() == "http://10.0.0.1:8081/readyz"
    assert named.health_url() == "http://10.0.0.2:9000/readyz"


# -- health checks ---------------------------------------------------------------------------


def test_the_first_check_decides_at_once(make_pool: MakePool) -> None:
    pool = make_pool(2, healthy_after=3, unhealthy_after=3)
    passing, failing = pool.backends
    for backend in pool.backends:
        backend.healthy, backend.joined = None, False
    assert passing.state() is ReplicaState.UNKNOWN
    pool._record_check(passing, None)
    pool._record_check(failing, "refused")
    assert passing.state() is ReplicaState.HEALTHY
    assert failing.state() is ReplicaState.UNHEALTHY
    assert failing.last_error == "refused"


def test_a_replica_never_in_rotation_joins_at_its_first_passed_check(
    make_pool: MakePool,
) -> None:
    pool = make_pool(1, healthy_after=3)
    backend = pool.backends[0]
    backend.healthy, backend.joined = None, False
    pool._record_check(backend, "refused")  # still starting
    pool._record_check(backend, "refused")
    assert backend.state() is ReplicaState.UNHEALTHY
    pool._record_check(backend, None)
    assert backend.state() is ReplicaState.HEALTHY
    pool._record_check(backend, "down")  # once it has served, passes in a row bring it back
    pool._record_check(backend, "down")
    pool._record_check(backend, "down")
    pool._record_check(backend, None)
    assert backend.state() is ReplicaState.UNHEALTHY


def test_a_healthy_replica_leaves_after_failures_in_a_row(make_pool: MakePool) -> None:
    pool = make_pool(1, unhealthy_after=3)
    backend = pool.backends[0]
    pool._record_check(backend, "timeout")
    pool._record_check(backend, "timeout")
    pool._record_check(backend, None)  # a pass starts the count again
    pool._record_check(backend, "timeout")
    pool._record_check(backend, "timeout")
    assert backend.state() is ReplicaState.HEALTHY
    pool._record_check(backend, "timeout")
    assert backend.state() is ReplicaState.UNHEALTHY


def test_an_unhealthy_replica_returns_after_passes_in_a_row(make_pool: MakePool) -> None:
    pool = make_pool(1, healthy_after=2, unhealthy_after=1)
    backend = pool.backends[0]
    pool._record_check(backend, "down")
    assert backend.state() is ReplicaState.UNHEALTHY
    pool._record_check(backend, None)
    pool._record_check(backend, "down")  # a failure starts the count again
    pool._record_check(backend, None)
    assert backend.state() is ReplicaState.UNHEALTHY
    pool._record_check(backend, None)
    assert backend.state() is ReplicaState.HEALTHY


def test_a_check_that_changes_nothing_logs_nothing(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(1)
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        pool._record_check(pool.backends[0], None)
    assert caplog.records == []


# -- passive ejection ------------------------------------------------------------------------


def refused() -> ConnectionFailedError:
    return ConnectionFailedError("connection refused")


async def test_failures_in_a_row_eject_a_replica(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=3, ejection_time=60)
    backend = pool.backends[0]
    pool.record_result(backend, refused())
    pool.record_result(backend, EngineError("decode failed"))
    assert backend.state() is ReplicaState.HEALTHY
    pool.record_result(backend, UnavailableError("draining"))
    assert backend.state() is ReplicaState.EJECTED
    assert pool.ejections == {"127.0.0.1:1": 1}
    assert backend.ejected_until - time.monotonic() == pytest.approx(60, abs=1)
    assert "draining" in backend.last_error


@pytest.mark.parametrize(
    "error",
    [
        OverloadedError("queue full"),
        InvalidRequestError("prompt", "too long"),
        DeadlineExceededError("late"),
    ],
)
async def test_errors_that_are_not_the_replicas_do_not_eject(
    make_pool: MakePool, error: LLMServiceError
) -> None:
    pool = make_pool(2, eject_after=2)
    backend = pool.backends[0]
    for _ in range(10):
        pool.record_result(backend, error)
    assert backend.state() is ReplicaState.HEALTHY
    assert pool.ejections == {}


async def test_a_success_resets_the_count(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=3)
    backend = pool.backends[0]
    for _ in range(3):
        pool.record_result(backend, refused())
        pool.record_result(backend, refused())
        pool.record_result(backend, None)
    assert backend.state() is ReplicaState.HEALTHY
    assert pool.ejections == {}


async def test_never_more_than_half_of_the_replicas_are_ejected(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=1, ejection_time=60)
    first, second = pool.backends
    pool.record_result(first, refused())
    pool.record_result(second, refused())
    pool.record_result(second, refused())
    assert first.state() is ReplicaState.EJECTED
    assert second.state() is ReplicaState.HEALTHY
    assert pool.ejections == {"127.0.0.1:1": 1}


async def test_half_of_four_replicas_may_be_ejected(make_pool: MakePool) -> None:
    pool = make_pool(4, eject_after=1, ejection_time=60)
    for backend in pool.backends:
        pool.record_result(backend, refused())
    states = [b.state() for b in pool.backends]
    assert states.count(ReplicaState.EJECTED) == 2
    assert len(pool.ejections) == 2


async def test_a_single_replica_is_never_ejected(make_pool: MakePool) -> None:
    pool = make_pool(1, eject_after=1)
    for _ in range(5):
        pool.record_result(pool.backends[0], refused())
    assert pool.backends[0].state() is ReplicaState.HEALTHY


async def test_an_ejection_ends_and_the_next_one_in_a_row_lasts_twice_as_long(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(2, eject_after=1, ejection_time=0.05)
    backend = pool.backends[0]
    pool.record_result(backend, refused())
    assert backend.ejected_until - time.monotonic() == pytest.approx(0.05, abs=0.02)
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        await asyncio.sleep(0.1)
    assert backend.state() is ReplicaState.HEALTHY
    assert "is healthy" in caplog.text  # the end of the ejection was logged

    pool.record_result(backend, refused())
    assert backend.state() is ReplicaState.EJECTED
    assert backend.ejected_until - time.monotonic() == pytest.approx(0.1, abs=0.02)
    assert pool.ejections == {"127.0.0.1:1": 2}
    await asyncio.sleep(0.15)
    assert backend.state() is ReplicaState.HEALTHY


async def test_a_success_after_an_ejection_resets_its_length(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=1, ejection_time=0.05)
    backend = pool.backends[0]
    pool.record_result(backend, refused())
    await asyncio.sleep(0.08)
    pool.record_result(backend, None)
    pool.record_result(backend, refused())
    assert backend.ejected_until - time.monotonic() == pytest.approx(0.05, abs=0.02)
    await asyncio.sleep(0.08)


# -- retry budget ----------------------------------------------------------------------------


def test_the_retry_budget_allows_its_floor_then_a_ratio_of_requests() -> None:
    budget = RetryBudget(0.5, floor=2)
    assert budget.try_retry()
    assert budget.try_retry()
    assert not budget.try_retry()
    for _ in range(4):
        budget.request()
    assert budget.try_retry()
    assert budget.try_retry()
    assert not budget.try_retry()


def test_a_retry_budget_of_nothing_allows_nothing() -> None:
    budget = RetryBudget(0, floor=0)
    for _ in range(100):
        budget.request()
    assert not budget.try_retry()


async def test_the_retry_budget_forgets_old_retries() -> None:
    budget = RetryBudget(0, floor=1, window=0.05)
    assert budget.try_retry()
    assert not budget.try_retry()
    await asyncio.sleep(0.1)
    assert budget.try_retry()


# -- routed streams --------------------------------------------------------------------------

Script = list[Chunk | LLMServiceError]

TIMINGS = Timings(
    queue_wait_ms=0.0,
    prefill_ms=1.0,
    time_to_first_token_ms=2.0,
    decode_tokens_per_s=10.0,
    total_ms=5.0,
)


def token(text: str) -> Chunk:
    return Chunk(text, (len(text),))


def done() -> Chunk:
    return Chunk("", (), FinishReason.STOP, Usage(4, 2), TIMINGS)


class FakeStream:
    """An ``AsyncStream`` that plays a script of chunks and errors."""

    def __init__(self, script: Script, prompt_tokens: int) -> None:
        self.script = list(script)
        self.started: Started | None = None
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self.completion: Completion | None = None  # set with the final chunk, as AsyncStream
        self._texts: list[str] = []

    async def __anext__(self) -> Chunk:
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, LLMServiceError):
            raise item
        self.started = Started("backend-req", self.prompt_tokens, 0.0, 0)
        self._texts.append(item.text)
        if item.final:
            assert item.finish_reason and item.usage and item.timings
            self.completion = Completion(
                "".join(self._texts), item.finish_reason, item.usage, item.timings, "backend-req"
            )
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeClient:
    """An ``AsyncClient`` whose calls each play the next script; records what it was asked."""

    def __init__(self, *scripts: Script, prompt_tokens: int = 4) -> None:
        self.scripts = list(scripts)
        self.prompt_tokens = prompt_tokens
        self.calls: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []

    def stream(self, prompt: Any, **kwargs: Any) -> FakeStream:
        self.calls.append({"prompt": prompt, **kwargs})
        stream = FakeStream(self.scripts.pop(0), self.prompt_tokens)
        self.streams.append(stream)
        return stream


def scripted(backend: Replica, *scripts: Script) -> FakeClient:
    client = FakeClient(*scripts)
    backend.client = client  # type: ignore[assignment]
    return client


def routed(pool: ReplicaPool, **kwargs: Any) -> RoutedStream:
    return RoutedStream(
        pool,
        MODEL,
        kwargs.pop("prompt", "Once upon"),
        kwargs.pop("sampling", {"max_tokens": 2}),
        request_id="req-1",
        deadline=time.monotonic() + kwargs.pop("timeout", 60.0),
    )


async def collect(stream: RoutedStream) -> list[Chunk]:
    chunks = []
    while True:
        chunk = await anext(stream)
        chunks.append(chunk)
        if chunk.final:
            return chunks


@pytest.fixture
def first_second(make_pool: MakePool) -> tuple[ReplicaPool, Replica, Replica]:
    """Two replicas; the first is chosen first (the second has a request in flight)."""
    pool = make_pool(2)
    first, second = pool.backends
    second.outstanding = 1
    return pool, first, second


async def test_a_stream_passes_the_replicas_chunks(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, _ = first_second
    client = scripted(first, [token("Hi"), token("!"), done()])
    stream = routed(pool, sampling={"max_tokens": 2, "temperature": 0.0})
    chunks = await collect(stream)
    assert [c.text for c in chunks] == ["Hi", "!", ""]
    assert client.calls == [
        {
            "prompt": "Once upon",
            "timeout": pytest.approx(60, abs=1),
            "request_id": "req-1",
            "tools": None,
            "split_reasoning": True,
            "max_tokens": 2,
            "temperature": 0.0,
        }
    ]
    assert stream.backend is first
    assert (stream.prompt_tokens, stream.completion_tokens) == (4, 2)
    assert stream.completion is not None and stream.completion.text == "Hi!"
    assert first.outstanding == 0


async def test_chat_messages_are_sent_as_a_list(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, _ = first_second
    client = scripted(first, [done()])
    messages = (ChatMessage("user", "Hi"),)
    await collect(routed(pool, prompt=messages))
    assert client.calls[0]["prompt"] == [ChatMessage("user", "Hi")]


@pytest.mark.parametrize(
    "error", [OverloadedError("queue full"), refused(), EngineError("decode failed")]
)
async def test_a_refusal_before_the_first_token_goes_to_another_replica(
    first_second: tuple[ReplicaPool, Replica, Replica], error: LLMServiceError
) -> None:
    pool, first, second = first_second
    scripted(first, [error])
    client = scripted(second, [token("Hi"), done()])
    stream = routed(pool)
    chunks = await collect(stream)
    assert [c.text for c in chunks] == ["Hi", ""]
    assert stream.backend is second
    assert len(client.calls) == 1
    assert pool.retries == {error.kind: 1}
    assert (first.outstanding, second.outstanding) == (0, 1)


async def test_an_error_after_a_token_ends_the_stream(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [token("Hi"), UnavailableError("draining")])
    client = scripted(second, [done()])
    stream = routed(pool)
    assert (await anext(stream)).text == "Hi"
    with pytest.raises(UnavailableError):
        await anext(stream)
    assert client.calls == []
    assert pool.retries == {}
    assert first.outstanding == 0


async def test_a_bad_request_is_not_retried(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [InvalidRequestError("sampling.top_k", "must be >= 0")])
    client = scripted(second, [done()])
    with pytest.raises(InvalidRequestError):
        await anext(routed(pool))
    assert client.calls == []


async def test_when_every_replica_refuses_the_last_refusal_is_raised(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [refused()])
    scripted(second, [OverloadedError("queue full", retry_after_s=3)])
    with pytest.raises(OverloadedError) as info:
        await anext(routed(pool))
    assert info.value.retry_after_s == 3
    assert (first.outstanding, second.outstanding) == (0, 1)


async def test_attempts_are_bounded(make_pool: MakePool) -> None:
    pool = make_pool(3, max_attempts=2)
    for backend in pool.backends:
        scripted(backend, [refused()])
    with pytest.raises(ConnectionFailedError):
        await anext(routed(pool))
    tried = [b for b in pool.backends if b.client.calls]  # type: ignore[attr-defined]
    assert len(tried) == 2
    assert pool.retries == {"connection_failed": 1}


async def test_a_spent_retry_budget_stops_retries(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    pool.budget = RetryBudget(0, floor=0)
    scripted(first, [OverloadedError("queue full")])
    client = scripted(second, [done()])
    with pytest.raises(OverloadedError):
        await anext(routed(pool))
    assert client.calls == []
    assert pool.retries == {}


async def test_a_passed_deadline_stops_retries(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [OverloadedError("queue full")])
    client = scripted(second, [done()])
    with pytest.raises(OverloadedError):
        await anext(routed(pool, timeout=-1.0))
    assert client.calls == []


async def test_refusals_count_towards_ejection(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=1, ejection_time=60)
    first, second = pool.backends
    second.outstanding = 1
    scripted(first, [refused()])
    scripted(second, [done()])
    await collect(routed(pool))
    assert first.state() is ReplicaState.EJECTED
    assert second.request_failures == 0


async def test_cancel_cancels_the_replicas_call_once(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, _ = first_second
    client = scripted(first, [token("Hi"), token("!"), done()])
    stream = routed(pool)
    await anext(stream)
    assert first.outstanding == 1
    stream.cancel()
    stream.cancel()
    assert client.streams[0].cancelled
    assert first.outstanding == 0
    assert first.request_failures == 0


def test_cancel_before_the_start_does_nothing(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, _ = first_second
    client = scripted(first, [done()])
    routed(pool).cancel()
    assert client.calls == []
    assert first.outstanding == 0


async def test_a_stream_ends_after_its_final_chunk(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [token("Hi"), done()])
    client = scripted(second, [token("again"), done()])
    chunks = [chunk async for chunk in routed(pool)]
    assert [c.text for c in chunks] == ["Hi", ""]
    assert client.calls == []


# -- regressions of the review's fixes -------------------------------------------------------


class FakeClock:
    """``time.monotonic`` for the budget: seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_retry_budget_forgets_old_requests_as_it_records_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(replicas, "time", clock)
    budget = RetryBudget(0.5, floor=0, window=10.0)
    for _ in range(1000):  # one request a second, never a retry: nothing else prunes
        budget.request()
        clock.now += 1.0
    assert len(budget._requests) <= 11
    assert budget.try_retry()  # the requests of the window still count


class ProbedClient:
    """The calls a health check makes, answered from what the test set."""

    def __init__(self, model: ModelInfo | Exception, health: str = "SERVING") -> None:
        self.model = model
        self.status = health
        self.model_info_calls = 0

    async def model_info(self) -> ModelInfo:
        self.model_info_calls += 1
        if isinstance(self.model, Exception):
            raise self.model
        return self.model

    async def health(self, service: str) -> str:
        return self.status


def probed(backend: Replica, model: ModelInfo | Exception) -> ProbedClient:
    """Give ``backend`` a fake client, and no health port (no HTTP check)."""
    backend.address = ReplicaAddress(backend.address.target, health=None)
    client = ProbedClient(model)
    backend.client = client  # type: ignore[assignment]
    assert backend.health_url() is None
    return client


async def test_every_check_rereads_what_a_healthy_replica_serves(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(1)
    backend = pool.backends[0]
    client = probed(backend, model_info("/m/Other.gguf"))
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        await pool._check(backend)
    assert client.model_info_calls == 1
    assert backend.model_id == "Other"
    assert backend.state() is ReplicaState.HEALTHY
    assert "now serves 'Other' (was 'SmolLM2')" in caplog.text
    assert [r.levelno for r in caplog.records if "now serves" in r.getMessage()] == [
        logging.WARNING
    ]
    assert pool.choose("Other", set()) is backend


async def test_a_check_that_finds_the_same_model_says_nothing_but_takes_its_pool_size(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(1)
    backend = pool.backends[0]
    probed(backend, model_info(pool_size=4))
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        await pool._check(backend)
    assert backend.pool_size == 4
    assert "now serves" not in caplog.text


async def test_an_unexpected_error_in_a_check_counts_as_a_failed_check(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(1, unhealthy_after=2)
    backend = pool.backends[0]
    probed(backend, RuntimeError("a bug"))
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        await pool._check(backend)  # does not raise
    assert backend.fails == 1 and backend.passes == 0
    assert "a bug" in backend.last_error
    assert "health check of backend 127.0.0.1:1" in caplog.text
    assert backend.state() is ReplicaState.HEALTHY  # one failure of two
    await pool._check(backend)
    assert backend.state() is ReplicaState.UNHEALTHY


async def test_one_replicas_bug_does_not_stop_the_checks_of_the_others(
    make_pool: MakePool,
) -> None:
    pool = make_pool(2)
    broken, good = pool.backends
    probed(broken, RuntimeError("a bug"))
    client = probed(good, model_info())
    await pool.check_all()
    assert client.model_info_calls == 1
    assert (broken.fails, good.passes) == (1, 1)


@pytest.mark.parametrize("others", [0, 1])
async def test_a_refusal_with_no_other_replica_left_spends_no_retry(
    make_pool: MakePool, others: int
) -> None:
    pool = make_pool(1 + others)
    only = pool.backends[0]
    for other in pool.backends[1:]:
        other.healthy = False  # there, but out of rotation
    scripted(only, [OverloadedError("queue full")])
    with pytest.raises(OverloadedError):
        await anext(routed(pool))
    assert pool.retries == {}
    assert len(pool.budget._retries) == 0
    assert only.outstanding == 0


async def test_a_cancelled_stream_does_not_count_as_a_success(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=3)
    first, second = pool.backends
    second.outstanding = 1  # the first is chosen
    pool.record_result(first, ConnectionFailedError("connection refused"))
    pool.record_result(first, ConnectionFailedError("connection refused"))
    client = scripted(first, [token("Hi"), token("!"), done()])
    stream = routed(pool)
    assert (await anext(stream)).text == "Hi"
    assert stream.backend is first
    stream.cancel()
    assert client.streams[0].cancelled
    assert first.request_failures == 2
    assert first.outstanding == 0
    pool.record_result(first, refused())  # the third in a row still ejects
    assert first.state() is ReplicaState.EJECTED


async def test_a_stream_cancelled_before_its_first_token_does_not_count(
    make_pool: MakePool,
) -> None:
    pool = make_pool(2, eject_after=3)
    first, second = pool.backends
    second.outstanding = 1
    pool.record_result(first, refused())
    pool.record_result(first, refused())
    client = scripted(first, [done()])
    stream = routed(pool)
    stream._open()  # sent, no answer yet
    assert first.outstanding == 1
    stream.cancel()
    assert client.streams[0].cancelled
    assert (first.outstanding, first.request_failures) == (0, 2)


async def test_a_call_the_replica_cancelled_goes_to_another_replica(
    first_second: tuple[ReplicaPool, Replica, Replica],
) -> None:
    pool, first, second = first_second
    scripted(first, [RequestCancelledError("the server is draining")])
    client = scripted(second, [token("Hi"), token("!"), done()])
    stream = routed(pool)
    chunks = await collect(stream)
    assert [c.text for c in chunks] == ["Hi", "!", ""]
    assert stream.backend is second
    assert len(client.calls) == 1
    assert pool.retries == {"cancelled": 1}
    assert first.outstanding == 0


async def test_at_most_half_of_a_models_replicas_are_ejected(make_pool: MakePool) -> None:
    pool = make_pool(4, eject_after=1, ejection_time=60)
    a1, a2, b1, b2 = pool.backends
    a1.model = a2.model = model_info("/m/A.gguf")
    b1.model = b2.model = model_info("/m/B.gguf")
    pool.record_result(a1, refused())
    assert a1.state() is ReplicaState.EJECTED
    pool.record_result(a2, refused())
    assert a2.state() is ReplicaState.HEALTHY  # only 1 of 4 is out, but 1 of A's 2 is
    assert pool.ejections == {"127.0.0.1:1": 1}
    assert pool.choose("A", set()) is a2
    pool.record_result(b1, refused())  # the other model's replicas count apart
    assert b1.state() is ReplicaState.EJECTED
    assert b2.state() is ReplicaState.HEALTHY


async def test_an_ejection_end_that_fires_early_waits_for_its_time(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(2)
    backend = pool.backends[0]
    backend.ejected_until = time.monotonic() + 0.05
    with caplog.at_level(logging.INFO, logger="llm_service.gateway"):
        pool._ejection_over(backend)  # as if the loop's timer fired 0.05 s early
        assert "is healthy" not in caplog.text
        assert backend.state() is ReplicaState.EJECTED
        await asyncio.sleep(0.1)
    assert "backend 127.0.0.1:1 is healthy" in caplog.text
    assert backend.state() is ReplicaState.HEALTHY


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets",
    [
        ("127.0.0.1:1", "127.0.0.1:1"),
        ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1,health=127.0.0.1:9000"),
        "127.0.0.1:1 127.0.0.1:1",
    ],
)
def test_the_same_backend_twice_is_refused(targets: tuple[str, ...] | str) -> None:
    with pytest.raises(pydantic.ValidationError, match="more than once") as info:
        GatewaySettings(backends=targets, insecure_backends=True)
    assert "127.0.0.1:1" in str(info.value)
    assert "127.0.0.1:2" not in str(info.value)


@pytest.mark.parametrize("size", [1024, 8 * 1024 * 1024, 15 * 1024 * 1024])
def test_max_request_bytes_within_bounds(size: int) -> None:
    settings = GatewaySettings(
        backends=("127.0.0.1:1",), insecure_backends=True, max_request_bytes=size
    )
    assert settings.max_request_bytes == size


@pytest.mark.parametrize("size", [0, 1023, 15 * 1024 * 1024 + 1, 16 * 1024 * 1024])
def test_max_request_bytes_out_of_bounds_is_refused(size: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="max_request_bytes"):
        GatewaySettings(backends=("127.0.0.1:1",), insecure_backends=True, max_request_bytes=size)


async def test_the_last_healthy_replica_of_a_model_is_not_ejected(make_pool: MakePool) -> None:
    pool = make_pool(2, eject_after=1, ejection_time=60)
    down, last = pool.backends
    down.healthy = False
    pool.record_result(last, EngineError("decode failed"))
    assert last.state() is ReplicaState.HEALTHY  # a failing replica serves better than none
    assert pool.ejections == {}


async def test_failures_while_ejected_do_not_count_towards_the_next_ejection(
    make_pool: MakePool,
) -> None:
    pool = make_pool(2, eject_after=2, ejection_time=0.05)
    backend = pool.backends[0]
    pool.record_result(backend, refused())
    pool.record_result(backend, refused())
    assert backend.state() is ReplicaState.EJECTED
    for _ in range(5):  # calls sent before the ejection, failing while it lasts
        pool.record_result(backend, refused())
    await asyncio.sleep(0.1)
    assert backend.state() is ReplicaState.HEALTHY
    pool.record_result(backend, refused())  # one failure after it: not a second ejection yet
    assert backend.state() is ReplicaState.HEALTHY
    assert pool.ejections == {"127.0.0.1:1": 1}
