"""llm_service.engine.cpu: which ggml backends a process loaded at run time."""

from __future__ import annotations

from pathlib import Path

from llm_service.engine.cpu import loaded_ggml_backends

VENV = "/opt/llm-service/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"


def test_the_run_time_loaded_backends_are_named_from_the_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f00-7f01 r--p 00000000 00:2a 11 {SITE}/llama_cpp/lib/libggml-base.so\n"
        f"7f01-7f02 r-xp 00001000 00:2a 12 {SITE}/llama_cpp/lib/libggml.so\n"
        f"7f02-7f03 r--p 00000000 00:2a 13 {SITE}/llama_cpp/lib/libllama.so\n"
        f"7f03-7f04 r--p 00000000 00:2a 14 {SITE}/bin/libggml-cpu-haswell.so\n"
        f"7f04-7f05 r-xp 00001000 00:2a 14 {SITE}/bin/libggml-cpu-haswell.so\n"
        "7f05-7f06 rw-p 00000000 00:00 0 \n"
        "7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n"
    )
    assert loaded_ggml_backends(maps) == ["libggml-cpu-haswell.so"]


def test_none_without_proc(tmp_path: Path) -> None:
    assert loaded_ggml_backends(tmp_path / "absent") == []
