"""Pure grid and coverage logic of TinySAM's hierarchical everything mode (SPEC section 4).

Points are (x, y) pixel coordinates in a crop's frame, as SAM's generator scales its [0, 1] grids;
a point lies on pixel (row, col) = (floor(y), floor(x)). Nothing here touches a model.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid


def layer_points_per_side(points_per_side: int, crop_n_layers: int, downscale_factor: int) -> list[int]:
    """Points per side of each crop layer: int(points_per_side / downscale_factor**i), SAM's
    `build_all_layer_point_grids` rule, except that a layer that would get none gets one point, so
    a coarse sparse grid never vanishes."""
    return [max(1, int(points_per_side / downscale_factor**layer)) for layer in range(crop_n_layers + 1)]


def layer_point_grids(points_per_side: int, crop_n_layers: int, downscale_factor: int) -> list[np.ndarray]:
    """One Nx2 grid in [0, 1]^2 per crop layer, exactly as SAM's generator builds them (row by row,
    x fastest), with `layer_points_per_side` points per side."""
    return [build_point_grid(n) for n in layer_points_per_side(points_per_side, crop_n_layers, downscale_factor)]


def scale_points(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nx2 grid in [0, 1]^2 -> Nx2 float64 (x, y) pixel coordinates in an image of `size` (h, w)."""
    return grid * np.array(size)[None, ::-1]


def points_to_pixels(points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Nx2 (x, y) coordinates -> (rows N, cols N) int64 indices of the pixels they lie on, clipped to `size`."""
    height, width = size
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(points[:, 0]), 0, width - 1).astype(np.int64)
    rows = np.clip(np.floor(points[:, 1]), 0, height - 1).astype(np.int64)
    return rows, cols


def coverage_from_logits(logits: torch.Tensor, high_score_thresh: float) -> torch.Tensor:
    """KxHxW mask logits -> HxW bool: pixels where at least one mask's logit exceeds the threshold."""
    if logits.ndim != 3:
        raise ValueError(f"expected KxHxW mask logits, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
    return (logits > high_score_thresh).any(dim=0)


def uncovered_points(points: np.ndarray, coverage: torch.Tensor) -> np.ndarray:
    """Nx2 (x, y) points and an HxW bool coverage map -> N bool, True where the point's pixel is uncovered."""
    rows, cols = points_to_pixels(points, tuple(coverage.shape))
    covered = coverage.cpu().numpy()[rows, cols]
    return ~covered
