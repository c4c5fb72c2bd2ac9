"""`HierarchicalMaskGenerator`: SAM's automatic mask generator, done in a cheaper order, plus TinySAM's
two-round (sparse, then uncovered dense) prompting.

Dense mode (`hierarchical=False`) returns what `segment_anything.SamAutomaticMaskGenerator` returns
for the same model, image and settings, under the contract of `hierarchical/agreement.py`: the same
records except where float rounding meets a threshold (a pixel whose logit lies within a stated
epsilon of the mask threshold, a score within a stated tolerance). It is faster because of the
order of work, never by approximating:

1. the crop is encoded once; the decoder's image-side work shared by all prompts is done once per
   crop, its attentions fold the projections of the 4096 image tokens into the 7 prompt tokens, and
   it runs on micro-batches of a few prompts that fit in the CPU caches (`hierarchical/decoder.py`:
   the same function as SAM's decoder, equal to float rounding); filtering still follows SAM's own
   `points_per_batch` batches;
2. the predicted-IoU filter runs inside the decoder, before its mask head: a prompt none of whose
   3 masks passes skips the mask head (two transposed convolutions over 64x64 -> 256x256), and the
   masks that fail it are never upsampled to full resolution, which dominates SAM's post-processing
   (SAM computes and upsamples all 3 masks of every point first); upsampling treats every mask plane
   on its own, so the survivors' full resolution logits, stability scores and binary masks are the
   same numbers;
3. binary masks of the candidates are kept instead of run-length encoding each one; only the masks
   that survive NMS are encoded, once, straight into the requested output form (SAM encodes every
   candidate to RLE and decodes the survivors again for `binary_mask` output). The price is
   memory: a crop's candidates are held as KxHxW bool (one byte per pixel) until its NMS, e.g.
   768 candidates of a 640x480 image = 236 MB with every filter off.

Hierarchical mode (TinySAM, SPEC section 4), per crop: a sparse round with the same filters;
pixels where any mask that passed the predicted-IoU and stability filters has a logit above
`high_score_thresh` are covered (TinySAM takes the same masks); a second round on the points that
`reprompt_rule` picks among the uncovered ones (`hierarchical/reprompt.py`: "lattice", the rest of
SAM's dense grid, or "tinysam", TinySAM's published rule); both rounds' masks go through one box
NMS, then the optional small-region clean-up, as in SAM. The sparse points count as points of the
dense grid, so neither rule prompts more points than dense mode.

Crops: TinySAM's hierarchical generator has none (it prompts the whole image only and ignores
`crop_n_layers`). With `crop_n_layers > 0` we run both rounds in every crop as SAM runs its grid:
in the crop's frame, with the crop's size as the image size and the layer's points per side
(`points_per_side / crop_n_points_downscale_factor**layer`), and one coverage map per crop; then
SAM's NMS between crops. Without crops, "tinysam" prompts exactly TinySAM's points in its order.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.predictor import SamPredictor
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms, box_area
from tqdm import tqdm

from hierarchical.config import ConfigError, GeneratorConfig
from hierarchical.decoder import SharedImageDecoder, default_micro_batch
from hierarchical.encoding import build_records, encode_masks
from hierarchical.grid import coverage_from_logits, layer_point_grids, layer_points_per_side, scale_points
from hierarchical.reprompt import TwoRounds
from student_models.preprocessing import to_rgb

# Per-candidate fields kept until NMS; "masks" is a list of HxW bool tensors (crop frame).
_TENSOR_KEYS = ("iou_preds", "points", "stability_score", "boxes")


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class GenerationTiming:
    """Where the seconds of one `generate` call went, and how many point prompts it used."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    postprocess_s: float = 0.0
    points_prompted: int = 0
    sparse_points: int = 0
    dense_points: int = 0
    masks: int = 0

    @property
    def total_s(self) -> float:
        return self.encoder_s + self.decoder_s + self.postprocess_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": self.total_s}

    def line(self) -> str:
        return (
            f"encoder {self.encoder_s:.3f}s, decoder {self.decoder_s:.3f}s, post-processing "
            f"{self.postprocess_s:.3f}s, total {self.total_s:.3f}s; points prompted {self.points_prompted} "
            f"(sparse {self.sparse_points}, dense {self.dense_points}); masks {self.masks}"
        )


def _empty_candidates(device: torch.device) -> MaskData:
    return MaskData(
        iou_preds=torch.zeros(0, device=device),
        points=torch.zeros(0, 2, dtype=torch.float64, device=device),
        stability_score=torch.zeros(0, device=device),
        boxes=torch.zeros(0, 4, dtype=torch.int64, device=device),
        masks=[],
    )


def _concat(parts: list[MaskData], device: torch.device) -> MaskData:
    """Concatenate candidate batches once (MaskData.cat re-copies and deep-copies on every call)."""
    if not parts:
        return _empty_candidates(device)
    merged = MaskData(masks=[m for part in parts for m in part["masks"]])
    for key in parts[0]._stats:
        if key != "masks":
            merged[key] = torch.cat([part[key] for part in parts], dim=0)
    return merged


class HierarchicalMaskGenerator:
    """Segment everything with a SAM-family model; a drop-in for `SamAutomaticMaskGenerator`.

    `HierarchicalMaskGenerator(sam, points_per_side=32, hierarchical=True, ...)` takes the fields of
    `GeneratorConfig` as keyword arguments (or a whole `config=`). `generate(image)` takes an HxWx3
    uint8 RGB image (HxW gray and HxWx4 RGBA are converted) and returns SAM's records: segmentation
    (HxW bool array, or an RLE dict per `output_mode`), area (pixels), bbox (XYWH), predicted_iou,
    point_coords ([[x, y]]), stability_score, crop_box (XYWH). `last_timing` holds the
    `GenerationTiming` of the latest call. `progress=True` shows a bar on stderr through each round's
    prompt batches (the decoder phase is most of the time).

    The work runs on the model's device (CPU or CUDA): every tensor made here is made there, and
    only the returned records' masks and fields are copied to the CPU.
    """

    def __init__(
        self, model: Sam, config: GeneratorConfig | None = None, progress: bool = False, **options: Any
    ) -> None:
        if config is not None and options:
            raise ConfigError(f"pass either config= or keyword settings, not both (got {sorted(options)})")
        self.config = config if config is not None else GeneratorConfig.from_dict(options)
        self.model = model
        self.progress = progress
        self.predictor = SamPredictor(model)
        self.device = model.device
        cfg = self.config
        layers = (cfg.crop_n_layers, cfg.crop_n_points_downscale_factor)
        self.dense_grids = layer_point_grids(cfg.points_per_side, *layers)
        self.rounds: list[TwoRounds] = []
        if cfg.hierarchical:
            dense_sides = layer_points_per_side(cfg.points_per_side, *layers)
            sparse_sides = layer_points_per_side(cfg.sparse_points_per_side, *layers)
            for dense, sparse in zip(dense_sides, sparse_sides, strict=True):
                self.rounds.append(TwoRounds(cfg.reprompt_rule, dense, sparse))
        self.last_timing: GenerationTiming | None = None
        self._timing = GenerationTiming()
        self._decoder: SharedImageDecoder | None = None

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """HxWx3 uint8 image -> list of SAM mask records (see the class docstring)."""
        image = to_rgb(image)
        self._timing = GenerationTiming()
        data, masks = self._generate_masks(image)
        start = time.perf_counter()
        if self.config.min_mask_region_area > 0:
            data, masks = self._remove_small_regions(data, masks)
        segmentations = encode_masks(masks, self.config.output_mode)
        areas = masks.flatten(1).sum(1).numpy()
        data.to_numpy()
        records = build_records(
            segmentations,
            areas,
            data["boxes"],
            data["iou_preds"],
            data["points"],
            data["stability_score"],
            data["crop_boxes"],
        )
        self._timing.postprocess_s += time.perf_counter() - start
        self._timing.masks = len(records)
        self.last_timing = self._timing
        return records

    def _generate_masks(self, image: np.ndarray) -> tuple[MaskData, torch.Tensor]:
        """All crops -> (per-mask fields, KxHxW bool masks in the image frame), after the crop NMS, on the CPU."""
        orig_size = image.shape[:2]
        cfg = self.config
        crop_boxes, layers = generate_crop_boxes(orig_size, cfg.crop_n_layers, cfg.crop_overlap_ratio)
        parts = [self._process_crop(image, box, i, orig_size) for box, i in zip(crop_boxes, layers, strict=True)]
        data = _concat(parts, self.device)
        start = clock(self.device)
        if len(crop_boxes) > 1:
            # SAM: between crops, prefer masks from smaller crops.
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(
                data["boxes"].float(),
                scores,
                torch.zeros_like(scores),
                iou_threshold=cfg.crop_nms_thresh,
            )
            data.filter(keep)
        masks = torch.stack(data["masks"]) if data["masks"] else torch.zeros(0, *orig_size, dtype=torch.bool)
        del data["masks"]
        masks = masks.cpu()  # one copy of the survivors; RLE and the small-region clean-up run on the CPU
        for key, value in data.items():
            data[key] = value.cpu()
        self._timing.postprocess_s += clock(self.device) - start
        return data, masks

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer_idx: int, orig_size: tuple[int, ...]
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        start = clock(self.device)
        self.predictor.set_image(crop)
        self._timing.encoder_s += clock(self.device) - start
        start = clock(self.device)
        _, no_mask_dense = self.model.prompt_encoder(points=None, boxes=None, masks=None)
        micro_batch = self.config.decoder_micro_batch or default_micro_batch(self.device, self.config.points_per_batch)
        self._decoder = SharedImageDecoder(
            self.model.mask_decoder,
            self.predictor.features,
            self.model.prompt_encoder.get_dense_pe(),
            no_mask_dense,
            micro_batch=micro_batch,
        )
        self._timing.decoder_s += clock(self.device) - start

        if self.config.hierarchical:
            rounds = self.rounds[layer_idx]
            sparse_points = rounds.sparse_points(crop_size)
            coverage = torch.zeros(crop_size, dtype=torch.bool, device=self.device)
            batches = self._prompt(sparse_points, crop_box, orig_size, "sparse round", coverage)
            self._timing.sparse_points += len(sparse_points)
            dense_points = rounds.second_points(sparse_points, coverage)
            round_name = "second round"
        else:
            batches = []
            dense_points = scale_points(self.dense_grids[layer_idx], crop_size)
            round_name = "dense grid"
        batches += self._prompt(dense_points, crop_box, orig_size, round_name)
        self._timing.dense_points += len(dense_points)
        self.predictor.reset_image()
        self._decoder = None

        start = clock(self.device)
        data = _concat(batches, self.device)
        keep = batched_nms(
            data["boxes"].float(),
            data["iou_preds"],
            torch.zeros_like(data["iou_preds"]),
            iou_threshold=self.config.box_nms_thresh,
        )
        data.filter(keep)
        orig_h, orig_w = orig_size
        if data["masks"]:
            data["masks"] = list(uncrop_masks(torch.stack(data["masks"]), crop_box, orig_h, orig_w))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64, device=self.device).repeat(
            len(data["masks"]), 1
        )
        self._timing.postprocess_s += clock(self.device) - start
        return data

    def _prompt(
        self,
        points: np.ndarray,
        crop_box: list[int],
        orig_size: tuple[int, ...],
        round_name: str,
        coverage: torch.Tensor | None = None,
    ) -> list[MaskData]:
        """Nx2 (x, y) crop-frame points -> filtered candidate batches; ORs high-logit pixels into `coverage`."""
        batches = []
        bar = tqdm(total=len(points), desc=round_name, unit="point", leave=False, disable=not self.progress)
        with bar:
            for (batch_points,) in batch_iterator(self.config.points_per_batch, points):
                start = clock(self.device)
                prompt_ids, low_res, iou_preds = self._decode(batch_points)
                self._timing.decoder_s += clock(self.device) - start
                start = clock(self.device)
                point_t = torch.as_tensor(batch_points, device=self.device)[prompt_ids]
                batches.append(self._filter_batch(low_res, iou_preds, point_t, crop_box, orig_size, coverage))
                self._timing.postprocess_s += clock(self.device) - start
                bar.update(len(batch_points))
        self._timing.points_prompted += len(points)
        return batches

    def _decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bx2 crop-frame points -> the multimask outputs that pass SAM's predicted-IoU filter, in SAM's
        order: (K prompt indices into `points`, Kx256x256 low-res logits, K predicted IoUs)."""
        transformed = self.predictor.transform.apply_coords(points, self.predictor.original_size)
        coords = torch.as_tensor(transformed, device=self.predictor.device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        sparse, _ = self.model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        prompt_ids, _, low_res, iou_preds = self._decoder.decode(sparse, self.config.pred_iou_thresh)
        return prompt_ids, low_res, iou_preds

    def _filter_batch(
        self,
        low_res: torch.Tensor,
        iou_preds: torch.Tensor,
        point_t: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, ...],
        coverage: torch.Tensor | None,
    ) -> MaskData:
        """SAM's per-batch filters after the predicted-IoU filter (done by the decoder, before any upsampling)
        on the K surviving masks' Kx256x256 logits, K IoUs and Kx2 points."""
        cfg = self.config
        # KxHxW full-resolution logits of the survivors only (SAM's own upsampling, per plane).
        logits = self.model.postprocess_masks(
            low_res[:, None], self.predictor.input_size, self.predictor.original_size
        )[:, 0]
        threshold = self.model.mask_threshold
        stability = calculate_stability_score(logits, threshold, cfg.stability_score_offset)
        if cfg.stability_score_thresh > 0.0:
            keep = stability >= cfg.stability_score_thresh
            logits, iou_preds, point_t, stability = logits[keep], iou_preds[keep], point_t[keep], stability[keep]
        if coverage is not None:
            coverage |= coverage_from_logits(logits, cfg.high_score_thresh)

        masks = logits > threshold
        del logits
        boxes = batched_mask_to_box(masks)
        orig_h, orig_w = orig_size
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            masks, boxes, iou_preds, point_t, stability = (
                masks[keep],
                boxes[keep],
                iou_preds[keep],
                point_t[keep],
                stability[keep],
            )
        return MaskData(iou_preds=iou_preds, points=point_t, stability_score=stability, boxes=boxes, masks=list(masks))

    def _remove_small_regions(self, data: MaskData, masks: torch.Tensor) -> tuple[MaskData, torch.Tensor]:
        """SAM's `postprocess_small_regions` on KxHxW bool CPU masks (no RLE round trip); same result and order."""
        if not len(masks):
            return data, masks
        min_area = self.config.min_mask_region_area
        new_masks, scores = [], []
        for mask in masks:
            cleaned, changed_holes = remove_small_regions(mask.numpy(), min_area, mode="holes")
            cleaned, changed_islands = remove_small_regions(cleaned, min_area, mode="islands")
            new_masks.append(torch.as_tensor(cleaned))
            scores.append(float(not (changed_holes or changed_islands)))
        stacked = torch.stack(new_masks)
        boxes = batched_mask_to_box(stacked)
        keep = batched_nms(
            boxes.float(),
            torch.as_tensor(scores),
            torch.zeros(len(boxes)),
            iou_threshold=max(self.config.box_nms_thresh, self.config.crop_nms_thresh),
        )
        for i in keep.tolist():
            if scores[i] == 0.0:
                masks[i] = stacked[i]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data, masks[keep]
