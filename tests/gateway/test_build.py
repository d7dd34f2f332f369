"""``build_gateway``: start-up checks name the gateway's own options."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_service.certs import write_dev_certs
from llm_service.errors import ConfigurationError
from llm_service.gateway import build_gateway
from llm_service.settings import GatewaySettings, ServiceSettings


def settings(tmp_path: Path, **values: object) -> GatewaySettings:
    values = {"backends": ("127.0.0.1:1",)} | values
    return GatewaySettings(certs_dir=tmp_path / "none", **values)  # type: ignore[arg-type]


def test_no_tls_material_names_the_gateway_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build_gateway(settings(tmp_path))
    message = str(caught.value)
    assert "--tls-ca / LLM_GATEWAY_TLS_CA" in message
    assert "--insecure-backends / LLM_GATEWAY_INSECURE_BACKENDS" in message
    assert "LLM_TLS_CA" not in message.replace("LLM_GATEWAY_TLS_CA", "")


def test_insecure_backends_with_tls_files_is_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigurationError, match=r"^--insecure-backends / LLM_GATEWAY"):
        build_gateway(settings(tmp_path, insecure_backends=True, tls_ca=ca))


def test_a_tls_file_that_is_not_pem_is_named(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match=r"^--tls-ca / LLM_GATEWAY_TLS_CA: .* not a PEM"):
        build_gateway(settings(tmp_path, tls_ca=ca))


def test_a_client_key_others_may_read_is_refused(tmp_path: Path) -> None:
    files = write_dev_certs(tmp_path / "certs")
    files["client.key"].chmod(0o644)
    with pytest.raises(
        ConfigurationError, match=r"^--tls-key / LLM_GATEWAY_TLS_KEY: client key .* 0644"
    ):
        build_gateway(
            settings(
                tmp_path,
                tls_ca=files["ca.crt"],
                tls_cert=files["client.crt"],
                tls_key=files["client.key"],
            )
        )


def test_no_backend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"--backend HOST:PORT"):
        build_gateway(GatewaySettings(insecure_backends=True))


def test_a_discovery_name_without_port_is_refused() -> None:
    with pytest.raises(ValidationError, match="expected NAME:PORT"):
        GatewaySettings(discover=("replicas.llm.svc",), insecure_backends=True)
    with pytest.raises(ValidationError, match="expected HOST:PORT"):
        GatewaySettings(discover=("a:1",), dns_server="10.0.0.10", insecure_backends=True)


def test_a_discovery_name_is_enough_to_start(tmp_path: Path) -> None:
    values = {"backends": (), "discover": ("replicas.test:50051",), "insecure_backends": True}
    gateway = build_gateway(settings(tmp_path, **values))
    assert gateway.pool.backends == []  # resolved when the gateway starts


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # (not the developer's own certificates, which `llm_service certs` puts in their config)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("LLM_GATEWAY_TLS_CERT", "")
    monkeypatch.setenv("LLM_GATEWAY_BACKENDS", "")
    monkeypatch.setenv("LLM_MODEL_PATH", "")
    assert GatewaySettings().tls_cert is None and GatewaySettings().backends == ()
    assert ServiceSettings().model_path is None
