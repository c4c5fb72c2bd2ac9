"""The mask helpers every stage shares: COCO RLE, mask IoU, and SAM's upscaling of low-res logits.

One of each, so that an AP, a fidelity figure and an everything-mode match are computed the
same way: RLE is pycocotools' own encoder and decoder, `upscale_logits` is the arithmetic of
`Sam.postprocess_masks` for callers without a `Sam` (an ONNX Runtime back-end).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from student_models.registry import IMAGE_SIZE


def encode_rle(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """KxHxW bool masks -> K COCO compressed RLEs with ``counts`` as str (JSON-ready), in one pycocotools call."""
    if isinstance(masks, torch.Tensor):
        masks = masks.cpu().numpy()
    if masks.ndim != 3:
        raise ValueError(f"encode_rle takes KxHxW masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    # pycocotools reads HxWxK column-major uint8.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rles: list[dict[str, Any]]) -> np.ndarray:
    """K COCO compressed RLEs (``counts`` str or bytes) of one image size -> KxHxW bool masks."""
    if not rles:
        raise ValueError("decode_rle needs at least one RLE (the image size comes from them)")
    return mask_utils.decode(list(rles)).transpose(2, 0, 1).astype(bool)


def mask_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """IoU of bool masks ...xHxW (leading dims broadcast): one value per mask pair, of `a`'s array type.

    Two empty masks agree perfectly: IoU 1 (pycocotools says 0; a fidelity check needs 1 there).
    Binarise logits first (``logits > 0``); for a differentiable IoU of probabilities see `distill.losses`.
    """
    if a.dtype not in (np.bool_, torch.bool) or b.dtype not in (np.bool_, torch.bool):
        raise TypeError(f"mask_iou takes bool masks, got {a.dtype} and {b.dtype} (binarise logits with > 0)")
    intersection = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    if isinstance(union, torch.Tensor):
        return torch.where(union > 0, intersection / union.clamp(min=1), 1.0)
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def upscale_logits(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """BxCx256x256 logits -> BxCxHxW logits at the original image size, as `Sam.postprocess_masks` does.

    Upscale to the padded model input (image_size^2), crop the padding (`input_size`: the resized
    image inside it), resize to `original_size` (H, W).
    """
    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
