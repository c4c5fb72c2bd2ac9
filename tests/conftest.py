"""Fixtures shared by test modules (helpers that are not fixtures live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import synthetic_image, tiny_model

SAM2_IMAGE = synthetic_image(0, (256, 320))[0]  # what the quantized SAM 2 student is calibrated on


@pytest.fixture
def float32_cuda():
    """TF32 rounds products to 10 mantissa bits (1e-3), outside the float32 contracts: hold a GPU to float32
    (harmless on the CPU). Set and restored by hand: the flags are properties that monkeypatch cannot undo."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def quantized_sam2():
    """(sam2_test_student quantized W8A8 with the MSE metric on `SAM2_IMAGE`, its QuantReport); needs the sam2
    extra (mark the test with requires_sam2)."""
    from quantize import PTQConfig, quantize_
    from tests.quantize.conftest import FAST

    sam = tiny_model("sam2_test_student").requires_grad_(False)
    report = quantize_(sam, PTQConfig(method="mse", **FAST), [SAM2_IMAGE], show_progress=False)
    return sam, report


@pytest.fixture(scope="session")
def sam2_exports(quantized_sam2, tmp_path_factory):
    """(the quantized SAM 2 student, its float32 and its int8 ExportResult), in DIR/float32 and DIR/int8 as
    ``python -m quantize`` writes them."""
    from quantize import export_onnx

    sam, _ = quantized_sam2
    out = tmp_path_factory.mktemp("sam2_onnx")
    float_result = export_onnx(sam, out / "float32", "float32", ort_format=False)
    return sam, float_result, export_onnx(sam, out / "int8", "int8", ort_format=False)
