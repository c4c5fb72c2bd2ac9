"""Shared fixtures: one small quantized tinyvit_test model for the save/load and export tests."""

from __future__ import annotations

import pytest

from quantize import PTQConfig, export_onnx, quantize_
from tests.helpers import synthetic_image, tiny_model

# Small search settings keep the suite within its CPU budget; the algorithm is the same.
FAST = dict(num_calib=1, max_prompts=1, num_alphas=6, rounds=1, max_split_exponent=6, search_tokens=16)


@pytest.fixture(scope="session")
def quantized_tinyvit():
    """(quantized tinyvit_test W8A8 with twin-uniform inputs, its QuantReport)."""
    sam = tiny_model("tinyvit_test")
    report = quantize_(sam, PTQConfig(method="mse", **FAST), [synthetic_image(0)[0]], show_progress=False)
    return sam, report


@pytest.fixture(scope="session")
def exports(quantized_tinyvit, tmp_path_factory):
    """(the quantized model, its float32 ExportResult (files prefixed float_), its int8 ExportResult), one folder."""
    sam, _ = quantized_tinyvit
    out = tmp_path_factory.mktemp("onnx")
    float_result = export_onnx(sam, out, "float32", ort_format=False, prefix="float_")
    return sam, float_result, export_onnx(sam, out, "int8")
