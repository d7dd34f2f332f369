"""Prometheus metrics of llm-gateway (served at ``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_service.gateway.replicas import ReplicaPool, ReplicaState

__all__ = ["GatewayMetrics"]

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _PoolCollector(Collector):
    """Replica states, load, retries and ejections, read from the pool at each scrape."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "llm_gateway_backend_state",
            "1 for each backend's current state (unknown, healthy, unhealthy, ejected)",
            labels=["backend", "state"],
        )
        outstanding = GaugeMetricFamily(
            "llm_gateway_backend_outstanding",
            "Requests in flight on each backend",
            labels=["backend"],
        )
        for backend, current in self.pool.states():
            for s in ReplicaState:
                state.add_metric([str(backend), s.value], 1.0 if s is current else 0.0)
            outstanding.add_metric([str(backend)], backend.outstanding)
        retries = CounterMetricFamily(
            "llm_gateway_retries",
            "Requests sent to another backend after a refusal, by the refusal's kind",
            labels=["reason"],
        )
        for reason, n in sorted(self.pool.retries.items()):
            retries.add_metric([reason], n)
        ejections = CounterMetricFamily(
            "llm_gateway_ejections",
            "Backends ejected after failed requests in a row",
            labels=["backend"],
        )
        for backend in self.pool.backends:
            ejections.add_metric([str(backend)], self.pool.ejections.get(str(backend), 0))
        yield from (state, outstanding, retries, ejections)


class GatewayMetrics:
    """Counters and histograms of one gateway, in a registry of their own."""

    def __init__(self, pool: ReplicaPool) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests",
            "HTTP requests by route, status and model",
            ["route", "status", "model"],
            registry=r,
        )
        self.duration = Histogram(
            "llm_gateway_request_duration_seconds",
            "From arrival of a request to the end of its response",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "From arrival of a generation request to its first token, as the gateway sees it",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llm_gateway_tokens", "Tokens by model and kind (prompt, completion)",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            "llm_gateway_client_disconnects",
            "Generation requests whose client went away before the end (backend call cancelled)",
            registry=r,
        )
        self.rate_limited = Counter(
            "llm_gateway_rate_limited", "Requests refused by the per-key rate limits", registry=r
        )
        r.register(_PoolCollector(pool))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
