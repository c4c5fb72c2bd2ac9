"""OpenVINO: IR converted from the checked ONNX files, checked layer by layer in OpenVINO, run as a SamBackend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import quantize.openvino_runtime as openvino_runtime
from quantize import ExportCheckError
from quantize.onnx_export import TOLERANCE, export_mode
from quantize.openvino_runtime import OpenVinoSam, export_openvino
from student_models.prompts import box_prompts
from student_models.sam_runner import TorchSamBackend

ov = pytest.importorskip("openvino", reason='the OpenVINO runtime is an extra: pip install -e ".[openvino]"')


@pytest.fixture(scope="module")
def onnx_dir(exports):
    """(the quantized tinyvit_test, the folder of its float_*.onnx and int8 *.onnx files)."""
    sam, _, int8 = exports
    return sam, Path(int8.files["encoder"]).parent


def test_float32_ir_matches_pytorch_and_runs_as_a_backend(onnx_dir):
    sam, folder = onnx_dir
    checks = export_openvino(sam, folder, "float32", prefix="float_")
    assert [c.file for c in checks] == ["float_encoder.xml", "float_decoder.xml"], checks
    assert all(c.passed for c in checks), checks
    runner = OpenVinoSam(folder / "float_encoder.xml", folder / "float_decoder.xml", num_threads=1)
    reference = TorchSamBackend(sam)
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32))
    with torch.no_grad(), export_mode(sam, "float32"):
        expected = reference.encode(images)
        embedding = runner.encode(images)
        torch.testing.assert_close(embedding, expected, atol=TOLERANCE["float32"]["max"], rtol=0)
        coords, labels = (torch.from_numpy(a) for a in box_prompts(np.array([[10, 20, 400, 500], [0, 0, 50, 60]])))
        masks, iou = runner.decode(embedding, coords, labels)
        ref_masks, ref_iou = reference.decode(embedding, coords, labels)
    assert masks.shape == (2, 4, 256, 256) and iou.shape == (2, 4)
    torch.testing.assert_close(masks, ref_masks, atol=1e-3, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="expects Bx3x1024x1024 preprocessed images"):
        runner.encode(torch.zeros(3, 1024, 1024))


@pytest.fixture(scope="module")
def int8_checks(onnx_dir):
    """The checks of the INT8 IR, written once into `onnx_dir`'s folder."""
    sam, folder = onnx_dir
    return export_openvino(sam, folder, "int8")


def test_int8_ir_passes_the_layer_by_layer_check(onnx_dir, int8_checks):
    _, folder = onnx_dir
    checks = int8_checks
    assert all(c.passed for c in checks), checks
    assert all(c.rel_diff["rounding_unexplained"] == 0 and c.info["forced_quantizers"] > 10 for c in checks)
    assert (folder / "encoder.xml").is_file() and (folder / "decoder.bin").is_file()


def test_the_int8_ir_has_its_1x1_convolutions_as_convolutions(onnx_dir, int8_checks, tmp_path):
    """ONNX Runtime's graph writes them as NHWC Gemms between transposes; OpenVINO would run those transposes."""
    sam, folder = onnx_dir
    from_ort_graph = openvino_runtime.write_openvino(folder / "encoder.onnx", tmp_path / "encoder.xml")
    count = lambda path, op: path.read_text().count(f'type="{op}"')  # noqa: E731
    shipped = folder / "encoder.xml"
    assert count(shipped, "Transpose") < count(from_ort_graph, "Transpose")
    assert count(shipped, "Convolution") > count(from_ort_graph, "Convolution")
    layers = [m for m in sam.modules() if getattr(m, "is_pointwise", False)]
    assert layers and all(layer.pointwise_as_gemm for layer in layers)  # the context put the default back


def test_bfloat16_inference_is_refused_where_the_cpu_would_use_it(onnx_dir, monkeypatch):
    """OpenVINO's default on bf16 CPUs: the float parts in bfloat16. The check must see that it is another model."""
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16: OpenVINO runs float32 here whatever the hint")
    sam, folder = onnx_dir
    monkeypatch.setattr(openvino_runtime, "PRECISION", {"INFERENCE_PRECISION_HINT": "bf16"})
    with pytest.raises(ExportCheckError, match="OpenVINO disagrees with PyTorch: encoder.xml: .*rounding_unexplained"):
        export_openvino(sam, folder, "int8")
    assert not (folder / "encoder.xml").exists()
