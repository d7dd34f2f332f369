"""The reliability harness's short version (``bench/reliability.py --quick``), run as CI runs it:
two real replicas and the gateway as processes, every phase (load, each fault, soak) with every
count scaled down. The full run is ``./bench/reliability``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quick_run_meets_every_rule(tmp_path: Path, model_path: Path) -> None:
    """Exit 0 (every rule passed), and the figures behind the main rules say so too."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reliability.py"), "--quick", "--skip-pytest",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr[-4000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    phases = {p["phase"]: p for p in report["phases"]}
    assert list(phases) == ["load", "kill", "term", "stop", "gateway", "soak"], output
    for name, phase in phases.items():
        assert phase["other_errors"] == 0, (name, phase["failures"], output)
        assert phase["truncations"] == 0, (name, phase["failures"], output)
        assert phase["contexts"]["free"], (name, phase["contexts"], output)
        assert phase["errors_logged"] == [], (name, phase["errors_logged"])
        assert phase["requests"] > 0, name
    for name in ("kill", "term", "stop"):
        assert phases[name]["fault"]["out_after_s"] is not None, (name, output)
    for name in ("kill", "term", "stop", "gateway"):
        assert phases[name]["fault"]["back_after_s"] is not None, (name, output)
    assert phases["gateway"]["fault"]["exit_code"] == 0, output
    assert phases["gateway"]["connect_retries"] > 0, "the gateway restart refused no connection"
    assert set(phases["soak"]["memory"]) == {"replica-a", "replica-b", "gateway"}
    assert result.returncode == 0, output
