"""Hard prompt sampling on hand-made masks: where points land, their labels, empty regions, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from distill.prompts import (
    PAD_LABEL,
    PromptSet,
    choose_masks,
    error_points,
    initial_prompts,
    noisy_boxes,
    sample_in_masks,
    to_input_coords,
    valid_lowres_region,
)


def _box_mask(y0, y1, x0, x1, size=32):
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _pixel(coords):
    """1024-frame (x, y) -> low-res (y, x) pixel index."""
    return (coords[:, ::-1] / 4).astype(int)


def test_points_land_inside_masks_and_empty_masks_are_flagged():
    masks = np.stack([_box_mask(2, 5, 3, 9), _box_mask(20, 21, 30, 31), np.zeros((32, 32), bool)])
    for seed in range(20):
        yx, found = sample_in_masks(masks, np.random.default_rng(seed))
        assert found.tolist() == [True, True, False]
        assert masks[0, yx[0, 0], yx[0, 1]] and tuple(yx[1]) == (20, 30)
    coords = to_input_coords(np.array([[20, 30]]))
    assert coords.tolist() == [[122.0, 82.0]]  # x then y, pixel centre in the 1024 frame


def test_error_points_labels_follow_the_error_region():
    target = np.stack([_box_mask(0, 10, 0, 10)] * 3)
    prediction = np.stack([np.zeros((32, 32), bool), _box_mask(0, 10, 0, 20), _box_mask(0, 10, 0, 10)])
    for seed in range(20):
        coords, labels = error_points(prediction, target, np.random.default_rng(seed))
        yx = _pixel(coords)
        assert labels[0] == 1 and target[0, yx[0, 0], yx[0, 1]]  # missed GT -> positive, inside the GT
        assert labels[1] == 0 and yx[1, 1] >= 10  # predicted outside the GT -> negative, in that extra area
        assert labels[2] == PAD_LABEL and coords[2].tolist() == [0.0, 0.0]  # nothing wrong -> padding
    # Without negatives the extra-only prompt gets padding too.
    _, labels = error_points(prediction, target, np.random.default_rng(0), negatives=False)
    assert labels.tolist() == [1, PAD_LABEL, PAD_LABEL]


def test_error_points_stay_in_the_valid_image_area():
    target = np.stack([_box_mask(0, 32, 0, 32)])
    valid = valid_lowres_region((40, 60), side=32)  # a 10x15 low-res image area
    assert valid.sum() == 10 * 15
    for seed in range(10):
        coords, labels = error_points(np.zeros_like(target), target, np.random.default_rng(seed), valid)
        y, x = _pixel(coords)[0]
        assert labels[0] == 1 and y < 10 and x < 15


def test_noisy_boxes_respect_sam_noise():
    boxes = np.array([[100, 100, 200, 150], [0, 0, 1000, 1000]], dtype=np.float32)
    jittered = noisy_boxes(boxes, np.random.default_rng(0))
    assert np.all(np.abs(jittered - boxes) <= 20.0 + 1e-4)  # at most 20 px, even for the large box
    many = np.stack([noisy_boxes(boxes[:1], np.random.default_rng(s))[0] for s in range(400)])
    std = (many - boxes[0]).std(0)
    assert std[0] == pytest.approx(10.0, rel=0.2) and std[1] == pytest.approx(5.0, rel=0.2)  # 10% of w, h
    assert np.all(jittered >= 0) and np.all(jittered <= 1024)


def test_initial_prompts_and_determinism():
    masks = np.stack([_box_mask(2, 5, 3, 9), _box_mask(10, 20, 10, 20)])
    boxes = np.array([[12, 8, 36, 20], [40, 40, 80, 80]], dtype=np.float32)
    points = initial_prompts(masks, boxes, np.random.default_rng(0), box_prob=0.0)
    assert points.boxes is None and points.points.shape == (2, 1, 2) and points.multimask
    assert all(masks[i][tuple(_pixel(points.points[i])[0])] for i in range(2)) and np.all(points.labels == 1)
    box = initial_prompts(masks, boxes, np.random.default_rng(0), box_prob=1.0)
    assert box.boxes.shape == (2, 4) and box.points.shape == (2, 0, 2) and not box.multimask
    grown = box.add_points(np.array([[4.0, 4.0], [8.0, 8.0]]), np.array([1, 0]))
    assert grown.points.shape == (2, 1, 2) and grown.labels[:, 0].tolist() == [1.0, 0.0]
    a = initial_prompts(masks, boxes, np.random.default_rng(7), box_prob=0.5)
    b = initial_prompts(masks, boxes, np.random.default_rng(7), box_prob=0.5)
    assert isinstance(a, PromptSet) and np.array_equal(a.points, b.points) and np.array_equal(a.labels, b.labels)
    picked = choose_masks(2, 5, np.random.default_rng(0))
    assert len(picked) == 5 and set(picked.tolist()) <= {0, 1}
    assert sorted(choose_masks(5, 5, np.random.default_rng(0)).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one mask"):
        choose_masks(0, 4, np.random.default_rng(0))
