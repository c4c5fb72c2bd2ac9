"""Mask encodings and SAM's record format, computed once per *output* mask.

SAM's generator run-length encodes every mask that passes its filters (one Python pass per mask
over a shared `nonzero()` result), then decodes the survivors of NMS again for `binary_mask`
output. We keep the binary masks of the candidates and encode only what is returned, in the form
requested; each function gives exactly what SAM's helpers give for the same masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything.utils.amg import box_xyxy_to_xywh

from student_models.masks import encode_rle


def masks_to_uncompressed_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """KxHxW bool -> K uncompressed RLEs (column-major counts starting with a 0-run), as
    `segment_anything.utils.amg.mask_to_rle_pytorch` writes them, without its per-mask scan."""
    count, height, width = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1).cpu().numpy()
    if count == 0:
        return []
    changes = flat[:, 1:] != flat[:, :-1]
    mask_idx, pos = np.nonzero(changes)
    splits = np.searchsorted(mask_idx, np.arange(1, count))
    out = []
    for i, change_pos in enumerate(np.split(pos, splits)):
        bounds = np.concatenate(([0], change_pos + 1, [height * width]))
        counts = [] if not flat[i, 0] else [0]
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [height, width], "counts": counts})
    return out


def encode_masks(masks: torch.Tensor, output_mode: str) -> list[Any]:
    """KxHxW bool -> K segmentations in SAM's `output_mode` ("binary_mask" gives HxW bool arrays)."""
    if output_mode == "binary_mask":
        return list(masks.cpu().numpy())
    if output_mode == "coco_rle":
        return encode_rle(masks)
    if output_mode == "uncompressed_rle":
        return masks_to_uncompressed_rle(masks)
    raise ValueError(f"unknown output_mode {output_mode!r}")


def build_records(
    segmentations: list[Any],
    areas: np.ndarray,
    boxes: np.ndarray,
    iou_preds: np.ndarray,
    points: np.ndarray,
    stability_scores: np.ndarray,
    crop_boxes: np.ndarray,
) -> list[dict[str, Any]]:
    """SAM's mask records. Boxes Kx4 XYXY (written as XYWH), points Kx2 (x, y), crop boxes Kx4 XYXY."""
    records = []
    for idx, segmentation in enumerate(segmentations):
        records.append(
            {
                "segmentation": segmentation,
                "area": int(areas[idx]),
                "bbox": box_xyxy_to_xywh(boxes[idx]).tolist(),
                "predicted_iou": iou_preds[idx].item(),
                "point_coords": [points[idx].tolist()],
                "stability_score": stability_scores[idx].item(),
                "crop_box": box_xyxy_to_xywh(crop_boxes[idx]).tolist(),
            }
        )
    return records
