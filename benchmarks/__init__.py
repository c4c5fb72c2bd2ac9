"""Benchmarks: COCO zero-shot instance segmentation AP, latency, everything mode, reports, demo.

Run ``python -m benchmarks coco|latency|everything|report|demo``; the library calls are below.
"""

from benchmarks.coco_eval import CocoEvalConfig, CocoEvalResult, DetectionsError, evaluate_coco
from benchmarks.demo import DemoConfig, run_demo
from benchmarks.everything import run_everything
from benchmarks.latency import LatencyConfig, benchmark_latency
from benchmarks.records import RecordError
from benchmarks.report import render_report, report_from_dir
from benchmarks.runs import run_coco, run_latency

__all__ = [
    "CocoEvalConfig",
    "CocoEvalResult",
    "DemoConfig",
    "DetectionsError",
    "LatencyConfig",
    "RecordError",
    "benchmark_latency",
    "evaluate_coco",
    "render_report",
    "report_from_dir",
    "run_coco",
    "run_demo",
    "run_everything",
    "run_latency",
]
