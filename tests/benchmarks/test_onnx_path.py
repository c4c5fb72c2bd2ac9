"""The ONNX Runtime back-end against the PyTorch one under the same `SamRunner`, on the same float tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.coco_eval import CocoEvalConfig, evaluate_coco
from benchmarks.runs import onnx_pair_in, onnx_runner
from quantize import export_onnx
from student_models.sam_runner import SamRunner, TorchSamBackend
from tests.helpers import synthetic_image, tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sam = tiny_model()
    folder = tmp_path_factory.mktemp("onnx_fp32")
    export_onnx(sam, folder, ort_format=False)
    return sam, onnx_pair_in(folder)


def test_onnx_and_pytorch_give_the_same_ap_and_masks(exported, synthetic_coco):
    sam, pair = exported
    assert pair.precision == "fp32"
    config = CocoEvalConfig(max_images=2, chunk_size=2)
    pytorch_runner = SamRunner(TorchSamBackend(sam))
    ort_runner = SamRunner(onnx_runner(pair, num_threads=1))
    torch_result = evaluate_coco(pytorch_runner, synthetic_coco, config, progress=False)
    onnx_result = evaluate_coco(ort_runner, synthetic_coco, config, progress=False)
    for name, value in torch_result.metrics.items():
        if value is None:
            assert onnx_result.metrics[name] is None
        else:
            assert onnx_result.metrics[name] == pytest.approx(value, abs=0.1), name

    # With random weights AP is ~0 on both paths, so compare the masks themselves as well.
    image, masks = synthetic_image(seed=5)
    ys, xs = np.nonzero(masks[0])
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()], [10, 12, 200, 150]], dtype=np.float32)
    outputs = []
    for runner in (pytorch_runner, ort_runner):
        runner.set_image(image)
        outputs.append(runner.predict_boxes(boxes))
    (torch_masks, torch_iou), (onnx_masks, onnx_iou) = outputs
    assert torch_masks.any()  # a non-trivial comparison
    assert (torch_masks != onnx_masks).float().mean() < 1e-3
    torch.testing.assert_close(onnx_iou, torch_iou, atol=1e-4, rtol=0)
