"""Benchmarks: COCO zero-shot instance segmentation AP, latency, everything mode, reports, demo.

Run ``python -m benchmarks coco|latency|everything|report|demo``; the library calls are below.
"""

from benchmarks.coco_eval import CocoEvalConfig, CocoEvalResult, DetectionsError, evaluate_coco
from benchmarks.latency import LatencyConfig, LatencyRunner, Timing, benchmark_latency, count_macs
from benchmarks.predictors import BoxPredictor, OnnxBoxPredictor, TorchBoxPredictor, upscale_masks
from benchmarks.records import RecordError, load_records, make_record, write_records
from benchmarks.report import render_report, report_from_dir
from benchmarks.runs import StageMissingError, run_coco, run_latency
from benchmarks.synthetic_coco import write_synthetic_coco

__all__ = [
    "BoxPredictor",
    "CocoEvalConfig",
    "CocoEvalResult",
    "DetectionsError",
    "LatencyConfig",
    "LatencyRunner",
    "OnnxBoxPredictor",
    "RecordError",
    "StageMissingError",
    "Timing",
    "TorchBoxPredictor",
    "benchmark_latency",
    "count_macs",
    "evaluate_coco",
    "load_records",
    "make_record",
    "render_report",
    "report_from_dir",
    "run_coco",
    "run_latency",
    "upscale_masks",
    "write_records",
    "write_synthetic_coco",
]
