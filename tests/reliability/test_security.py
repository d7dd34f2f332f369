"""Security of the gateway -> replica link and of API keys, against real processes.

- The mutual-TLS matrix of the service, repeated with the gateway as the client: only the
  right certificate, from the right CA, on the allow-list, unexpired, gets through; anything
  else leaves the replica out of rotation with the reason in /readyz and the log.
- API keys: never in the gateway's log (DEBUG included) nor echoed in an error.
- Start-up refuses a private key others may read.
- No request makes the service read a file or fetch a URL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_service.certs import new_ca
from tests.harness.gateway import KEY, MODEL, Gateway, running_gateway
from tests.harness.service import Certs, ClientCert, Service, greedy, pool_status

pytestmark = pytest.mark.model


def gateway_with(
    tmp_path: Path,
    certs: Certs,
    replicas: list[Service],
    env: dict[str, str],
) -> Gateway:
    return Gateway(tmp_path, certs, replicas[:1], env={"LLM_GATEWAY_HEALTH_INTERVAL": "0.3"} | env)


def replica_state(gw: Gateway, timeout: float = 20) -> dict[str, Any]:
    """The replica's entry in /readyz, once the gateway has judged it."""
    end = time.monotonic() + timeout
    while True:
        if gw.process.poll() is not None:
            raise AssertionError(f"the gateway exited {gw.process.returncode}:\n{gw.log}")
        try:
            status, body = gw.readyz()
            entry: dict[str, Any] = body["backends"][0]
            if entry["state"] != "unknown":
                return entry | {"status": status}
        except OSError:
            pass
        assert time.monotonic() < end, f"no verdict on the replica:\n{gw.log}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other-ca") / "ca.crt"
    path.write_bytes(new_ca("another CA").cert_pem)
    return path


def tls_env(ca: Path, client: ClientCert | None) -> dict[str, str]:
    env = {"LLM_GATEWAY_TLS_CA": str(ca)}
    if client is None:  # no client certificate at all
        env |= {"LLM_GATEWAY_TLS_CERT": "", "LLM_GATEWAY_TLS_KEY": ""}
    else:
        env |= {"LLM_GATEWAY_TLS_CERT": str(client.cert), "LLM_GATEWAY_TLS_KEY": str(client.key)}
    return env


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("good", None),
        ("no client certificate", "UNAVAILABLE"),
        ("client certificate from another CA", "UNAVAILABLE"),
        ("expired client certificate", "UNAVAILABLE"),
        ("client not on the allow-list", "PERMISSION_DENIED"),
        ("server certificate from an unknown CA", "UNAVAILABLE"),
        ("plaintext to a TLS replica", "UNAVAILABLE"),
    ],
)
def test_the_gateway_to_replica_link_needs_mutual_tls(
    case: str,
    reason: str | None,
    tmp_path: Path,
    certs: Certs,
    backends: list[Service],
    other_ca: Path,
) -> None:
    env = {
        "good": tls_env(certs.ca, certs.client),
        "no client certificate": tls_env(certs.ca, None),
        "client certificate from another CA": tls_env(certs.ca, certs.foreign),
        "expired client certificate": tls_env(certs.ca, certs.expired),
        "client not on the allow-list": tls_env(certs.ca, certs.intruder),
        "server certificate from an unknown CA": tls_env(other_ca, certs.client),
        "plaintext to a TLS replica": {
            "LLM_GATEWAY_INSECURE_BACKENDS": "1",
            "LLM_GATEWAY_TLS_CA": "",
            "LLM_GATEWAY_TLS_CERT": "",
            "LLM_GATEWAY_TLS_KEY": "",
            "LLM_GATEWAY_CERTS_DIR": str(tmp_path / "none"),
        },
    }[case]
    if case == "no client certificate":
        env["LLM_GATEWAY_CERTS_DIR"] = str(tmp_path / "none")
    gw = gateway_with(tmp_path, certs, backends, env)
    try:
        entry = replica_state(gw)
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=60,
        )
        if reason is None:
            assert entry["state"] == "healthy" and entry["status"] == 200
            assert answer.status_code == 200, answer.text
        else:
            assert entry["state"] == "unhealthy" and entry["status"] == 503, entry
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["type"]
            if reason == "PERMISSION_DENIED":
                assert "not allowed" in entry["last_error"] or "PERMISSION" in entry["last_error"]
    finally:
        assert gw.stop() == 0, gw.log


def test_api_keys_are_never_logged_nor_echoed(gateway_with_keys: Gateway) -> None:
    wrong = "sk-wrong-" + "S3CRET" * 4
    url = gateway_with_keys.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    refused = httpx.post(url, json=body, headers={"Authorization": f"Bearer {wrong}"}, timeout=60)
    assert refused.status_code == 401
    assert wrong not in refused.text and "S3CRET" not in refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    served = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert served.status_code == 200, served.text
    # A key sent where no key belongs (the body, a header) is not echoed either.
    odd = httpx.post(url, json=body | {"model": wrong}, headers={"X-Api-Key": wrong}, timeout=60)
    assert odd.status_code == 401 and wrong not in odd.text
    log = gateway_with_keys.log
    assert "DEBUG" in log  # the most talkative level
    assert "key-2" in log  # the caller is logged by the name of its key's line...
    for secret in (wrong, "S3CRET", KEY):  # ...never by the key
        assert secret not in log, secret


@pytest.fixture(scope="module")
def gateway_with_keys(
    tmp_path_factory: pytest.TempPathFactory,
    certs: Certs,
    backends: list[Service],
    keys_file: Path,
) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gw"), certs, backends, keys_file=keys_file) as gw:
        yield gw


@pytest.mark.parametrize("mode", [0o644, 0o666])
def test_the_gateway_refuses_a_client_key_others_may_read(
    tmp_path: Path,
    certs: Certs,
    mode: int,
) -> None:
    key = tmp_path / "client.key"
    key.write_bytes(certs.client.key.read_bytes())
    key.chmod(mode)
    result = subprocess.run(
        [sys.executable, "-m", "llm_service.gateway", "--backend", "127.0.0.1:1",
         "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client.cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"client key {key} has permissions {mode:04o}" in result.stderr
    assert f"chmod 600 {key}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "schema",
    [
        '{"$ref": "file:///etc/passwd"}',
        '{"$ref": "https://example.com/schema.json"}',
        '{"properties": {"a": {"$ref": "/etc/hostname"}}}',
        '{"allOf": [{"$ref": "../../etc/passwd#/x"}]}',
    ],
)
async def test_no_request_makes_the_service_read_a_file(
    schema: str,
    backends: list[Service],
) -> None:
    svc = backends[0]
    request = greedy("Hi", 2)
    request.sampling.json_schema = schema
    async with svc.channel() as channel:
        stub = svc.stub(channel)
        with pytest.raises(Exception) as info:
            [e async for e in stub.Generate(request)]
        assert info.value.code().name == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        assert "points outside the schema" in info.value.details()  # type: ignore[attr-defined]
        # A grammar has no way to name a file: a path is only text it must match.
        request = greedy("Hi", 2, grammar='root ::= "/etc/passwd"')
        events = [e async for e in stub.Generate(request)]
        assert events[-1].done.text in ("/etc/passwd"[:n] for n in range(12))
        assert (await pool_status(stub)).leased == 0


def test_a_model_name_is_not_a_path(gateway_with_keys: Gateway) -> None:
    for model in ("/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd"):
        answer = httpx.post(
            gateway_with_keys.url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "model_not_found"
        assert "root:" not in answer.text
