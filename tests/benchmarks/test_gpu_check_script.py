"""scripts/gpu_check.sh keeps to its time budget and says so, instead of running past the GPU lease."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_a_spent_budget_runs_no_step_and_fails(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BUDGET_S": "4", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert summary[0] == "tests-cuda: not run (the 4 s budget is spent)"
    assert "tests-all: not run (the 4 s budget is spent)" in summary
    assert not [line for line in summary if "passed in" in line]
    assert summary[-2].endswith("SOME STEPS FAILED")
    assert "torch" in (tmp_path / "out" / "environment.txt").read_text()


def test_an_unknown_device_is_refused_before_anything_runs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--device", "tpu"], env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert "--device must be cuda or cpu, got 'tpu'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_per_test_limit_stops_a_hanging_test_and_says_so(tmp_path):
    """The script's CUDA tests run with pytest-timeout's --timeout: a test past it fails, named, with the reason."""
    (tmp_path / "test_hangs.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(30)\n")
    command = [sys.executable, "-m", "pytest", "-v", "--tb=long", "--timeout", "2", "-p", "no:cacheprovider"]
    done = subprocess.run([*command, "test_hangs.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert done.returncode == 1
    assert "test_hangs.py::test_hangs FAILED" in done.stdout
    assert "Timeout (>2.0s)" in done.stdout
