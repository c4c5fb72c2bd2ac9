"""Records -> a Markdown report and an AP-vs-latency plot.

The report has one table per record kind (COCO AP, latency, everything mode, distillation
throughput), every row with its device and git commit. The plot puts each of our COCO results at
its image-encoder latency (the record of the same model, precision, runtime and ONNX folder, most
threads) and draws the paper's published points beside them with their own marker, legend entry
and caption: they come from another protocol (ViTDet-H boxes) and other hardware (T4 TensorRT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.coco_eval import METRIC_NAMES
from benchmarks.published import PUBLISHED_POINTS, PUBLISHED_SOURCE
from benchmarks.records import IDENTITY_FIELDS, RECORD_KINDS, load_records
from distill.phases import PHASES
from student_models.io import atomic_write, atomic_write_text

PLOT_NAME = "ap_vs_latency.png"
REPORT_NAME = "report.md"
_HIDDEN = {*IDENTITY_FIELDS, "runtime_version", "config", "timestamp"}
_EVERYTHING_ORDER = (
    "image",
    "method",
    "seconds",
    "encoder_s",
    "decoder_s",
    "postprocess_s",
    "points_prompted",
    "masks",
)
_LABEL_OFFSETS = {"MobileSAM": (5, -11), "Q-TinySAM": (-20, 7)}  # points that share a latency


@dataclass(frozen=True)
class PlotPoint:
    """One of our models on the plot: AP in percent at encoder latency in ms."""

    label: str
    ap: float
    latency_ms: float
    threads: int | None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def markdown_table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    """``columns`` = [(header, record key)] -> a Markdown table of ``rows``."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for _, key in columns) + " |")
    return "\n".join(lines)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _with_derived(record: dict[str, Any]) -> dict[str, Any]:
    row = dict(record)
    if record.get("macs") is not None:
        row["gmacs"] = record["macs"] / 1e9
    if record.get("params") is not None:
        row["mparams"] = record["params"] / 1e6
    if record.get("onnx_bytes") is not None:
        row["onnx_mb"] = record["onnx_bytes"] / 2**20
    # The last two parts of a path say enough (e.g. "onnx/int8", "distill/student.pt").
    row["checkpoint"] = "/".join(Path(record["checkpoint"]).parts[-2:]) if record.get("checkpoint") else "random init"
    return row


COCO_COLUMNS = [
    ("model", "model"),
    ("checkpoint", "checkpoint"),
    ("precision", "precision"),
    ("runtime", "runtime"),
    *[(name.upper().replace("_", " "), name) for name in METRIC_NAMES],
    ("images", "num_images"),
    ("prompts", "num_prompts"),
    ("boxes", "boxes"),
    ("runtime version", "runtime_version"),
    ("device", "device"),
    ("commit", "git_commit"),
]
LATENCY_COLUMNS = [
    ("model", "model"),
    ("component", "component"),
    ("precision", "precision"),
    ("runtime", "runtime"),
    ("threads", "threads"),
    ("batch", "batch"),
    ("median ms", "median_ms"),
    ("IQR ms", "iqr_ms"),
    ("repeats", "repeats"),
    ("params M", "mparams"),
    ("GMACs", "gmacs"),
    ("ONNX MB", "onnx_mb"),
    ("runtime version", "runtime_version"),
    ("device", "device"),
    ("commit", "git_commit"),
]


# `python -m benchmarks distill`: what ran (settings from its config), how fast, where the step's time went.
DISTILL_COLUMNS = [
    ("teacher->student", "model"),
    ("student init", "checkpoint"),
    ("precision", "precision"),
    ("threads", "threads"),
    ("batch", "batch_size"),
    ("prompts/image", "prompts_per_image"),
    ("max points", "max_prompt_iters"),
    ("images/s", "images_per_second_text"),
    ("step ms", "step_ms"),
    *[(f"{name.replace('_', ' ')} ms", f"{name}_ms") for name in (*PHASES, "other")],
    ("peak MB", "peak_memory_mb"),
    ("memory", "peak_memory_kind"),
    ("GPU util %", "gpu_utilization_percent"),
    ("teacher images/s", "teacher_images_per_second"),
    ("steps", "measured_steps"),
    ("runtime version", "runtime_version"),
    ("device", "device"),
    ("commit", "git_commit"),
]


def _distill_row(row: dict[str, Any]) -> dict[str, Any]:
    """The settings a distill record ran with, from its config, and its images/s to 3 significant figures
    (CPU rates such as 0.089 would read 0.09 in the table's general format)."""
    config = row["config"]
    iterations = config.get("max_prompt_iters") if config.get("hard_prompts", True) else 0
    return {
        **row,
        "batch_size": config.get("batch_size"),
        "prompts_per_image": config.get("prompts_per_image"),
        "max_prompt_iters": iterations,
        "images_per_second_text": f"{row['images_per_second']:.3g}",
    }


def _onnx_folder(rec: dict[str, Any]) -> str | None:
    """The folder of an exported model's record (coco: its checkpoint; latency: its file), else None."""
    if rec["runtime"] not in ("onnxruntime", "openvino"):
        return None
    if rec["kind"] == "latency":
        return str(Path(rec["onnx_file"]).parent) if rec.get("onnx_file") else None
    return rec.get("checkpoint")


def plot_points(records: list[dict[str, Any]]) -> tuple[list[PlotPoint], list[str]]:
    """Pair each COCO record with the encoder latency of the same model/precision/runtime.

    ONNX records pair only within the same folder: two INT8 exports of one model (ours and ONNX
    Runtime's quantize_static, say) are different graphs with different latencies. PyTorch records
    pair across checkpoints, since weights do not change PyTorch's speed.
    Returns (points, labels of COCO records that have no matching latency record).
    """
    latency = {}
    for rec in records:
        if rec["kind"] == "latency" and rec.get("component") == "encoder":
            key = (rec["model"], rec["precision"], rec["runtime"], _onnx_folder(rec))
            best = latency.get(key)
            if best is None or (rec["threads"] or 0) > (best["threads"] or 0):
                latency[key] = rec
    points, unmatched = [], []
    for rec in records:
        if rec["kind"] != "coco" or rec.get("ap") is None:
            continue
        folder = _onnx_folder(rec)
        label = f"{rec['model']} {rec['precision']} ({rec['runtime']}{f', {Path(folder).name}' if folder else ''})"
        if not rec.get("checkpoint"):
            label += " [random init]"
        match = latency.get((rec["model"], rec["precision"], rec["runtime"], folder))
        if match is None:
            unmatched.append(label)
        else:
            points.append(PlotPoint(label, rec["ap"], match["median_ms"], match["threads"]))
    return points, unmatched


def render_plot(points: list[PlotPoint], path: str | os.PathLike, device: str = "", boxes: str = "GT boxes") -> Path:
    """AP (%) vs image-encoder latency (ms, log scale): ours and the paper's published points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Our points are numbered on the plot and named in a key below it: they often share an AP
    # (e.g. ~0 with random weights), where text labels would pile up.
    key_lines = [f"{i}: {p.label}, {p.latency_ms:.0f} ms, AP {p.ap:.1f}" for i, p in enumerate(points, 1)]
    # Layout in inches under the axes: x label, legend (2 lines), key, caption (3 lines).
    label_in, legend_in, line_in = 0.55, 0.4, 0.13
    bottom_in = label_in + legend_in + line_in * (len(key_lines) + 3) + 0.15
    height = 4.6 + bottom_in
    fig, ax = plt.subplots(figsize=(8.5, height))
    ax.scatter(
        [p.latency_ms for p in PUBLISHED_POINTS],
        [p.ap for p in PUBLISHED_POINTS],
        marker="s",
        facecolors="none",
        edgecolors="gray",
        s=60,
        label=f"published, not comparable: {PUBLISHED_SOURCE}",
    )
    for p in PUBLISHED_POINTS:
        offset = _LABEL_OFFSETS.get(p.name, (5, 4))
        ax.annotate(p.name, (p.latency_ms, p.ap), textcoords="offset points", xytext=offset, fontsize=8, color="gray")
    if points:
        ax.scatter(
            [p.latency_ms for p in points],
            [p.ap for p in points],
            marker="o",
            color="tab:blue",
            s=40,
            label=f"ours, measured: {boxes}, {device or 'this machine'}",
        )
        for i, p in enumerate(points, 1):
            offset = (4, 5 + 9 * ((i - 1) % 3))  # stagger numbers of points that share an AP
            ax.annotate(
                str(i), (p.latency_ms, p.ap), textcoords="offset points", xytext=offset, fontsize=7, color="tab:blue"
            )
    ax.set_xscale("log")
    latencies = [p.latency_ms for p in (*PUBLISHED_POINTS, *points)]
    ax.set_xlim(min(latencies) / 1.6, max(latencies) * 1.8)
    ax.set_xlabel("image encoder latency (ms, log scale)")
    ax.set_ylabel("COCO mask AP (%)")
    ax.set_ylim(bottom=min([0.0, *[p.ap for p in points]]) - 3, top=max([50.0, *[p.ap for p in points]]) + 3)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Mask AP vs image-encoder latency")
    fig.subplots_adjust(left=0.09, right=0.97, top=1 - 0.35 / height, bottom=bottom_in / height)
    handles, labels = ax.get_legend_handles_labels()
    legend_top = (bottom_in - label_in) / height
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.02, legend_top), fontsize=7, frameon=False)
    caption = [
        *key_lines,
        "",
        "Grey squares: published figures from another protocol (ViTDet-H boxes) and hardware (T4, TensorRT).",
        "Blue dots: measured here, at the encoder latency of the same model/precision/runtime (ONNX: same folder).",
    ]
    text_top = (bottom_in - label_in - legend_in) / height
    fig.text(0.025, text_top, "\n".join(caption), fontsize=7, color="dimgray", va="top", linespacing=1.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path, "wb") as f:  # an interrupted save keeps the previous plot whole
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def render_report(records: list[dict[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``ap_vs_latency.png`` into ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {kind: [_with_derived(r) for r in records if r["kind"] == kind] for kind in RECORD_KINDS}
    for row in rows["coco"]:
        row["boxes"] = "detections" if row["config"].get("detections") else "GT"
    points, unmatched = plot_points(records)
    devices = sorted({r["device"] for r in records})
    boxes = " + ".join(sorted({"detection boxes" if r["boxes"] == "detections" else "GT boxes" for r in rows["coco"]}))
    plot_path = render_plot(points, out_dir / PLOT_NAME, "; ".join(devices), boxes or "GT boxes")
    parts = ["# Benchmark report", "", f"Devices: {'; '.join(devices)}.", ""]
    if rows["coco"]:
        parts += [
            "## COCO zero-shot instance segmentation (mask AP, %)",
            "",
            markdown_table(COCO_COLUMNS, rows["coco"]),
            "",
        ]
    if rows["latency"]:
        parts += ["## Latency (warm, median of repeats)", "", markdown_table(LATENCY_COLUMNS, rows["latency"]), ""]
    if rows["everything"]:
        found = {k for r in rows["everything"] for k, v in r.items() if k not in _HIDDEN and _is_scalar(v)}
        keys = [k for k in _EVERYTHING_ORDER if k in found] + sorted(found - set(_EVERYTHING_ORDER))
        columns = [("model", "model"), ("precision", "precision"), ("threads", "threads"), *[(k, k) for k in keys]]
        parts += ["## Everything mode (hierarchical vs dense)", "", markdown_table(columns, rows["everything"]), ""]
    if rows["distill"]:
        parts += [
            "## Distillation throughput (`python -m benchmarks distill`)",
            "",
            "Milliseconds per training step, means over the measured steps, split by phase (exclusive times: they "
            "add up to the step); `other` is time in no phase. Batch is per process; max points is the most "
            "corrective points per prompt.",
            "",
            markdown_table(DISTILL_COLUMNS, [_distill_row(r) for r in rows["distill"]]),
            "",
        ]
    parts += [
        "## AP vs latency",
        "",
        f"![AP vs latency]({PLOT_NAME})",
        "",
        f"Grey squares are published figures ({PUBLISHED_SOURCE}); they come from another protocol and "
        "hardware and are drawn for orientation only. Blue dots are ours, at the image-encoder latency of the "
        "same model, precision, runtime and ONNX folder (most threads measured).",
    ]
    if unmatched:
        parts += [
            "",
            f"Not plotted (no encoder latency record of the same model/precision/runtime): {', '.join(unmatched)}.",
        ]
    return atomic_write_text(out_dir / REPORT_NAME, "\n".join(parts) + "\n"), plot_path


def report_from_dir(records_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Load every record under ``records_dir`` and render the report into ``out_dir``."""
    return render_report(load_records(records_dir), out_dir)
