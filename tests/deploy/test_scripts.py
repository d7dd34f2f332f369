"""The scripts deploy/Dockerfile runs, run here for real: the build variants of
scripts/llama-build.env, the runtime lock, scripts/check-runtime and scripts/install-runtime."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.deploy.layout import (
    ROOT,
    SCRIPTS,
    console_scripts,
    dependency_closure,
    llama_build,
    lock_entries,
    pyproject,
)


def test_the_default_build_is_the_documented_one() -> None:
    """LLAMA_VARIANT unset: the flags for this CPU, as docs/operations.md shows for an EPYC."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"the `CMAKE_ARGS` are:\s*```\s*(.*?)```", doc, re.DOTALL)
    assert block
    epyc = {"LLAMA_CPUINFO": str(ROOT / "tests/data/cpuinfo/amd-zen3-avx2.txt"),
            "LLAMA_ARCH": "x86_64"}  # fmt: skip
    default = llama_build(None, env=epyc)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == block[1].split()
    assert llama_build("native", env=epyc).stdout == default.stdout
    assert "BACKEND_DL" not in llama_build(None).stdout


def test_the_image_variants_build_every_cpu_variant_with_runtime_loading() -> None:
    cpu = llama_build("cpu-all").stdout.split()
    assert cpu == [
        "-DGGML_NATIVE=OFF",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_CPU_ALL_VARIANTS=ON",
        "-DLLAVA_BUILD=OFF",
    ]
    cuda = llama_build("cuda").stdout.split()
    assert cuda[: len(cpu)] == cpu and "-DGGML_CUDA=ON" in cuda
    (archs,) = [f for f in cuda if f.startswith("-DCMAKE_CUDA_ARCHITECTURES=")]
    numbers = [a.removesuffix("-real") for a in archs.partition("=")[2].split(";")]
    assert numbers == ["70", "75", "80", "86", "89", "90"]
    # The AMX variant, which crashes in these VMs, is left out unless asked for.
    assert llama_build("cpu-all", "$LLAMA_SKIP_CPU_VARIANTS").stdout == "sapphirerapids"


def test_an_unknown_variant_is_refused() -> None:
    result = llama_build("gpu")
    assert result.returncode == 2
    assert "LLAMA_VARIANT=gpu: expected native, cpu-all or cuda" in result.stderr


def _fake_venv(tmp_path: Path, *, copies: bool) -> tuple[Path, Path]:
    venv = tmp_path / "venv"
    flags = ["--without-pip"] + (["--copies"] if copies else [])
    subprocess.run([sys.executable, "-m", "venv", *flags, str(venv)], check=True)
    code = "import sysconfig; print(sysconfig.get_path('platlib'))"
    site = Path(subprocess.check_output([venv / "bin" / "python", "-c", code], text=True).strip())
    return venv, site


def _link(venv: Path, cmake_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'. scripts/llama-build.env && link_ggml_backends "{venv}"'],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(ROOT), "LLAMA_CMAKE_ARGS": cmake_args},
        capture_output=True,
        text=True,
        check=False,
    )


def test_run_time_loaded_backends_are_linked_beside_the_venvs_python(tmp_path: Path) -> None:
    venv, site = _fake_venv(tmp_path, copies=True)
    (site / "bin").mkdir()
    names = ["libggml-cpu-haswell.so", "libggml-cpu-sapphirerapids.so", "libggml-cuda.so"]
    for name in names:
        (site / "bin" / name).write_bytes(b"\x7fELF")
    assert _link(venv, "-DGGML_BACKEND_DL=ON").returncode == 0
    linked = sorted(p.name for p in (venv / "bin").glob("libggml-*"))
    assert linked == ["libggml-cpu-haswell.so", "libggml-cuda.so"]
    for name in linked:
        assert (venv / "bin" / name).resolve() == (site / "bin" / name).resolve()
        assert not os.readlink(venv / "bin" / name).startswith("/"), "relative, to survive COPY"


def test_linking_backends_needs_a_venv_whose_python_is_a_copy(tmp_path: Path) -> None:
    venv, site = _fake_venv(tmp_path, copies=False)
    (site / "bin").mkdir()
    (site / "bin" / "libggml-cpu-x64.so").write_bytes(b"\x7fELF")
    result = _link(venv, "-DGGML_BACKEND_DL=ON")
    assert result.returncode != 0
    assert "create the venv with --copies" in result.stderr


def test_the_runtime_lock_is_the_runtime_part_of_the_fulllock_entries() -> None:
    full, runtime = (
        lock_entries(ROOT / "requirements.lock"),
        lock_entries(ROOT / "requirements-runtime.lock"),
    )
    for name, (version, hashes) in runtime.items():
        assert name in full, f"{name} is not in requirements.lock"
        assert full[name] == (version, hashes), f"{name}: the two locks disagree"
    # Exactly the installed closure of the project's dependencies and its "server" extra (as
    # this venv resolves them), less llama-cpp-python, which is compiled from its own lock.
    project = pyproject()["project"]
    closure = dependency_closure(
        project["dependencies"] + project["optional-dependencies"]["server"]
    )
    assert set(runtime) == closure - {"llama-cpp-python"}
    assert not {"mypy", "ruff", "cmake", "ninja", "pytest", "hatchling"} & set(runtime)


def _check_runtime(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPTS / "check-runtime", venv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_check_runtime_finds_a_missing_library(tmp_path: Path) -> None:
    """A module whose dependencies are not there, as in an image that lacks a package."""
    venv, site = _fake_venv(tmp_path, copies=False)
    import llama_cpp

    libllama = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    (site / "broken").mkdir()
    shutil.copy(libllama, site / "broken" / "libllama.so")  # without libggml beside it
    result = _check_runtime(venv)
    assert result.returncode == 1
    assert "libraries not found" in result.stderr and "libggml" in result.stderr
    # Allowing the missing sonames (as the CUDA image allows the driver's) lets it through to
    # the next check, which fails here for want of llm_service in this bare venv.
    missing = re.findall(r"(libggml\S*\.so\.\d+)", result.stderr)
    allowed = _check_runtime(venv, LLM_ALLOW_MISSING_LIBS=" ".join(set(missing)))
    assert "libraries not found" not in allowed.stderr
    assert "check-runtime: error: llm-service is not installed" in allowed.stderr


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/install-runtime, for real, from the set-up venv (whose own set-up, the llama.cpp
    compile, CI's ./scripts/setup proves)."""
    target = tmp_path_factory.mktemp("runtime") / "venv"
    result = subprocess.run(
        [SCRIPTS / "install-runtime", "--no-setup", target],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backends: CPU" in result.stderr
    return target


def test_install_runtime_holds_only_the_runtime_packages(runtime_venv: Path) -> None:
    listed = subprocess.run(
        [runtime_venv / "bin" / "python", "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    expected = set(lock_entries(ROOT / "requirements-runtime.lock"))
    expected |= {"llama-cpp-python", "llm-service", "pip"}
    # ensurepip brings setuptools on Python < 3.12
    assert installed - {"setuptools"} == expected


def test_install_runtime_installs_llm_service_from_its_wheel(runtime_venv: Path) -> None:
    python = runtime_venv / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import llm_service; print(llm_service.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert Path(where.stdout.strip()).is_relative_to(runtime_venv), "not the repository's"
    dist = subprocess.run(
        [python, "-c", "from importlib.metadata import distribution as d;"
         " print(d('llm-service').read_text('direct_url.json') or '')"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"editable": true' not in dist.stdout
    for script in console_scripts():
        path = runtime_venv / "bin" / script
        assert path.read_text().splitlines()[0] == f"#!{runtime_venv}/bin/python"
    subprocess.run([runtime_venv / "bin" / "llm_service", "serve", "--help"], check=True,
                   capture_output=True)  # fmt: skip
