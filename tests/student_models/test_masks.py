"""The shared mask helpers against the references they stand for: pycocotools and `Sam.postprocess_masks`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from student_models.masks import decode_rle, encode_rle, mask_iou, upscale_logits
from tests.helpers import tiny_model


def _masks(count: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 23, 31)) > 0.6


def test_rle_is_pycocotools_per_mask_and_round_trips():
    masks = _masks()
    rles = encode_rle(torch.from_numpy(masks))
    for mask, rle in zip(masks, rles, strict=True):
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": expected["size"], "counts": expected["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_rle(rles), masks)
    assert encode_rle(np.zeros((0, 4, 4), bool)) == []


def test_rle_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match=r"encode_rle takes KxHxW masks, got shape \(4, 4\)"):
        encode_rle(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="decode_rle needs at least one RLE"):
        decode_rle([])


def test_mask_iou_equals_pycocotools_on_numpy_and_torch():
    a, b = _masks(6, seed=1), _masks(6, seed=2)
    rle_a, rle_b = encode_rle(a), encode_rle(b)
    expected = np.array([mask_utils.iou([x], [y], [0])[0, 0] for x, y in zip(rle_a, rle_b, strict=True)])
    np.testing.assert_allclose(mask_iou(a, b), expected, rtol=1e-12)
    torch.testing.assert_close(mask_iou(torch.from_numpy(a), torch.from_numpy(b)), torch.from_numpy(expected).float())
    # Broadcast: every mask of `a` against every mask of `b`, as pycocotools' matrix.
    matrix = mask_utils.iou(rle_a, rle_b, [0] * len(rle_b))
    np.testing.assert_allclose(mask_iou(a[:, None], b[None]), matrix, rtol=1e-12)


def test_mask_iou_of_two_empty_masks_is_one_and_logits_are_refused():
    empty = np.zeros((2, 8, 8), bool)
    full = np.ones((2, 8, 8), bool)
    np.testing.assert_array_equal(mask_iou(empty, empty), [1.0, 1.0])
    np.testing.assert_array_equal(mask_iou(empty, full), [0.0, 0.0])
    with pytest.raises(TypeError, match=r"mask_iou takes bool masks, got float32 and bool \(binarise logits"):
        mask_iou(empty.astype(np.float32), full)


def test_upscale_logits_is_sams_postprocess_masks_bit_for_bit():
    low_res = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    input_size, original_size = (819, 1024), (200, 250)  # a 200x250 image resized so its long side is 1024
    expected = tiny_model().postprocess_masks(low_res, input_size, original_size)
    torch.testing.assert_close(upscale_logits(low_res, input_size, original_size), expected, rtol=0, atol=0)
