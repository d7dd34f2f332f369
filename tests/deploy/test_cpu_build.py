"""llama.cpp is built for the CPU at hand, and a build for another CPU is never run.

The flags come from scripts/llama-build.env, fed the /proc/cpuinfo of the CPUs this project's
machines are (tests/data/cpuinfo); what a build needs is recorded with it (llama-build.info), and
scripts/setup and llm_service read that record.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llm_service.engine.cpu import BUILD_INFO, check_build_fits_cpu, cpu_extensions
from llm_service.errors import ModelLoadError
from tests.deploy.layout import ROOT, SCRIPTS, VENV, llama_build

CPUINFO = ROOT / "tests" / "data" / "cpuinfo"
AVX2 = ["SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2"]
AVX512 = ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
OPTIONS = ["SSE42", "AVX", "AVX2", "AVX_VNNI", "FMA", "F16C", "BMI2", *AVX512,
           "AMX_TILE", "AMX_INT8", "AMX_BF16"]  # fmt: skip


def build_env(expr: str, **env: str) -> str:
    """``expr`` after sourcing scripts/llama-build.env with ``env`` (on a clean environment)."""
    result = llama_build(None, expr, env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def flags_for(cpu: str, **env: str) -> dict[str, str]:
    """-DGGML_<option>=<value> of the default build for a CPU of tests/data/cpuinfo."""
    args = build_env("$CMAKE_ARGS", LLAMA_CPUINFO=str(CPUINFO / cpu), LLAMA_ARCH="x86_64", **env)
    return dict(re.findall(r"-DGGML_(\w+)=(\w+)", args))


def on(flags: dict[str, str]) -> list[str]:
    return [name for name in OPTIONS if flags.get(name) == "ON"]


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("amd-zen2.txt", AVX2),
        ("amd-zen3-avx2.txt", AVX2),
        ("amd-zen4.txt", AVX2 + AVX512),
        # AVX-VNNI too; AMX never, though this CPU has it (its matmul path segfaults in VMs).
        ("intel-sapphire-rapids.txt", [*AVX2[:3], "AVX_VNNI", *AVX2[3:], *AVX512]),
    ],
)
def test_the_default_build_enables_exactly_the_cpus_extensions(
    cpu: str, expected: list[str]
) -> None:
    flags = flags_for(cpu)
    assert on(flags) == expected
    # Every option named, ON or OFF: with GGML_NATIVE=OFF, ggml turns AVX2 and others on
    # unless told otherwise, and -march=native would bring AMX.
    assert flags == {"NATIVE": "OFF"} | {name: flags[name] for name in OPTIONS}


def test_the_avx2_build_requires_nothing_an_avx2_epyc_lacks() -> None:
    cpuinfo = str(CPUINFO / "amd-zen3-avx2.txt")
    requires = build_env(
        '$(build_cpu_requirements "$CMAKE_ARGS" x)', LLAMA_CPUINFO=cpuinfo, LLAMA_ARCH="x86_64"
    )
    assert requires.split() == ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]
    _, have = cpu_extensions(Path(cpuinfo))
    assert have is not None and set(requires.split()) <= have


def test_what_ggml_turns_on_by_itself_is_required_too() -> None:
    """LLAMA_CMAKE_ARGS with GGML_NATIVE=OFF and nothing else: ggml builds AVX2 and the rest;
    CMake's truth values in any case."""
    requires = build_env('$(build_cpu_requirements "-DGGML_NATIVE=off -DGGML_AVX512=on" x)')
    assert requires.split() == [
        "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
        "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
    ]  # fmt: skip
    off = build_env('$(build_cpu_requirements "-DGGML_NATIVE=OFF -DGGML_AVX2=0 -DGGML_FMA=OFF" x)')
    assert off.split() == ["sse4_2", "avx", "f16c", "bmi2"]


def test_a_cpuinfo_without_flags_is_refused() -> None:
    result = llama_build(None, env={"LLAMA_CPUINFO": "/nonexistent", "LLAMA_ARCH": "x86_64"})
    assert result.returncode == 2
    assert "LLAMA_CPUINFO=/nonexistent: no flags line to derive the build from" in result.stderr


def test_an_avx512_build_is_unfit_for_an_avx2_epyc() -> None:
    zen3 = str(CPUINFO / "amd-zen3-avx2.txt")
    zen4 = str(CPUINFO / "amd-zen4.txt")
    missing = build_env(
        f'$(missing_cpu_extensions "$(build_cpu_requirements "$CMAKE_ARGS" x)" {zen3})',
        LLAMA_CPUINFO=zen4,
        LLAMA_ARCH="x86_64",
    )
    assert missing.split() == [
        "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
        "avx512vbmi", "avx512_vnni", "avx512_bf16",
    ]  # fmt: skip


def test_a_native_build_requires_what_the_building_cpu_has() -> None:
    """LLAMA_CMAKE_ARGS without GGML_NATIVE=OFF: ggml's -march=native, AMX included."""
    spr = str(CPUINFO / "intel-sapphire-rapids.txt")
    requires = build_env(
        f'$(build_cpu_requirements "$CMAKE_ARGS" {spr})',
        LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF",
        LLAMA_ARCH="x86_64",
    ).split()
    assert {"avx512f", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"} <= set(requires)
    assert "hypervisor" not in requires  # only what the compiler can use


def test_another_architecture_builds_natively() -> None:
    arm = str(CPUINFO / "arm-neoverse-n1.txt")
    env = {"LLAMA_CPUINFO": arm, "LLAMA_ARCH": "aarch64"}
    assert build_env("$CMAKE_ARGS", **env) == "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
    requires = build_env('$(build_cpu_requirements "$CMAKE_ARGS" "$LLAMA_CPUINFO")', **env)
    assert requires.split()[:3] == ["fp", "asimd", "evtstrm"] and "asimddp" in requires


def test_llama_cmake_args_override_the_derived_flags() -> None:
    args = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON"
    cpu = str(CPUINFO / "amd-zen4.txt")
    assert build_env("$CMAKE_ARGS", LLAMA_CMAKE_ARGS=args, LLAMA_CPUINFO=cpu) == args


def test_a_build_for_another_cpu_is_refused_before_ggml_runs(tmp_path: Path) -> None:
    requires = "sse4_2 avx avx2 avx512f avx512_fp16"
    cpuinfo = CPUINFO / "amd-zen3-avx2.txt"
    (tmp_path / BUILD_INFO).write_text(
        f"# a comment: ignored\nbuilt_for: Intel Xeon\nrequires: {requires}\n"
        "rebuild: cd /src && ./scripts/setup\n"
    )
    with pytest.raises(ModelLoadError) as info:
        check_build_fits_cpu(tmp_path, cpuinfo)
    assert str(info.value) == (
        "this llama.cpp build uses the CPU extensions avx512f, avx512_fp16, which this CPU"
        " (AMD EPYC) lacks: it was built for Intel Xeon. Rebuild it for this machine:"
        " cd /src && ./scripts/setup"
    )
    check_build_fits_cpu(tmp_path, CPUINFO / "intel-sapphire-rapids.txt")  # it has them
    (tmp_path / BUILD_INFO).write_text("requires:\n")  # a cpu-all build: picks at run time
    check_build_fits_cpu(tmp_path, cpuinfo)
    check_build_fits_cpu(tmp_path / "no-venv-here", cpuinfo)  # nothing recorded: not checked
    (tmp_path / BUILD_INFO).write_text(f"requires: {requires}\n")
    silent = tmp_path / "cpuinfo"
    silent.write_text("processor\t: 0\n")  # says nothing of its extensions: not checked
    check_build_fits_cpu(tmp_path, silent)


def test_the_set_up_venv_records_a_build_that_fits_this_cpu() -> None:
    info = (VENV / BUILD_INFO).read_text()
    requires = re.search(r"^requires: (.*)$", info, re.MULTILINE)
    assert requires, info
    _, have = cpu_extensions()
    assert have is not None and set(requires[1].split()) <= have
    assert f"rebuild: cd {ROOT} && ./scripts/setup" in info
    check_build_fits_cpu(VENV)


def _lacking_flag() -> str:
    """An extension a build could use that this CPU lacks."""
    _, have = cpu_extensions()
    candidates = ["avx512_fp16", "amx_tile", "avx_vnni", "avx512f", "avx512_vnni", "avx10_2"]
    return next((flag for flag in candidates if flag not in (have or ())), "no_such_extension")


def _venv_with_build_info(tmp_path: Path, requires: str) -> Path:
    """A venv whose packages are those of .venv and the repository's, recording a build that
    needs ``requires``: what a venv copied from another machine looks like to llm_service."""
    venv = tmp_path / "copied-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = subprocess.check_output(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        text=True,
    ).strip()
    (Path(site) / "set-up-venv.pth").write_text(
        f"{sysconfig.get_path('purelib')}\n{ROOT / 'src'}\n"
    )
    (venv / BUILD_INFO).write_text(
        f"built_for: Some Xeon\nrequires: sse4_2 {requires}\n"
        f"rebuild: cd {ROOT} && ./scripts/setup\n"
    )
    return venv


@pytest.mark.parametrize(
    "command",
    [["serve", "--insecure", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
     ["generate", "hi"]],
)  # fmt: skip
def test_llm_service_refuses_a_build_for_another_cpu_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    lacking = _lacking_flag()
    venv = _venv_with_build_info(tmp_path, lacking)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    result = subprocess.run(
        [venv / "bin" / "python", "-m", "llm_service", *command],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    model, _ = cpu_extensions()
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"llm_service: error: this llama.cpp build uses the CPU extension {lacking}, which this"
        f" CPU ({model}) lacks: it was built for Some Xeon. Rebuild it for this machine:"
        f" cd {ROOT} && ./scripts/setup\n"
    )


def test_importing_the_engine_refuses_it_before_loading_llama_cpp(tmp_path: Path) -> None:
    venv = _venv_with_build_info(tmp_path, _lacking_flag())
    code = (
        "import sys\n"
        "from llm_service.errors import ModelLoadError\n"
        "try:\n"
        "    import llm_service.engine.llama\n"
        "except ModelLoadError as exc:\n"
        "    print(exc)\n"
        "print('llama_cpp' in sys.modules)\n"
    )
    result = subprocess.run(
        [venv / "bin" / "python", "-c", code], capture_output=True, text=True, check=True
    )
    message, loaded = result.stdout.splitlines()
    assert message.startswith("this llama.cpp build uses the CPU extension")
    assert loaded == "False"


def _setup_until(line: str, **env: str) -> list[str]:
    """scripts/setup's progress lines up to the first that contains ``line`` (then it is
    stopped, with what it started: what follows is a venv or a llama.cpp build, minutes of
    work)."""
    process = subprocess.Popen(
        [SCRIPTS / "setup"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stderr is not None
    lines = []
    try:
        for out in process.stderr:
            lines.append(out.rstrip("\n"))
            if line in out:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return lines


def test_setup_prints_the_flags_and_keeps_a_venv_that_fits(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".setup-stamp").write_text((VENV / ".setup-stamp").read_text())
    (venv / BUILD_INFO).write_text((VENV / BUILD_INFO).read_text())
    lines = _setup_until("up to date", LLM_VENV=str(venv))
    # (the CPU of LLAMA_CPUINFO where the suite runs with one)
    assert re.match(r"==> llama\.cpp for (this CPU|the CPU of \S+) \(.+\): \w", lines[0])
    assert lines[-1] == f"==> environment in {venv} is up to date"


def test_setup_sets_up_again_a_venv_built_for_another_cpu(tmp_path: Path) -> None:
    """Same flags asked for (the stamp matches), but its record says it needs more."""
    lacking = _lacking_flag()
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".setup-stamp").write_text((VENV / ".setup-stamp").read_text())
    (venv / BUILD_INFO).write_text(f"requires: sse4_2 {lacking}\n")
    lines = _setup_until(
        "==> creating", LLM_VENV=str(venv), LLM_WHEEL_CACHE=str(tmp_path / "wheels")
    )
    assert (
        f"==> the llama.cpp build in {venv} uses {lacking}, which this CPU lacks:"
        " setting it up again"
    ) in lines
    assert lines[-1].startswith(f"==> creating {venv}")


def test_setup_rebuilds_a_cached_wheel_built_for_another_cpu(tmp_path: Path) -> None:
    cache = tmp_path / "wheels"
    key = Path((VENV / ".llama-wheel").read_text().strip()).parent.name
    (cache / key).mkdir(parents=True)
    (cache / key / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    (cache / key / BUILD_INFO).write_text(f"requires: {_lacking_flag()}\n")
    lines = _setup_until(
        "==> creating", LLM_VENV=str(tmp_path / "venv"), LLM_WHEEL_CACHE=str(cache)
    )
    assert lines[-2] == (
        f"==> the cached llama-cpp-python wheel in {cache / key} uses {_lacking_flag()}, which"
        " this CPU lacks: building it again"
    )
    assert not (cache / key).exists()
