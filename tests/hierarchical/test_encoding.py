"""Our one-pass encoders give exactly SAM's RLEs; the overlay paints masks, or says it found none."""

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import coco_encode_rle, mask_to_rle_pytorch, rle_to_mask

from hierarchical.encoding import encode_masks, masks_to_uncompressed_rle
from hierarchical.overlay import render_overlay
from student_models.masks import encode_rle


@pytest.fixture
def masks():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 13, 17, generator=generator) > 0.6
    masks[1] = False  # empty
    masks[2] = True  # full
    masks[3, 0, 0] = True  # starts with a foreground run
    masks[4, 0, 0] = False
    return masks


def test_uncompressed_rle_matches_sams(masks):
    assert masks_to_uncompressed_rle(masks) == mask_to_rle_pytorch(masks)
    for rle, mask in zip(masks_to_uncompressed_rle(masks), masks, strict=True):
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())
    assert masks_to_uncompressed_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_coco_rle_matches_sams(masks):
    assert encode_rle(masks) == [coco_encode_rle(rle) for rle in mask_to_rle_pytorch(masks)]
    assert all(isinstance(rle["counts"], str) for rle in encode_rle(masks))


def test_binary_mode_returns_the_masks_and_unknown_mode_is_named(masks):
    out = encode_masks(masks, "binary_mask")
    assert len(out) == 5 and all(np.array_equal(a, b.numpy()) for a, b in zip(out, masks, strict=True))
    with pytest.raises(ValueError, match="unknown output_mode 'png'"):
        encode_masks(masks, "png")


def test_overlay_tints_masked_pixels_only():
    image = np.full((10, 12, 3), 100, dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:8, 3:9] = True
    out = render_overlay(image, [mask])
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any(axis=-1).all()


def test_overlay_without_masks_says_so_on_the_image():
    image = np.full((120, 160, 3), 100, dtype=np.uint8)
    out = render_overlay(image, [])
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != image).any(axis=-1)
    assert changed[:40, :].sum() > 200  # the black band and white letters, top left
    np.testing.assert_array_equal(out[60:], image[60:])  # the rest of the photo is untouched
    assert (out.min(axis=-1) > 200).sum() > 50  # white letters on the band
