"""Prometheus metrics of one llm_service process (served on the HTTP port at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_service.engine import Finished
from llm_service.server.state import ServerState

__all__ = ["ServiceMetrics"]

# Seconds. Time to first token spans queueing and prefill; inter-token is one decode step.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceMetrics:
    """Counters, gauges and histograms, in a registry of their own (one per service)."""

    def __init__(self, state: ServerState) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_requests",
            "Generate calls by how they ended (stop, length, stop_sequence, cancelled, stalled,"
            " deadline,"
            " error); calls refused before they started are in llm_requests_rejected_total",
            ["finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "llm_requests_rejected",
            "Generate calls refused before they started, by gRPC status code",
            ["code"],
            registry=r,
        )
        self.cancelled = Counter(
            "llm_requests_cancelled", "Generate calls cancelled by the client", registry=r
        )
        Gauge(
            "llm_requests_in_flight", "Generate calls being served or waiting", registry=r
        ).set_function(lambda: state.in_flight)
        Gauge(
            "llm_engine_failed",
            "1 once the engine failed for good (the service then exits to be restarted)",
            registry=r,
        ).set_function(lambda: state.failure is not None)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(
            "llm_generated_tokens", "Completion tokens generated", registry=r
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "From arrival of a Generate call to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "llm_inter_token_seconds",
            "Between two consecutive tokens of one stream",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llm_request_duration_seconds",
            "From arrival of a Generate call to its end",
            buckets=_E2E_BUCKETS,
            registry=r,
        )

        def pool_value(name: str) -> Callable[[], float]:
            def read() -> float:
                pool = state.pool_state()
                return float(getattr(pool, name)) if pool is not None else 0.0

            return read

        Gauge("llm_queue_depth", "Requests waiting for a free context", registry=r).set_function(
            pool_value("waiting")
        )
        for name, doc in (
            ("size", "Contexts in the pool"),
            ("free", "Contexts free to lease"),
            ("leased", "Contexts in use"),
            ("replaced", "Contexts replaced since start after a failed reset check"),
        ):
            Gauge(f"llm_pool_{name}", doc, registry=r).set_function(pool_value(name))
        r.register(_StepCollector(state))

    def finished(self, event: Finished) -> None:
        """Account the tokens and timings of a stream that ended with ``event``."""
        self.prompt_tokens.inc(event.usage.prompt_tokens)
        self.generated_tokens.inc(event.usage.completion_tokens)
        self.e2e.observe(event.timings.total_ms / 1000)
        if event.timings.time_to_first_token_ms is not None:
            self.ttft.observe(event.timings.time_to_first_token_ms / 1000)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _StepCollector(Collector):
    """Batched mode's steps, by kind (``prompt``: prompt tokens of the requests being admitted;
    ``decode``: one token of every decoding stream): tokens per step is how full the batch is,
    tokens per second of ``decode`` steps the speed of batched decoding itself. No series in
    contexts mode."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        counts = self._state.engine.step_counts() if self._state.engine is not None else {}
        if not counts:
            return
        families = (
            ("llm_batch_steps", "Steps evaluated, by kind", "steps"),
            ("llm_batch_step_tokens", "Tokens those steps evaluated, by kind", "tokens"),
            (
                "llm_batch_step_seconds",
                "Time those steps took to evaluate (llama_decode; not sampling), by kind",
                "seconds",
            ),
        )
        for name, doc, field in families:
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, step in counts.items():
                family.add_metric([kind], getattr(step, field))
            yield family
