"""Benchmark records: one flat dict per measured figure set, written as JSON.

Every record says what was measured (``kind``: "coco", "latency", "everything" or "distill"), on what
(``model``, ``checkpoint``, ``precision``, ``runtime`` and its ``runtime_version``, ``threads``), where
(``device``: the CPU model name from /proc/cpuinfo with its integer-product ISA, or the CUDA device
name) and from which code (``git_commit``),
with the exact ``config`` that produced it, then its figures as top-level keys (``ap``,
``median_ms``, ...). The report reads nothing else.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import torch

from student_models.io import atomic_write_text

RECORD_KINDS = ("coco", "latency", "everything", "distill")
IDENTITY_FIELDS = ("kind", "model", "checkpoint", "precision", "runtime", "threads", "device", "git_commit")


class RecordError(ValueError):
    """A record or record file that is not what the report expects."""


@cache
def cpu_name() -> str:
    """The CPU model name (first ``model name`` line of /proc/cpuinfo, else the platform's)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    name = match.group(1).strip() if match else (platform.processor() or platform.machine())
    return f"{name} ({os.cpu_count()} logical cores)"


@cache
def cpu_isa() -> str:
    """The widest integer-product extension the CPU reports: "AMX", "AVX-512 VNNI", "AVX-VNNI", "AVX2" or
    the machine type (INT8 speed, and on x86 without VNNI correctness, depend on it)."""
    try:
        flags = set(re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    for flag, name in (
        ("amx_int8", "AMX"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx_vnni", "AVX-VNNI"),
        ("avx2", "AVX2"),
    ):
        if flag in flags:
            return name
    return platform.machine()


def device_name(device: str | torch.device = "cpu") -> str:
    """A human-readable name of the device a figure was measured on; a CPU's with its `cpu_isa`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {cpu_isa()}"


# The package whose version a record of each runtime names.
RUNTIME_PACKAGES = {
    "pytorch": "torch",
    "pytorch-compile": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}


def runtime_version(runtime: str) -> str | None:
    """The installed version of `runtime`'s package (None for a runtime without one, or not installed)."""
    try:
        return importlib.metadata.version(RUNTIME_PACKAGES[runtime])
    except (KeyError, importlib.metadata.PackageNotFoundError):
        return None


@cache
def git_commit() -> str:
    """The short commit of this repository when first asked (cached for the process), ``+dirty`` when
    tracked files differ from it. Benchmarks call it before measuring, so it names the code that ran."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def make_record(
    kind: str,
    *,
    model: str,
    checkpoint: str | None,
    precision: str,
    runtime: str,
    threads: int | None,
    config: dict[str, Any],
    device: str | None = None,
    **figures: Any,
) -> dict[str, Any]:
    """A flat record: identity fields, ``config``, a UTC ``timestamp`` and the figures."""
    if kind not in RECORD_KINDS:
        raise RecordError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    clash = set(figures) & {*IDENTITY_FIELDS, "runtime_version", "config", "timestamp"}
    if clash:
        raise RecordError(f"figure names clash with record fields: {sorted(clash)}")
    record = {
        "kind": kind,
        "model": model,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "precision": precision,
        "runtime": runtime,
        "runtime_version": runtime_version(runtime),
        "threads": threads,
        "device": device or device_name("cpu"),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
    }
    record.update(figures)
    return record


def make_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create the records folder; the benchmarks call it before measuring, so an unwritable
    ``--out`` fails at once rather than after hours of work."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_records(records: list[dict[str, Any]], out_dir: str | os.PathLike, stem: str) -> Path:
    """Write ``records`` to ``out_dir/<stem>-<random>.json`` (never overwriting) and return the path.

    Written atomically: a kill or a full disk leaves no half-written file for `load_records` to refuse.
    """
    for record in records:
        validate_record(record)
    path = make_out_dir(out_dir) / f"{stem}-{uuid.uuid4().hex[:8]}.json"
    return atomic_write_text(path, json.dumps(records, indent=2, allow_nan=False) + "\n")


def validate_record(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in (*IDENTITY_FIELDS, "config") if f not in record]
    if missing:
        raise RecordError(f"record is missing {missing}: {json.dumps(record)[:200]}")
    if record["kind"] not in RECORD_KINDS:
        raise RecordError(f"unknown record kind {record['kind']!r}")
    return record


def load_records(records_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record in the ``*.json`` files under ``records_dir`` (recursively), sorted by file name."""
    root = Path(records_dir)
    if not root.is_dir():
        raise RecordError(f"{root}: no such folder of records")
    files = sorted(root.rglob("*.json"))
    if not files:
        raise RecordError(f"{root}: holds no *.json record files")
    records = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not JSON ({exc})") from exc
        for record in data if isinstance(data, list) else [data]:
            try:
                records.append(validate_record(record))
            except RecordError as exc:
                raise RecordError(f"{path}: {exc}") from exc
    return records
