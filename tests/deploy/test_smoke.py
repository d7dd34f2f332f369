"""deploy/smoke: in agreement with the image, the settings and the Compose file it drives (in
seconds, with no container engine). The full run (a real image build, replicas and a gateway in
containers) is opt-in: LLM_TEST_CONTAINERS=1, on a host with podman or docker; the first run takes
about 15 minutes on 2 cores, most of it compiling llama.cpp (docs/operations.md)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.layout import (
    DEPLOY,
    DOCKERFILE,
    ROOT,
    console_scripts,
    dockerfile_stages,
    gateway_env_names,
    gateway_routes,
    service_env_names,
    service_routes,
)

SMOKE = DEPLOY / "smoke"


def _smoke() -> str:
    return SMOKE.read_text()


def test_it_is_an_executable_bash_script_that_parses() -> None:
    assert os.access(SMOKE, os.X_OK)
    assert _smoke().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(SMOKE)], check=True)


def test_help_and_a_bad_argument_need_no_engine() -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "LLM_SMOKE_ENGINE": "/nonexistent"}
    shown = subprocess.run([SMOKE, "--help"], capture_output=True, text=True, env=env, check=False)
    assert shown.returncode == 0 and "deploy/smoke [--bases" in shown.stdout
    bad = subprocess.run([SMOKE, "--bogus"], capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_the_build_arguments_it_passes_are_the_dockerfiles() -> None:
    args = {a.partition("=")[0] for i, a in dockerfile_stages()[""] if i == "ARG"}
    passed = set(re.findall(r"--build-arg \"?([A-Z_]+)=", _smoke()))
    assert passed == {"VARIANT", "CPU_BUILDER_IMAGE", "CPU_RUNTIME_IMAGE", "PYTHON_PATH"}
    assert passed <= args
    # The registry bases it tries to pull are the Dockerfile's defaults.
    text = DOCKERFILE.read_text()
    assert "ARG CPU_BUILDER_IMAGE=python:${PYTHON_VERSION}-bookworm" in text
    assert "ARG CPU_RUNTIME_IMAGE=python:${PYTHON_VERSION}-slim-bookworm" in text
    assert "REGISTRY_BUILDER=docker.io/library/python:$PYTHON_VERSION-bookworm" in _smoke()
    assert "REGISTRY_RUNTIME=docker.io/library/python:$PYTHON_VERSION-slim-bookworm" in _smoke()
    # Debian's python3.11, which both Debian bases hold at the path it names.
    assert "PYTHON_PATH=/usr/bin/python3.11" in _smoke()
    assert "python3.11-venv" in _smoke()


def test_the_paths_it_uses_in_the_image_exist() -> None:
    runtime = " ".join(a for _, a in dockerfile_stages()["runtime"])
    assert "/opt/llm-service/bin/check-runtime" in runtime
    for path in re.findall(r"/opt/llm-service/venv/bin/([\w-]+)", _smoke()):
        assert path in console_scripts() or path == "python", path
    for path in ("deploy/Dockerfile", "deploy/Dockerfile.dockerignore", "deploy/compose.yaml"):
        assert path in _smoke() and (ROOT / path).is_file(), path
    user = [a for i, a in dockerfile_stages()["runtime"] if i == "USER"]
    assert user == ["10001:10001"] and "10001:10001" in _smoke()


def test_the_settings_it_sets_exist() -> None:
    names = set(re.findall(r"-e \"?(LLM_[A-Z_]+)=", _smoke()))
    assert {"LLM_GRPC_ADDR", "LLM_TLS_CERT", "LLM_GATEWAY_BACKENDS", "LLM_GATEWAY_TLS_CA"} <= names
    for name in names:
        assert name in service_env_names() | gateway_env_names(), name
    # The routes it waits on.
    assert "/readyz" in service_routes() and "/healthz" in gateway_routes()
    assert "/readyz" in _smoke() and "/healthz" in _smoke()


@pytest.mark.skipif(
    os.environ.get("LLM_TEST_CONTAINERS") != "1",
    reason="builds the image and runs containers (~15 min on 2 cores): set LLM_TEST_CONTAINERS=1",
)
def test_the_full_smoke_run(tmp_path: Path) -> None:
    result = subprocess.run([SMOKE], cwd=ROOT, timeout=3600, check=False)
    assert result.returncode == 0
