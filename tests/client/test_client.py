"""The Python client against a real llm_service: a second process, mutual TLS, real sockets, on
the fake backend (``LLM_BACKEND=fake``: every reply counts "1, 2, 3, ..." at about 100 tokens/s).

What is tested here is the client: streams, cancellation, deadlines, errors, retries, TLS. What
the model says is the server's and the engine's business, tested on the real model there.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llm_service import errors
from llm_service.certs import new_ca
from llm_service.client import AsyncClient, Client, FinishReason
from llm_service.settings import ClientSettings, ServiceSettings
from tests.client.conftest import options, target
from tests.harness.service import Certs, Service, free_port

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
LONG = 900  # tokens: far more than a test waits for (the fake's reply never stops sooner)


@pytest.fixture(scope="session")
def model_path() -> None:
    """No model: the services of this module serve the fake backend."""
    return None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Service]:
    """The module's shared service: fake backend, mTLS, allow-list {llm-client}, pool of 2."""
    svc = Service(
        tmp_path_factory.mktemp("fake-service"),
        certs,
        None,
        env={"LLM_TLS_ALLOWED_CLIENTS": "llm-client"},
    )
    try:
        yield svc.wait_ready()
    finally:
        assert svc.stop() == 0, svc.log


def wait_all_free(client: Client, within: float = 1.0) -> float:
    """Wait until every context of the service is free; return how long it took."""
    started = time.monotonic()
    while (pool := client.status().pool).free != pool.size:
        assert time.monotonic() - started < within, f"contexts still leased: {pool}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_sync_stream_adds_up_to_the_completion(
    client: Callable[..., Client], service: Service
) -> None:
    c = client()
    chunks = list(c.stream(COUNTING, max_tokens=12, temperature=0))
    last = chunks[-1]
    assert last.final and not any(ch.final for ch in chunks[:-1])
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert sum(len(ch.token_ids) for ch in chunks) == 12
    assert last.timings is not None and last.timings.time_to_first_token_ms
    done = c.generate(COUNTING, max_tokens=12, temperature=0, request_id="rq-whole")
    assert done.text == "".join(ch.text for ch in chunks)
    time.sleep(0.2)
    assert "[rq-whole] finished: length" in service.log
    assert "[rq-whole] call cancelled" not in service.log  # a finished call is not cancelled
    assert done.text == "1, 2, 3, 4, "  # the fake's reply, a byte a token
    assert done.request_id == "rq-whole"


async def test_async_stream_and_chat_messages(aclient: AsyncClient) -> None:
    chunks = [ch async for ch in aclient.stream(COUNTING, max_tokens=12, temperature=0)]
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    sync_text = "".join(ch.text for ch in chunks)
    assert (await aclient.generate(COUNTING, max_tokens=12, temperature=0)).text == sync_text
    reply = await aclient.generate(
        [{"role": "system", "content": "Be brief."}, ("user", "Say hello.")],
        max_tokens=24,
        temperature=0,
    )
    assert reply.text and reply.usage.prompt_tokens > 5
    text, n = await aclient.apply_chat_template([("user", "Hi")])
    assert "Hi" in text and n > 1


async def test_text_calls_and_inspection(aclient: AsyncClient) -> None:
    tokens = await aclient.tokenize("Hello world", add_special=False)
    assert await aclient.detokenize(tokens) == "Hello world"
    info = await aclient.model_info()
    assert info.pool_size == 2 and info.context_per_slot == 1024 and info.has_chat_template
    status = await aclient.status()
    assert status.state == "serving" and status.pool.size == 2
    assert await aclient.health() == "SERVING"
    assert await aclient.health("llm.v1.Inference") == "SERVING"
    assert await aclient.health("no.such.Service") == "SERVICE_UNKNOWN"


@pytest.mark.parametrize("how", ["break in with", "close", "dropped"])
def test_leaving_a_sync_stream_early_cancels_it_on_the_server(
    client: Callable[..., Client], service: Service, how: str
) -> None:
    c = client()
    cancelled = service.metric("llm_requests_cancelled_total")
    if how == "break in with":
        with c.stream(COUNTING, max_tokens=LONG, temperature=0) as stream:
            for i, _ in enumerate(stream):
                if i == 2:
                    break
    elif how == "close":
        stream = c.stream(COUNTING, max_tokens=LONG, temperature=0)
        next(stream), next(stream)
        stream.close()
    else:
        for i, _ in enumerate(c.stream(COUNTING, max_tokens=LONG, temperature=0)):
            if i == 2:
                break  # the stream is garbage once the loop is left
        gc.collect()
    wait_all_free(c)
    service.wait_metric(cancelled + 1, "llm_requests_cancelled_total")


async def test_leaving_an_async_stream_early_cancels_it_on_the_server(
    aclient: AsyncClient, client: Callable[..., Client], service: Service
) -> None:
    cancelled = service.metric("llm_requests_cancelled_total")
    async with aclient.stream(COUNTING, max_tokens=LONG, temperature=0) as stream:
        async for chunk in stream:
            if chunk.token_ids:
                break
    stream = aclient.stream(COUNTING, max_tokens=LONG, temperature=0)
    await anext(stream)
    del stream  # garbage collection cancels too
    task = asyncio.create_task(aclient.generate(COUNTING, max_tokens=LONG, temperature=0))
    await asyncio.sleep(0.5)
    task.cancel()  # and so does cancelling the task that waits for it
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(wait_all_free, client())
    service.wait_metric(cancelled + 3, "llm_requests_cancelled_total")


def test_ctrl_c_while_reading_cancels_the_stream(
    client: Callable[..., Client], service: Service
) -> None:
    c = client()
    cancelled = service.metric("llm_requests_cancelled_total")
    stream = c.stream(COUNTING, max_tokens=LONG, temperature=0)
    next(stream)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    wait_all_free(c)
    service.wait_metric(cancelled + 1, "llm_requests_cancelled_total")


def test_deadline_per_call(client: Callable[..., Client]) -> None:
    c = client(timeout=30)
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceededError) as info:
        c.generate(COUNTING, max_tokens=LONG, temperature=0, timeout=0.5)
    assert time.monotonic() - started < 3
    assert info.value.status == "DEADLINE_EXCEEDED" and info.value.request_id
    wait_all_free(c)


def test_invalid_requests_name_the_field_and_the_request(client: Callable[..., Client]) -> None:
    c = client()
    with pytest.raises(errors.InvalidRequestError) as invalid:
        c.generate("Hi", top_p=1.5, request_id="rq-top-p")
    assert invalid.value.field == "sampling.top_p"
    assert str(invalid.value) == "sampling.top_p: must be in (0, 1], got 1.5"
    assert (invalid.value.status, invalid.value.request_id) == ("INVALID_ARGUMENT", "rq-top-p")
    with pytest.raises(errors.InvalidRequestError) as role:
        c.generate([("user", "Hi"), ("wizard", "?")])
    assert role.value.field == "messages[1].role"
    with pytest.raises(errors.PromptTooLongError) as too_long:
        c.generate("Hi", max_tokens=5000)
    assert (too_long.value.requested_tokens, too_long.value.limit) == (
        too_long.value.prompt_tokens + 5000,
        1024,
    )
    assert c.generate("Hi", max_tokens=2).usage.completion_tokens == 2


def test_refused_certificates_and_unreachable_targets(
    client: Callable[..., Client], service: Service, certs: Certs, tmp_path: Path
) -> None:
    with pytest.raises(errors.PermissionDeniedError) as denied:
        client(client=certs.intruder).model_info()
    assert denied.value.status == "PERMISSION_DENIED"

    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(new_ca("not the service's CA").cert_pem)
    refused = [
        Client(f"127.0.0.1:{free_port()}", **options(certs, max_retries=0)),  # nothing there
        Client(target(service), **options(certs, client=certs.foreign, max_retries=0)),
        Client(target(service), tls_ca=certs.ca, max_retries=0),  # no client certificate
        Client(
            target(service),
            **options(certs, max_retries=0) | {"tls_ca": other_ca},  # untrusted server
        ),
        Client(target(service), insecure=True, max_retries=0),  # plaintext to a TLS port
    ]
    for c in refused:
        with c, pytest.raises(errors.ConnectionFailedError) as failed:
            c.model_info(timeout=10)
        assert failed.value.status == "UNAVAILABLE"
        assert str(failed.value).startswith("cannot reach the service")
    assert client().health() == "SERVING"


def test_overload_is_retried_with_back_off_then_reported(
    start_service: Callable[..., Service], certs: Certs
) -> None:
    svc = start_service({"LLM_LLAMA_SERVICE_THREADS": "1", "LLM_MAX_QUEUE": "0"})
    with (
        Client(target(svc), **options(certs)) as c,
        Client(target(svc), **options(certs, max_retries=0)) as impatient,
    ):
        hold = c.stream(COUNTING, max_tokens=LONG, temperature=0)
        next(hold)
        with pytest.raises(errors.OverloadedError) as overloaded:
            impatient.generate("Hi", max_tokens=2)
        assert overloaded.value.retry_after_s == 1.0
        assert overloaded.value.status == "RESOURCE_EXHAUSTED"
        # Retried: the context frees up while the client backs off (about 1 s, the hint).
        threading.Timer(0.3, hold.close).start()
        assert c.generate("Hi", max_tokens=2).usage.completion_tokens == 2
        assert svc.metric("llm_requests_rejected_total", code="RESOURCE_EXHAUSTED") >= 2


def test_draining_service_is_unavailable_not_a_connection_failure(
    start_service: Callable[..., Service], certs: Certs
) -> None:
    svc = start_service()
    with Client(target(svc), **options(certs, max_retries=0)) as c:
        hold = c.stream(COUNTING, max_tokens=LONG, temperature=0)
        next(hold)
        svc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while svc.readyz()[0] == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(errors.UnavailableError) as info:
            c.generate("Hi", max_tokens=2)
        assert type(info.value) is errors.UnavailableError
        hold.close()
    assert svc.stop() == 0


def test_settings_from_the_environment_and_the_development_certificates(
    service: Service, certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's run command serves here; a client with no settings must find it.
    assert ClientSettings().target == ServiceSettings().grpc_addr == "127.0.0.1:50051"
    for name in ("ca.crt", "client.crt", "client.key"):
        shutil.copy(certs.dir / name, tmp_path / name)  # with its mode: keys stay private
    monkeypatch.setenv("LLM_TARGET", target(service))
    monkeypatch.setenv("LLM_CERTS_DIR", str(tmp_path))
    with Client.from_settings() as c:
        assert c.health() == "SERVING"
    monkeypatch.setenv("LLM_CERTS_DIR", str(tmp_path / "none"))
    with pytest.raises(errors.ConfigurationError, match="no TLS material"):
        Client.from_settings()
