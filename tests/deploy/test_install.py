"""``pip install llm-service`` without the server extra: the client, ``llm_cli`` and
``llm-gateway``, with no compiler and no llama.cpp.

The wheel is built from this checkout and installed into a fresh venv with the base
dependencies only, pinned and hash-checked from requirements-runtime.lock, binary wheels only
(so nothing is compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from llm_service.types import ChatTemplateName
from tests.deploy.layout import ROOT, dependency_closure, lock_entries, pyproject


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "VIRTUAL_ENV"))}
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("client-install")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", work / "dist", ROOT)  # fmt: skip
    (wheel,) = (work / "dist").glob("llm_service-*.whl")
    base = dependency_closure(pyproject()["project"]["dependencies"])
    lock = lock_entries(ROOT / "requirements-runtime.lock")
    assert base <= set(lock), f"not in the runtime lock: {base - set(lock)}"
    pins = work / "base.txt"
    pins.write_text(
        "".join(
            f"{name}=={lock[name][0]} "
            + " ".join(f"--hash={digest}" for digest in sorted(lock[name][1]))
            + "\n"
            for name in sorted(base)
        )
    )
    run(sys.executable, "-m", "venv", work / "venv")
    pip = (work / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet")
    run(*pip, "--require-hashes", "--no-deps", "--only-binary", ":all:", "-r", pins)
    run(*pip, "--no-deps", wheel)
    return work / "venv"


def test_the_wheel_ships_the_chat_templates(client_venv: Path) -> None:
    shipped = client_venv.glob("lib/python*/site-packages/llm_service/engine/templates/*.jinja")
    assert {p.name for p in shipped} == {f"{name}.jinja" for name in get_args(ChatTemplateName)}


def test_the_base_install_has_no_llama_cpp(client_venv: Path) -> None:
    listed = run(client_venv / "bin" / "python", "-m", "pip", "list").stdout.lower()
    assert "llm-service" in listed
    assert "llama" not in listed and "numpy" not in listed


@pytest.mark.parametrize("command", ["llm_cli", "llm-gateway", "llm_service"])
def test_the_commands_start(client_venv: Path, command: str) -> None:
    assert "usage:" in run(client_venv / "bin" / command, "--help").stdout


def test_the_client_imports_nothing_of_the_server(client_venv: Path) -> None:
    """What makes an import slow is what it drags in: the client takes no engine, server,
    gateway, web framework or numerical code (the import itself took about 0.3 s here)."""
    loaded = run(
        client_venv / "bin" / "python",
        "-c",
        "import sys; from llm_service.client import AsyncClient, Client; print(*sys.modules)",
    ).stdout.split()
    heavy = [
        name
        for name in loaded
        if name.startswith(("llm_service.engine", "llm_service.server", "llm_service.gateway"))
        or name.split(".")[0] in {"llama_cpp", "numpy", "fastapi", "uvicorn", "starlette"}
    ]
    assert heavy == []


def test_serving_without_the_server_extra_says_what_to_install(client_venv: Path) -> None:
    model = client_venv / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    result = subprocess.run(
        [client_venv / "bin" / "llm_service", "generate", "--model", str(model), "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("LLM_")},
    )
    assert result.returncode == 1
    assert 'pip install "llm-service[server]"' in result.stderr
    assert "Traceback" not in result.stderr
