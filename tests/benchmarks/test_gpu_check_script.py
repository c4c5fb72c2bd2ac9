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
