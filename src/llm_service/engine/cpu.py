"""Refuses a llama.cpp build that uses a CPU extension this machine lacks, before ggml runs.

``scripts/setup`` compiles llama.cpp for the CPU at hand (``scripts/llama-build.env``) and writes
what the build needs into the venv, as ``llama-build.info``:

```
built_for: AMD EPYC
cmake_args: -DGGML_NATIVE=OFF -DGGML_SSE42=ON ...
requires: sse4_2 avx avx2 fma f16c bmi2
rebuild: cd /path/to/llm-service && ./scripts/setup
```

A build run on a CPU without one of those extensions (a venv copied from another machine, a
wheel from a shared cache) dies with SIGILL at its first call into ggml, with no message. The
engine's llama.cpp module calls ``check_build_fits_cpu`` before it loads the library, so that it
fails with one line instead. A venv without that file (llama-cpp-python installed some other
way) is not checked: nothing says what it was built for.

This module uses the standard library only: it runs before ``llama_cpp`` is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llm_service.errors import ModelLoadError

__all__ = [
    "BUILD_INFO",
    "BuildInfo",
    "check_build_fits_cpu",
    "cpu_extensions",
    "loaded_ggml_backends",
    "read_build_info",
]

BUILD_INFO = "llama-build.info"
CPUINFO = Path("/proc/cpuinfo")
MAPS = Path("/proc/self/maps")


class BuildInfo(dict[str, str]):
    """The ``key: value`` lines of a ``llama-build.info`` file."""

    @property
    def requires(self) -> list[str]:
        return self.get("requires", "").split()


def read_build_info(path: Path) -> BuildInfo | None:
    """The build record at ``path``; None if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    info = BuildInfo()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            info[key.strip()] = value.strip()
    return info


def cpu_extensions(cpuinfo: Path = CPUINFO) -> tuple[str, set[str] | None]:
    """(model name, extensions) of the CPU that ``cpuinfo`` (a ``/proc/cpuinfo``) describes:
    its x86-64 ``flags`` or aarch64 ``Features``, as the kernel names them; None if it lists
    neither."""
    model, flags = "unknown CPU", None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model == "unknown CPU":
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    return model, flags


def check_build_fits_cpu(prefix: Path | None = None, cpuinfo: Path = CPUINFO) -> None:
    """Raise unless this CPU has every extension the venv's llama.cpp build uses.

    Args:
        prefix: the venv holding the build (default: the running interpreter's).
        cpuinfo: the CPU's description.

    Raises:
        ModelLoadError: the build uses extensions this CPU lacks; names them and the command
            that rebuilds it.
    """
    info = read_build_info((prefix or Path(sys.prefix)) / BUILD_INFO)
    if info is None or not info.requires:
        return
    try:
        model, have = cpu_extensions(cpuinfo)
    except OSError:
        return  # no /proc (not Linux): nothing to compare with
    if have is None:
        return  # a CPU that says nothing of its extensions: nothing to compare with
    missing = [flag for flag in info.requires if flag not in have]
    if not missing:
        return
    built_for = info.get("built_for", "another CPU")
    rebuild = info.get("rebuild", "./scripts/setup")
    raise ModelLoadError(
        f"this llama.cpp build uses the CPU extension{'s' if len(missing) > 1 else ''}"
        f" {', '.join(missing)}, which this CPU ({model}) lacks: it was built for {built_for}."
        f" Rebuild it for this machine: {rebuild}"
    )


def loaded_ggml_backends(maps: Path = MAPS) -> list[str]:
    """The ggml backends this process loaded at run time (a ``GGML_BACKEND_DL`` build, such as
    the images' ``cpu-all``): the file names of the ``libggml-<name>.so`` mapped in it, e.g.
    ``libggml-cpu-haswell.so``, the CPU variant ggml picked for this machine. Empty for a build
    with its backends linked in, or where ``/proc`` cannot be read."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    names = {Path(line.split()[-1]).name for line in lines if line.rstrip().endswith(".so")}
    return sorted(n for n in names if n.startswith("libggml-") and n != "libggml-base.so")
