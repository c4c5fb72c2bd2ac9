"""The INT8 export across calibration sizes, models, search methods and twin ranges: which cells export.

    python -m benchmarks export-matrix --calib ../shared/data/coco_val2017_tiny --out runs/export_matrix \\
        [--models tinyvit_5m repvit_m0_9] [--num-calib 1 8 32] [--methods mse hessian] \\
        [--alpha-candidates 20] [--rounds 1] [--runtime ort openvino]

Every cell is one `python -m quantize` run in its own process, exactly the command a user types
(with and without ``--no-twin``), writing into ``OUT/<cell>/``. A finished cell is read back from
its ``cell.json`` instead of run again, so a killed matrix resumes where it stopped.
Per cell the record keeps the exit status, the error line of a refused export, the wall time, the
INT8 checks' figures that decide a refusal (values rounded apart, and how many of them no tie
explains), the layers that kept twin ranges and the held-out embedding SQNR against float; the
command writes ``matrix.json`` and ``matrix.md`` into OUT.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.records import cpu_isa, cpu_name
from student_models.io import atomic_write_text, writable_folder


@dataclass(frozen=True)
class Cell:
    model: str
    num_calib: int
    method: str
    twin: bool

    @property
    def name(self) -> str:
        return f"{self.model}_calib{self.num_calib}_{self.method}_{'twin' if self.twin else 'no-twin'}"


def quantize_command(cell: Cell, calib: str, out: Path, options: list[str]) -> list[str]:
    command = [sys.executable, "-m", "quantize", "--model", cell.model, "--calib", calib, "--out", str(out)]
    command += ["--num-calib", str(cell.num_calib), "--method", cell.method, *options]
    return command + ([] if cell.twin else ["--no-twin"])


def int8_figures(summary: dict) -> dict:
    """Per INT8 file (ONNX Runtime's, then OpenVINO's IR where exported): the fraction of quantizer values
    rounded apart from PyTorch and those no tie explains."""
    figures = {}
    export = summary["export"]["int8"]
    for check in export["checks"] + export.get("openvino", {}).get("checks", []):
        figures[check["file"]] = {
            "passed": check["passed"],
            "rounding_mismatch": check["info"]["rounding_mismatch"],
            "rounding_unexplained": check["rel_diff"]["rounding_unexplained"],
        }
    return figures


def run_cell(cell: Cell, calib: str, out: Path, options: list[str]) -> dict:
    """The record of one cell: read back from its ``cell.json``, or run `python -m quantize` and write it.

    Only a finished run leaves ``cell.json`` (an export or a one-line refusal, exit status 0 or 1): a
    cell killed midway runs again.
    """
    folder = out / cell.name
    if (folder / "cell.json").is_file():
        return json.loads((folder / "cell.json").read_text())
    command = quantize_command(cell, calib, folder, options)
    record = {**asdict(cell), "command": " ".join(["python", *command[1:]])}
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    record["seconds"] = round(time.time() - start, 1)
    if done.returncode == 0:
        summary = json.loads((folder / "summary.json").read_text())
        record.update(
            exported=True,
            quantize_seconds=summary["quantize_seconds"],
            int8=int8_figures(summary),
            twin_layers=sorted(n for n, c in summary["report"]["twin_candidates"].items() if c["twin"]),
            twin_candidates=len(summary["report"]["twin_candidates"]),
            sqnr_embedding_db=summary.get("fidelity_vs_float", {}).get("sqnr_embedding_db"),
        )
    elif done.returncode == 1:
        record.update(exported=False, error=done.stderr.strip().splitlines()[-1])
    else:
        raise RuntimeError(f"{record['command']} ended with exit status {done.returncode}:\n{done.stderr[-2000:]}")
    atomic_write_text(folder / "cell.json", json.dumps(record, indent=2))
    return record


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| model | calib images | method | twin | exported | values rounded apart (enc / dec) | unexplained | "
        "twin layers | SQNR emb. dB | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["exported"]:
            apart = " / ".join(
                f"{max(c['rounding_mismatch'] for f, c in r['int8'].items() if f.startswith(part)):.1e}"
                for part in ("encoder", "decoder")
            )  # the worst of each part's files (.onnx, .ort)
            unexplained = max(c["rounding_unexplained"] for c in r["int8"].values())
            twin = f"{len(r['twin_layers'])} of {r['twin_candidates']}"
            result = f"yes | {apart} | {unexplained:g} | {twin} | {r['sqnr_embedding_db']:.2f}"
        else:
            reason = r["error"].split(". ")[0]  # what failed; the rest says what was kept (in matrix.json)
            result = f"**no**: {reason} | | | |"
        lines.append(f"| {r['model']} | {r['num_calib']} | {r['method']} | {r['twin']} | {result} | {r['seconds']} |")
    return "\n".join(lines)


def run_matrix(
    calib: str,
    out: str | Path,
    models: list[str],
    num_calib: list[int],
    methods: list[str],
    options: list[str],
) -> tuple[dict, str]:
    """Run (or read back) every cell; write matrix.json and matrix.md into `out`; return both."""
    out = writable_folder(Path(out))
    records = []
    # Models innermost but for twin, so that a matrix stopped early has covered every model.
    for n, method, model, twin in itertools.product(num_calib, methods, models, (True, False)):
        records.append(run_cell(Cell(model, n, method, twin), calib, out, options))
        print(f"{records[-1]['command']}: {'exported' if records[-1]['exported'] else records[-1]['error']}")
        matrix = {"cpu": cpu_name(), "isa": cpu_isa(), "date": time.strftime("%Y-%m-%d"), "cells": records}
        atomic_write_text(out / "matrix.json", json.dumps(matrix, indent=2))
    table = markdown_table(records)
    atomic_write_text(out / "matrix.md", table + "\n")
    return matrix, table
