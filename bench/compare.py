"""llm_service side by side with llama.cpp's llama-server and llama-cpp-python's server.

Every server runs the same model, from the same llama.cpp sources and build flags, with the same
number of slots, and is driven by the same load generator (``llm_service.client.bench``) with the
same requests: a different prompt each (so no server can answer from a prompt cache), greedy, a
fixed number of tokens. Run it with ``bench/run`` (which builds llama-server first).

Prints a table with each row's ratio to llama-server, writes JSON and a PNG plot, and checks
the targets of the throughput issue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from servers import (
    Server,
    Setup,
    Stack,
    llama_cpp_python_server,
    llama_server,
    llm_gateway,
    llm_service,
)

from llm_service.certs import write_dev_certs
from llm_service.client import AsyncClient
from llm_service.client.bench import BenchResult, bench_prompt, run_load
from llm_service.default_model import fetch_default_model
from llm_service.engine.cpu import BUILD_INFO, cpu_extensions, read_build_info
from llm_service.engine.llama import LLAMA_CPP_COMMIT
from llm_service.settings import ServiceSettings

REFERENCE = "llama-server"
# Sends request (prompt index, max tokens); yields the token count of each chunk as it arrives.
StreamOpener = Callable[[int, int], AsyncIterator[int]]
# The prompt of request i.
Prompts = Callable[[int], str]
# The long prompts whose time to first token is measured alone (tokens, about), and how often.
LONG_PROMPTS = (800, 3900)
LONG_PROMPT_RUNS = 3
# llama-batched-bench's shape: prompt and generated tokens of each sequence.
BATCHED_BENCH_PP, BATCHED_BENCH_TG = 32, 96


def grpc_opener(client: AsyncClient, prompts: Prompts = bench_prompt) -> StreamOpener:
    """Streams Generate through the Python client; counts the tokens of each delta."""

    async def stream(prompt_index: int, max_tokens: int) -> AsyncIterator[int]:
        prompt = prompts(prompt_index)
        async with client.stream(prompt, max_tokens=max_tokens, temperature=0) as chunks:
            async for chunk in chunks:
                yield len(chunk.token_ids)

    return stream


def openai_opener(
    session: aiohttp.ClientSession, base: str, model: str, prompts: Prompts = bench_prompt
) -> StreamOpener:
    """Streams /v1/completions (OpenAI wire format); each streamed choice is one token."""

    async def stream(prompt_index: int, max_tokens: int) -> AsyncIterator[int]:
        body = {"model": model, "prompt": prompts(prompt_index), "max_tokens": max_tokens,
                "temperature": 0, "stream": True}  # fmt: skip
        async with session.post(f"{base}/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    yield 1

    return stream


async def measure(
    name: str,
    opener: StreamOpener,
    server: Server | Stack,
    level: int,
    requests: int,
    first: int,
    max_tokens: int,
) -> tuple[BenchResult, float, dict[str, list[float]] | None]:
    """``requests`` requests against one server, ``level`` at a time, prompts ``first`` on
    (the same prompts for every server); its samples, the server's peak RSS in MB, and for
    llm_service batched its steps meanwhile (``batch_steps``)."""
    peak = server.rss_mb()
    steps_before = batch_steps(server)

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.rss_mb())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss())
    try:
        result: BenchResult = await run_load(
            lambda i: opener(first + i, max_tokens),
            concurrency=level,
            requests=requests,
            progress=sys.stderr.isatty(),
            label=f"{name}, {level} streams",
        )
    finally:
        sampler.cancel()
    steps_after = batch_steps(server)
    steps = None
    if steps_before is not None and steps_after is not None:
        steps = {
            kind: [a - b for a, b in zip(steps_after[kind], steps_before[kind], strict=True)]
            for kind in steps_after
        }
    return result, peak, steps


def batch_steps(server: Server | Stack) -> dict[str, list[float]] | None:
    """llm_service batched's steps so far from its /metrics, by kind (prompt, decode): [steps,
    tokens, seconds in llama_decode]; None for any other server."""
    if not isinstance(server, Server) or not server.url:
        return None
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # llama-server: no /metrics unless asked
        return None
    counts: dict[str, list[float]] = {}
    fields = [f"llm_batch_{name}_total" for name in ("steps", "step_tokens", "step_seconds")]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in fields:
                kind = counts.setdefault(sample.labels["kind"], [0.0, 0.0, 0.0])
                kind[fields.index(sample.name)] = sample.value
    return counts or None


async def measure_all(
    targets: list[str],
    setup: Setup,
    session: aiohttp.ClientSession,
    model_id: str,
    levels: list[int],
    per_stream: int,
    min_requests: int,
    max_tokens: int,
) -> list[dict[str, Any]]:
    """Every level against every target, in two halves taken in turns A B C C B A.

    These machines' speed drifts by 10-20 % over minutes, and in bursts (other tenants of the
    host): measured one target after another, each over all levels, a ratio would compare two
    different machines. So every server runs from the start (idle ones cost nothing), the runs
    a ratio compares are a minute or two apart at most, and the mirrored order cancels a drift
    that goes one way over the level.
    """
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for target in targets:
            server, openers = await stack.enter_async_context(
                serving(target, setup, session, model_id)
            )
            opener = openers(bench_prompt)
            await _drain(opener(10_000, 8))  # warm-up, outside the figures
            started.append((_display(target), opener, server))
        rows = []
        first = 0
        for level in levels:
            requests = max(min_requests, per_stream * level)
            halves = [(first, requests // 2), (first + requests // 2, requests - requests // 2)]
            samples: dict[str, list[BenchResult]] = {name: [] for name, _, _ in started}
            peaks: dict[str, float] = {name: 0.0 for name, _, _ in started}
            steps: dict[str, dict[str, list[float]]] = {}
            for half, order in zip(halves, (started, started[::-1]), strict=True):
                for name, opener, server in order:
                    result, peak, half_steps = await measure(
                        name, opener, server, level, half[1], half[0], max_tokens
                    )
                    samples[name].append(result)
                    peaks[name] = max(peaks[name], peak)
                    for kind, counts in (half_steps or {}).items():
                        total = steps.setdefault(name, {}).setdefault(kind, [0.0, 0.0, 0.0])
                        total[:] = [t + c for t, c in zip(total, counts, strict=True)]
            for name, results in samples.items():
                merged = BenchResult(
                    level,
                    [sample for result in results for sample in result.samples],
                    sum(result.wall_s for result in results),
                )
                figures = merged.figures()
                figures["target"] = name
                figures["peak_rss_mb"] = round(peaks[name], 1)
                figures["cut_off"] = sum(
                    1 for s in merged.samples if s.ok and s.tokens < max_tokens
                )
                if name in steps:
                    figures["steps"] = step_figures(steps[name], merged.wall_s)
                rows.append(figures)
                print(
                    f"  {name:<18} {level:>3} streams: {figures['tokens_per_s']:7.1f} tokens/s,"
                    f" TTFT p50 {figures['ttft_ms']['p50']} ms, errors {figures['errors'] or 0}",
                    file=sys.stderr,
                )
            first += requests
    names = [_display(t) for t in targets]
    return sorted(rows, key=lambda r: (r["concurrency"], names.index(r["target"])))


def step_figures(steps: dict[str, list[float]], wall_s: float) -> dict[str, Any]:
    """Where a level's wall time went in llm_service batched, from its step counters: decode
    steps (tokens/s while decoding: the counterpart of llama-batched-bench's S_TG; tokens a
    step: how full the batch ran), prompt steps, and the rest (the scheduler waiting for
    work: requests in transit, between a stream's requests, or none left)."""
    decode, prompt = steps.get("decode", [0.0] * 3), steps.get("prompt", [0.0] * 3)
    return {
        "decode_tokens_per_s": round(decode[1] / decode[2], 1) if decode[2] else None,
        "decode_tokens_per_step": round(decode[1] / decode[0], 2) if decode[0] else None,
        "decode_share": round(decode[2] / wall_s, 3),
        "prompt_share": round(prompt[2] / wall_s, 3),
        "other_share": round(max(0.0, 1 - (decode[2] + prompt[2]) / wall_s), 3),
    }


async def _drain(stream: AsyncIterator[int]) -> None:
    async for _ in stream:
        pass


def llama_bench_tg(setup: Setup, n: int = 128) -> float:
    """llama-bench's single-stream generation speed (tg) on the same build, tokens/s."""
    assert setup.tools is not None
    out = subprocess.run(
        [str(setup.tools / "llama-bench"), "-m", str(setup.model), "-p", "0", "-n", str(n),
         "-t", str(setup.threads), "-r", "3", "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout)[0]["avg_ts"])


def llama_batched_bench(setup: Setup, sizes: list[int]) -> dict[str, dict[int, float]]:
    """The physical limit of batched decoding, with no server at all: llama-batched-bench on
    the same build and model, B sequences of BATCHED_BENCH_PP prompt tokens decoding
    BATCHED_BENCH_TG tokens each in one batch per step. By B: generated tokens/s of the decode
    steps alone (``tg``, llama-batched-bench's S_TG), and over the whole run, the prompts'
    evaluation included (``end_to_end``: B x TG / T, what a server's tokens/s counts)."""
    assert setup.tools is not None
    per_seq = 2 * (BATCHED_BENCH_PP + BATCHED_BENCH_TG)
    out = subprocess.run(
        [str(setup.tools / "llama-batched-bench"), "-m", str(setup.model),
         "-c", str(max(sizes) * per_seq), "-b", "2048", "-ub", "512",
         "-npp", str(BATCHED_BENCH_PP), "-ntg", str(BATCHED_BENCH_TG),
         "-npl", ",".join(map(str, sizes)), "-t", str(setup.threads),
         "--output-format", "jsonl"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {
        "tg": {int(row["pl"]): round(float(row["speed_tg"]), 1) for row in rows},
        "end_to_end": {
            int(row["pl"]): round(int(row["pl"]) * int(row["tg"]) / float(row["t"]), 1)
            for row in rows
        },
    }


def engine_alone(setup: Setup, sizes: list[int]) -> dict[str, Any]:
    """llm_service's engine with no server (``bench/engine_alone.py``), in llama-batched-bench's
    shape: the same two figures by batch size (``tg``: its decode steps alone; ``end_to_end``:
    over the whole run), and its prompts' mean length."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("engine_alone.py")),
         "--model", str(setup.model), "--sizes", ",".join(map(str, sizes)),
         "--prompt", str(BATCHED_BENCH_PP), "--generate", str(BATCHED_BENCH_TG),
         "--ctx", str(2 * (BATCHED_BENCH_PP + BATCHED_BENCH_TG)), "--threads", str(setup.threads)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data = json.loads(out.stdout.splitlines()[-1])
    return {
        "tg": {int(b): v for b, v in data["tg"].items()},
        "end_to_end": {int(b): v for b, v in data["end_to_end"].items()},
        "prompt_tokens_mean": data["prompt_tokens_mean"],
    }


def long_prompt(i: int, n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens (a count, as bench_prompt's), unique to ``i``."""
    start = 100_000 + 1_000 * (i % 800)  # (distinct first numbers, and six digits each)
    # Six-digit numbers and ", ": 8 tokens each (one per digit) with this model's tokenizer.
    return ", ".join(str(n) for n in range(start, start + n_tokens // 8)) + ","


async def time_to_first_token(opener: StreamOpener, prompt_index: int) -> float:
    """Seconds from sending one request to its first token."""
    sent = time.perf_counter()
    stream = opener(prompt_index, 4)
    try:
        await anext(stream)
        return time.perf_counter() - sent
    finally:
        await _drain(stream)


async def long_prompt_ttfts(
    targets: list[str], setup: Setup, session: aiohttp.ClientSession, model_id: str
) -> list[dict[str, Any]]:
    """TTFT of one request alone with a prompt of about each LONG_PROMPTS tokens, the median of
    LONG_PROMPT_RUNS (each prompt new to the server), the targets taking turns run by run (as
    in ``measure_all``: these machines drift)."""
    async with contextlib.AsyncExitStack() as stack:
        openers: dict[str, Callable[[Prompts], StreamOpener]] = {}
        for target in targets:
            _, openers[target] = await stack.enter_async_context(
                serving(target, setup, session, model_id)
            )
        rows = []
        for k, n_tokens in enumerate(LONG_PROMPTS):
            prompts = functools.partial(long_prompt, n_tokens=n_tokens)
            times: dict[str, list[float]] = {target: [] for target in targets}
            for r in range(LONG_PROMPT_RUNS):
                for target in targets if r % 2 == 0 else targets[::-1]:
                    opener = openers[target](prompts)
                    times[target].append(await time_to_first_token(opener, 1000 * (k + 1) + r))
            for target in targets:
                ttft = sorted(times[target])[LONG_PROMPT_RUNS // 2] * 1000
                name = _display(target)
                print(f"  {name:<18} {n_tokens:>5}-token prompt: TTFT {ttft:.0f} ms",
                      file=sys.stderr)  # fmt: skip
                rows.append({"target": name, "prompt_tokens": n_tokens, "ttft_ms": round(ttft, 1)})
    return rows


EMBED_BATCHES = (1, 32)
EMBED_INPUTS = 64  # inputs embedded at each batch size (each a bench prompt, ~40 tokens)


async def embedding_rates(
    name: str, session: aiohttp.ClientSession, url: str, model_id: str
) -> list[dict[str, Any]]:
    """Embeddings per second through ``url``'s OpenAI ``/v1/embeddings``, one request at a
    time, at each batch size (inputs per request)."""
    texts = [bench_prompt(10_000 + i) for i in range(EMBED_INPUTS)]
    rows = []
    for batch in EMBED_BATCHES:
        started = time.perf_counter()
        for first in range(0, EMBED_INPUTS, batch):
            body = {"model": model_id, "input": texts[first : first + batch]}
            async with session.post(url + "/v1/embeddings", json=body) as response:
                answer = await response.json()
                if response.status != 200 or len(answer["data"]) != batch:
                    raise RuntimeError(f"{name}: /v1/embeddings answered {response.status}")
        rate = EMBED_INPUTS / (time.perf_counter() - started)
        print(f"  {name:<18} batch {batch:>2}: {rate:.1f} embeddings/s", file=sys.stderr)
        rows.append({"target": name, "batch": batch, "embeddings_per_s": round(rate, 1)})
    return rows


@contextlib.asynccontextmanager
async def serving_embeddings(target: str, setup: Setup) -> AsyncIterator[str]:
    """llama-server with mean-pooled embeddings, or llm-gateway over a replica serving them
    (the same pooling); yields the base URL."""
    if target == REFERENCE:
        server, url = llama_server(setup, "--embeddings", "--pooling", "mean")
        stack: Server | Stack = server
    else:
        service, grpc_target = llm_service(setup, "batched", env={"LLM_EMBEDDINGS": "1"})
        gateway, url = llm_gateway(setup, grpc_target)
        stack = Stack([service, gateway])
    servers = stack.servers if isinstance(stack, Stack) else [stack]
    try:
        for server in servers:
            server.start(setup.workdir)
            server.wait_ready()
        yield url
    finally:
        for server in reversed(servers):
            server.stop()


def _display(target: str) -> str:
    """A target's name in the figures ("llm_service-batched" is "llm_service batched")."""
    return target.replace("llm_service-", "llm_service ")


@contextlib.asynccontextmanager
async def serving(
    target: str, setup: Setup, session: aiohttp.ClientSession, model_id: str
) -> AsyncIterator[tuple[Server | Stack, Callable[[Prompts], StreamOpener]]]:
    """Start ``target`` (and what it needs), wait until it is ready, and yield it with a maker
    of stream openers for given prompts; stop it at the end."""
    if target in ("llama-server", "llama-cpp-python"):
        maker = llama_server if target == "llama-server" else llama_cpp_python_server
        server, url = maker(setup)
        server.start(setup.workdir)
        try:
            server.wait_ready()
            yield server, lambda prompts: openai_opener(session, url, model_id, prompts)
        finally:
            server.stop()
    elif target == "llm-gateway":
        # The OpenAI path of llm_service: HTTP to the gateway, gRPC + mTLS to the replica.
        service, grpc_target = llm_service(setup, "batched")
        gateway, url = llm_gateway(setup, grpc_target)
        service.start(setup.workdir)
        try:
            service.wait_ready()
            gateway.start(setup.workdir)
            gateway.wait_ready()
            yield (
                Stack([service, gateway]),
                lambda prompts: openai_opener(session, url, model_id, prompts),
            )
        finally:
            gateway.stop()
            service.stop()
    else:
        server, grpc_target = llm_service(setup, target.removeprefix("llm_service-"))
        server.start(setup.workdir)
        try:
            server.wait_ready()
            async with AsyncClient(
                grpc_target,
                tls_ca=setup.certs["ca.crt"], tls_cert=setup.certs["client.crt"],
                tls_key=setup.certs["client.key"], max_retries=0,
            ) as client:  # fmt: skip
                yield server, lambda prompts: grpc_opener(client, prompts)
        finally:
            server.stop()


def build_info() -> dict[str, Any]:
    """The CPU and the llama.cpp build every server here runs (figures differ between them)."""
    model_name, _ = cpu_extensions()
    info: dict[str, str] = read_build_info(Path(sys.prefix) / BUILD_INFO) or {}
    return {
        "cpu_model": model_name,
        "cmake_args": info.get("cmake_args", "unknown"),
        "cpu_extensions_used": info.get("requires", "unknown"),
    }


def idle_rss(setup: Setup, slots: int) -> float:
    """llm_service's resident memory once ready, with ``slots`` slots (batched mode)."""
    server, _ = llm_service(Setup(**{**setup.__dict__, "slots": slots}), "batched")
    server.start(setup.workdir)
    try:
        server.wait_ready()
        time.sleep(1)
        return server.rss_mb()
    finally:
        server.stop()


def print_table(rows: list[dict[str, Any]]) -> None:
    ref = {r["concurrency"]: r for r in rows if r["target"] == REFERENCE}
    head = ["streams", "target", "tokens/s", "x ref", "TTFT p50", "x ref", "TTFT p99",
            "ITL p50", "ITL p99", "peak RSS", "errors"]  # fmt: skip
    table = [head]
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["target"] != REFERENCE)):
        base = ref.get(r["concurrency"])
        tps_ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        t50, b50 = r["ttft_ms"]["p50"], base["ttft_ms"]["p50"] if base else None
        errors = sum(r["errors"].values()) + r["cut_off"]
        table.append([
            str(r["concurrency"]), r["target"], f"{r['tokens_per_s']:.1f}",
            f"{tps_ratio:.2f}" if tps_ratio else "-", _ms(t50),
            f"{t50 / b50:.2f}" if t50 and b50 else "-", _ms(r["ttft_ms"]["p99"]),
            _ms(r["itl_ms"]["p50"]), _ms(r["itl_ms"]["p99"]), f"{r['peak_rss_mb']:.0f} MB",
            str(errors),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        print("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(row, widths, strict=True))))  # fmt: skip
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_steps(rows: list[dict[str, Any]]) -> None:
    """Where llm_service batched's wall time went at each level (its step counters)."""
    mine = [r for r in rows if r.get("steps")]
    if not mine:
        return
    print(
        "\nllm_service batched, share of wall time in its decode steps, prompt steps and"
        " neither (waiting for work); its decode steps' tokens/s and tokens a step:"
    )
    for r in mine:
        s = r["steps"]
        print(
            f"  {r['concurrency']:>3} streams: decode {s['decode_share']:.0%},"
            f" prompts {s['prompt_share']:.0%}, neither {s['other_share']:.0%};"
            f" decoding {s['decode_tokens_per_s'] or 0:.1f} tokens/s,"
            f" {s['decode_tokens_per_step'] or 0:.1f} tokens a step"
        )


def print_long_and_limit(report: dict[str, Any]) -> None:
    """The rows against llama-batched-bench, and the long prompts' time to first token."""
    if report["physical_limit"]:
        alone = report.get("engine_alone", {})
        print(
            "\nagainst llama-batched-bench (same build, no server; prompt"
            f" {BATCHED_BENCH_PP}, {BATCHED_BENCH_TG} generated), generated tokens/s: of its"
            " decode steps alone (S_TG), and over its whole run with the prompts (B x TG / T);"
            " llm_service's engine alone in the same shape (no server, in one process: prompts"
            f" of {alone.get('prompt_tokens_mean', 0):.0f} tokens), and the served figures"
            " above (which include the server, the load generator and queueing, on the same"
            " cores):"
        )
        for row in report["physical_limit"]:
            x = row.get
            print(
                f"  batch {row['batch']:>3}: llama-batched-bench {row['llama_batched_bench']:.1f}"
                f" / {x('llama_batched_bench_end_to_end') or 0:.1f};"
                f" engine alone {x('engine_alone_tg') or 0:.1f}"
                f" (x{x('engine_alone_ratio_tg') or 0:.2f})"
                f" / {x('engine_alone_end_to_end') or 0:.1f}"
                f" (x{x('engine_alone_ratio_end_to_end') or 0:.2f});"
                f" served: llm_service {row['llm_service']:.1f} (x{row['ratio']:.2f}"
                f" / x{x('ratio_end_to_end') or 0:.2f}, its decode steps"
                f" {x('llm_service_decode_steps') or 0:.1f}),"
                f" llama-server {x('llama_server') or 0:.1f} (x{x('llama_server_ratio') or 0:.2f})"
            )
    if report.get("long_prompts"):
        print(f"\nfirst token of one request alone, long prompts (median of {LONG_PROMPT_RUNS}):")
        ref = {
            r["prompt_tokens"]: r["ttft_ms"]
            for r in report["long_prompts"]
            if r["target"] == REFERENCE
        }
        for r in report["long_prompts"]:
            base = ref.get(r["prompt_tokens"])
            ratio = f" (x{r['ttft_ms'] / base:.2f})" if base else ""
            print(
                f"  {r['target']:<20} ~{r['prompt_tokens']:>5} tokens: {_ms(r['ttft_ms'])}{ratio}"
            )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def check_targets(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The throughput issue's targets, judged on this run (those whose servers were run)."""
    by = {(r["target"], r["concurrency"]): r for r in report["runs"]}
    ours = "llm_service batched"
    levels = [c for c in report["concurrency"] if (ours, c) in by and (REFERENCE, c) in by]
    checks = []

    def ratios(value: Callable[[dict[str, Any]], float]) -> dict[int, float]:
        return {c: value(by[(ours, c)]) / value(by[(REFERENCE, c)]) for c in levels}

    def listed(values: dict[int, float]) -> str:
        return ", ".join(f"{c} streams: {r:.2f}" for c, r in values.items())

    if levels:
        tps = ratios(lambda r: r["tokens_per_s"])
        checks.append(
            ("tokens/s >= 1.0 x llama-server at every concurrency", min(tps.values()) >= 1.0,
             listed(tps))
        )  # fmt: skip
        itl = ratios(lambda r: r["itl_ms"]["p99"] or 0.0)
        checks.append(
            ("inter-token p99 <= 1.25 x llama-server at every concurrency",
             max(itl.values()) <= 1.25, listed(itl))
        )  # fmt: skip
        ttft = ratios(lambda r: r["ttft_ms"]["p50"] or 0.0)
        checks.append(
            ("TTFT p50 <= 1.0 x llama-server at every concurrency", max(ttft.values()) <= 1.0,
             listed(ttft))
        )  # fmt: skip
    limit = {row["batch"]: row for row in report.get("physical_limit", [])}
    if 8 in limit and limit[8]["engine_alone_ratio_tg"]:
        # Like against like: the engine with no server, in llama-batched-bench's shape. The
        # served figure includes prompts, queueing, gRPC and the load generator's CPU on the
        # same two cores: printed beside it.
        row = limit[8]
        tg, whole = row["engine_alone_ratio_tg"], row["engine_alone_ratio_end_to_end"] or 0.0
        checks.append(
            (">= 0.9 x llama-batched-bench at 8 streams (the engine alone, no server)",
             min(tg, whole) >= 0.9,
             f"decode steps {tg:.2f}, whole run {whole:.2f}; served, against S_TG:"
             f" llm_service {row['ratio']:.2f}, llama-server {row['llama_server_ratio'] or 0:.2f}")
        )  # fmt: skip
    gateway = {g["concurrency"]: g["tokens_per_s_ratio"] for g in gateway_overhead(report)}
    if {1, 8} <= set(gateway):
        checks.append(
            ("through llm-gateway >= 0.95 x llm_service reached directly, at 1 and 8 streams",
             min(gateway[1], gateway[8]) >= 0.95, f"1: {gateway[1]:.2f}, 8: {gateway[8]:.2f}")
        )  # fmt: skip
    longs = report.get("long_prompts", [])
    ref_long = {r["prompt_tokens"]: r["ttft_ms"] for r in longs if r["target"] == REFERENCE}
    gw_long = {
        r["prompt_tokens"]: r["ttft_ms"] / ref_long[r["prompt_tokens"]]
        for r in longs
        if r["target"] == "llm-gateway" and r["prompt_tokens"] in ref_long
    }
    if gw_long:
        checks.append(
            ("long-prompt TTFT through llm-gateway <= 1.05 x llama-server",
             max(gw_long.values()) <= 1.05,
             ", ".join(f"~{n} tokens: {r:.2f}" for n, r in gw_long.items()))
        )  # fmt: skip
    tg = report["llama_bench_tg128"]
    if (ours, 1) in by:
        single = by[(ours, 1)]["tokens_per_s"]
        checks.append(
            ("single stream >= 0.95 x llama-bench tg128", single >= 0.95 * tg,
             f"{single:.1f} vs {tg:.1f} tokens/s ({single / tg:.2f})")
        )  # fmt: skip
    if ("llama-cpp-python", 8) in by and (ours, 8) in by:
        ratio = by[(ours, 8)]["tokens_per_s"] / by[("llama-cpp-python", 8)]["tokens_per_s"]
        checks.append((">= 4 x llama-cpp-python's server at 8 streams", ratio >= 4, f"{ratio:.2f}"))
    mine = [r for r in report["runs"] if r["target"] == ours]
    if mine:
        cut = sum(r["cut_off"] + sum(r["errors"].values()) for r in mine)
        checks.append(("no llm_service stream cut off or failed", cut == 0, f"{cut}"))
    return checks


def physical_limit(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each server's tokens/s at B streams as a ratio to llama-batched-bench at batch B."""
    by = {(r["target"], r["concurrency"]): r for r in report["runs"]}
    rows = []
    whole = report.get("llama_batched_bench_end_to_end", {})
    alone = report.get("engine_alone", {})
    for batch, limit in sorted(report.get("llama_batched_bench_tg", {}).items()):
        ours, ref = by.get(("llm_service batched", batch)), by.get((REFERENCE, batch))
        if ours is None or not limit:
            continue
        end_to_end = whole.get(batch)
        decoding = (ours.get("steps") or {}).get("decode_tokens_per_s")
        alone_tg = alone.get("tg", {}).get(batch)
        alone_whole = alone.get("end_to_end", {}).get(batch)
        rows.append({
            "batch": batch,
            "llama_batched_bench": limit,
            "llama_batched_bench_end_to_end": end_to_end,
            "llm_service": ours["tokens_per_s"],
            "ratio": round(ours["tokens_per_s"] / limit, 3),
            "ratio_end_to_end": round(ours["tokens_per_s"] / end_to_end, 3) if end_to_end else None,
            "llm_service_decode_steps": decoding,
            "engine_alone_tg": alone_tg,
            "engine_alone_ratio_tg": round(alone_tg / limit, 3) if alone_tg else None,
            "engine_alone_end_to_end": alone_whole,
            "engine_alone_ratio_end_to_end": round(alone_whole / end_to_end, 3)
            if alone_whole and end_to_end else None,
            "llama_server": ref["tokens_per_s"] if ref else None,
            "llama_server_ratio": round(ref["tokens_per_s"] / limit, 3) if ref else None,
        })  # fmt: skip
    return rows


def gateway_overhead(report: dict[str, Any]) -> list[dict[str, Any]]:
    """llm-gateway (HTTP + SSE, then gRPC) against llm_service batched reached directly."""
    by = {(r["target"], r["concurrency"]): r for r in report["runs"]}
    rows = []
    for c in report["concurrency"]:
        gw, direct = by.get(("llm-gateway", c)), by.get(("llm_service batched", c))
        if gw is None or direct is None:
            continue
        g50, d50 = gw["ttft_ms"]["p50"], direct["ttft_ms"]["p50"]
        rows.append({
            "concurrency": c,
            "tokens_per_s_ratio": round(gw["tokens_per_s"] / direct["tokens_per_s"], 3),
            "ttft_p50_added_ms": round(g50 - d50, 1) if g50 and d50 else None,
            "itl_p50_added_ms": round(gw["itl_ms"]["p50"] - direct["itl_ms"]["p50"], 2)
            if gw["itl_ms"]["p50"] and direct["itl_ms"]["p50"] else None,
        })  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        left.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=target)
        right.plot(xs, [r["ttft_ms"]["p50"] for r in mine], marker="o", label=target)
    for ax, title in ((left, "aggregate tokens/s"), (right, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.concurrency.split(",")]
    cache = ServiceSettings.model_validate({}).model_cache
    model = fetch_default_model(cache, progress=sys.stderr.isatty())
    workdir = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    setup = Setup(
        model=model, slots=args.slots, ctx_per_slot=args.ctx_per_slot, threads=args.threads,
        tools=args.tools, workdir=workdir, certs=write_dev_certs(workdir / "certs"),
    )  # fmt: skip
    print(f"bench: {model.name}, {args.slots} slots x {args.ctx_per_slot} tokens,"
          f" {args.threads} threads, {args.max_tokens} tokens per request, greedy;"
          f" logs in {workdir}", file=sys.stderr)  # fmt: skip
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            **build_info(),
        },
        "model": model.name,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "slots": args.slots,
        "ctx_per_slot": args.ctx_per_slot,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "concurrency": levels,
        "runs": [],
    }
    machine = report["machine"]
    print(f"bench: CPU {machine['cpu_model']} ({machine['cpus']} cores), llama.cpp built with"
          f" {machine['cmake_args']}", file=sys.stderr)  # fmt: skip
    print("bench: llama-bench tg128 ...", file=sys.stderr)
    report["llama_bench_tg128"] = round(llama_bench_tg(setup), 2)
    sizes = [c for c in levels if c <= 16]
    # Batch size by batch size, llama-batched-bench then the engine alone: the two figures a
    # ratio compares are seconds apart, not minutes (the machine's speed drifts).
    limits: dict[str, dict[int, float]] = {"tg": {}, "end_to_end": {}}
    alone: dict[str, Any] = {"tg": {}, "end_to_end": {}, "prompt_tokens_mean": 0.0}
    for size in sizes:
        print(f"bench: batch {size}, and llm_service's engine alone in its shape ...",
              file=sys.stderr)  # fmt: skip
        limit, mine = llama_batched_bench(setup, [size]), engine_alone(setup, [size])
        for key in ("tg", "end_to_end"):
            limits[key].update(limit[key])
            alone[key].update(mine[key])
        alone["prompt_tokens_mean"] = mine["prompt_tokens_mean"]
    report["llama_batched_bench_tg"] = limits["tg"]
    report["llama_batched_bench_end_to_end"] = limits["end_to_end"]
    if sizes:
        report["engine_alone"] = alone
    targets = [t for t in args.targets.split(",") if t]
    model_id = model.name.removesuffix(".gguf")  # the gateway's id of it; the others ignore it
    # A fresh connection per request: llama-server closes a connection after a stream, and a
    # reused one fails with "server disconnected".
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        report["runs"] = await measure_all(
            targets,
            setup,
            session,
            model_id,
            levels,
            args.requests_per_stream,
            max(2, args.min_requests),
            args.max_tokens,
        )
        if args.long_prompts:
            # Servers with room for the longest prompt in every slot.
            long_setup = Setup(**{**setup.__dict__, "ctx_per_slot": max(LONG_PROMPTS) + 256})
            chosen = [t for t in (REFERENCE, "llm_service-batched", "llm-gateway") if t in targets]
            report["long_prompts"] = await long_prompt_ttfts(chosen, long_setup, session, model_id)
        if args.embeddings:
            print("bench: embeddings ...", file=sys.stderr)
            report["embeddings"] = []
            for target in (REFERENCE, "llm-gateway"):
                async with serving_embeddings(target, setup) as url:
                    report["embeddings"] += await embedding_rates(
                        _display(target), session, url, model_id
                    )
    print("bench: memory per slot ...", file=sys.stderr)
    one, many = idle_rss(setup, 1), idle_rss(setup, args.slots)
    report["memory"] = {
        "rss_1_slot_mb": round(one, 1),
        "rss_all_slots_mb": round(many, 1),
        "mb_per_extra_slot": round((many - one) / max(1, args.slots - 1), 1),
    }
    print()
    print(f"CPU {machine['cpu_model']} ({machine['cpus']} cores); llama.cpp extensions:"
          f" {machine['cpu_extensions_used']}")  # fmt: skip
    print()
    print_table(report["runs"])
    print(f"\nllama-bench tg128 (same build, {args.threads} threads): "
          f"{report['llama_bench_tg128']:.1f} tokens/s")  # fmt: skip
    mem = report["memory"]
    print(f"llm_service memory when ready: {mem['rss_1_slot_mb']:.0f} MB with 1 slot,"
          f" {many:.0f} MB with {args.slots}: {mem['mb_per_extra_slot']:.1f} MB per extra slot"
          f" ({args.ctx_per_slot} tokens of KV cache each)")  # fmt: skip
    print_steps(report["runs"])
    report["physical_limit"] = physical_limit(report)
    print_long_and_limit(report)
    if report.get("embeddings"):
        print(f"\nembeddings/s, {EMBED_INPUTS} inputs one request at a time (mean pooling):")
        for row in report["embeddings"]:
            print(f"  {row['target']:<18} batch {row['batch']:>2}: {row['embeddings_per_s']:.1f}")
    report["gateway_overhead"] = gateway_overhead(report)
    if report["gateway_overhead"]:
        print("\nllm-gateway vs llm_service batched reached directly (same replica settings):")
        for g in report["gateway_overhead"]:
            print(f"  {g['concurrency']:>3} streams: tokens/s x{g['tokens_per_s_ratio']:.2f},"
                  f" TTFT p50 {g['ttft_p50_added_ms']:+} ms, ITL p50"
                  f" {g['itl_p50_added_ms']:+} ms")  # fmt: skip
    report["targets"] = [
        {"target": name, "met": met, "measured": measured}
        for name, met, measured in check_targets(report)
    ]
    print("\ntargets:")
    for t in report["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['measured']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["runs"], args.out / "latest.png")
    print(f"\nbench: wrote {args.out}/latest.json and latest.png", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", type=Path, required=True, help="folder with llama-server")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32", help="levels, comma-separated")
    parser.add_argument(
        "--requests-per-stream", type=int, default=3,
        help="requests per level = this x concurrency, or --min-requests if more",
    )  # fmt: skip
    parser.add_argument(
        "--min-requests", type=int, default=24,
        help="requests per level at least (so that low levels run long enough to measure)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per request")
    parser.add_argument("--slots", type=int, default=8, help="parallel slots of every server")
    parser.add_argument("--ctx-per-slot", type=int, default=1024, help="context per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    parser.add_argument(
        "--targets",
        default="llama-server,llm_service-batched,llm-gateway,llm_service-contexts,"
        "llama-cpp-python",
        help="which servers, comma-separated",
    )
    parser.add_argument(
        "--long-prompts", action=argparse.BooleanOptionalAction, default=True,
        help=f"also time the first token of one request alone with prompts of about"
        f" {' and '.join(map(str, LONG_PROMPTS))} tokens",
    )  # fmt: skip
    parser.add_argument(
        "--embeddings", action=argparse.BooleanOptionalAction, default=True,
        help=f"also measure embeddings/s at batch sizes {EMBED_BATCHES} (llama-server and"
        " llm-gateway, mean pooling)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
