"""Hierarchical mode on a tiny model: the re-prompt set, full/no coverage, the merged NMS, bad input."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from torchvision.ops import batched_nms

from hierarchical import ConfigError, GeneratorConfig, HierarchicalMaskGenerator
from hierarchical.grid import layer_point_grids, scale_points
from student_models.preprocessing import ImageError
from tests.helpers import synthetic_image

PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def prompted_points(records):
    return {tuple(np.round(r["point_coords"][0], 6)) for r in records}


@pytest.fixture(scope="module")
def image():
    return synthetic_image(4, (72, 96))[0]


def test_reprompt_set_matches_coverage_computed_independently(tiny_sam, image):
    size = image.shape[:2]
    sparse = scale_points(layer_point_grids(1, 0, 1)[0], size)
    dense = scale_points(layer_point_grids(4, 0, 1)[0], size)
    # The sparse round's full-resolution logits, from SAM's own predictor (all 3 masks pass PERMISSIVE).
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    coords = torch.as_tensor(predictor.transform.apply_coords(sparse, size))
    logits, _, _ = predictor.predict_torch(coords[:, None], torch.ones(1, 1), multimask_output=True, return_logits=True)
    dense_rows, dense_cols = dense[:, 1].astype(int), dense[:, 0].astype(int)
    best = logits[0].amax(0)[dense_rows, dense_cols].sort().values
    tau = float((best[7] + best[8]) / 2)  # half of the 16 dense points lie on covered pixels
    uncovered = dense[(logits[0] > tau).any(0)[dense_rows, dense_cols].numpy() == 0]
    assert len(uncovered) == 8

    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=4, high_score_thresh=tau, **PERMISSIVE)
    records = generator.generate(image)
    timing = generator.last_timing
    assert (timing.sparse_points, timing.dense_points, timing.points_prompted) == (1, 8, 9)
    assert prompted_points(records) == {tuple(np.round(p, 6)) for p in np.concatenate([sparse, uncovered])}
    assert len(records) == 3 * 9


def test_no_coverage_prompts_both_grids_and_merges_them_with_one_nms(tiny_sam, image):
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=2, high_score_thresh=1e9, **PERMISSIVE)
    merged = generator.generate(image)
    assert (generator.last_timing.sparse_points, generator.last_timing.dense_points) == (1, 4)
    assert len(merged) == 3 * 5  # every candidate of both rounds: NMS at 1.0 removes nothing
    scores = [r["predicted_iou"] for r in merged]
    assert scores == sorted(scores, reverse=True)  # one NMS over both rounds orders them by predicted IoU

    strict = HierarchicalMaskGenerator(
        tiny_sam, points_per_side=2, high_score_thresh=1e9, **{**PERMISSIVE, "box_nms_thresh": 0.7}
    )
    kept = strict.generate(image)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in merged)], dtype=torch.float)
    expected = batched_nms(boxes, torch.tensor(scores), torch.zeros(len(boxes)), 0.7)
    assert [r["predicted_iou"] for r in kept] == [scores[i] for i in expected.tolist()]
    assert [r["bbox"] for r in kept] == [merged[i]["bbox"] for i in expected.tolist()]


def test_full_coverage_skips_the_dense_round(tiny_sam, image):
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=2, high_score_thresh=-1e9, **PERMISSIVE)
    records = generator.generate(image)
    assert (generator.last_timing.sparse_points, generator.last_timing.dense_points) == (1, 0)
    assert len(records) == 3
    assert prompted_points(records) == {(48.0, 36.0)}


def test_gray_and_rgba_images_are_converted(tiny_sam):
    gray = synthetic_image(5, (40, 56))[0][:, :, 0]
    rgba = np.concatenate([np.repeat(gray[:, :, None], 3, axis=2), np.full((40, 56, 1), 7, np.uint8)], axis=2)
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=1, hierarchical=False, **PERMISSIVE)
    from_gray, from_rgba = generator.generate(gray), generator.generate(rgba)
    assert len(from_gray) == len(from_rgba) == 3
    for a, b in zip(from_gray, from_rgba, strict=True):
        assert a["segmentation"].shape == gray.shape
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == b["predicted_iou"]


def test_one_pixel_image_gives_one_pixel_masks(tiny_sam):
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=1, hierarchical=False, **PERMISSIVE)
    records = generator.generate(np.full((1, 1, 3), 128, np.uint8))
    assert len(records) == 3
    for record in records:
        assert record["segmentation"].shape == (1, 1)
        assert record["area"] == int(record["segmentation"].sum())
        assert record["point_coords"] == [[0.5, 0.5]]


def test_bad_arrays_and_settings_are_named(tiny_sam):
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=1)
    with pytest.raises(ImageError, match="empty"):
        generator.generate(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="expected uint8 pixels"):
        generator.generate(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ConfigError, match="either config= or keyword settings"):
        HierarchicalMaskGenerator(tiny_sam, GeneratorConfig(), points_per_side=4)
    with pytest.raises(ConfigError, match="unknown generator setting"):
        HierarchicalMaskGenerator(tiny_sam, point_grids=[])
