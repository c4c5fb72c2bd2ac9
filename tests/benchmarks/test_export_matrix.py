"""The export matrix: each cell is the user's `python -m quantize` command; finished cells are not run again."""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmarks import export_matrix
from benchmarks.export_matrix import Cell, markdown_table, run_matrix


def test_a_refused_cell_keeps_its_error_line_and_a_finished_matrix_is_read_back(tmp_path, monkeypatch):
    empty = tmp_path / "no_images"
    empty.mkdir()
    matrix, table = run_matrix(str(empty), tmp_path / "out", ["tinyvit_test"], [1], ["mse"], ["--rounds", "1"])

    twin, no_twin = matrix["cells"]
    assert (twin["twin"], no_twin["twin"]) == (True, False)
    assert no_twin["command"].endswith("--rounds 1 --no-twin") and "--num-calib 1 --method mse" in twin["command"]
    for cell in (twin, no_twin):
        assert not cell["exported"] and str(empty) in cell["error"] and cell["error"].startswith("error:")
        reason = cell["error"].split(". ")[0]
        assert f"| tinyvit_test | 1 | mse | {cell['twin']} | **no**: {reason} |" in table
    assert json.loads((tmp_path / "out" / "matrix.json").read_text())["cells"] == matrix["cells"]

    def no_process(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(subprocess, "run", no_process)
    again, _ = run_matrix(str(empty), tmp_path / "out", ["tinyvit_test"], [1], ["mse"], ["--rounds", "1"])
    assert again["cells"] == matrix["cells"]


def test_a_killed_cell_is_an_error_and_leaves_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], -9, stdout="", stderr="Killed")
    )
    with pytest.raises(RuntimeError, match="exit status -9"):
        export_matrix.run_cell(Cell("tinyvit_test", 1, "mse", True), "calib", tmp_path, [])
    assert not list(tmp_path.rglob("cell.json"))


def test_the_table_shows_each_parts_worst_file_and_the_twin_layers():
    checks = {
        "encoder.onnx": {"passed": True, "rounding_mismatch": 2e-5, "rounding_unexplained": 0.0},
        "decoder.onnx": {"passed": True, "rounding_mismatch": 1e-5, "rounding_unexplained": 0.0},
        "encoder.ort": {"passed": True, "rounding_mismatch": 3e-5, "rounding_unexplained": 0.0},
        "decoder.ort": {"passed": True, "rounding_mismatch": 1e-5, "rounding_unexplained": 0.0},
    }
    record = {
        "model": "tinyvit_5m", "num_calib": 8, "method": "hessian", "twin": True, "exported": True, "seconds": 61.0,
        "int8": checks, "twin_layers": ["a", "b"], "twin_candidates": 5, "sqnr_embedding_db": 24.5,
    }  # fmt: skip
    assert markdown_table([record]).splitlines()[-1] == (
        "| tinyvit_5m | 8 | hessian | True | yes | 3.0e-05 / 1.0e-05 | 0 | 2 of 5 | 24.50 | 61.0 |"
    )
