"""Re-prompt rules on hand-made coverage maps: TinySAM's published rule and the SAM-lattice rule.

TinySAM's rule as published (`hierarchical_generate` in xinghaochen/TinySAM): around each sparse
point (x, y), in sparse-grid order, visit (x + dx * (W // n), y + dy * (H // n)) for dx in -1, 0, 1
(outer) and dy in -1, 0, 1 (inner) except (0, 0); then dx = 2 with dy = -1, 0, 1 if x + 2 * (W // n)
< W; then dy = 2 with dx = -1, 0, 1 if y + 2 * (H // n) < H; then (2, 2) if both hold. A position is
prompted when the pixel (int(y'), int(x')) is not covered.
"""

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import build_point_grid

from hierarchical.grid import scale_points
from hierarchical.reprompt import TwoRounds, lattice_split, tinysam_reprompt


def published_rule(sparse, covered, n):
    """The rule above, one position at a time."""
    height, width = covered.shape
    ws, hs = width // n, height // n
    offsets = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    offsets += [(2, dy) for dy in (-1, 0, 1)] + [(dx, 2) for dx in (-1, 0, 1)] + [(2, 2)]
    points = []
    for x, y in sparse:
        for dx, dy in offsets:
            px, py = x + dx * ws, y + dy * hs
            if (dx == 2 and px >= width) or (dy == 2 and py >= height) or covered[int(py), int(px)]:
                continue
            points.append((px, py))
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def tinysam_points(size, n, covered=None):
    covered = np.zeros(size, dtype=bool) if covered is None else covered
    sparse = scale_points(build_point_grid(n // 4), size)
    return sparse, tinysam_reprompt(sparse, torch.as_tensor(covered), n)


def test_square_side_divisible_by_the_grid_drops_the_far_column_and_row():
    # 16x16, n=4: one sparse point (8, 8), strides 4; x + 8 = 16 is not < 16, so no dx = 2 or dy = 2.
    _, points = tinysam_points((16, 16), 4)
    expected = [(4, 4), (4, 8), (4, 12), (8, 4), (8, 12), (12, 4), (12, 8), (12, 12)]
    np.testing.assert_array_equal(points, expected)


def test_non_square_sides_not_divisible_by_the_grid_prompt_the_whole_4x4_block():
    # 18 high x 22 wide, n=4: sparse (11, 9), strides 5 (x) and 4 (y); 21 < 22 and 17 < 18.
    sparse, points = tinysam_points((18, 22), 4)
    np.testing.assert_array_equal(sparse, [(11, 9)])
    expected = [(6, 5), (6, 9), (6, 13), (11, 5), (11, 13), (16, 5), (16, 9), (16, 13)]
    expected += [(21, 5), (21, 9), (21, 13), (6, 17), (11, 17), (16, 17), (21, 17)]
    np.testing.assert_array_equal(points, expected)
    assert len(sparse) + len(points) == 4 * 4  # the sparse point is one of the dense grid's 16


def test_covered_borders_are_skipped_and_uncovered_ones_kept():
    covered = np.zeros((18, 22), dtype=bool)
    covered[:, :7] = True  # left border: x = 6 covered
    covered[17:, :] = True  # bottom border: y = 17 covered
    covered[9, 11] = True  # the sparse point's own pixel: not a re-prompt candidate anyway
    _, points = tinysam_points((18, 22), 4, covered)
    expected = [(11, 5), (11, 13), (16, 5), (16, 9), (16, 13), (21, 5), (21, 9), (21, 13)]
    np.testing.assert_array_equal(points, expected)
    _, none_left = tinysam_points((18, 22), 4, np.ones((18, 22), dtype=bool))
    assert none_left.shape == (0, 2)


def test_two_by_two_sparse_grid_keeps_the_published_order_per_sparse_point():
    # 24 high x 40 wide, n=8: sparse x 10, 30 and y 6, 18; strides 5 and 3; 30 + 10 = 40 and
    # 18 + 6 = 24 reach the edges, so the far blocks lose their dx = 2 column / dy = 2 row.
    sparse, points = tinysam_points((24, 40), 8)
    np.testing.assert_array_equal(sparse, [(10, 6), (30, 6), (10, 18), (30, 18)])
    assert len(points) == 15 + 11 + 11 + 8
    np.testing.assert_array_equal(points[:8], [(5, 3), (5, 6), (5, 9), (10, 3), (10, 9), (15, 3), (15, 6), (15, 9)])
    np.testing.assert_array_equal(points[23:26], [(25, 12), (30, 12), (35, 12)])  # 2nd block: its dy = 2 row


@pytest.mark.parametrize("size", [(480, 640), (427, 640), (37, 53), (100, 33), (64, 64)])
@pytest.mark.parametrize("n", [4, 8, 16, 33])
def test_matches_the_published_rule_on_random_coverage(size, n):
    rng = np.random.default_rng(n * size[0] + size[1])
    for fraction in (0.0, 0.3, 0.8):
        covered = rng.random(size) < fraction
        sparse, points = tinysam_points(size, n, covered)
        reference = published_rule(sparse, covered, n)
        np.testing.assert_allclose(points, reference, rtol=0, atol=1e-9)  # the [0, 1] round trip: last bits
        assert len(sparse) + len(points) <= n * n


def test_lattice_split_takes_the_dense_point_in_each_sparse_points_cell():
    sparse, rest = lattice_split(10, 3)
    # SAM's sparse grid at 1/6, 1/2, 5/6 of the side lies in dense cells 1, 5, 8 of 10.
    rows, cols = np.divmod(sparse, 10)
    assert sorted(set(rows.tolist())) == sorted(set(cols.tolist())) == [1, 5, 8]
    assert len(sparse) == 9 and len(rest) == 91
    assert np.array_equal(np.sort(np.concatenate([sparse, rest])), np.arange(100))
    assert list(sparse) == sorted(sparse) and list(rest) == sorted(rest)  # grid order
    assert lattice_split(4, 1)[0].tolist() == [2 * 4 + 2]
    assert lattice_split(3, 3)[1].size == 0
    with pytest.raises(ValueError, match=r"sparse_points_per_side must lie in \[1, 4\], got 5"):
        lattice_split(4, 5)


@pytest.mark.parametrize("size", [(72, 96), (37, 53)])
def test_lattice_rounds_are_the_dense_grid_split_by_coverage(size):
    rounds = TwoRounds("lattice", 8, 2)
    dense = scale_points(build_point_grid(8), size)
    sparse = rounds.sparse_points(size)
    nothing = rounds.second_points(sparse, torch.zeros(size, dtype=torch.bool))
    assert len(sparse) + len(nothing) == 64
    np.testing.assert_array_equal(np.sort(np.concatenate([sparse, nothing]), axis=0), np.sort(dense, axis=0))
    covered = torch.zeros(size, dtype=torch.bool)
    covered[:, : size[1] // 2] = True  # left half
    second = rounds.second_points(sparse, covered)
    assert len(second) == 32 - 2 and (second[:, 0] >= size[1] // 2).all()
    assert len(rounds.second_points(sparse, torch.ones(size, dtype=torch.bool))) == 0


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match=r"reprompt_rule must be one of \('lattice', 'tinysam'\), got 'sam'"):
        TwoRounds("sam", 8, 2)
