"""Records -> Markdown tables and the AP-vs-latency PNG."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from benchmarks.published import PUBLISHED_SOURCE
from benchmarks.records import RecordError, load_records, make_record, write_records
from benchmarks.report import plot_points, render_report


def _records():
    common = dict(checkpoint=None, threads=None, config={"max_images": 2})
    coco = [
        make_record("coco", model="tinyvit_test", precision="fp32", runtime="pytorch", ap=12.5, ap50=30.0, **common),
        make_record("coco", model="tinyvit_test", precision="int8", runtime="onnxruntime", ap=11.0, **common),
        make_record("coco", model="sam_vit_test", precision="fp32", runtime="pytorch", ap=3.0, **common),
    ]
    latency = [
        make_record(
            "latency",
            model="tinyvit_test",
            checkpoint=None,
            precision=precision,
            runtime=runtime,
            threads=threads,
            config={},
            component="encoder",
            batch=1,
            median_ms=ms,
            iqr_ms=1.0,
            macs=2_000_000_000,
            params=300_000,
        )
        for precision, runtime, threads, ms in [
            ("fp32", "pytorch", 1, 90.0),
            ("fp32", "pytorch", 2, 50.0),
            ("int8", "onnxruntime", 2, 20.0),
        ]
    ]
    return coco + latency


def test_report_writes_tables_and_png(tmp_path):
    records_dir = tmp_path / "records"
    write_records(_records()[:3], records_dir, "coco")
    write_records(_records()[3:], records_dir / "nested", "latency")

    report, plot = render_report(load_records(records_dir), tmp_path / "report")

    text = report.read_text()
    assert "| tinyvit_test | random init | fp32 | pytorch | 12.50 | 30.00 |" in text
    assert "| tinyvit_test | encoder | int8 | onnxruntime | 2 | 1 | 20.00 | 1.00 |" in text
    assert "2.00" in text  # GMACs column
    assert PUBLISHED_SOURCE in text
    assert "Not plotted (no encoder latency record of the same model/precision/runtime): sam_vit_test fp32" in text
    assert "sam_vit_test fp32 (pytorch) [random init]." in text
    pixels = mpimg.imread(plot)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def _distill_record(**figures):
    phases = dict(data_ms=423.0, prompt_sampling_ms=14.0, teacher_decoder_ms=3523.0, student_forward_ms=10399.0)
    phases.update(backward_ms=7550.0, optimizer_ms=500.0, other_ms=9.0)
    config = {"batch_size": 2, "prompts_per_image": 4, "max_prompt_iters": 2, "hard_prompts": True, "measure": 5}
    figures = {
        "images_per_second": 0.0892,
        "images_per_step": 2.0,
        "measured_steps": 5,
        "step_ms": 22418.0,
        **phases,
        "peak_memory_mb": 3490.4,
        "peak_memory_kind": "process peak RSS",
        "gpu_utilization_percent": None,
        "teacher_images_per_second": 0.56,
        **figures,
    }
    return make_record(
        "distill",
        model="sam_vit_test->tinyvit_test",
        checkpoint=None,
        precision="float32",
        runtime="pytorch",
        threads=2,
        config=config,
        device="Xeon (2 logical cores)",
        **figures,
    )


def test_distill_throughput_records_get_their_own_table(tmp_path):
    """A `benchmarks distill` record: settings from its config, images/s to 3 significant figures, every phase."""
    gpu = _distill_record(images_per_second=41.7, gpu_utilization_percent=87.5, peak_memory_kind="cuda max allocated")
    gpu["config"] = {**gpu["config"], "hard_prompts": False, "batch_size": 8}
    report, _ = render_report([*_records(), _distill_record(), gpu], tmp_path)
    text = report.read_text()
    table = text.split("## Distillation throughput (`python -m benchmarks distill`)")[1].split("##")[0]
    header, rule, cpu_row, gpu_row = [line for line in table.splitlines() if line.startswith("|")]
    assert header.startswith("| teacher->student | student init | precision | threads | batch | prompts/image |")
    assert "| data ms | prompt sampling ms | teacher decoder ms | student forward ms | backward ms |" in header
    assert header.count("|") == rule.count("|")
    assert cpu_row.startswith("| sam_vit_test->tinyvit_test | random init | float32 | 2 | 2 | 4 | 2 | 0.0892 | 22418 |")
    assert "| 423 | 14.00 | 3523 | 10399 | 7550 | 500 | 9.00 | 3490 | process peak RSS | - | 0.56 | 5 |" in cpu_row
    assert (
        "| 8 | 4 | 0 | 41.7 |" in gpu_row and "| cuda max allocated | 87.50 |" in gpu_row
    )  # no hard prompts: 0 points
    assert text.index("## Latency") < text.index("## Distillation throughput") < text.index("## AP vs latency")


def test_an_interrupted_report_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    """The report and plot are written atomically: a failure mid-save leaves the earlier files and no temp file."""
    out = tmp_path / "report"
    report, plot = render_report(_records(), out)
    before = {report: report.read_bytes(), plot: plot.read_bytes()}

    from matplotlib.figure import Figure

    def half_a_png(self, f, **kwargs):
        f.write(before[plot][:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_a_png)
    with pytest.raises(OSError, match="No space left"):
        render_report(_records()[:1], out)
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in before)


def test_plot_points_use_the_encoder_latency_with_most_threads():
    points, unmatched = plot_points(_records())
    by_label = {p.label: p for p in points}
    assert by_label["tinyvit_test fp32 (pytorch) [random init]"].latency_ms == 50.0
    assert by_label["tinyvit_test fp32 (pytorch) [random init]"].threads == 2
    assert by_label["tinyvit_test int8 (onnxruntime) [random init]"].ap == 11.0
    assert unmatched == ["sam_vit_test fp32 (pytorch) [random init]"]


def test_onnx_results_pair_with_the_latency_of_their_own_folder():
    """Two INT8 exports of one model are different graphs: each AP goes with its own file's latency."""
    records = []
    for folder, ms, ap in [("/x/ours-int8", 20.0, 11.0), ("/x/ort-int8", 25.0, 4.0)]:
        common = dict(model="tinyvit_test", precision="int8", runtime="onnxruntime", config={})
        records.append(make_record("coco", checkpoint=folder, threads=None, ap=ap, **common))
        records.append(
            make_record(
                "latency",
                checkpoint=None,
                threads=2,
                component="encoder",
                median_ms=ms,
                onnx_file=f"{folder}/encoder.onnx",
                **common,
            )
        )
    records.append(
        make_record(
            "coco",
            model="tinyvit_test",
            precision="int8",
            runtime="onnxruntime",
            checkpoint="/y",
            threads=None,
            config={},
            ap=1.0,
        )
    )
    points, unmatched = plot_points(records)
    assert {(p.label, p.latency_ms, p.ap) for p in points} == {
        ("tinyvit_test int8 (onnxruntime, ours-int8)", 20.0, 11.0),
        ("tinyvit_test int8 (onnxruntime, ort-int8)", 25.0, 4.0),
    }
    assert unmatched == ["tinyvit_test int8 (onnxruntime, y)"]


def test_bad_records_are_errors(tmp_path):
    with pytest.raises(RecordError, match="no such folder of records"):
        load_records(tmp_path / "missing")
    with pytest.raises(RecordError, match="holds no \\*.json record files"):
        load_records(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps([{"kind": "coco", "model": "x"}]))
    with pytest.raises(RecordError, match="bad.json: record is missing"):
        load_records(tmp_path)
    identity = dict(model="x", checkpoint=None, precision="fp32", runtime="pytorch", threads=1, config={})
    with pytest.raises(RecordError, match="unknown record kind 'speed'"):
        make_record("speed", **identity)
    with pytest.raises(RecordError, match=r"clash with record fields: \['timestamp'\]"):
        make_record("coco", **identity, timestamp=1)
