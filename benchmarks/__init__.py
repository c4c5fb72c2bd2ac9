"""Benchmarks: COCO zero-shot instance segmentation AP, latency, everything mode, reports, demo.

Run ``python -m benchmarks coco|latency|everything|report|demo``; the library calls are below.
"""

from benchmarks.coco_eval import CocoEvalConfig, CocoEvalResult, DetectionsError, evaluate_coco
from benchmarks.demo import DemoConfig, run_demo
from benchmarks.everything import run_everything
from benchmarks.latency import LatencyConfig, LatencyRunner, Timing, benchmark_latency, count_macs
from benchmarks.records import RecordError, load_records, make_record, write_records
from benchmarks.report import render_report, report_from_dir
from benchmarks.runs import (
    LoadedModel,
    OnnxModel,
    StageMissingError,
    load_torch_model,
    onnx_pair_in,
    run_coco,
    run_latency,
)
from benchmarks.synthetic_coco import write_synthetic_coco

__all__ = [
    "CocoEvalConfig",
    "CocoEvalResult",
    "DemoConfig",
    "DetectionsError",
    "LatencyConfig",
    "LatencyRunner",
    "LoadedModel",
    "OnnxModel",
    "RecordError",
    "StageMissingError",
    "Timing",
    "benchmark_latency",
    "count_macs",
    "evaluate_coco",
    "load_records",
    "load_torch_model",
    "make_record",
    "onnx_pair_in",
    "render_report",
    "report_from_dir",
    "run_coco",
    "run_demo",
    "run_everything",
    "run_latency",
    "write_records",
    "write_synthetic_coco",
]
