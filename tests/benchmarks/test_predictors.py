"""Box predictors against SAM's own predictor and post-processing on the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from benchmarks.predictors import TorchBoxPredictor
from tests.helpers import requires_cuda, synthetic_image, tiny_model


def test_torch_predictor_matches_sam_predictor_best_multimask():
    sam = tiny_model()
    image, masks = synthetic_image(seed=1)
    ys, xs = np.nonzero(masks[0])
    boxes = np.array([[xs.min(), ys.min(), xs.max(), ys.max()], [5, 7, 120, 90], [0, 0, 319, 255]], dtype=np.float32)

    predictor = TorchBoxPredictor(sam, chunk_size=2)  # two chunks: batching must not change results
    predictor.set_image(image)
    ours, our_iou = predictor.predict_boxes(boxes)

    reference = SamPredictor(sam)
    reference.set_image(image)
    boxes_1024 = reference.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
    ref_masks, ref_iou, _ = reference.predict_torch(None, None, boxes=boxes_1024, multimask_output=True)
    best = ref_iou.argmax(dim=1)
    rows = torch.arange(len(boxes))
    assert ours.shape == (3, *image.shape[:2]) and ours.dtype == bool
    np.testing.assert_allclose(our_iou, ref_iou[rows, best].numpy(), atol=1e-5)
    mismatch = (ours != ref_masks[rows, best].numpy()).mean()
    assert mismatch < 1e-4  # logits exactly at the 0 threshold may flip with batch-dependent rounding


def test_predict_before_set_image_is_an_error():
    with pytest.raises(RuntimeError, match=r"call set_image\(image\) before predict_boxes"):
        TorchBoxPredictor(tiny_model()).predict_boxes(np.zeros((1, 4)))


@requires_cuda
def test_cuda_predictor_agrees_with_the_cpu_one():
    """Box prompts decoded in batches on the GPU give the CPU's masks up to logits near the threshold."""
    image, _ = synthetic_image(seed=2)
    boxes = np.array([[5, 7, 120, 90], [0, 0, 319, 255], [40, 30, 200, 180]], dtype=np.float32)
    results = []
    for device in ("cpu", "cuda"):
        predictor = TorchBoxPredictor(tiny_model(), chunk_size=2, device=device)
        predictor.set_image(image)
        results.append(predictor.predict_boxes(boxes))
    (cpu_masks, cpu_iou), (cuda_masks, cuda_iou) = results
    assert cuda_masks.dtype == bool and cuda_masks.shape == cpu_masks.shape
    np.testing.assert_allclose(cuda_iou, cpu_iou, atol=1e-3)
    assert (cuda_masks != cpu_masks).mean() < 1e-3  # TF32/cuDNN rounding flips only near-zero logits
