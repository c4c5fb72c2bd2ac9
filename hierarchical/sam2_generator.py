"""`HierarchicalSam2MaskGenerator`: TinySAM's two-round everything mode on a SAM 2 model, as a
``SAM2AutomaticMaskGenerator`` that prompts fewer points.

It is ``sam2``'s own generator with one method replaced: per crop, `_process_crop` prompts the sparse grid,
marks as covered the pixels where a mask that passed the predicted-IoU and stability filters has a logit above
`high_score_thresh`, then prompts the points that `reprompt_rule` picks among the uncovered ones
(`hierarchical/reprompt.py`, the rules and grids of the SAM generator); both rounds' candidates go through the
crop's box NMS, and everything else (crops, the crop NMS, small-region clean-up, records) is sam2's. Each batch
of points goes through sam2's own ``_process_batch``; the covered pixels are read off the logits it asks the
predictor for, so no prompt is decoded twice. With ``hierarchical=False`` nothing is replaced: the records are
``SAM2AutomaticMaskGenerator``'s.

Not supported in hierarchical mode: explicit ``point_grids`` (the rounds are built from ``points_per_side``) and
``use_m2m`` (its refinement pass would cover pixels with masks it then replaces). ``sam2`` is the optional extra:
this module imports it, so import it only where a SAM 2 model is at hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.amg import MaskData, batch_iterator, calculate_stability_score, uncrop_boxes_xyxy, uncrop_points
from torchvision.ops.boxes import batched_nms

from hierarchical.config import ConfigError
from hierarchical.grid import coverage_from_logits, layer_points_per_side
from hierarchical.reprompt import REPROMPT_RULES, TINYSAM_SPARSE_RATIO, TwoRounds


class HierarchicalSam2MaskGenerator(SAM2AutomaticMaskGenerator):
    """``SAM2AutomaticMaskGenerator(model, **sam2_settings)`` plus TinySAM's settings (the SAM generator's:
    `hierarchical`, `sparse_points_per_side` (default a quarter of ``points_per_side``, 1/16 of the points),
    `high_score_thresh` (a mask logit), `reprompt_rule`). `points_prompted` counts the points of the latest
    `generate` call."""

    def __init__(
        self,
        model: SAM2Base,
        points_per_side: int = 32,
        hierarchical: bool = True,
        sparse_points_per_side: int | None = None,
        high_score_thresh: float = 8.5,
        reprompt_rule: str = "lattice",
        **sam2_settings: Any,
    ) -> None:
        super().__init__(model, points_per_side=points_per_side, **sam2_settings)
        self.hierarchical, self.high_score_thresh = hierarchical, high_score_thresh
        self.points_prompted = 0
        self.rounds: list[TwoRounds] = []
        if not hierarchical:
            return
        if sam2_settings.get("point_grids") is not None or sam2_settings.get("use_m2m"):
            raise ConfigError("hierarchical mode takes neither point_grids nor use_m2m; set hierarchical=False")
        if reprompt_rule not in REPROMPT_RULES:
            raise ConfigError(f"reprompt_rule must be one of {REPROMPT_RULES}, got {reprompt_rule!r}")
        sparse = sparse_points_per_side or max(1, points_per_side // TINYSAM_SPARSE_RATIO)
        if not 1 <= sparse <= points_per_side:
            raise ConfigError(f"sparse_points_per_side must lie in [1, {points_per_side}], got {sparse}")
        if reprompt_rule == "tinysam" and sparse != points_per_side // TINYSAM_SPARSE_RATIO:
            raise ConfigError("reprompt_rule 'tinysam' needs sparse_points_per_side = points_per_side // 4")
        layers = (sam2_settings.get("crop_n_layers", 0), sam2_settings.get("crop_n_points_downscale_factor", 1))
        dense_sides = layer_points_per_side(points_per_side, *layers)
        sparse_sides = layer_points_per_side(sparse, *layers)
        self.rounds = [TwoRounds(reprompt_rule, n, m) for n, m in zip(dense_sides, sparse_sides, strict=True)]

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        self.points_prompted = 0
        return super().generate(image)  # sam2's, under torch.no_grad

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int, orig_size: tuple[int, ...]
    ) -> MaskData:
        if not self.hierarchical:
            self.points_prompted += len(self.point_grids[crop_layer_idx])
            return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        size = crop.shape[:2]
        self.predictor.set_image(crop)
        rounds = self.rounds[crop_layer_idx]
        sparse = rounds.sparse_points(size)
        coverage = torch.zeros(size, dtype=torch.bool, device=self.predictor.device)
        data = self._prompt(sparse, size, crop_box, orig_size, coverage)
        data.cat(self._prompt(rounds.second_points(sparse, coverage), size, crop_box, orig_size))
        self.predictor.reset_predictor()
        # The crop's box NMS over both rounds, then back to the image frame, as sam2 ends a crop.
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), self.box_nms_thresh
        )
        data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
        return data

    def _prompt(
        self,
        points: np.ndarray,
        size: tuple[int, int],
        crop_box: list[int],
        orig_size: tuple[int, ...],
        coverage: torch.Tensor | None = None,
    ) -> MaskData:
        """Nx2 crop-frame (x, y) points through sam2's ``_process_batch`` in its batches; with `coverage`, ORs
        into it the high-logit pixels of the masks that pass the predicted-IoU and stability filters."""
        data = MaskData()
        self.points_prompted += len(points)
        for (batch,) in batch_iterator(self.points_per_batch, points):
            if coverage is None:
                data.cat(self._process_batch(batch, size, crop_box, orig_size, normalize=True))
                continue
            predict = self.predictor._predict
            self.predictor._predict = _covering(predict, coverage, self._covered_pixels)
            try:
                data.cat(self._process_batch(batch, size, crop_box, orig_size, normalize=True))
            finally:
                del self.predictor._predict  # the class's method again
        return data

    def _covered_pixels(self, logits: torch.Tensor, iou_preds: torch.Tensor) -> torch.Tensor:
        """HxW bool: where a mask (of BxCxHxW logits, BxC predicted IoU) that passes the generator's filters has a
        logit above `high_score_thresh`; sam2's filters, in its order."""
        logits, iou_preds = logits.flatten(0, 1), iou_preds.flatten(0, 1)
        keep = torch.ones_like(iou_preds, dtype=torch.bool)
        if self.pred_iou_thresh > 0.0:
            keep &= iou_preds > self.pred_iou_thresh
        if self.stability_score_thresh > 0.0:
            stability = calculate_stability_score(logits, self.mask_threshold, self.stability_score_offset)
            keep &= stability >= self.stability_score_thresh
        return coverage_from_logits(logits[keep], self.high_score_thresh)


def _covering(
    predict: Callable, coverage: torch.Tensor, covered: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Callable:
    """The predictor's ``_predict``, also ORing `covered(masks, iou)` of what it returns into `coverage`."""

    def predict_and_cover(*args: Any, **kwargs: Any):
        masks, iou_preds, low_res = predict(*args, **kwargs)
        coverage.logical_or_(covered(masks, iou_preds))
        return masks, iou_preds, low_res

    return predict_and_cover
