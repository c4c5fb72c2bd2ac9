"""`python -m benchmarks distill`: a real tiny run split by phase, written as a record; bad settings in one line."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.records import load_records
from benchmarks.report import render_report
from distill.phases import PHASES

# One measured step after one skipped, of one generated image with one prompt and one corrective point, so
# that every phase has work (the teacher decoder drives no sampling here: its final pass is the teacher's work).
TINY = ["--num-synthetic", "2", "--batch-size", "1", "--prompts-per-image", "1", "--max-prompt-iters", "1"]
TINY += ["--hard-prompts", "--num-workers", "0", "--device", "cpu", "--skip", "1", "--measure", "1"]


def test_cli_writes_a_distill_record_whose_phases_add_up(tmp_path, capsys):
    assert main(["distill", *TINY, "--seed", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "sam_vit_test->tinyvit_test on " in printed and "record: " in printed
    (record,) = load_records(tmp_path)
    assert (record["kind"], record["precision"], record["runtime"]) == ("distill", "float32", "pytorch")
    assert (record["measured_steps"], record["images_per_step"]) == (1, 1)
    assert record["config"]["seed"] == 3 and record["config"]["measure"] == 1  # the flags given reached the run
    phases = {name: record[f"{name}_ms"] for name in (*PHASES, "other")}
    assert all(phases[name] > 0 for name in PHASES), phases
    assert sum(phases.values()) == pytest.approx(record["step_ms"], rel=1e-9)
    assert record["images_per_second"] == pytest.approx(1000 / record["step_ms"])
    assert record["teacher_images_per_second"] > 0  # a fresh cache was filled and timed
    assert record["peak_memory_kind"] == "process peak RSS" and record["peak_memory_mb"] > 100
    assert record["gpu_utilization_percent"] is None
    json.dumps(record, allow_nan=False)
    report, _ = render_report([record], tmp_path / "report")  # the report's table of distill records shows it
    row = f"| sam_vit_test->tinyvit_test | random init | float32 | {record['threads']} | 1 | 1 | 1 | "
    assert row + f"{record['images_per_second']:.3g} | {record['step_ms']:.0f} |" in report.read_text()


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    assert main(["distill", "--measure", "0", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: --measure must be >= 1 and --skip >= 0, got 0 and 1\n"
    assert main(["distill", "--batch-size", "0", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: batch_size must be >= 1, got 0\n"
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # the benchmark sets these itself (no validation, its own steps)
        main(["distill", "--val-images", "2", "--out", str(tmp_path)])
    assert "unrecognized arguments: --val-images 2" in capsys.readouterr().err
