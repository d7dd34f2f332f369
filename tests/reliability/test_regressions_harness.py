"""Regression tests for the defects the reliability harness (``bench/reliability.py``) found,
each reduced to its smallest reproduction. A test marked ``xfail(strict=True)`` documents a
defect not fixed yet: fixing it makes the test pass, and the marker must then go."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llm_service.client import AsyncClient
from llm_service.errors import ConnectionFailedError, ConnectionLostError, UnavailableError
from tests.harness.fixtures import Rig
from tests.harness.service import Certs, Service, greedy

CANCELS = 100


async def test_client_cancels_mid_stream_are_cancels_not_internal_errors(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by the harness: an abandoned stream logged as an internal error on its replica.
    Many cancels, each after a few messages, so that some land while a write is in flight (about
    one in five on 2 cores; before 35ef97b, none of them was an error)."""
    caplog.set_level(logging.ERROR, logger="llm_service")
    for _ in range(CANCELS):
        rig.backend.enqueue("x" * 300)
        call = rig.stub.Generate(greedy("x", 300))
        for _ in range(3):
            await call.read()
        call.cancel()
        assert await rig.servicer.wait_idle(2)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], f"{len(errors)} of {CANCELS} cancels logged as {errors[0]!r}"
    assert rig.metrics.requests.labels("error")._value.get() == 0
    assert rig.metrics.cancelled._value.get() == CANCELS


@pytest.mark.model
async def test_a_replica_killed_mid_stream_is_not_reported_as_unreachable(
    tmp_path: Path, certs: Certs, model_path: Path
) -> None:
    """Found by the harness's SIGKILL phase: the error event of a stream cut by the kill."""
    replica = Service(tmp_path, certs, model_path).wait_ready()
    try:
        options = {"tls_ca": certs.ca, "tls_cert": certs.client.cert, "tls_key": certs.client.key}
        async with AsyncClient(f"localhost:{replica.grpc_port}", **options) as client:  # type: ignore[arg-type]
            with pytest.raises(UnavailableError) as info:
                async with client.stream("1, 2, 3,", max_tokens=400, temperature=0) as stream:
                    async for chunk in stream:
                        if chunk.text:
                            replica.process.kill()  # SIGKILL, as the harness does
    finally:
        replica.process.kill()
        replica.process.wait()
    assert not isinstance(info.value, ConnectionFailedError), str(info.value)
    assert isinstance(info.value, ConnectionLostError), str(info.value)
    assert "handshake" not in str(info.value)
