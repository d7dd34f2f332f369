"""Fixtures of the hostile-input suite, and its hypothesis profiles.

``HYPOTHESIS_PROFILE`` picks the profile: ``ci`` (the default: few examples, derandomized, so
that CI runs the same examples every time and each file takes seconds) or ``full`` (many more
examples, random, for a soak run: ``HYPOTHESIS_PROFILE=full pytest tests/reliability``).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.harness.gateway import Gateway
from tests.harness.service import Certs, Service

# Generated requests are slow to answer (a real model) and some are megabytes on purpose.
_SLOW_AND_LARGE = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
]
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_AND_LARGE,
)
settings.register_profile(
    "full", max_examples=500, deadline=None, print_blob=True, suppress_health_check=_SLOW_AND_LARGE
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(share: float) -> int:
    """``share`` of the profile's ``max_examples`` (at least 3), for the costlier properties."""
    return max(3, round(settings().max_examples * share))


def wait_pool_whole(svc: Service, timeout: float = 15) -> None:
    """Wait until every context of ``svc`` is free and nothing waits; fail if its process died
    or the pool is not whole after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        assert svc.process.poll() is None, f"the service died ({svc.process.returncode})"
        status, body = svc.readyz()
        pool = body.get("pool") or {}
        whole = pool.get("free") == pool.get("size") and not pool.get("leased")
        if status == 200 and whole and not pool.get("waiting"):
            return
        assert time.monotonic() < end, f"pool not whole after {timeout} s: {status} {body}"
        time.sleep(0.05)


def cap_memory(svc: Service, headroom_kib: int = 2_000_000) -> Service:
    """``svc``, its address space capped at its current size plus ``headroom_kib``: a request
    that makes it allocate without end fails there (the service may abort), instead of taking
    the memory of a machine other jobs share."""
    status = Path(f"/proc/{svc.process.pid}/status").read_text()
    size_kib = int(status.split("VmSize:")[1].split()[0])
    cap = (size_kib + headroom_kib) * 1024
    resource.prlimit(svc.process.pid, resource.RLIMIT_AS, (cap, cap))
    return svc


def replica(workdir: Path, files: Certs, model: Path, env: dict[str, str] | None = None) -> Service:
    """A service for this suite: mTLS with the allow-list, a pool of 2 x 128 tokens (batched:
    any prompt that fits is cheap to evaluate; a chat template alone takes about 30), logging
    at INFO (DEBUG would copy every megabyte prompt into the log), serving embeddings too."""
    base = {
        "LLM_TLS_ALLOWED_CLIENTS": "llm-client",
        "LLM_LOG_LEVEL": "INFO",
        "LLM_N_CTX": "128",
        # One compute thread: llama.cpp's threads spin, and two of them on 2 cores shared with
        # other processes wait on each other (measured here: a 31-token prompt 1-7 s, not 0.1).
        "LLM_N_THREADS": "1",
        "LLM_EMBEDDINGS": "1",
    }
    return Service(workdir, files, model, env=base | (env or {}))


@pytest.fixture(scope="module")
def hostile_service(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    model_path: Path,
) -> Iterator[Service]:
    """One service for the whole module: every generated request goes to the same process, so
    a request that breaks it fails the examples after it too."""
    svc = replica(tmp_path_factory.mktemp("hostile"), certs, model_path)
    try:
        yield cap_memory(svc.wait_ready())
    finally:
        assert svc.stop() == 0, svc.log


@pytest.fixture(scope="module")
def hostile_gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    hostile_service: Service,
    certs: Certs,
    keys_file: Path,
) -> Iterator[Gateway]:
    """A gateway with API keys over ``hostile_service`` alone (settings: the module's
    ``GATEWAY_ENV``, if it has one)."""
    env = getattr(request.module, "GATEWAY_ENV", {})
    workdir = tmp_path_factory.mktemp("gateway")
    gw = Gateway(workdir, certs, [hostile_service], env=env, keys_file=keys_file)
    try:
        yield gw.wait_ready(30)
    finally:
        assert gw.stop() == 0, gw.log
