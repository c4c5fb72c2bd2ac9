"""ONNX export: ORT vs PyTorch for float32 and INT8, integer kernels, and the OnnxSam runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantize import OnnxSam, PTQConfig, export_onnx, quantize_
from quantize.modules import QuantConv2d
from quantize.onnx_export import TOLERANCE
from quantize.ptq import quantized_layers
from student_models.prompts import box_prompts, point_prompts
from student_models.sam_runner import TorchSamBackend
from tests.helpers import synthetic_image, tiny_model
from tests.quantize.conftest import FAST


def test_float_export_matches_pytorch(exports):
    _, result, _ = exports
    assert {c.file for c in result.checks} == {"float_encoder.onnx", "float_decoder.onnx"}
    for check in result.checks:
        assert check.passed and all(v <= TOLERANCE["float32"]["max"] for k, v in check.rel_diff.items()), check


def test_int8_export_matches_simulated_model_and_uses_integer_kernels(exports):
    _, float_result, result = exports
    assert {c.file for c in result.checks} == {"encoder.onnx", "decoder.onnx", "encoder.ort", "decoder.ort"}
    assert all(check.passed for check in result.checks), result.checks
    encoder_ops = result.ort_kernels["encoder"]
    decoder_ops = result.ort_kernels["decoder"]
    integer_ops = ("QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv", "MatMulInteger")
    assert sum(encoder_ops.get(op, 0) for op in integer_ops) >= 10, encoder_ops
    # one integer product per uniform input of a Linear or attention product, two per twin-uniform one
    assert decoder_ops.get("MatMulIntegerToFloat", 0) + decoder_ops.get("QGemm", 0) >= 40, decoder_ops
    assert result.sizes_mb["decoder"] < 0.5 * float_result.sizes_mb["decoder"]  # int8 weights
    assert any("av_matmul" in name for name in result.int8_layers)  # twin-softmax input: two integer products


def test_onnx_sam_is_a_backend_with_dynamic_prompts(exports, tmp_path):
    sam, result, _ = exports
    runner = OnnxSam(result.files["encoder"], result.files["decoder"], num_threads=1)
    reference = TorchSamBackend(tiny_model("tinyvit_test"))
    assert runner.device == torch.device("cpu")
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 1024, 1024)).astype(np.float32))
    embeddings = runner.encode(images)  # two images: one ORT call each
    assert isinstance(embeddings, torch.Tensor) and embeddings.shape == (2, 256, 64, 64)
    torch.testing.assert_close(embeddings, reference.encode(images), atol=1e-3, rtol=0)
    embedding = embeddings[1:]
    for coords, labels in (
        box_prompts(np.array([[10, 20, 400, 500], [100, 100, 900, 800], [0, 0, 50, 60]])),  # B=3 boxes
        point_prompts(np.array([[[300, 200], [310, 600]]]), np.array([[1, 0]])),  # 1 prompt, 2 points + pad
    ):
        coords, labels = torch.from_numpy(coords), torch.from_numpy(labels)
        masks, iou = runner.decode(embedding, coords, labels)
        assert masks.shape == (len(coords), 4, 256, 256) and iou.shape == (len(coords), 4)
        ref_masks, ref_iou = reference.decode(embedding, coords, labels)
        torch.testing.assert_close(masks, ref_masks, atol=1e-3, rtol=0)
        torch.testing.assert_close(iou, ref_iou, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="expects point_coords BxNx2 and point_labels BxN"):
        runner.decode(embedding, torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="expects Bx3x1024x1024 preprocessed images"):
        runner.encode(torch.zeros(3, 1024, 1024))


def test_decoder_graph_equals_sam_prompt_encoder_and_decoder():
    from student_models.sam_runner import PointPromptDecoder

    sam = tiny_model("sam_vit_test")
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[10.0, 20, 400, 500], [0, 0, 1000, 700]])
    coords, labels = (torch.from_numpy(a) for a in box_prompts(boxes.numpy()))
    with torch.no_grad():
        masks, iou = PointPromptDecoder(sam)(embedding, coords, labels)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        ref_masks, ref_iou = sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=1e-5)
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-5)


def test_failed_export_leaves_no_shippable_file(exports, tmp_path, monkeypatch):
    """A check that fails writes nothing into the output folder; the graphs wait in `<precision>.failed/`."""
    import quantize.onnx_export
    from quantize.onnx_export import ExportCheckError

    sam, _, _ = exports
    monkeypatch.setitem(quantize.onnx_export.TOLERANCE, "float32", {"rms": -1.0, "max": -1.0})
    with pytest.raises(ExportCheckError, match=r"Nothing was written to .*float32\.failed for debugging"):
        export_onnx(sam, tmp_path, "float32", ort_format=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float32.failed"]
    kept = tmp_path / "float32.failed"
    assert sorted(p.name for p in kept.iterdir()) == ["decoder.onnx", "encoder.onnx", "export_float32.json"]
    assert '"passed": false' in (kept / "export_float32.json").read_text()

    monkeypatch.undo()
    result = export_onnx(sam, tmp_path, "float32", ort_format=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "encoder.onnx", "export_float32.json"]
    assert result.files == {"encoder": str(tmp_path / "encoder.onnx"), "decoder": str(tmp_path / "decoder.onnx")}


@pytest.mark.slow
def test_repvit_m0_9_exports_and_passes_the_int8_check(tmp_path):
    """EdgeSAM's CNN student, the real architecture with random weights (about 3 minutes on 2 busy cores)."""
    sam = tiny_model("repvit_m0_9")
    report = quantize_(sam, PTQConfig(method="minmax", **FAST), [synthetic_image(0)[0]], show_progress=False)
    mixer = "image_encoder.backbone.stages_0.blocks.0.token_mixer"
    assert isinstance(quantized_layers(sam)[mixer], QuantConv2d)  # RepVggDw's three branches: one depthwise conv
    assert report.layers[mixer]["input_scale_from"] == "image_encoder.backbone.stem.conv2.c.output_quant"
    result = export_onnx(sam, tmp_path, "int8", ort_format=False)
    assert all(check.passed for check in result.checks), result.checks
    assert result.ort_kernels["encoder"].get("QLinearConv", 0) >= 20, result.ort_kernels["encoder"]
