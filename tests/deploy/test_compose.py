"""deploy/compose.yaml: two replicas and the gateway, with certificates that `llm_service certs`
really writes, readable by the servers' user."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.deploy.layout import (
    DEPLOY,
    gateway_env_names,
    gateway_routes,
    port_of,
    service_env_names,
    service_routes,
)

REPLICAS = ("llm-service-1", "llm-service-2")
# Compose's ${NAME:-default} interpolation, as Compose does it with NAME unset.
_VARIABLE = re.compile(r"\$\{([A-Z_]+):-([^}]*)\}")


def _interpolate(value: Any) -> Any:
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: m[2], value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (DEPLOY / "compose.yaml").open() as f:
        return _interpolate(yaml.safe_load(f))  # type: ignore[no-any-return]


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """mount path -> (volume, mode)"""
    mounts = {}
    for spec in service.get("volumes", []):
        volume, path, *mode = spec.split(":")
        mounts[path] = (volume, mode[0] if mode else "rw")
    return mounts


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+/\w+", " ".join(test))
    return url


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"certs", "model", *REPLICAS, "gateway"}
    assert set(compose["volumes"]) == {"certs", "models"}
    # One image for all, built from deploy/Dockerfile with a variant it has.
    for name, service in compose["services"].items():
        assert service["image"] == "llm-service:cpu", name
        assert service["build"] == {
            "context": "..",
            "dockerfile": "deploy/Dockerfile",
            "args": {"VARIANT": "cpu-all"},
        }
        assert (DEPLOY / service["build"]["context"] / "deploy" / "Dockerfile").is_file()


def test_replicas(compose: dict[str, Any]) -> None:
    for name in REPLICAS:
        service = compose["services"][name]
        env = service["environment"]
        assert set(env) <= service_env_names(), set(env) - service_env_names()
        assert service["command"] == ["serve"]
        assert env["LLM_GRPC_ADDR"].startswith("0.0.0.0:")
        url = _healthcheck_url(service)
        assert url == f"http://127.0.0.1:{port_of(env['LLM_HTTP_ADDR'])}/readyz"
        assert "/readyz" in service_routes()
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > float(env["LLM_SHUTDOWN_GRACE"])
        assert _mounts(service)["/certs"] == ("certs", "ro")
        assert _mounts(service)[env["LLM_MODEL_CACHE"]][0] == "models"
        assert service["depends_on"]["certs"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["model"]["condition"] == "service_completed_successfully"
    model = compose["services"]["model"]
    assert model["command"] == ["fetch-model"]
    assert _mounts(model)[model["environment"]["LLM_MODEL_CACHE"]] == ("models", "rw")


def test_the_gateway_reaches_both_replicas(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    assert set(env) <= gateway_env_names(), set(env) - gateway_env_names()
    assert Path(gateway["entrypoint"][0]).name == "llm-gateway"
    backends = env["LLM_GATEWAY_BACKENDS"].split()
    assert backends == [
        f"{n}:{port_of(compose['services'][n]['environment']['LLM_GRPC_ADDR'])}" for n in REPLICAS
    ]
    listen = port_of(env["LLM_GATEWAY_LISTEN"])
    assert gateway["ports"] == [f"8000:{listen}"]
    path = _healthcheck_url(gateway).rpartition("/")[2]
    assert _healthcheck_url(gateway) == f"http://127.0.0.1:{listen}/{path}"
    assert f"/{path}" in gateway_routes()
    assert _mounts(gateway)["/certs"] == ("certs", "ro")
    grace = float(gateway["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["LLM_GATEWAY_SHUTDOWN_GRACE"])


def test_the_certificates_are_written_once_by_the_servers_user(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Runs the cert service's own command (with llm_service from this venv) and checks that
    it writes every file the servers and the gateway are given, as keys they accept."""
    services = compose["services"]
    certs = services["certs"]
    assert _mounts(certs)["/certs"] == ("certs", "rw")
    users = {s["user"] for s in services.values()}
    assert users == {"10001:10001"}, "the key files are 0600: one uid writes and reads them"
    assert certs["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = certs["command"]
    out = tmp_path / "certs"
    out.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    script = script.replace("/certs", str(out))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True, capture_output=True)
    first = (out / "ca.crt").read_bytes()
    # A second start keeps the first one's certificates (a new CA would lock clients out).
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True, capture_output=True)
    assert (out / "ca.crt").read_bytes() == first

    args = shlex.split(script.partition("||")[2])
    sans = [args[i + 1] for i, a in enumerate(args) if a == "--san"]
    assert sans == list(REPLICAS)
    client_name = args[args.index("--client-name") + 1]

    given = [v for s in services.values() for v in s.get("environment", {}).values()]
    files = {Path(v).name for v in given if isinstance(v, str) and v.startswith("/certs/")}
    assert files == {"ca.crt", "server.crt", "server.key", "client.crt", "client.key"}
    for name in files:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        if name.endswith(".key"):
            assert mode == 0o600, oct(mode)
    # The server certificate names both replicas; the client one is the gateway's.
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(REPLICAS) <= set(names.get_values_for_type(x509.DNSName))
    client = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == client_name
