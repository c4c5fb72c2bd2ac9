"""Quantization and ONNX export of a SAM 2 student: calibration in SAM 2's frame, the three-level graphs checked in
ONNX Runtime with the INT8 rounding rule, and the exported files run through the same runner as PyTorch.

Tolerance for the float32 files against PyTorch: the same graph run by another library's kernels, which may sum in
another order: 1e-4 of the logits' scale (measured here: 4e-7).
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from quantize import OnnxSam, load_quantized, save_quantized
from quantize.calibration import prepare_calibration
from quantize.onnx_export import export_mode
from student_models.data import Sample
from student_models.families import FAMILIES
from student_models.sam2_pipeline import Sam2Features, Sam2Runner, Sam2Transforms, TorchSam2Backend
from tests.conftest import SAM2_IMAGE as IMAGE
from tests.student_models.test_sam2_models import requires_sam2

pytestmark = requires_sam2


def test_calibration_images_and_boxes_are_in_sam2s_square_frame():
    box = np.array([[32.0, 64.0, 160.0, 192.0]], dtype=np.float32)  # in a 320 wide, 256 high image
    (item,) = prepare_calibration([Sample("a", IMAGE, None, box)], 1, 4, seed=0, family="sam2")
    torch.testing.assert_close(item.image, Sam2Transforms(1024).images([IMAGE]), rtol=0, atol=0)
    scale = torch.tensor([1024 / 320, 1024 / 256])
    torch.testing.assert_close(item.coords, torch.from_numpy(box).reshape(1, 2, 2) * scale)
    assert item.labels.tolist() == [[2.0, 3.0]]


def test_both_parts_are_quantized_and_what_the_image_pipeline_ignores_stays_float(quantized_sam2):
    _, report = quantized_sam2
    assert any(name.startswith("image_encoder.trunk.") for name in report.layers)
    assert any(name.startswith("image_encoder.neck.") for name in report.layers)
    # conv_s0/conv_s1 belong to the mask decoder but run on the encoder's side (SAM2Base.forward_image)
    assert {"sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1"} <= set(report.layers)
    attention = "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image"
    assert {f"{attention}.qk_matmul", f"{attention}.av_matmul"} <= set(report.layers)  # the attention adapter
    # the image pipeline's outputs do not depend on the object-score head, and the exported decoder has none
    assert report.unused and all(".pred_obj_score_head." in name for name in report.unused)


def test_the_encoder_graph_gives_the_three_levels_the_decoder_graph_takes(sam2_exports):
    _, float_result, int8 = sam2_exports
    for result in (float_result, int8):
        encoder, decoder = onnx.load(result.files["encoder"]), onnx.load(result.files["decoder"])
        assert [o.name for o in encoder.graph.output] == list(FAMILIES["sam2"].embedding_names)
        assert [i.name for i in decoder.graph.input] == list(FAMILIES["sam2"].decoder_inputs)


def test_the_int8_graphs_pass_the_rounding_check_on_integer_kernels(sam2_exports):
    _, _, int8 = sam2_exports
    assert [check.file for check in int8.checks] == ["encoder.onnx", "decoder.onnx"]
    for check in int8.checks:
        assert check.passed, check.rel_diff
        assert check.rel_diff["rounding_unexplained"] == 0
    assert any(name.startswith("image_encoder.") for name in int8.int8_layers)
    assert any(name.startswith("sam_mask_decoder.transformer.") for name in int8.int8_layers)


def test_the_float32_files_segment_like_pytorch_through_sam2s_runner(sam2_exports):
    sam, float_result, _ = sam2_exports
    onnx_model = OnnxSam(float_result.files["encoder"], float_result.files["decoder"])
    assert isinstance(onnx_model.encode(torch.zeros(1, 3, 1024, 1024)), Sam2Features)
    runners = [onnx_model.runner(chunk_size=3), TorchSam2Backend(sam).runner(chunk_size=3)]
    assert all(isinstance(runner, Sam2Runner) for runner in runners)
    boxes = np.array([[10, 20, 200, 180], [50, 60, 300, 250], [0, 0, 319, 255], [100, 90, 140, 130], [5, 5, 60, 40]])
    points, labels = np.array([[[120.0, 100.0], [30.0, 200.0]]]), np.array([[1, 0]])
    predictions = []
    with export_mode(sam, "float32"):
        for runner in runners:
            runner.set_image(IMAGE)
            predictions.append((runner.predict(boxes=boxes), runner.predict(points, labels, multimask_output=False)))
    for onnx_prediction, torch_prediction in zip(*predictions, strict=True):
        logits = torch_prediction.low_res_logits
        scale = float(logits.abs().max())
        torch.testing.assert_close(onnx_prediction.low_res_logits, logits, rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(onnx_prediction.iou, torch_prediction.iou, rtol=0, atol=1e-4)


def test_a_saved_quantized_sam2_model_loads_with_the_same_outputs(quantized_sam2, tmp_path):
    sam, _ = quantized_sam2
    loaded = load_quantized(save_quantized(sam, tmp_path / "q.pt"))
    image, coords = torch.randn(1, 3, 1024, 1024), torch.rand(2, 2, 2) * 1024
    labels = torch.tensor([[2.0, 3.0], [2.0, 3.0]])
    outputs = []
    for model in (sam, loaded):
        backend = TorchSam2Backend(model)
        outputs.append(backend.decode(backend.encode(image), coords, labels))
    for got, expected in zip(*outputs, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_int8_files_convert_to_openvino_ir_that_passes_its_check(sam2_exports, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from quantize.openvino_runtime import OpenVinoSam, export_openvino

    sam, _, int8 = sam2_exports
    for key in ("encoder", "decoder"):
        shutil.copy(int8.files[key], tmp_path)
    checks = export_openvino(sam, tmp_path, "int8")
    assert [check.file for check in checks] == ["encoder.xml", "decoder.xml"] and all(c.passed for c in checks)
    openvino_model = OpenVinoSam(tmp_path / "encoder.xml", tmp_path / "decoder.xml")
    assert openvino_model.family is FAMILIES["sam2"] and isinstance(openvino_model.runner(), Sam2Runner)
