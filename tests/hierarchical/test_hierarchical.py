"""Hierarchical mode on a tiny model: the second round per rule, full/no coverage, crops, the merged NMS, bad input."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import generate_crop_boxes
from torchvision.ops import batched_nms

from hierarchical import ConfigError, GeneratorConfig, HierarchicalMaskGenerator
from hierarchical.reprompt import TwoRounds
from student_models.preprocessing import ImageError
from tests.helpers import synthetic_image

PERMISSIVE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def prompted_points(records):
    return {tuple(np.round(r["point_coords"][0], 6)) for r in records}


@pytest.fixture(scope="module")
def image():
    return synthetic_image(4, (72, 96))[0]


def sparse_round_logits(sam, image, sparse):
    """HxW max over the sparse round's 3 masks per point, from SAM's own predictor (all pass PERMISSIVE)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    coords = torch.as_tensor(predictor.transform.apply_coords(sparse, image.shape[:2]))
    labels = torch.ones(len(sparse), 1)
    logits, _, _ = predictor.predict_torch(coords[:, None], labels, multimask_output=True, return_logits=True)
    return logits.amax(dim=(0, 1))


def spy_on_prompts(generator):
    """Record the Nx2 points of each `_prompt` call (sparse round first, then the second round)."""
    calls = []
    prompt = generator._prompt

    def recording(points, *args, **kwargs):
        calls.append(points.copy())
        return prompt(points, *args, **kwargs)

    generator._prompt = recording
    return calls


@pytest.mark.parametrize("rule", ["lattice", "tinysam"])
def test_second_round_follows_coverage_computed_independently(tiny_sam, image, rule):
    size = image.shape[:2]
    rounds = TwoRounds(rule, 4, 1)
    sparse = rounds.sparse_points(size)
    best = sparse_round_logits(tiny_sam, image, sparse)
    # tau between two logits of the best map, so that some candidate pixels are covered and some not
    candidates = rounds.second_points(sparse, torch.zeros(size, dtype=torch.bool))
    rows, cols = candidates[:, 1].astype(int), candidates[:, 0].astype(int)
    values = best[rows, cols].sort().values
    tau = float((values[len(values) // 2 - 1] + values[len(values) // 2]) / 2)
    expected = rounds.second_points(sparse, best > tau)
    assert 0 < len(expected) < len(candidates)

    generator = HierarchicalMaskGenerator(
        tiny_sam, points_per_side=4, high_score_thresh=tau, reprompt_rule=rule, **PERMISSIVE
    )
    calls = spy_on_prompts(generator)
    records = generator.generate(image)
    np.testing.assert_array_equal(calls[0], sparse)
    np.testing.assert_array_equal(calls[1], expected)  # the same points in the same order
    timing = generator.last_timing
    assert (timing.sparse_points, timing.dense_points) == (1, len(expected))
    assert prompted_points(records) == {tuple(np.round(p, 6)) for p in np.concatenate([sparse, expected])}


def prompts_without_decoding(generator, image):
    """The Nx2 crop-frame points of each `_prompt` call when nothing is decoded (so nothing is covered)."""
    calls = []
    generator._prompt = lambda points, *args, **kwargs: calls.append(points.copy()) or []
    generator.generate(image)
    return calls


@pytest.mark.parametrize("rule", ["lattice", "tinysam"])
def test_with_nothing_covered_as_many_points_as_dense_mode(tiny_sam, rule):
    image = synthetic_image(4, (74, 98))[0]  # for "tinysam": 49 + 2 * (98 // 4) < 98, the whole 4x4 block
    dense = HierarchicalMaskGenerator(tiny_sam, points_per_side=4, hierarchical=False, **PERMISSIVE)
    dense_records = dense.generate(image)
    generator = HierarchicalMaskGenerator(
        tiny_sam, points_per_side=4, high_score_thresh=1e9, reprompt_rule=rule, **PERMISSIVE
    )
    records = generator.generate(image)
    assert generator.last_timing.points_prompted == dense.last_timing.points_prompted == 16
    assert len(records) == len(dense_records) == 3 * 16
    if rule == "lattice":  # exactly dense mode's prompts
        assert prompted_points(records) == prompted_points(dense_records)


def test_tinysam_prompts_fewer_where_the_grid_divides_the_image(tiny_sam):
    # 48 + 2 * (96 // 4) = 96 and 36 + 2 * (72 // 4) = 72 reach the edges: no dx = 2 column, no dy = 2 row.
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=4, reprompt_rule="tinysam")
    sparse, second = prompts_without_decoding(generator, synthetic_image(4, (72, 96))[0])
    assert len(sparse) + len(second) == 9 < 16


def test_crops_run_both_rounds_in_each_crops_frame(tiny_sam, image):
    """TinySAM has no crops; we run its rule in each crop as if the crop were the image (the rules share this path)."""
    settings = dict(points_per_side=8, crop_n_layers=1, crop_n_points_downscale_factor=2)
    generator = HierarchicalMaskGenerator(tiny_sam, reprompt_rule="tinysam", **settings)
    calls = prompts_without_decoding(generator, image)
    boxes, _ = generate_crop_boxes(image.shape[:2], 1, generator.config.crop_overlap_ratio)
    assert len(calls) == 2 * len(boxes) == 10  # the whole image, then 4 crops: two rounds each
    rounds_of_crops = zip(boxes, [8, 4, 4, 4, 4], calls[::2], calls[1::2], strict=True)
    for (x0, y0, x1, y1), side, sparse, second in rounds_of_crops:
        rounds = TwoRounds("tinysam", side, side // 4)  # 8x8 with 2x2 sparse, then 4x4 with 1 sparse point
        size = (y1 - y0, x1 - x0)
        np.testing.assert_array_equal(sparse, rounds.sparse_points(size))
        np.testing.assert_array_equal(second, rounds.second_points(sparse, torch.zeros(size, dtype=torch.bool)))
        assert len(sparse) + len(second) <= side * side


def test_both_rounds_merge_with_one_nms(tiny_sam, image):
    generator = HierarchicalMaskGenerator(tiny_sam, points_per_side=2, high_score_thresh=1e9, **PERMISSIVE)
    merged = generator.generate(image)
    assert (generator.last_timing.sparse_points, generator.last_timing.dense_points) == (1, 3)
    assert len(merged) == 3 * 4  # every candidate of both rounds: NMS at 1.0 removes nothing
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


@pytest.mark.parametrize("rule", ["lattice", "tinysam"])
def test_full_coverage_skips_the_second_round(tiny_sam, image, rule):
    generator = HierarchicalMaskGenerator(
        tiny_sam, points_per_side=4, high_score_thresh=-1e9, reprompt_rule=rule, **PERMISSIVE
    )
    records = generator.generate(image)
    assert (generator.last_timing.sparse_points, generator.last_timing.dense_points) == (1, 0)
    assert len(records) == 3
    expected = (60.0, 45.0) if rule == "lattice" else (48.0, 36.0)  # dense cell (2, 2) vs SAM's 1x1 grid
    assert prompted_points(records) == {expected}


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
