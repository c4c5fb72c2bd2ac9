"""Hard prompt sampling (TinySAM section 3.2, SAM's interactive training), pure and seeded.

Masks here are boolean arrays in the decoder's low-resolution frame (256x256 for a 1024 input, one
pixel = 4 input pixels); prompt coordinates are returned in the 1024 input frame that SAM's prompt
encoder expects (the centre of the low-res pixel). All functions take a `numpy.random.Generator`
and are vectorised over the P prompts of one image.

A prompt starts from a noisy ground-truth box (probability `box_prob`) or from one point drawn
uniformly inside the ground-truth mask. Each later point is drawn uniformly from the error region of
a prediction against a target: target-minus-prediction gives a positive point (label 1),
prediction-minus-target a negative one (label 0). When the region is empty the point is padding
(label -1, which SAM's prompt encoder embeds as "not a point"), so every prompt keeps the same
number of points and the batch stays rectangular. The caller picks the target: the ground truth
(TinySAM, mode "gt") or the teacher's mask (EdgeSAM, mode "disagreement").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOWRES_STRIDE = 4  # 1024 input pixels / 256 low-res pixels
PAD_LABEL = -1


@dataclass(frozen=True)
class PromptSet:
    """P prompts: points PxNx2 float32 (x, y) and labels PxN float32 in the 1024 frame; boxes Px4 XYXY or None.

    `multimask` is True while each prompt is a single point without a box (SAM then picks among its
    three multimask outputs, because one point is ambiguous).
    """

    points: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray | None

    @property
    def num_prompts(self) -> int:
        return len(self.labels)

    @property
    def multimask(self) -> bool:
        return self.boxes is None and self.labels.shape[1] == 1

    def add_points(self, coords: np.ndarray, labels: np.ndarray) -> PromptSet:
        """Append one point per prompt: coords Px2 (x, y), labels P."""
        points = np.concatenate([self.points, coords[:, None].astype(np.float32)], axis=1)
        return PromptSet(points, np.concatenate([self.labels, labels[:, None].astype(np.float32)], 1), self.boxes)


def choose_masks(num_masks: int, num_prompts: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the GT masks to prompt: all of them in random order, repeated when there are fewer masks."""
    if num_masks < 1:
        raise ValueError("an image needs at least one mask to sample prompts")
    return rng.choice(num_masks, size=num_prompts, replace=num_masks < num_prompts)


def sample_in_masks(masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One pixel drawn uniformly inside each of P masks (PxHxW bool).

    Returns (yx Px2 int64, found P bool); an empty mask gives found=False and yx=(0, 0).
    """
    scores = rng.random(masks.shape, dtype=np.float32)
    scores[~masks] = -1.0
    flat = scores.reshape(len(masks), -1).argmax(axis=1)
    found = masks.reshape(len(masks), -1).any(axis=1)
    yx = np.stack(np.unravel_index(flat, masks.shape[1:]), axis=1)
    yx[~found] = 0
    return yx.astype(np.int64), found


def to_input_coords(yx: np.ndarray) -> np.ndarray:
    """Low-res pixel indices Px2 (y, x) -> Px2 (x, y) float32 at the pixel centres in the 1024 frame."""
    return ((yx[:, ::-1].astype(np.float32) + 0.5) * LOWRES_STRIDE).astype(np.float32)


def noisy_boxes(
    boxes: np.ndarray, rng: np.random.Generator, frac: float = 0.1, max_px: float = 20.0, limit: float = 1024.0
) -> np.ndarray:
    """SAM's box jitter: each coordinate moves by N(0, (frac*side)^2), clipped to +-max_px, kept in [0, limit].

    boxes: Px4 XYXY in the 1024 frame; the x coordinates use the box width, the y ones its height.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    sides = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)  # w, h, w, h
    noise = np.clip(rng.normal(size=boxes.shape) * frac * sides, -max_px, max_px)
    jittered = np.clip(boxes + noise.astype(np.float32), 0.0, limit)
    x0, x1 = np.minimum(jittered[:, 0], jittered[:, 2]), np.maximum(jittered[:, 0], jittered[:, 2])
    y0, y1 = np.minimum(jittered[:, 1], jittered[:, 3]), np.maximum(jittered[:, 1], jittered[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1)


def initial_prompts(
    gt_masks: np.ndarray,
    gt_boxes: np.ndarray,
    rng: np.random.Generator,
    box_prob: float = 0.5,
    noise_frac: float = 0.1,
    noise_max: float = 20.0,
) -> PromptSet:
    """First prompt for each of P masks: a noisy box (all P, with probability box_prob) or one point inside.

    gt_masks: PxHxW bool low-res; gt_boxes: Px4 XYXY in the 1024 frame. One choice per image keeps
    the batch rectangular (every prompt has the same tokens).
    """
    num = len(gt_masks)
    if rng.random() < box_prob:
        boxes = noisy_boxes(gt_boxes, rng, noise_frac, noise_max)
        return PromptSet(np.zeros((num, 0, 2), np.float32), np.zeros((num, 0), np.float32), boxes)
    yx, found = sample_in_masks(gt_masks, rng)
    labels = np.where(found, 1.0, float(PAD_LABEL)).astype(np.float32)
    return PromptSet(to_input_coords(yx)[:, None], labels[:, None], None)


def error_points(
    prediction: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
    negatives: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The next corrective point for each of P prompts.

    prediction, target: PxHxW bool; valid: HxW bool (the image area, outside the padding) or None.
    Draws uniformly from target-minus-prediction (label 1) and, if `negatives`, prediction-minus-target
    (label 0). Returns (coords Px2 (x, y) in the 1024 frame, labels P float32; -1 where nothing is wrong).
    """
    missed = target & ~prediction
    extra = prediction & ~target if negatives else np.zeros_like(missed)
    if valid is not None:
        missed, extra = missed & valid, extra & valid
    yx, found = sample_in_masks(missed | extra, rng)
    rows = np.arange(len(yx))
    labels = np.where(missed[rows, yx[:, 0], yx[:, 1]], 1.0, 0.0)
    labels = np.where(found, labels, float(PAD_LABEL)).astype(np.float32)
    coords = to_input_coords(yx)
    coords[~found] = 0.0
    return coords, labels


def draw_iterations(rng: np.random.Generator, max_iters: int) -> int:
    """k ~ U{0..max_iters}: how many corrective points this image's prompts get."""
    return int(rng.integers(0, max_iters + 1))


def valid_lowres_region(input_size: tuple[int, int], side: int = 256) -> np.ndarray:
    """HxW bool: the low-res pixels covering the resized image (not its zero padding)."""
    height, width = (-(-s // LOWRES_STRIDE) for s in input_size)
    valid = np.zeros((side, side), dtype=bool)
    valid[:height, :width] = True
    return valid
