"""llm_service end to end: a real second process, real sockets, real mutual TLS, the real model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.server import SERVICE_NAME
from tests.harness.service import Certs, Service, greedy, pool_status, read_rest, run_stream
from tests.support import run_llm_service

pytestmark = pytest.mark.model

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy output keeps counting: long and predictable
PROBE = greedy("The capital of France is", 24)


async def expect_refused(svc: Service, code: grpc.StatusCode, **channel_args: object) -> str:
    async with svc.channel(**channel_args) as channel:  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await svc.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.value.code() is code, info.value
    return info.value.details() or ""


async def model_info(svc: Service) -> pb.ModelInfo:
    async with svc.channel() as channel:
        return await svc.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


async def test_mutual_tls_matrix(service: Service, certs: Certs) -> None:
    assert (await model_info(service)).pool_size == 2
    handshake_refused = [
        {"no_client_cert": True},
        {"client": certs.foreign},
        {"client": certs.expired},
        {"plaintext": True},
    ]
    for case in handshake_refused:
        await expect_refused(service, grpc.StatusCode.UNAVAILABLE, **case)
        assert (await model_info(service)).name, f"service stopped serving after {case}"
    details = await expect_refused(
        service, grpc.StatusCode.PERMISSION_DENIED, client=certs.intruder
    )
    assert "not allowed" in details
    assert (await model_info(service)).name
    assert "intruder" in service.log


async def test_stream_arrives_token_by_token_and_adds_up(service: Service) -> None:
    async with service.channel() as channel:
        stub = service.stub(channel)
        t0 = time.monotonic()
        arrivals: list[tuple[float, pb.GenerateResponse]] = []
        async for event in stub.Generate(greedy(COUNTING, 64)):
            arrivals.append((time.monotonic() - t0, event))
    kinds = [e.WhichOneof("event") for _, e in arrivals]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"delta"}
    deltas = [e.delta for _, e in arrivals[1:-1]]
    done = arrivals[-1][1].done
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 64 == sum(len(d.token_ids) for d in deltas)
    assert "".join(d.text for d in deltas) == done.text
    # Streamed, not buffered: the first token arrived long before the last one was produced.
    first_delta_at, done_at = arrivals[1][0], arrivals[-1][0]
    assert first_delta_at < done_at / 2, (first_delta_at, done_at)
    assert done.usage.prompt_tokens == arrivals[0][1].started.prompt_tokens > 0


async def test_chat_and_the_text_calls(service: Service) -> None:
    async with service.channel() as channel:
        stub = service.stub(channel)
        tokens = (await stub.Tokenize(pb.TokenizeRequest(text="Hello world"))).tokens
        assert len(tokens) >= 2
        assert (await stub.Detokenize(pb.DetokenizeRequest(tokens=tokens))).text == "Hello world"
        messages = [pb.ChatMessage(role="user", content="Say hi")]
        rendered = await stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=messages))
        assert "<|im_start|>user\nSay hi" in rendered.text
        events = await run_stream(
            stub,
            pb.GenerateRequest(
                chat=pb.Chat(messages=messages),
                sampling=pb.SamplingParams(max_tokens=8, temperature=0),
            ),
        )
        assert events[0].started.prompt_tokens == rendered.prompt_tokens
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.llama_cpp_commit.startswith("0c1e570")
        assert (info.context_per_slot, info.pool_size) == (1024, 2)
        modes = {"contexts": pb.POOL_MODE_CONTEXTS, "batched": pb.POOL_MODE_BATCHED}
        assert info.pool_mode == modes[service.pool_mode]
        assert f"pool ready: {service.pool_mode} mode, 2 " in service.log
        assert info.size_bytes == os.path.getsize(info.path)
        status = await stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status.state == pb.SERVING_STATE_SERVING
        assert status.pool.size == 2 and status.uptime_s > 0


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (greedy("Hi", 5, top_p=1.5), "sampling.top_p"),
        (greedy("Hi", 5, temperature=float("nan")), "sampling.temperature"),
        (pb.GenerateRequest(), "input"),
        (greedy("Hi", 5, grammar="root ::= nonsense("), "sampling.grammar"),
        (greedy("Hi", 5, json_schema="[1, 2"), "sampling.json_schema"),
        (greedy("word " * 1100, 5), "prompt: prompt is"),
        (greedy("Hi", 5000), "sampling.max_tokens"),
        (pb.GenerateRequest(prompt="Hi", request_id="bad id\n"), "request_id"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    service: Service, request_: pb.GenerateRequest, expected: str
) -> None:
    async with service.channel() as channel:
        stub = service.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_stream(stub, request_)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert expected in (info.value.details() or "")
        if "max_tokens" in expected:
            assert "1024" in (info.value.details() or "")  # both numbers: needed and the limit
        # Nothing broke: the pool is whole and the next request works.
        assert (await pool_status(stub)).free == 2
        assert (await run_stream(stub, greedy("Hi", 2)))[-1].HasField("done")


async def test_request_id_from_metadata_is_used_everywhere(service: Service) -> None:
    async with service.channel() as channel:
        call = service.stub(channel).Generate(
            greedy("Hi", 2), metadata=(("x-request-id", "rq-42"),)
        )
        events = [e async for e in call]
        assert dict(await call.initial_metadata())["x-request-id"] == "rq-42"
        unary = service.stub(channel).Tokenize(
            pb.TokenizeRequest(text="x"), metadata=(("x-request-id", "rq-43"),)
        )
        assert (await unary).tokens
        assert dict(await unary.initial_metadata())["x-request-id"] == "rq-43"
    assert events[0].started.request_id == "rq-42"
    assert "[rq-42] Generate from" in service.log
    assert "[rq-42] finished" in service.log


async def test_health_reflection_and_metrics(service: Service) -> None:
    async with service.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflect.ServerReflectionInfo(iter([request]))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        steps_before = step_counts(service)
        prompt_before = service.metric("llm_prompt_tokens_total")
        await run_stream(service.stub(channel), greedy(COUNTING, 3))
    assert service.http_get("/livez")[0] == 200
    status, body = service.readyz()
    assert status == 200 and body["status"] == "serving" and body["pool"]["size"] == 2
    code, text = service.http_get("/metrics")
    assert code == 200
    for series in (
        'llm_requests_total{finish_reason="length"}',
        "llm_generated_tokens_total",
        "llm_prompt_tokens_total",
        "llm_time_to_first_token_seconds_bucket",
        "llm_inter_token_seconds_bucket",
        "llm_request_duration_seconds_bucket",
        "llm_requests_in_flight",
        "llm_queue_depth",
        "llm_pool_free 2.0",
        "llm_pool_replaced",
        "llm_requests_cancelled_total",
    ):
        assert series in text, series
    steps = step_counts(service)
    if service.pool_mode == "contexts":
        assert "llm_batch_steps" not in text  # no batch, no series
    else:  # its prompt in a step, then a step for each token but the first (sampled after it)
        # (at least: the service is shared, a stream of an earlier test may still be ending)
        prompt_tokens = service.metric("llm_prompt_tokens_total") - prompt_before
        assert steps["prompt"][1] - steps_before["prompt"][1] >= prompt_tokens > 0
        assert steps["decode"][0] - steps_before["decode"][0] >= 2
        assert steps["decode"][1] - steps_before["decode"][1] >= 2
        for kind in ("prompt", "decode"):
            assert steps[kind][2] > steps_before[kind][2]


def step_counts(service: Service) -> dict[str, tuple[float, float, float]]:
    """The batch steps' counters by kind: steps, tokens, seconds."""
    return {
        kind: tuple(  # type: ignore[misc]
            service.metric(f"llm_batch_{name}_total", kind=kind)
            for name in ("steps", "step_tokens", "step_seconds")
        )
        for kind in ("prompt", "decode")
    }


async def test_deadline_ends_the_stream_and_frees_the_context(service: Service) -> None:
    deadlines = service.metric("llm_requests_total", finish_reason="deadline")
    cancels = service.metric("llm_requests_cancelled_total")
    async with service.channel() as channel:
        stub = service.stub(channel)
        await pool_status(stub)  # connected: the deadline below is all generation
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for event in stub.Generate(greedy(COUNTING, 900), timeout=1.5):
                received.append(event)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert received and received[0].HasField("started")
        assert not received[-1].HasField("done")
        await wait_free(stub, 2)
    # Counted once, as a deadline, not as a client cancel.
    service.wait_metric(deadlines + 1, "llm_requests_total", finish_reason="deadline")
    assert service.metric("llm_requests_cancelled_total") == cancels


async def wait_free(stub: object, n: int, within_s: float = 1.0) -> None:
    end = time.monotonic() + within_s
    while (free := (await pool_status(stub)).free) != n:  # type: ignore[arg-type]
        assert time.monotonic() < end, f"{free} contexts free after {within_s} s, expected {n}"
        await asyncio.sleep(0.02)


async def test_cancel_frees_the_context_cleared(start_service) -> None:  # type: ignore[no-untyped-def]
    svc: Service = start_service()
    async with svc.channel() as channel:
        stub = svc.stub(channel)
        fresh = (await run_stream(stub, PROBE))[-1].done.text
        long_a = stub.Generate(greedy(COUNTING, 600))
        long_b = stub.Generate(greedy("Once upon a time", 600))
        starts = [await long_a.read(), await long_b.read()]
        # Both run at once, on different contexts.
        assert {s.started.slot for s in starts} == {0, 1}
        for _ in range(5):
            assert (await long_a.read()).HasField("delta")
        long_a.cancel()
        await wait_free(stub, 1)  # a's context is back while b still runs
        long_b.cancel()
        await wait_free(stub, 2)
        # Both contexts (one of them was cancelled mid-stream) give the fresh service's output.
        again = await asyncio.gather(run_stream(stub, PROBE), run_stream(stub, PROBE))
        assert {e[0].started.slot for e in again} == {0, 1}
        assert [e[-1].done.text for e in again] == [fresh, fresh]
    svc.wait_metric(2, "llm_requests_cancelled_total")
    assert svc.metric("llm_requests_total", finish_reason="cancelled") == 2
    assert svc.metric("llm_requests_total", finish_reason="length") == 3
    assert svc.metric("llm_requests_in_flight") == 0
    assert svc.stop() == 0
    assert svc.log.count("cancelled by the client") == 2


async def test_overload_is_resource_exhausted_with_a_retry_hint(start_service) -> None:  # type: ignore[no-untyped-def]
    svc: Service = start_service({"LLM_LLAMA_SERVICE_THREADS": "1", "LLM_MAX_QUEUE": "2"})
    async with svc.channel() as channel:
        stub = svc.stub(channel)

        generated: list[int] = []

        async def one(i: int) -> str:
            call = stub.Generate(greedy(f"{i}, {i + 1}, {i + 2},", 32))
            try:
                events = [e async for e in call]
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert int(dict(exc.trailing_metadata() or ())["retry-after-ms"]) > 0
                return "refused"
            generated.append(events[-1].done.usage.completion_tokens)
            return "ok"

        outcomes = await asyncio.gather(*(one(i) for i in range(10)))
        assert set(outcomes) <= {"ok", "refused"}
        assert outcomes.count("ok") >= 3 and outcomes.count("refused") >= 1, outcomes
        await wait_free(stub, 1)
    assert svc.readyz()[0] == 200
    refused = svc.metric("llm_requests_rejected_total", code="RESOURCE_EXHAUSTED")
    assert refused == outcomes.count("refused")
    assert svc.metric("llm_requests_total", finish_reason="length") == outcomes.count("ok")
    assert svc.metric("llm_generated_tokens_total") == sum(generated)
    assert svc.stop() == 0


async def test_sigterm_drains_running_streams_then_exits_zero(start_service) -> None:  # type: ignore[no-untyped-def]
    svc: Service = start_service()
    async with svc.channel() as channel:
        stub = svc.stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        streams = [stub.Generate(greedy(COUNTING, 400)), stub.Generate(greedy("Once upon", 400))]
        for call in streams:
            assert (await call.read()).HasField("started")
        svc.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # Draining: not ready, not serving, new work refused; running streams go on.
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        status, body = svc.readyz()
        assert (status, body["status"]) == (503, "draining")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_stream(stub, greedy("Hi", 2))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        for call in streams:
            rest = await read_rest(call)
            assert rest[-1].done.usage.completion_tokens == 400
    assert svc.stop() == 0
    assert "stopped" in svc.log


async def test_sigterm_cancels_streams_at_the_grace_limit(start_service) -> None:  # type: ignore[no-untyped-def]
    svc: Service = start_service({"LLM_SHUTDOWN_GRACE": "1"})
    async with svc.channel() as channel:
        stub = svc.stub(channel)
        call = stub.Generate(greedy(COUNTING, 900))
        assert (await call.read()).HasField("started")
        t0 = time.monotonic()
        svc.signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_rest(call)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shut down" in (info.value.details() or "")
        assert 0.8 < time.monotonic() - t0 < 5
    assert svc.stop() == 0
    assert "cancelled 1 stream(s)" in svc.log


async def test_sighup_reloads_certificates_without_dropping_streams(
    tmp_path: Path, model_path: Path
) -> None:
    old = Certs.create(tmp_path / "old")
    svc = Service(tmp_path, old, model_path).wait_ready()
    try:
        async with svc.channel() as channel:
            stub = svc.stub(channel)
            call = stub.Generate(greedy(COUNTING, 300))
            assert (await call.read()).HasField("started")
            new = Certs.create(tmp_path / "new")
            for src, dst in ((new.ca, old.ca), (new.server_cert, old.server_cert),
                             (new.server_key, old.server_key)):  # fmt: skip
                dst.write_bytes(src.read_bytes())
            svc.signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            rest = await read_rest(call)  # the stream on the old connection goes on
            assert rest[-1].done.usage.completion_tokens == 300
        svc.certs = new  # clients now trust the new CA and present the new client cert
        assert (await model_info(svc)).name
        svc.certs = Certs(**{**vars(new), "client": old.client})
        await expect_refused(svc, grpc.StatusCode.UNAVAILABLE)
        assert "TLS certificates re-read" in svc.log
    finally:
        assert svc.stop() == 0


async def test_plaintext_only_when_asked(start_service) -> None:  # type: ignore[no-untyped-def]
    svc: Service = start_service(tls=False)
    async with svc.channel(plaintext=True) as channel:
        assert (await run_stream(svc.stub(channel), greedy("Hi", 2)))[-1].HasField("done")
    assert "--insecure" in svc.log
    assert svc.stop() == 0


def test_no_tls_material_and_no_insecure_says_how_to_fix() -> None:
    result = run_llm_service("serve")
    assert result.returncode == 2
    assert "--tls-cert" in result.stderr and "--insecure" in result.stderr
    assert "llm_service certs" in result.stderr


def test_unusable_settings_fail_with_the_flag_named(certs: Certs, tmp_path: Path) -> None:
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
           "--tls-ca", str(certs.ca)]  # fmt: skip
    result = run_llm_service("serve", *tls, "--grpc-addr", "nowhere")
    assert result.returncode == 2 and "--grpc-addr" in result.stderr
    missing = tmp_path / "missing.pem"
    result = run_llm_service("serve", *tls[:4], "--tls-ca", str(missing))
    assert result.returncode == 2 and f"--tls-ca: cannot read client CA {missing}" in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o660])
def test_a_server_key_others_may_read_is_refused(certs: Certs, tmp_path: Path, mode: int) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(certs.server_key.read_bytes())
    key.chmod(mode)
    result = run_llm_service("serve", "--tls-cert", str(certs.server_cert), "--tls-key", str(key),
                             "--tls-ca", str(certs.ca))  # fmt: skip
    assert result.returncode == 2
    assert f"--tls-key: server key {key} has permissions {mode:04o}" in result.stderr
    assert f"chmod 600 {key}" in result.stderr
    assert "Traceback" not in result.stderr


def test_certs_command_writes_private_keys(tmp_path: Path) -> None:
    result = run_llm_service("certs", "--out", str(tmp_path / "c"), "--san", "llm.example")
    assert result.returncode == 0, result.stderr
    for name in ("ca", "server", "client"):
        assert (tmp_path / "c" / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "c" / f"{name}.crt").exists()
    text = (tmp_path / "c" / "server.crt").read_bytes()
    from cryptography import x509

    sans = x509.load_pem_x509_certificate(text).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert {"localhost", "llm.example"} <= set(sans.value.get_values_for_type(x509.DNSName))


def test_a_key_that_does_not_match_the_certificate_is_named(certs: Certs) -> None:
    result = run_llm_service(
        "serve", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.client.key),
        "--tls-ca", str(certs.ca),
    )  # fmt: skip
    assert result.returncode == 2
    assert "--tls-key" in result.stderr and "is not the private key of" in result.stderr


def test_insecure_with_tls_settings_is_refused(certs: Certs) -> None:
    result = run_llm_service("serve", "--insecure", "--tls-ca", str(certs.ca))
    assert result.returncode == 2
    assert "--insecure" in result.stderr and "--tls-ca" in result.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # naming TLS 1.0 and 1.1 is deprecated
@pytest.mark.parametrize(
    ("versions", "accepted"),
    [
        ((ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1), False),
        ((ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2), True),
        ((ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3), True),
    ],
)
def test_tls_1_2_or_later_only(
    service: Service, certs: Certs, versions: tuple[ssl.TLSVersion, ssl.TLSVersion], accepted: bool
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs.ca)
    context.load_cert_chain(certs.client.cert, certs.client.key)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old versions at all
    context.minimum_version, context.maximum_version = versions
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", service.grpc_port), timeout=10) as raw:
        if accepted:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        else:
            with pytest.raises(ssl.SSLError) as info:
                context.wrap_socket(raw, server_hostname="localhost")
            # The server hung up on the hello, or sent a protocol_version alert: not this client
            # declining to offer the old versions (NO_PROTOCOLS_AVAILABLE).
            error = info.value
            assert isinstance(error, ssl.SSLEOFError) or "VERSION" in str(error).upper(), error


CLIENT_THAT_DIES = """
import asyncio, sys, grpc
from llm_service.api.v1 import llm_pb2 as pb, llm_pb2_grpc

async def main(port, ca, cert, key):
    read = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        stub = llm_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(
            prompt="1, 2, 3, 4,", sampling=pb.SamplingParams(max_tokens=900, temperature=0)
        )
        async for event in stub.Generate(request):
            if event.HasField("delta"):
                print("streaming", flush=True)
                await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_client_that_dies_mid_stream_gives_its_context_back(service: Service) -> None:
    certs = service.certs
    assert certs is not None
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_THAT_DIES, str(service.grpc_port), str(certs.ca),
         str(certs.client.cert), str(certs.client.key)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "streaming"
        async with service.channel() as channel:
            stub = service.stub(channel)
            assert (await pool_status(stub)).free == 1
            client.kill()  # no goodbye: the connection just drops
            client.wait()
            await wait_free(stub, 2)
    finally:
        client.kill()
        client.wait()
