"""Each package exports what a user calls, and nothing else; every exported name says what it is."""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_API = {
    "student_models": [
        "CheckpointError", "MissingExtraError", "ModelSpec", "SamRunner", "TorchSamBackend", "build_sam", "get_spec",
        "list_models", "load_sam", "register_model",
    ],
    "distill": [
        "CacheError", "DistillConfig", "DistillError", "DistillResult", "EmbeddingCache", "distill", "fill_cache",
    ],
    "quantize": [
        "ExportCheckError", "ExportResult", "OnnxSam", "PTQConfig", "QuantReport", "export_onnx", "load_quantized",
        "quantize_", "save_quantized",
    ],
    "hierarchical": [
        "ConfigError", "GeneratorConfig", "HierarchicalMaskGenerator", "agreement_with_sam", "compare_generators",
        "segment_files",
    ],
    "benchmarks": [
        "CocoEvalConfig", "CocoEvalResult", "DemoConfig", "DetectionsError", "LatencyConfig", "RecordError",
        "benchmark_latency", "evaluate_coco", "render_report", "report_from_dir", "run_coco", "run_demo",
        "run_everything", "run_latency",
    ],
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_the_package_exports_exactly_its_public_api(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC_API[package])


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_every_exported_name_has_a_docstring_of_its_own(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)
        doc = inspect.getdoc(obj) or ""
        # A dataclass without a docstring gets its signature as one: that says nothing.
        assert doc and not doc.startswith(f"{name}("), f"{package}.{name} has no docstring"


def test_the_whole_public_api_is_small():
    assert sum(len(names) for names in PUBLIC_API.values()) <= 60
