"""A load generator: N concurrent streams x M requests, and the figures users compare servers by.

It drives any server through one function, ``open_stream(i)``, that sends request ``i`` and
yields the number of tokens in each chunk as it arrives; so the same measurement code serves
``llm_cli bench`` (llm_service over gRPC) and the side-by-side benchmark in ``bench/``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from llm_service.errors import LLMServiceError

__all__ = ["BenchResult", "RequestSample", "bench_prompt", "format_table", "run_load"]


def bench_prompt(i: int) -> str:
    """The prompt of request ``i``: fixed, and different from every other request's from its
    first token on (so that no server can reuse a cached prefix).

    It is a count the model goes on with for hundreds of tokens, so that every request
    produces its full ``max_tokens`` (a model asked for an essay may stop after a few words).
    """
    start = 1 + 37 * i
    return ", ".join(str(n) for n in range(start, start + 8)) + ","


@dataclass
class RequestSample:
    """One request as the client saw it (times in seconds since the request was sent)."""

    ok: bool = False
    error: str | None = None  # the error's kind (gRPC status name, or the exception's class)
    first_token_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    total_s: float = 0.0


@dataclass
class BenchResult:
    """A run's samples and its wall time, summarized by ``figures()``."""

    concurrency: int
    samples: list[RequestSample]
    wall_s: float

    def figures(self) -> dict[str, Any]:
        """Aggregate figures (JSON-ready): throughput, latency percentiles, errors by kind."""
        ok = [s for s in self.samples if s.ok]
        ttft = sorted(s.first_token_s for s in ok if s.first_token_s is not None)
        gaps = sorted(g for s in ok for g in s.token_gaps_s)
        tokens = sum(s.tokens for s in self.samples)
        wall = self.wall_s or math.inf
        return {
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "completed": len(ok),
            "tokens": tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(ok) / wall, 3),
            "ttft_ms": {f"p{q}": _ms(_percentile(ttft, q)) for q in (50, 95, 99)},
            "itl_ms": {f"p{q}": _ms(_percentile(gaps, q)) for q in (50, 99)},
            "errors": dict(Counter(s.error for s in self.samples if not s.ok and s.error)),
        }


async def run_load(
    open_stream: Callable[[int], AsyncIterator[int]],
    *,
    concurrency: int,
    requests: int,
    progress: bool = True,
    label: str = "requests",
) -> BenchResult:
    """Send ``requests`` requests, ``concurrency`` at a time, and time every token.

    Args:
        open_stream: sends request ``i``; yields the token count of each chunk as it arrives.
            An ``LLMServiceError`` (or any exception) counts as a failed request, by kind.
        progress: draw a progress bar on stderr.
    """
    samples = [RequestSample() for _ in range(requests)]
    queue = iter(range(requests))
    bar = tqdm(total=requests, desc=label, unit="req", disable=not progress, leave=False)

    async def worker() -> None:
        for i in queue:
            await _measure(open_stream(i), samples[i])
            bar.update()

    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, requests)):
                group.create_task(worker())
    finally:
        bar.close()
    return BenchResult(concurrency, samples, time.perf_counter() - started)


async def _measure(stream: AsyncIterator[int], sample: RequestSample) -> None:
    sent = last = time.perf_counter()
    try:
        async for n in stream:
            if n <= 0:
                continue
            now = time.perf_counter()
            if sample.first_token_s is None:
                sample.first_token_s = now - sent
            else:
                # A chunk of n tokens: n gaps, the time spread evenly over them.
                sample.token_gaps_s.extend([(now - last) / n] * n)
            last = now
            sample.tokens += n
        sample.ok = True
    except LLMServiceError as exc:
        sample.error = exc.status or exc.kind
    except Exception as exc:
        sample.error = type(exc).__name__
    finally:
        sample.total_s = time.perf_counter() - sent
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def format_table(rows: Sequence[dict[str, Any]], *, names: Sequence[str] | None = None) -> str:
    """A text table of ``BenchResult.figures()`` rows (optionally with a leading name column)."""
    head = ["streams", "requests", "ok", "tokens/s", "req/s", "TTFT p50", "p95", "p99",
            "ITL p50", "p99", "errors"]  # fmt: skip
    lines = []
    for i, r in enumerate(rows):
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "-"
        lines.append(
            [
                str(r["concurrency"]),
                str(r["requests"]),
                str(r["completed"]),
                f"{r['tokens_per_s']:.1f}",
                f"{r['requests_per_s']:.2f}",
                *(_fmt_ms(r["ttft_ms"][q]) for q in ("p50", "p95", "p99")),
                *(_fmt_ms(r["itl_ms"][q]) for q in ("p50", "p99")),
                errors,
            ]
        )
        if names is not None:
            lines[-1].insert(0, names[i])
    if names is not None:
        head.insert(0, "target")
    widths = [max(len(row[c]) for row in [head, *lines]) for c in range(len(head))]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"
