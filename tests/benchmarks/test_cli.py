"""The command line: a real tiny COCO run, the report from its record, and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import get_parser, main
from benchmarks.coco_eval import CocoEvalConfig, evaluate_coco, open_coco
from benchmarks.records import make_record, write_records
from tests.benchmarks.test_coco_eval import OraclePredictor
from tests.helpers import COCO_ROOT, requires_coco


def test_coco_then_report(synthetic_coco, tmp_path, capsys):
    records = tmp_path / "records"
    argv = ["coco", "--model", "tinyvit_test", "--coco-root", str(synthetic_coco), "--max-images", "1"]
    assert main([*argv, "--chunk-size", "2", "--out", str(records)]) == 0
    out = capsys.readouterr().out
    assert "COCO segm on 1 images" in out

    (path,) = records.glob("coco-tinyvit_test-fp32-pytorch-*.json")
    (record,) = json.loads(path.read_text())
    assert (record["model"], record["precision"], record["runtime"], record["num_images"]) == (
        "tinyvit_test",
        "fp32",
        "pytorch",
        1,
    )
    assert 0.0 <= record["ap"] <= 100.0 and record["config"]["chunk_size"] == 2

    assert main(["report", "--records", str(records), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "ap_vs_latency.png").stat().st_size > 10_000
    assert "| tinyvit_test | random init | fp32 | pytorch |" in (tmp_path / "report" / "report.md").read_text()


MODEL_FREE_COMMANDS = {"report", "runtimes"}  # records only; exported files in CPU runtimes only


def test_every_command_that_runs_a_model_takes_a_device(capsys):
    (subcommands,) = [a for a in get_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"coco", "latency", "everything", "demo"} <= set(subcommands.choices)
    for name, parser in subcommands.choices.items():
        assert ("--device" in parser.format_help()) == (name not in MODEL_FREE_COMMANDS), name
    with pytest.raises(SystemExit):
        main(["latency", "--model", "tinyvit_test", "--device", "mps", "--out", "x"])
    assert "argument --device: device 'mps': only auto, cpu, cuda and cuda:N are supported" in capsys.readouterr().err


def test_errors_are_one_line_messages(tmp_path, capsys):
    argv = ["coco", "--model", "tinyvit_test", "--coco-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    assert main(argv) == 1
    assert f"error: {tmp_path / 'nowhere'}: no such COCO folder" in capsys.readouterr().err

    assert main(["report", "--records", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    assert "no such folder of records" in capsys.readouterr().err

    with pytest.raises(SystemExit, match="--onnx-encoder and --onnx-decoder go together"):
        main([*argv[:-2], "--onnx-encoder", "e.onnx", "--out", str(tmp_path)])


def test_an_unwritable_out_is_one_error_line_and_writes_nothing(tmp_path):
    """The real entry point: exit 1, one `error:` line naming the folder, no traceback, no file left."""
    records = tmp_path / "records"
    write_records([make_record("coco", model="m", checkpoint=None, precision="fp32", runtime="pytorch",
                               threads=None, config={}, ap=1.0)], records, "coco")  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "report"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", "--records", str(records), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {out}: Not a directory"]


def test_latency_compile_reaches_the_benchmark(tmp_path, monkeypatch, capsys):
    import benchmarks.runs

    configs = []

    def record_config(sam, model, config, **kwargs):
        configs.append(config)
        return []

    monkeypatch.setattr(benchmarks.runs, "benchmark_latency", record_config)
    argv = ["latency", "--model", "tinyvit_test", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*argv, "--compile"]) == 0
    assert main(argv) == 0
    assert [config.compile for config in configs] == [True, False]
    with pytest.raises(SystemExit):
        main(["latency", "--help"])
    assert "--compile" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["coco", "latency", "everything"])
def test_an_unwritable_out_fails_before_measuring(command, synthetic_coco, tmp_path, capsys, monkeypatch):
    import benchmarks.runs

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    for name in ("evaluate_coco", "benchmark_latency"):
        monkeypatch.setattr(benchmarks.runs, name, no_measuring)
    monkeypatch.setattr("hierarchical.compare.compare_generators", no_measuring)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    inputs = {"coco": ["--coco-root", str(synthetic_coco)], "latency": [], "everything": []}[command]
    assert main([command, "--model", "tinyvit_test", *inputs, "--out", str(blocker)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {blocker}: File exists"]


@requires_coco
def test_oracle_on_the_real_coco_subset_gives_ap_100():
    """Real annotations (polygons, crowd regions, many sizes): GT masks through the pipeline give AP 100."""
    config = CocoEvalConfig(max_images=8)
    result = evaluate_coco(OraclePredictor(open_coco(COCO_ROOT)), COCO_ROOT, config, progress=False)
    assert result.num_images == 8
    assert result.metrics["ap"] == pytest.approx(100.0)


def test_everything_prints_the_per_method_table_and_names_bad_methods(synthetic_coco, tmp_path, capsys):
    argv = ["everything", "--model", "tinyvit_test", "--coco-root", str(synthetic_coco), "--max-images", "1"]
    argv += ["--points-per-side", "1", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    assert main([*argv, "--methods", "dense", "hierarchical-lattice", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| hierarchical-lattice |" in out and "recall@0.9 " in out

    assert main([*argv, "--methods", "fast", "--out", str(tmp_path)]) == 1
    assert (
        "error: unknown method(s) ['fast']; choose from ('sam', 'dense', 'hierarchical-lattice'"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main([*argv, "--images", str(tmp_path), "--out", str(tmp_path)])
    assert "not allowed with argument --coco-root" in capsys.readouterr().err


def test_runtimes_names_a_folder_without_the_exported_encoders(tmp_path, capsys):
    assert main(["runtimes", str(tmp_path), "--images", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'float32' / 'encoder.onnx'}" in err and "give the output folder of python -m quantize" in err
