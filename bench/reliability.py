"""The reliability harness: llm-gateway over two llm_service replicas, under load, faults and soak.

Every request goes through the gateway in the OpenAI wire format, sent by clients that behave
like real ones: a mix of streaming and whole answers, chat and text completions, short and long
prompts, and 20 % of the streams abandoned after a few chunks (the connection closed). A
connection refused or reset before any byte of the response is retried with back-off (counted
as a retried connect); a 429 is counted as refused (allowed), and so is its streaming form, an
``overloaded`` error event before any token (once keep-alive pings have started a response, a
refusal can only come that way). Server-Sent Events are parsed here, so that an ``error`` event
is told apart from a silent truncation: a stream is whole only if it ends with a chunk that has
a ``finish_reason``, then ``data: [DONE]``; an error event then ``[DONE]`` is an error event;
anything else (connection cut, ``[DONE]`` without a finish reason, invalid JSON) is a silent
truncation, always a failure.

Phases, one after the other, with a recovery wait between them:

- ``load``: more concurrent clients than contexts in all, for a fixed number of requests;
- ``kill``: the same load, during which one replica is SIGKILLed, then restarted once it is out
  of rotation; only requests that were running on it may fail, each with an error event (or,
  for a whole answer, an error status), never silently;
- ``term``: one replica SIGTERMed (it drains and exits), then restarted;
- ``stop``: one replica frozen with SIGSTOP for longer than the gateway needs to take it out of
  rotation, then SIGCONT;
- ``gateway``: the gateway SIGTERMed (it drains) and started again on the same port;
- ``soak``: many requests at steady concurrency (shorter ones: 8 to 16 tokens); resident memory
  (RSS, and its anonymous part: RSS less the mapped model file, which the kernel may drop and
  read back) and open file descriptors of each replica and of the gateway after warm-up (the
  first 10 % of the requests) and at the end, both taken idle, with the clients' connections
  closed.

A fault phase's load lasts at least its number of requests and until the fault is over (the
replica back in rotation). After every phase every context of every replica must be free, and
no replica nor the gateway may have logged an error.
The gateway and the replicas run with their default settings, except what running two replicas
on one machine needs (one llama.cpp thread each). Prints a table per phase and a pass/fail line
per rule, writes JSON, exits 1 if a rule failed. Run it with ``bench/reliability``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from servers import Server, Setup, free_port, llm_gateway, llm_service
from tqdm import tqdm

from llm_service.certs import write_dev_certs
from llm_service.client.bench import bench_prompt
from llm_service.default_model import fetch_default_model
from llm_service.engine.llama import LLAMA_CPP_COMMIT
from llm_service.settings import GatewaySettings, ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("load", "kill", "term", "stop", "gateway", "soak")
ABANDON_AFTER = 3  # content chunks an abandoning client reads before it closes the connection
MAX_TOKENS = 32  # requests ask for 8 to this many tokens (an abandoned stream: this many)
SOAK_MAX_TOKENS = 16  # shorter in the soak, so that its many requests fit in minutes
RETRY_CONNECT_FOR_S = 90.0  # how long a client keeps retrying a refused connection
REQUEST_TIMEOUT_S = 180.0
CONTEXTS_FREE_WITHIN_S = 5.0
RSS_GROWTH_LIMIT_MB = 30.0
FD_GROWTH_LIMIT = 5
# The replicas' and the gateway's own defaults, except one llama.cpp thread per replica: two
# replicas with every core each on one machine make llama.cpp's spinning threads wait on each
# other (0.3 tokens/s per stream instead of about 40).
REPLICA_ENV = {"LLM_N_THREADS": "1", "LLM_LOG_LEVEL": "INFO"}
GATEWAY_ENV = {"LLM_GATEWAY_LOG_LEVEL": "INFO"}


@dataclass(frozen=True)
class Sizes:
    """How much each phase does (``--quick`` scales every count down)."""

    concurrency: int  # clients at once in load and fault phases
    load_requests: int
    fault_requests: int  # at least, in each fault phase (it also lasts until the fault is over)
    soak_requests: int
    soak_concurrency: int
    freeze_s: float  # SIGSTOP length: the gateway needs up to 2 x (interval + timeout) = 8 s
    sample_every_s: float  # RSS and fd sampling during the soak
    recovery_s: float  # pause between phases, once every replica is back and idle


FULL = Sizes(12, 300, 150, 2000, 8, 12.0, 2.0, 3.0)
QUICK = Sizes(6, 12, 8, 40, 6, 12.0, 0.5, 0.5)


@dataclass(frozen=True)
class RequestSpec:
    """One client request: what it asks and how the client behaves."""

    request_id: str
    chat: bool
    stream: bool
    long: bool
    abandon: bool  # a stream whose client leaves after ABANDON_AFTER content chunks
    max_tokens: int
    include_usage: bool

    @classmethod
    def make(cls, phase: str, i: int) -> RequestSpec:
        rng = random.Random(f"{phase}-{i}")  # the same requests at every run
        top = SOAK_MAX_TOKENS if phase == "soak" else MAX_TOKENS
        stream = rng.random() < 0.6
        abandon = stream and rng.random() < 0.2
        return cls(
            request_id=f"rel-{phase}-{i}",
            chat=rng.random() < 0.5,
            stream=stream,
            long=rng.random() < 0.2,
            abandon=abandon,
            max_tokens=top if abandon else rng.randint(8, top),
            include_usage=stream and rng.random() < 0.5,
        )

    def body(self, model: str, index: int) -> dict[str, Any]:
        # A different prompt for every request (no prefix cache to lean on); long ones ~300 tokens.
        prompt = bench_prompt(index * 11)
        if self.long:
            prompt = " ".join(bench_prompt(index * 11 + k) for k in range(11))
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0}
        if self.chat:
            body["messages"] = [{"role": "user", "content": f"Continue this list: {prompt}"}]
        else:
            body["prompt"] = prompt
        if self.stream:
            body["stream"] = True
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
        return body


# A log record at ERROR or above, in the servers' text log format ("12:34:56 ERROR   name: ...").
_ERROR_RECORD = re.compile(r"^\d\d:\d\d:\d\d (ERROR|CRITICAL)\b")
GATEWAY_RESTART = "gateway SIGTERM + restart"
# How a request ended, as the client saw it.
COMPLETED, ABANDONED, REFUSED = "completed", "abandoned", "refused"
ERROR_EVENT, ERROR_STATUS = "error_event", "error_status"  # a clean failure: allowed on a kill
TRUNCATED, OTHER = "truncated", "other_error"
# The gateway's error codes for a 429 (every replica busy, or the caller's rate limit).
REFUSALS = ("overloaded", "rate_limit_exceeded")


@dataclass
class Outcome:
    request_id: str
    stream: bool
    kind: str = ""
    detail: str = ""
    started: float = 0.0  # monotonic, at the first attempt
    ended: float = 0.0
    ttft_s: float | None = None  # streams: first content chunk, from the first attempt
    connect_retries: int = 0
    content_chunks: int = 0
    allowed: bool = False  # a failure the rules allow (running on a SIGKILLed replica)


CONNECT_ERRORS = (aiohttp.ClientConnectionError, ConnectionError)


async def send(
    session: aiohttp.ClientSession, base: str, model: str, spec: RequestSpec, index: int
) -> Outcome:
    """One request, as a real client sends it; never raises."""
    out = Outcome(spec.request_id, spec.stream, started=time.monotonic())
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    body = spec.body(model, index)
    headers = {"x-request-id": spec.request_id}
    delay = 0.05
    try:
        while True:
            try:
                response = await session.post(base + path, json=body, headers=headers)
                break
            except TimeoutError as exc:  # aiohttp's timeouts are connection errors too
                out.kind, out.detail = OTHER, f"timed out before a response: {exc!r}"
                return out
            except CONNECT_ERRORS as exc:  # refused or reset before any byte of the response
                if time.monotonic() - out.started > RETRY_CONNECT_FOR_S:
                    out.kind, out.detail = (
                        OTHER,
                        f"no connection for {RETRY_CONNECT_FOR_S} s: {exc!r}",
                    )
                    return out
                out.connect_retries += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(1.0, delay * 2)
        try:
            if response.status == 429:
                out.kind, out.detail = REFUSED, (await response.text())[:200]
            elif response.status != 200:
                out.kind, out.detail = (
                    ERROR_STATUS,
                    f"{response.status}: {(await response.text())[:300]}",
                )
            elif spec.stream:
                await _read_stream(response, spec, out)
            else:
                await _read_whole(response, spec, out)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            out.kind, out.detail = TRUNCATED, f"cut after {out.content_chunks} chunks: {exc!r}"
        finally:
            if out.kind in (COMPLETED, REFUSED, ERROR_EVENT, ERROR_STATUS):
                response.release()  # read to its end: the connection is kept alive, reused
            else:
                response.close()  # an abandoned stream's client goes away: the connection too
    finally:
        out.ended = time.monotonic()
    return out


async def _read_whole(response: aiohttp.ClientResponse, spec: RequestSpec, out: Outcome) -> None:
    raw = await response.read()
    try:
        obj = json.loads(raw)
        finish = obj["choices"][0]["finish_reason"]
    except (ValueError, KeyError, IndexError, TypeError):
        out.kind, out.detail = TRUNCATED, f"not a whole completion: {raw[:200]!r}"
        return
    if finish not in ("stop", "length"):
        out.kind, out.detail = TRUNCATED, f"finish_reason {finish!r}"
        return
    out.kind = COMPLETED


async def _read_stream(response: aiohttp.ClientResponse, spec: RequestSpec, out: Outcome) -> None:
    finish: str | None = None
    error: dict[str, Any] | None = None
    done = False
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line or line.startswith(b":"):  # event separators, keep-alive pings
            continue
        if not line.startswith(b"data: ") or done:
            out.kind, out.detail = (
                TRUNCATED,
                f"unexpected line {line[:120]!r} (after [DONE]: {done})",
            )
            return
        data = line[6:]
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            out.kind, out.detail = TRUNCATED, f"invalid JSON {data[:120]!r}"
            return
        if error is not None:
            out.kind, out.detail = TRUNCATED, f"an event after the error event: {data[:120]!r}"
            return
        if "error" in obj:
            error = obj["error"]
            continue
        for choice in obj.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if spec.chat else choice.get("text")
            if piece:
                out.content_chunks += 1
                if out.ttft_s is None:
                    out.ttft_s = time.monotonic() - out.started
            finish = choice.get("finish_reason") or finish
        if spec.abandon and finish is None and out.content_chunks >= ABANDON_AFTER:
            out.kind = ABANDONED  # the client goes away; response.close() cuts the connection
            return
    if done and error is not None and error.get("code") in REFUSALS and not out.content_chunks:
        # Refused while it waited for its first token, after keep-alive pings had started the
        # response: the streaming form of a 429.
        out.kind, out.detail = REFUSED, "in-stream: " + json.dumps(error)[:300]
    elif done and error is not None:
        out.kind, out.detail = ERROR_EVENT, json.dumps(error)[:300]
    elif done and finish is not None:
        out.kind = COMPLETED
    else:
        out.kind = TRUNCATED
        out.detail = f"ended after {out.content_chunks} chunks, finish {finish!r}, [DONE] {done}"


class Monitor:
    """Polls the gateway's /readyz: each backend's state over time (the gateway's own view)."""

    def __init__(self, base: str, every: float = 0.1) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.base = base
        self.every = every
        self.states: dict[str, str] = {}
        self.history: list[tuple[float, dict[str, str]]] = []
        self.load: list[tuple[float, float]] = []  # the machine's 1-minute load average
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.session.close()

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with self.session.get(self.base + "/readyz") as response:
                    body = await response.json()
                states = {b["target"]: b["state"] for b in body["backends"]}
                if states != self.states:
                    self.history.append((time.monotonic(), states))
                self.states = states
            now = time.monotonic()
            if not self.load or now - self.load[-1][0] >= 1:
                self.load.append((now, os.getloadavg()[0]))
            await asyncio.sleep(self.every)

    def load_max(self, since: float) -> float | None:
        """The highest 1-minute load average of the machine seen since ``since``."""
        return max((load for t, load in self.load if t >= since), default=None)

    async def wait(
        self, target: str, want: Callable[[str], bool], since: float, within: float
    ) -> float | None:
        """When ``target``'s state first satisfied ``want`` at or after ``since`` (None: not
        within ``within`` seconds of ``since``)."""
        while True:
            changes = [(t, s) for t, s in self.history if t >= since]
            for t, states in changes:
                if want(states.get(target, "gone")):
                    return t
            if not changes and want(self.states.get(target, "gone")):
                return since  # so already before ``since``
            if time.monotonic() - since > within:
                return None
            await asyncio.sleep(self.every / 2)


@dataclass
class Replica:
    name: str
    server: Server
    target: str  # its gRPC address, as the gateway names it


@dataclass
class System:
    """The system under test: two replicas and the gateway; the clients' session; the view of
    the gateway's /readyz."""

    setup: Setup
    replicas: list[Replica]
    gateway: Server
    base: str
    model: str
    session: aiohttp.ClientSession
    monitor: Monitor

    def processes(self) -> dict[str, Server]:
        return {r.name: r.server for r in self.replicas} | {"gateway": self.gateway}

    def log_marks(self) -> dict[str, int]:
        """Where each process's log ends now (restarted processes add to the same log)."""
        return {n: p.log.stat().st_size if p.log else 0 for n, p in self.processes().items()}

    def errors_logged(self, marks: dict[str, int]) -> list[str]:
        """The ERROR and CRITICAL records, and tracebacks printed without one, that the
        processes logged since ``marks``, each as its process's name and first line."""
        found = []
        for name, p in self.processes().items():
            assert p.log is not None
            with p.log.open("rb") as log:
                log.seek(marks.get(name, 0))
                lines = log.read().decode(errors="replace").splitlines()
            for before, line in itertools.pairwise(["", *lines]):
                if _ERROR_RECORD.match(line) or (
                    line.startswith("Traceback") and not _ERROR_RECORD.match(before)
                ):
                    found.append(f"{name}: {line}")
        return found

    async def replica_pools(self) -> dict[str, dict[str, Any]]:
        pools = {}
        for r in self.replicas:
            async with self.monitor.session.get(r.server.url + "/readyz") as response:
                body = await response.json()
            pools[r.name] = body["pool"] | {"in_flight": body["requests_in_flight"]}
        return pools

    async def contexts_free(self, within: float = CONTEXTS_FREE_WITHIN_S) -> dict[str, Any]:
        """Whether every context of every replica is free (nothing leased, waiting or in
        flight), and how long it took to get there."""
        start = time.monotonic()
        pools: dict[str, dict[str, Any]] = {}
        while time.monotonic() - start < within:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                pools = await self.replica_pools()
                if all(
                    p["free"] == p["size"]
                    and p["leased"] == 0
                    and p["waiting"] == 0
                    and p["in_flight"] == 0
                    for p in pools.values()
                ):
                    return {
                        "free": True,
                        "after_s": round(time.monotonic() - start, 2),
                        "pools": pools,
                    }
            await asyncio.sleep(0.05)
        return {"free": False, "after_s": None, "pools": pools}

    async def recover(self, pause: float) -> None:
        """Wait until every replica is back in rotation and idle, then ``pause`` seconds."""
        end = time.monotonic() + 120
        while not (
            len(self.monitor.states) == len(self.replicas)
            and all(s == "healthy" for s in self.monitor.states.values())
        ):
            if time.monotonic() > end:
                raise RuntimeError(f"replicas not back in rotation: {self.monitor.states}")
            await asyncio.sleep(0.1)
        await self.contexts_free(within=30)
        await asyncio.sleep(pause)


@dataclass
class FaultRecord:
    """What a fault did, when (seconds from its start), and what it allows."""

    kind: str
    target: str
    after_requests: int = 0  # requests done in the phase when it struck
    out_after_s: float | None = None  # fault -> out of rotation in the gateway's /readyz
    out_state: str | None = None
    restarted_after_s: float | None = None
    ready_after_s: float | None = None  # fault -> the process ready again
    back_after_s: float | None = None  # restart / SIGCONT -> back in rotation
    back_after_ready_s: float | None = None
    exit_code: int | None = None  # SIGTERMed processes: after their drain
    exited_after_s: float | None = None
    notes: list[str] = field(default_factory=list)
    allowed_ids: set[str] = field(default_factory=set)  # requests that may fail (SIGKILL only)


class Progress:
    """Requests done so far in a phase; a fault waits on it for its moment."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def add(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reached(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.count >= n)


Fault = Callable[["System", Progress], Coroutine[Any, Any, FaultRecord]]


async def _wait_exit(server: Server) -> int:
    return await asyncio.to_thread(server.wait, 90)


async def _restart(system: System, replica: Replica, rec: FaultRecord, t0: float) -> None:
    """Start the replica again on its ports; time it until it is back in rotation."""
    restart = time.monotonic()
    rec.restarted_after_s = round(restart - t0, 2)
    replica.server.start(system.setup.workdir)
    await asyncio.to_thread(replica.server.wait_ready, 120)
    ready = time.monotonic()
    rec.ready_after_s = round(ready - t0, 2)
    back = await system.monitor.wait(replica.target, lambda s: s == "healthy", restart, 120)
    if back is not None:
        rec.back_after_s = round(back - restart, 2)
        rec.back_after_ready_s = round(max(0.0, back - ready), 2)


def _out(state: str) -> bool:
    return state != "healthy"


def fault_kill(trigger: int) -> Fault:
    """SIGKILL replica 0 once ``trigger`` requests are done; restart it once it is out."""

    async def run(system: System, done: Progress) -> FaultRecord:
        await done.reached(trigger)
        replica = system.replicas[0]
        rec = FaultRecord("SIGKILL", replica.name)
        rec.after_requests = done.count
        assert replica.server.log is not None
        t0 = time.monotonic()
        replica.server.send(signal.SIGKILL)
        await _wait_exit(replica.server)
        # The requests that reached it before it died: the only ones allowed to fail.
        seen = replica.server.log.read_text(errors="replace")
        rec.allowed_ids = {
            line.split("] ", 1)[0].rsplit("[", 1)[-1]
            for line in seen.splitlines()
            if "] Generate from" in line
        }
        out = await system.monitor.wait(replica.target, _out, t0, 60)
        if out is not None:
            rec.out_after_s = round(out - t0, 2)
            rec.out_state = system.monitor.states.get(replica.target)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # a supervisor's restart
        await _restart(system, replica, rec, t0)
        return rec

    return run


def fault_term(trigger: int) -> Fault:
    """SIGTERM replica 1 (it drains and exits); start it again once it exited."""

    async def run(system: System, done: Progress) -> FaultRecord:
        await done.reached(trigger)
        replica = system.replicas[1]
        rec = FaultRecord("SIGTERM", replica.name)
        rec.after_requests = done.count
        t0 = time.monotonic()
        replica.server.send(signal.SIGTERM)
        rec.exit_code = await _wait_exit(replica.server)
        rec.exited_after_s = round(time.monotonic() - t0, 2)
        left = await system.monitor.wait(replica.target, _out, t0, 60)
        if left is not None:
            rec.out_after_s = round(left - t0, 2)
        await _restart(system, replica, rec, t0)
        return rec

    return run


def fault_stop(trigger: int, freeze: float) -> Fault:
    """SIGSTOP replica 0 for ``freeze`` seconds, then SIGCONT."""

    async def run(system: System, done: Progress) -> FaultRecord:
        await done.reached(trigger)
        replica = system.replicas[0]
        rec = FaultRecord("SIGSTOP", replica.name)
        rec.after_requests = done.count
        t0 = time.monotonic()
        replica.server.send(signal.SIGSTOP)
        try:
            out = await system.monitor.wait(replica.target, _out, t0, freeze)
            if out is not None:
                rec.out_after_s = round(out - t0, 2)
                rec.out_state = system.monitor.states.get(replica.target)
            await asyncio.sleep(max(0.0, t0 + freeze - time.monotonic()))
        finally:
            replica.server.send(signal.SIGCONT)
        cont = time.monotonic()
        rec.restarted_after_s = round(cont - t0, 2)
        back = await system.monitor.wait(replica.target, lambda s: s == "healthy", cont, 120)
        if back is not None:
            rec.back_after_s = round(back - cont, 2)
        return rec

    return run


def fault_gateway(trigger: int) -> Fault:
    """SIGTERM the gateway (it drains and exits 0), start it again on the same port."""

    async def run(system: System, done: Progress) -> FaultRecord:
        await done.reached(trigger)
        rec = FaultRecord(GATEWAY_RESTART, "gateway")
        rec.after_requests = done.count
        t0 = time.monotonic()
        system.gateway.send(signal.SIGTERM)
        rec.exit_code = await _wait_exit(system.gateway)
        rec.exited_after_s = round(time.monotonic() - t0, 2)
        rec.restarted_after_s = rec.exited_after_s
        system.gateway.start(system.setup.workdir)
        await asyncio.to_thread(system.gateway.wait_ready, 60)
        rec.ready_after_s = round(time.monotonic() - t0, 2)
        rec.back_after_s = round(time.monotonic() - t0 - rec.exited_after_s, 2)
        return rec

    return run


async def drive(
    system: System,
    phase: str,
    requests: int,
    concurrency: int,
    fault: Fault | None = None,
    offset: int = 0,
) -> tuple[list[Outcome], FaultRecord | None, float]:
    """Run ``requests`` requests (more if the fault is not over by then), ``concurrency`` at a
    time, with ``fault`` running alongside; the outcomes, the fault's record, the phase's start.
    Request ``i`` is ``RequestSpec.make(phase, offset + i)``."""
    outcomes: list[Outcome] = []
    counter = itertools.count()
    t0 = time.monotonic()
    bar = tqdm(
        total=requests,
        desc=f"{phase:>8}",
        unit="req",
        file=sys.stderr,
        leave=False,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    progress = Progress()
    fault_task = asyncio.create_task(fault(system, progress)) if fault else None

    async def client() -> None:
        while True:
            i = next(counter)
            if i >= requests and (fault_task is None or fault_task.done()):
                return
            if i >= 20 * requests:
                return  # a fault that never ends; its record says so
            n = offset + i
            spec = RequestSpec.make(phase, n)
            outcomes.append(await send(system.session, system.base, system.model, spec, n))
            if len(outcomes) > requests:
                bar.total = len(outcomes)
            bar.update()
            await progress.add()

    record = None
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
        if fault_task is not None:
            try:
                record = await fault_task
            except Exception as exc:  # reported as a fault that did not run its course
                record = FaultRecord("fault failed", "-", notes=[repr(exc)])
                say(f"  the fault failed: {exc!r}")
    finally:
        bar.close()
        if fault_task is not None and not fault_task.done():
            fault_task.cancel()
    return outcomes, record, t0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def figures(outcomes: list[Outcome], record: FaultRecord | None, t0: float) -> dict[str, Any]:
    """Counts by outcome; a failure is allowed only if it ran on a SIGKILLed replica."""
    allowed_ids = record.allowed_ids if record is not None else set()
    for o in outcomes:
        # A stream that failed before its first token should have been retried on the other
        # replica by the gateway: only streams already running may end with an error event.
        running = o.content_chunks > 0 or not o.stream
        o.allowed = (
            o.kind in (ERROR_EVENT, ERROR_STATUS) and o.request_id in allowed_ids and running
        )
    count = {
        k: sum(o.kind == k for o in outcomes) for k in (COMPLETED, ABANDONED, REFUSED, TRUNCATED)
    }
    failed = [o for o in outcomes if o.kind in (ERROR_EVENT, ERROR_STATUS, OTHER) and not o.allowed]
    ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return {
        "requests": len(outcomes),
        "completed": count[COMPLETED],
        "abandoned": count[ABANDONED],
        "refused_429": count[REFUSED],
        "connect_retries": sum(o.connect_retries for o in outcomes),
        "error_events": sum(o.allowed for o in outcomes),
        "other_errors": len(failed),
        "truncations": count[TRUNCATED],
        "ttft_ms": {
            "p50": _round_ms(percentile(ttft, 50)),
            "p99": _round_ms(percentile(ttft, 99)),
        },
        "failures": [_failure(o, t0) for o in outcomes if o.kind not in (COMPLETED, ABANDONED,
                                                                           REFUSED)][:50],
    }  # fmt: skip


def _failure(o: Outcome, t0: float) -> dict[str, Any]:
    """A failed request for the JSON, its times in seconds since the phase started."""
    return asdict(o) | {"started": round(o.started - t0, 2), "ended": round(o.ended - t0, 2)}


def _round_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def run_phase(
    system: System, phase: str, requests: int, concurrency: int, fault: Fault | None
) -> dict[str, Any]:
    say(
        f"phase {phase}: {requests} requests, {concurrency} clients"
        + (", with a fault during the load" if fault else "")
    )
    marks = system.log_marks()
    outcomes, record, t0 = await drive(system, phase, requests, concurrency, fault)
    result: dict[str, Any] = {"phase": phase, "concurrency": concurrency}
    result["seconds"] = round(max((o.ended for o in outcomes), default=t0) - t0, 1)
    result |= figures(outcomes, record, t0)
    result["contexts"] = await system.contexts_free()
    result["errors_logged"] = system.errors_logged(marks)
    result["load_avg_max"] = system.monitor.load_max(t0)
    if record is not None:
        fault_json = asdict(record)
        fault_json["allowed_ids"] = len(record.allowed_ids)
        fault_json["summary"] = describe_fault(record)
        result["fault"] = fault_json
        say(f"  {describe_fault(record)}")
    say(
        f"  {result['completed']} completed, {result['abandoned']} abandoned,"
        f" {result['refused_429']} refused (429), {result['error_events']} error events,"
        f" {result['other_errors']} other errors, {result['truncations']} truncations"
        f" in {result['seconds']} s"
    )
    return result


def describe_fault(rec: FaultRecord) -> str:
    parts = [f"{rec.kind} {rec.target}:"]
    if rec.out_after_s is not None:
        parts.append(f"out of rotation after {rec.out_after_s} s ({rec.out_state or 'unhealthy'});")
    elif rec.kind != GATEWAY_RESTART:
        parts.append("never out of rotation;")
    if rec.exit_code is not None:
        parts.append(f"exited {rec.exit_code} after {rec.exited_after_s} s;")
    if rec.kind == "SIGSTOP":
        parts.append(f"SIGCONT after {rec.restarted_after_s} s;")
    elif rec.restarted_after_s is not None:
        parts.append(
            f"restarted after {rec.restarted_after_s} s, ready after {rec.ready_after_s} s;"
        )
    if rec.kind == GATEWAY_RESTART:
        parts.append(f"serving again {rec.back_after_s} s after it exited")
    elif rec.back_after_s is not None:
        since = "SIGCONT" if rec.kind == "SIGSTOP" else "restart"
        extra = (
            f", {rec.back_after_ready_s} s after it was ready"
            if rec.back_after_ready_s is not None
            else ""
        )
        parts.append(f"back in rotation {rec.back_after_s} s after {since}{extra}")
    else:
        parts.append("NOT back in rotation")
    if rec.kind == "fault failed":
        parts.append(f"({'; '.join(rec.notes)})")
    return " ".join(parts)


async def soak(system: System, requests: int, concurrency: int, every: float) -> dict[str, Any]:
    """Steady load; memory and fds of every process after warm-up (10 %) and at the end, each
    taken with the clients' connections closed and every context free, so they compare."""
    say(f"phase soak: {requests} requests, {concurrency} clients; memory and fds every {every} s")
    procs = system.processes()
    cpu = {name: p.cpu_s() for name, p in procs.items()}
    samples: list[tuple[float, dict[str, Footprint]]] = []
    t0 = time.monotonic()

    def measure() -> dict[str, Footprint]:
        return {name: Footprint.of(p) for name, p in procs.items()}

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - t0, measure()))
            await asyncio.sleep(every)

    async def quiet() -> dict[str, Footprint]:
        await system.session.close()  # the clients' keep-alive connections go
        system.session = _session(concurrency)
        await system.contexts_free(within=30)
        await asyncio.sleep(1.0)
        return measure()

    warm = max(1, requests // 10)
    marks = system.log_marks()
    sampler = asyncio.create_task(sample())
    try:
        first, _, _ = await drive(system, "soak", warm, concurrency)
        after_warm = await quiet()
        warm_t = time.monotonic() - t0
        rest, _, _ = await drive(system, "soak", requests - warm, concurrency, offset=warm)
        end = await quiet()
    finally:
        sampler.cancel()
    outcomes = first + rest
    result: dict[str, Any] = {"phase": "soak", "concurrency": concurrency}
    result |= figures(outcomes, None, t0)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["contexts"] = await system.contexts_free()
    result["errors_logged"] = system.errors_logged(marks)
    result["load_avg_max"] = system.monitor.load_max(t0)
    memory = {}
    for name in procs:
        w, e = after_warm[name], end[name]
        later = [s[name].rss_mb for t, s in samples if t >= warm_t] or [e.rss_mb]
        memory[name] = {
            "rss_warm_mb": round(w.rss_mb, 1),
            "rss_end_mb": round(e.rss_mb, 1),
            "rss_growth_mb": round(e.rss_mb - w.rss_mb, 1),
            "rss_peak_mb": round(max(later), 1),
            "anon_warm_mb": round(w.anon_mb, 1),
            "anon_end_mb": round(e.anon_mb, 1),
            "anon_growth_mb": round(e.anon_mb - w.anon_mb, 1),
            "fds_warm": w.fds,
            "fds_end": e.fds,
            "fds_growth": e.fds - w.fds,
        }
    result["memory"] = memory
    result["cpu_s_per_request"] = {
        name: round((p.cpu_s() - cpu[name]) / max(1, len(outcomes)), 3) for name, p in procs.items()
    }
    # Every n-th sample, at most 300, as columns: seconds since the start, then each process's.
    kept = samples[:: max(1, math.ceil(len(samples) / 300))]
    result["samples"] = {"t": [round(t, 1) for t, _ in kept]} | {
        name: {k: [getattr(s[name], k) for _, s in kept] for k in ("rss_mb", "anon_mb", "fds")}
        for name in procs
    }
    say(
        f"  {result['completed']} completed, {result['abandoned']} abandoned,"
        f" {result['other_errors']} other errors, {result['truncations']} truncations"
        f" in {result['seconds']} s; growth: "
        + ", ".join(
            f"{n} RSS {m['rss_growth_mb']:+.1f} MB, anonymous {m['anon_growth_mb']:+.1f} MB,"
            f" {m['fds_growth']:+d} fds"
            for n, m in memory.items()
        )
    )
    return result


@dataclass(frozen=True)
class Footprint:
    """One process's memory (MiB, rounded to 0.1) and open file descriptors, at one moment."""

    rss_mb: float
    anon_mb: float
    fds: int

    @classmethod
    def of(cls, server: Server) -> Footprint:
        return cls(round(server.rss_mb(), 1), round(server.anon_mb(), 1), server.num_fds())


def rules(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Every rule of the suite, judged on this run: (rule, passed, what was measured)."""
    checks: list[tuple[str, bool, str]] = []

    def check(rule: str, passed: bool, measured: str) -> None:
        checks.append((rule, passed, measured))

    pytest_run = report.get("pytest")
    if pytest_run and pytest_run.get("ran"):
        code = pytest_run["exit_code"]
        check("pytest tests/reliability (HYPOTHESIS_PROFILE=full) passes", code in (0, 5),
              f"exit {code}" + (" (no test)" if code == 5 else ""))  # fmt: skip
    for p in report["phases"]:
        name, fault = p["phase"], p.get("fault")
        accounted = p["completed"] + p["abandoned"] + p["refused_429"] + p["error_events"]
        check(f"{name}: no error but 429s (and error events of streams on a killed replica)",
              p["other_errors"] == 0, f"{p['other_errors']} other errors")  # fmt: skip
        check(f"{name}: no silent truncation", p["truncations"] == 0, f"{p['truncations']}")
        check(f"{name}: every request completed, abandoned, refused or an allowed error",
              accounted == p["requests"], f"{accounted} of {p['requests']}")  # fmt: skip
        ctx = p["contexts"]
        check(f"{name}: every context of every replica free at the end", ctx["free"],
              f"after {ctx['after_s']} s" if ctx["free"] else json.dumps(ctx["pools"]))  # fmt: skip
        logged = p["errors_logged"]
        check(f"{name}: no error logged by a replica or the gateway", not logged,
              f"{len(logged)}" + (f", first: {logged[0][:160]}" if logged else ""))  # fmt: skip
        for proc, m in p.get("memory", {}).items():
            for kind, key in (("RSS", "rss"), ("anonymous memory", "anon")):
                growth = (f"{m[f'{key}_warm_mb']} -> {m[f'{key}_end_mb']} MB"
                          f" ({m[f'{key}_growth_mb']:+.1f})")  # fmt: skip
                check(f"{name}: {proc} {kind} growth after warm-up < {RSS_GROWTH_LIMIT_MB:.0f} MB",
                      m[f"{key}_growth_mb"] < RSS_GROWTH_LIMIT_MB, growth)  # fmt: skip
            check(
                f"{name}: {proc} open fds stable (growth <= {FD_GROWTH_LIMIT})",
                m["fds_growth"] <= FD_GROWTH_LIMIT,
                f"{m['fds_warm']} -> {m['fds_end']}",
            )
        if fault is None:
            continue
        if fault["kind"] != GATEWAY_RESTART:
            check(f"{name}: the replica left rotation", fault["out_after_s"] is not None,
                  f"after {fault['out_after_s']} s")  # fmt: skip
        check(f"{name}: back in rotation (gateway: serving again)",
              fault["back_after_s"] is not None, f"after {fault['back_after_s']} s")  # fmt: skip
        if fault["exit_code"] is not None:
            check(f"{name}: drained and exited 0", fault["exit_code"] == 0,
                  f"exit {fault['exit_code']} after {fault['exited_after_s']} s")  # fmt: skip
    return checks


def print_tables(report: dict[str, Any]) -> None:
    rows = [["phase", "requests", "completed", "abandoned", "429", "conn retries",
             "error events", "other errors", "truncations", "TTFT p50", "TTFT p99", "out after",
             "back after", "contexts free", "errors logged", "load avg"]]  # fmt: skip
    for p in report["phases"]:
        f = p.get("fault") or {}
        counts = ("requests", "completed", "abandoned", "refused_429", "connect_retries",
                  "error_events", "other_errors", "truncations")  # fmt: skip
        rows.append([p["phase"], *(str(p[c]) for c in counts), _ms(p["ttft_ms"]["p50"]),
                     _ms(p["ttft_ms"]["p99"]), _s(f.get("out_after_s")),
                     _s(f.get("back_after_s")), "yes" if p["contexts"]["free"] else "NO",
                     str(len(p["errors_logged"])), _load(p.get("load_avg_max"))])  # fmt: skip
    print_table(rows)
    cpus = report["machine"]["cpus"]
    print(f"  load avg: the machine's highest 1-minute load average in the phase ({cpus} CPUs:"
          f" above {cpus}, other work competed with the suite for them)")  # fmt: skip
    for p in report["phases"]:
        if p.get("fault"):
            print(f"  {p['phase']}: {p['fault']['summary']}")
    for p in report["phases"]:
        if "memory" not in p:
            continue
        print()
        rows = [["process", "RSS after warm-up", "RSS at end", "growth", "peak after warm-up",
                 "anonymous after warm-up", "at end", "growth", "fds after warm-up",
                 "fds at end"]]  # fmt: skip
        for name, m in p["memory"].items():
            rows.append([name, f"{m['rss_warm_mb']:.1f} MB", f"{m['rss_end_mb']:.1f} MB",
                         f"{m['rss_growth_mb']:+.1f} MB", f"{m['rss_peak_mb']:.1f} MB",
                         f"{m['anon_warm_mb']:.1f} MB", f"{m['anon_end_mb']:.1f} MB",
                         f"{m['anon_growth_mb']:+.1f} MB", str(m["fds_warm"]),
                         str(m["fds_end"])])  # fmt: skip
        print_table(rows)
        print(
            "  anonymous: resident memory not backed by a file (RSS less the mapped model and"
            " libraries, which the kernel may drop under memory pressure): what a leak grows"
        )


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _load(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def say(message: str) -> None:
    print(f"reliability: {message}", file=sys.stderr, flush=True)


def run_pytest() -> dict[str, Any]:
    """``pytest tests/reliability`` with the full Hypothesis profile (this harness's own CI test
    left out: it runs this very harness)."""
    folder = ROOT / "tests" / "reliability"
    if not folder.is_dir():
        say("no tests/reliability: pytest skipped")
        return {"ran": False, "reason": "tests/reliability does not exist"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/reliability",
        "-p",
        "no:cacheprovider",
        "--ignore",
        "tests/reliability/test_harness.py",
    ]
    say(f"HYPOTHESIS_PROFILE=full {' '.join(command[2:])}")
    start = time.monotonic()
    code = subprocess.run(
        command, cwd=ROOT, env=os.environ | {"HYPOTHESIS_PROFILE": "full"}, check=False
    ).returncode
    return {
        "ran": True,
        "exit_code": code,
        "seconds": round(time.monotonic() - start, 1),
        "command": "HYPOTHESIS_PROFILE=full " + " ".join(command[2:]),
    }


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=10)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["bench/reliability.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "sizes": asdict(sizes),
        "phases": [],
    }
    if not args.skip_pytest:
        report["pytest"] = run_pytest()
    cache = ServiceSettings.model_validate({}).model_cache
    model = fetch_default_model(cache, progress=sys.stderr.isatty())
    workdir = Path(tempfile.mkdtemp(prefix="llm-reliability-"))
    service_defaults = ServiceSettings.model_validate({})
    setup = Setup(
        model=model,
        slots=service_defaults.llama_service_threads,
        ctx_per_slot=service_defaults.n_ctx,
        threads=1,
        workdir=workdir,
        certs=write_dev_certs(workdir / "certs"),
    )
    gw_defaults = GatewaySettings.model_validate({"backends": ["127.0.0.1:1"]})
    report |= {
        "model": model.name,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "replicas": {
            "count": 2,
            "slots": setup.slots,
            "n_ctx": setup.ctx_per_slot,
            "n_threads": 1,
            "env": REPLICA_ENV,
        },
        "gateway": {
            k: getattr(gw_defaults, k)
            for k in (
                "health_interval",
                "health_timeout",
                "healthy_after",
                "unhealthy_after",
                "eject_after",
                "ejection_time",
                "max_attempts",
                "retry_budget",
                "shutdown_grace",
                "keepalive_interval",
            )
        },
    }
    say(
        f"{model.name}, 2 replicas x {setup.slots} slots (LLM_N_THREADS=1), gateway defaults"
        f" (health every {gw_defaults.health_interval:g} s, out after"
        f" {gw_defaults.unhealthy_after} failed checks or {gw_defaults.eject_after} failed"
        f" requests); logs in {workdir}"
    )
    replicas = []
    for name in ("replica-a", "replica-b"):
        server, target = llm_service(
            setup, "batched", name=name, ports=(free_port(), free_port()), env=REPLICA_ENV
        )
        replicas.append(Replica(name, server, target))
    gateway, base = llm_gateway(setup, [r.target for r in replicas], env=GATEWAY_ENV)
    session = _session(max(sizes.concurrency, sizes.soak_concurrency))
    monitor = Monitor(base)
    system = System(
        setup, replicas, gateway, base, model.name.removesuffix(".gguf"), session, monitor
    )
    phases = [p for p in PHASES if p in args.phases.split(",")]
    try:
        for r in replicas:
            r.server.start(workdir)
        for r in replicas:
            await asyncio.to_thread(r.server.wait_ready, 180)
        gateway.start(workdir)
        await asyncio.to_thread(gateway.wait_ready, 60)
        monitor.start()
        await system.recover(0)
        quarter = max(2, sizes.fault_requests // 4)
        faults: dict[str, Fault] = {
            "kill": fault_kill(quarter),
            "term": fault_term(quarter),
            "stop": fault_stop(quarter, sizes.freeze_s),
            "gateway": fault_gateway(quarter),
        }
        for phase in phases:
            if phase == "soak":
                result = await soak(
                    system, sizes.soak_requests, sizes.soak_concurrency, sizes.sample_every_s
                )
            elif phase == "load":
                result = await run_phase(
                    system, "load", sizes.load_requests, sizes.concurrency, None
                )
            else:
                result = await run_phase(
                    system, phase, sizes.fault_requests, sizes.concurrency, faults[phase]
                )
            report["phases"].append(result)
            await system.recover(sizes.recovery_s)
    finally:
        await monitor.stop()
        await system.session.close()
        gateway.stop()
        for r in replicas:
            r.server.stop()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["rules"] = [{"rule": r, "passed": ok, "measured": m} for r, ok, m in rules(report)]
    print()
    print_tables(report)
    print("\nrules:")
    for r in report["rules"]:
        print(f"  [{'pass' if r['passed'] else 'FAIL'}] {r['rule']}: {r['measured']}")
    failed = [r for r in report["rules"] if not r["passed"]]
    print(
        f"\n{len(report['rules']) - len(failed)} of {len(report['rules'])} rules passed"
        f" in {report['seconds']:.0f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.out}/latest.json")
    if failed or args.keep_logs:
        say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every count scaled down: the whole run in about 2 minutes",
    )
    parser.add_argument(
        "--skip-pytest", action="store_true", help="do not run pytest tests/reliability first"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"which phases, comma-separated (default: {','.join(PHASES)})",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs even when all passed"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "reliability",
        help="folder for latest.json",
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
