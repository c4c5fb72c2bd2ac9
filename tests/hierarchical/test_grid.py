"""Pure grid and coverage logic on hand-made points and logits (the re-prompt rules: test_reprompt.py)."""

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import build_all_layer_point_grids

from hierarchical.grid import (
    coverage_from_logits,
    layer_point_grids,
    layer_points_per_side,
    points_to_pixels,
    scale_points,
    uncovered_points,
)


def test_layer_grids_are_sams_and_a_coarse_layer_keeps_one_point():
    ours = layer_point_grids(8, 2, 2)
    for mine, sams in zip(ours, build_all_layer_point_grids(8, 2, 2), strict=True):
        np.testing.assert_array_equal(mine, sams)
    coarse = layer_point_grids(2, 2, 4)  # layer 1 and 2 would get int(2/4) = 0 points from SAM's rule
    assert [len(g) for g in coarse] == [4, 1, 1]
    assert layer_points_per_side(2, 2, 4) == [2, 1, 1] and layer_points_per_side(32, 2, 2) == [32, 16, 8]
    np.testing.assert_allclose(coarse[1], [[0.5, 0.5]])


def test_sparse_grid_is_a_quarter_per_side_and_disjoint_from_the_dense_grid():
    dense, sparse = layer_point_grids(32, 0, 1)[0], layer_point_grids(8, 0, 1)[0]
    assert len(dense) == 1024 and len(sparse) == 64
    np.testing.assert_allclose(sparse[:2], [[1 / 16, 1 / 16], [3 / 16, 1 / 16]])
    distances = np.abs(dense[:, None, :] - sparse[None, :, :]).sum(-1)
    assert distances.min() > 1e-6


def test_scale_points_uses_width_for_x_and_height_for_y():
    np.testing.assert_allclose(scale_points(np.array([[0.5, 0.25]]), (40, 100)), [[50.0, 10.0]])


def test_points_to_pixels_floors_and_clips():
    rows, cols = points_to_pixels(np.array([[0.5, 0.5], [3.99, 1.0], [10.0, -2.0]]), (4, 5))
    assert rows.tolist() == [0, 1, 0]
    assert cols.tolist() == [0, 3, 4]


def test_coverage_is_strictly_above_the_threshold_in_any_mask():
    logits = torch.full((2, 3, 4), -5.0)
    logits[0, 0, 0] = 9.0
    logits[1, 2, 3] = 8.5  # equal to the threshold: not covered
    logits[1, 1, 1] = 8.6
    coverage = coverage_from_logits(logits, 8.5)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 0] = expected[1, 1] = True
    assert torch.equal(coverage, expected)
    assert not coverage_from_logits(torch.zeros(0, 3, 4), 8.5).any()
    with pytest.raises(ValueError, match="KxHxW"):
        coverage_from_logits(torch.zeros(3, 4), 8.5)


def test_uncovered_points_follow_the_pixel_each_point_lies_on():
    size = (8, 8)
    dense = scale_points(layer_point_grids(4, 0, 1)[0], size)  # pixel centres 1, 3, 5, 7
    logits = torch.full((1, *size), -1.0)
    logits[0, :, :4] = 10.0  # one confident mask over the left half
    keep = uncovered_points(dense, coverage_from_logits(logits, 8.5))
    assert keep.tolist() == [False, False, True, True] * 4
    assert uncovered_points(dense, torch.zeros(size, dtype=torch.bool)).all()
    assert not uncovered_points(dense, torch.ones(size, dtype=torch.bool)).any()
