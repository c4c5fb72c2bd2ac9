"""Which points hierarchical mode prompts in its two rounds: the re-prompt rules (pure, no model).

Both rules count the sparse round's points as points of the dense grid, so with nothing covered a
rule prompts at most `points_per_side**2` points in all, never more than dense mode:

- "lattice": both rounds prompt points of SAM's own dense grid ((i + 0.5) / n of the side). The
  sparse round takes, for each point of SAM's `sparse_points_per_side` grid, the dense point whose
  cell holds it; the second round takes the other dense points that lie on uncovered pixels. With
  nothing covered it prompts exactly the dense grid, and every prompt is one dense mode makes.
- "tinysam": TinySAM's published rule (`SamHierarchicalMaskGenerator.hierarchical_generate`).
  The sparse round is SAM's grid with `points_per_side // 4` points per side; around each sparse
  point it re-prompts the positions sparse + (dx * (W // n), dy * (H // n)) for dx, dy in
  {-1, 0, 1, 2} except (0, 0), in its order, keeping those on uncovered pixels. Integer pixel
  strides put them off SAM's lattice; the dx = 2 (dy = 2) positions are kept only while they stay
  left of the right edge (above the bottom edge), so where n divides W (H) the last column (row)
  of its 4x4 blocks is never prompted.

Points are (x, y) pixel coordinates in a crop's frame (see `hierarchical/grid.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid

from hierarchical.grid import points_to_pixels, scale_points, uncovered_points

REPROMPT_RULES = ("lattice", "tinysam")

# TinySAM's sparse grid has a quarter of the points per side; its 4x4 blocks of offsets assume it.
TINYSAM_SPARSE_RATIO = 4

# (dx, dy) in the order TinySAM's loops visit them: the 3x3 block (dx outer, dy inner) without the
# sparse point itself, then the dx = 2 column, the dy = 2 row and the (2, 2) corner.
_TINYSAM_OFFSETS = np.array(
    [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    + [(2, dy) for dy in (-1, 0, 1)]
    + [(dx, 2) for dx in (-1, 0, 1)]
    + [(2, 2)]
)


def lattice_split(points_per_side: int, sparse_points_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into SAM's `points_per_side`**2 grid (row by row, x fastest): (the sparse round's,
    the rest), each in grid order. Sparse rows and columns are floor((j + 0.5) * n / n_sparse)."""
    n, m = points_per_side, sparse_points_per_side
    if not 1 <= m <= n:
        raise ValueError(f"sparse_points_per_side must lie in [1, {n}], got {m}")
    lines = (2 * np.arange(m) + 1) * n // (2 * m)
    is_sparse = np.zeros((n, n), dtype=bool)
    is_sparse[np.ix_(lines, lines)] = True
    return np.flatnonzero(is_sparse), np.flatnonzero(~is_sparse)


def tinysam_reprompt(sparse_points: np.ndarray, coverage: torch.Tensor, points_per_side: int) -> np.ndarray:
    """TinySAM's second round: Nx2 sparse points and an HxW bool coverage map -> Mx2 points, M <= 15 N.

    `points_per_side` is the dense grid's n (the strides are W // n and H // n pixels). Where the
    image is narrower than n pixels the stride is 0 and, as in TinySAM, the sparse point's own
    position comes back once per offset.
    """
    height, width = coverage.shape
    size = np.array([width, height], dtype=np.float64)
    strides = np.array([width // points_per_side, height // points_per_side], dtype=np.float64)
    positions = sparse_points[:, None, :] + _TINYSAM_OFFSETS[None] * strides  # Nx15x2
    inside = ((_TINYSAM_OFFSETS < 2) | (positions < size)).all(axis=-1)
    rows, cols = points_to_pixels(positions.reshape(-1, 2), (height, width))
    uncovered = ~coverage.cpu().numpy()[rows, cols].reshape(inside.shape)
    # TinySAM stores the points in [0, 1] and scales them back, which can move the last bit.
    return positions[inside & uncovered] / size * size


class TwoRounds:
    """One crop layer's two rounds under a re-prompt rule.

    `points_per_side` and `sparse_points_per_side` are the layer's; "tinysam" needs
    `sparse_points_per_side == points_per_side // 4` (`GeneratorConfig` checks it).
    """

    def __init__(self, rule: str, points_per_side: int, sparse_points_per_side: int) -> None:
        if rule not in REPROMPT_RULES:
            raise ValueError(f"reprompt_rule must be one of {REPROMPT_RULES}, got {rule!r}")
        self.rule = rule
        self.points_per_side = points_per_side
        if rule == "tinysam":
            self.sparse_grid = build_point_grid(sparse_points_per_side)
        else:
            dense = build_point_grid(points_per_side)
            sparse_index, rest_index = lattice_split(points_per_side, sparse_points_per_side)
            self.sparse_grid, self.rest_grid = dense[sparse_index], dense[rest_index]

    def sparse_points(self, size: tuple[int, int]) -> np.ndarray:
        """The sparse round's Nx2 (x, y) points in a crop of `size` (h, w)."""
        return scale_points(self.sparse_grid, size)

    def second_points(self, sparse_points: np.ndarray, coverage: torch.Tensor) -> np.ndarray:
        """The second round's Mx2 points, given the sparse round's points and its HxW coverage map."""
        if self.rule == "tinysam":
            return tinysam_reprompt(sparse_points, coverage, self.points_per_side)
        rest = scale_points(self.rest_grid, tuple(coverage.shape))
        return rest[uncovered_points(rest, coverage)]
