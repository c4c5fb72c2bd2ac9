"""What "the same as SAM's generator" means, and the one function that checks it.

Our dense mode and `SamAutomaticMaskGenerator` compute the same function in float32 but not with the
same order or kernels (projections folded into the prompt tokens, micro-batches, another CPU's GEMM
blocking, a GPU), so a mask logit can come out a few units in the last place apart. Bits are
therefore not the contract; this is:

Two record lists of the same model, image and settings agree when, after pairing the records by
prompt point, crop box and mask (best mask IoU among the same point's records):

1. every pixel where two paired masks differ is *borderline*: SAM's own logit for that mask there
   lies within `LOGIT_EPS` x (the largest |logit| of that mask) of `mask_threshold`;
2. paired predicted IoUs differ by at most `SCORE_ATOL`, and each stability score lies within
   `SCORE_ATOL` of the range that SAM's logits give when every pixel within the same epsilon of
   `mask_threshold +- stability_score_offset` may fall either way;
3. a record without a partner is *borderline*: its predicted IoU lies within `SCORE_ATOL` of
   `pred_iou_thresh`, or its stability range (2) reaches `stability_score_thresh` (a filter
   whose threshold is 0, i.e. off in SAM, drops nothing and excuses nothing).

Order is not part of it (SAM sorts by predicted IoU, and two scores within rounding may swap). Not
covered either, and so reported as disagreement: a box NMS or crop-edge decision that a borderline
pixel flips. "SAM's own logit" is SAM's predictor on that one point: a third float32 computation,
which the epsilon covers as well.

Why these epsilons (measured with `rounding_spread`: float32 decoder paths against a float64 copy,
random-weight tinyvit_test and sam_vit_test, two random 1x256x64x64 embeddings, 64 prompts (SAM's
batch), SAM's decoder and our micro-batches of 2, 4 and 8, 1 and 2 threads, on the 2-core Intel
Xeon build machine; command and figures in docs/BENCHMARKS.md): the largest float32 error of a
low-res logit was 1.53e-6 of its mask's largest |logit|, of a predicted IoU 2.25e-7. `LOGIT_EPS`
and `SCORE_ATOL` are about 6.5x and 44x those, for CPUs whose kernels round differently; `tests/hierarchical/
test_agreement.py` re-measures the spread wherever the tests run and fails if it exceeds half of
either. A GPU in float32 is held to the same numbers (TF32 off: TF32 keeps 10 mantissa bits,
errors near 1e-3, outside this contract).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.predictor import SamPredictor

from hierarchical.config import GeneratorConfig
from hierarchical.decoder import SharedImageDecoder

LOGIT_EPS = 1e-5  # of the mask's largest |logit|: ~6.5x the largest float32 error measured (1.53e-6)
SCORE_ATOL = 1e-5  # predicted IoU and stability score: ~44x the largest predicted-IoU error measured (2.25e-7)


@dataclass
class Agreement:
    """How a candidate's records compare with a reference's (SAM's) under the contract above.

    `records_equal`: paired with identical masks; `records_borderline`: paired, differing only in
    borderline pixels; `unpaired_borderline`: without a partner, allowed by rule 3. `violations`
    says what breaks the contract, one line each; `pixels_differing` counts pixels where paired
    masks differ, out of `pixels_compared` (the reference masks' areas).
    """

    reference_records: int = 0
    candidate_records: int = 0
    records_equal: int = 0
    records_borderline: int = 0
    unpaired_borderline: int = 0
    pixels_compared: int = 0
    pixels_differing: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "holds": self.holds}


def decode_segmentation(segmentation: Any) -> np.ndarray:
    """A record's segmentation in any of SAM's output modes -> HxW bool."""
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        height, width = segmentation["size"]
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(segmentation).astype(bool)


class ReferenceLogits:
    """SAM's own predictor, one point at a time: the 3xHxW full-resolution logits (image frame) of a
    record's point in its crop; -inf outside the crop, where no mask has pixels."""

    def __init__(self, model: Sam, image: np.ndarray) -> None:
        self.predictor = SamPredictor(model)
        self.image = image
        self._crop: tuple[int, ...] | None = None

    @torch.no_grad()
    def __call__(self, point: tuple[float, float], crop_box_xywh: tuple[int, ...]) -> torch.Tensor:
        x0, y0, w, h = crop_box_xywh
        if self._crop != crop_box_xywh:
            self.predictor.set_image(self.image[y0 : y0 + h, x0 : x0 + w])
            self._crop = crop_box_xywh
        crop_point = np.array([[point[0] - x0, point[1] - y0]])
        coords = self.predictor.transform.apply_coords(crop_point, self.predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float, device=self.predictor.device)[None]
        labels = torch.ones(1, 1, dtype=torch.int, device=self.predictor.device)
        logits, _, _ = self.predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
        frame = torch.full((3, *self.image.shape[:2]), -torch.inf, dtype=torch.float64)
        frame[:, y0 : y0 + h, x0 : x0 + w] = logits[0].double().cpu()
        return frame


@torch.no_grad()
def rounding_spread(
    model: Sam, image_embedding: torch.Tensor, coords: torch.Tensor, micro_batches: tuple[int | None, ...] = (None,)
) -> dict[int | None, tuple[float, float]]:
    """How far SAM's float32 decoder (None) and `SharedImageDecoder` (each micro-batch) land from float64.

    `image_embedding` is 1xCxHxW and `coords` Nx2 points in the model's 1024-frame, decoded as one
    batch. Returns per entry of `micro_batches` (the largest low-res logit error over the largest
    |logit| of its mask, the largest predicted-IoU error): the rounding that `LOGIT_EPS` and
    `SCORE_ATOL` must cover on this device.
    """
    labels = torch.ones(len(coords), 1, dtype=torch.int, device=coords.device)
    sparse, dense = model.prompt_encoder(points=(coords[:, None], labels), boxes=None, masks=None)
    image_pe = model.prompt_encoder.get_dense_pe()
    exact = copy.deepcopy(model.mask_decoder).double()
    logits64, iou64 = exact(image_embedding.double(), image_pe.double(), sparse.double(), dense.double(), True)
    scale = logits64.abs().amax(dim=(-2, -1), keepdim=True)
    spreads = {}
    for micro_batch in micro_batches:
        if micro_batch is None:
            logits, iou = model.mask_decoder(image_embedding, image_pe, sparse, dense, True)
        else:
            decoder = SharedImageDecoder(model.mask_decoder, image_embedding, image_pe, dense[:1], micro_batch)
            logits, iou = decoder(sparse, multimask_output=True)
        logit_error = float(((logits.double() - logits64).abs() / scale).max())
        spreads[micro_batch] = (logit_error, float((iou.double() - iou64).abs().max()))
    return spreads


def _near(logits: torch.Tensor, value: float, eps: torch.Tensor) -> torch.Tensor:
    return (logits - value).abs() <= eps


def _stability_range(
    logits: torch.Tensor, eps: float, config: GeneratorConfig, threshold: float
) -> tuple[float, float]:
    """The stability scores an HxW logit map allows when pixels within `eps` of either cut may fall either way."""
    high, low = threshold + config.stability_score_offset, threshold - config.stability_score_offset
    inter_min, inter_max = int((logits > high + eps).sum()), int((logits > high - eps).sum())
    union_min, union_max = int((logits > low + eps).sum()), int((logits > low - eps).sum())
    return inter_min / max(union_max, 1), inter_max / max(union_min, 1)


class _Checker:
    """The contract's rules for one image, with SAM's logits fetched only for records that need them."""

    def __init__(self, model: Sam, image: np.ndarray, config: GeneratorConfig) -> None:
        self.config = config
        self.threshold = model.mask_threshold
        self.logits = ReferenceLogits(model, image)

    def plane(self, record: dict, mask: np.ndarray) -> tuple[torch.Tensor, float]:
        """SAM's logit map of the record's mask (the one of its point's 3 that binarizes closest) and its epsilon."""
        planes = self.logits(tuple(record["point_coords"][0]), tuple(record["crop_box"]))
        target = torch.as_tensor(mask)
        best = min(range(3), key=lambda i: int(((planes[i] > self.threshold) ^ target).sum()))
        plane = planes[best]
        return plane, LOGIT_EPS * float(plane[plane.isfinite()].abs().max())

    def stability_ok(self, record: dict, plane: torch.Tensor, eps: float) -> bool:
        low, high = _stability_range(plane, eps, self.config, self.threshold)
        return low - SCORE_ATOL <= record["stability_score"] <= high + SCORE_ATOL

    def unpaired_is_borderline(self, record: dict, mask: np.ndarray) -> bool:
        """Rule 3; a threshold of 0 switches its filter off in SAM, so it cannot drop a record."""
        iou_thresh, stability_thresh = self.config.pred_iou_thresh, self.config.stability_score_thresh
        if iou_thresh > 0.0 and abs(record["predicted_iou"] - iou_thresh) <= SCORE_ATOL:
            return True
        if stability_thresh <= 0.0:
            return False
        plane, eps = self.plane(record, mask)
        low, high = _stability_range(plane, eps, self.config, self.threshold)
        return low - SCORE_ATOL <= stability_thresh <= high + SCORE_ATOL


def _pair(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[tuple[int, int]]:
    """Greedy pairs (i, j) of one point's masks, highest IoU first; masks with no overlap stay unpaired."""
    scores = []
    for i, ref in enumerate(reference):
        for j, cand in enumerate(candidate):
            union = int((ref | cand).sum())
            iou = int((ref & cand).sum()) / union if union else 1.0
            if iou > 0:
                scores.append((-iou, i, j))
    pairs, used_i, used_j = [], set(), set()
    for _, i, j in sorted(scores):
        if i not in used_i and j not in used_j:
            pairs.append((i, j))
            used_i.add(i)
            used_j.add(j)
    return pairs


def agreement_with_sam(
    model: Sam, image: np.ndarray, reference: list[dict], candidate: list[dict], config: GeneratorConfig
) -> Agreement:
    """Check `candidate` records against `reference` records (SAM's generator on `model`, `image` and
    `config`'s settings) under the contract in this module's docstring."""
    checker = _Checker(model, image, config)
    result = Agreement(reference_records=len(reference), candidate_records=len(candidate))
    groups: dict[tuple, tuple[list[dict], list[dict]]] = defaultdict(lambda: ([], []))
    for side, records in enumerate((reference, candidate)):
        for record in records:
            key = (tuple(record["point_coords"][0]), tuple(record["crop_box"]))
            groups[key][side].append(record)
    for (point, _), (refs, cands) in groups.items():
        ref_masks = [decode_segmentation(r["segmentation"]) for r in refs]
        cand_masks = [decode_segmentation(c["segmentation"]) for c in cands]
        pairs = _pair(ref_masks, cand_masks)
        for i, j in pairs:
            ref, cand = refs[i], cands[j]
            differ = ref_masks[i] ^ cand_masks[j]
            result.pixels_compared += int(ref_masks[i].sum())
            result.pixels_differing += int(differ.sum())
            if abs(ref["predicted_iou"] - cand["predicted_iou"]) > SCORE_ATOL:
                result.violations.append(
                    f"point {point}: predicted IoU {cand['predicted_iou']:.7f} vs SAM's {ref['predicted_iou']:.7f}"
                )
                continue
            if not differ.any() and abs(ref["stability_score"] - cand["stability_score"]) <= SCORE_ATOL:
                result.records_equal += 1
                continue
            plane, eps = checker.plane(ref, ref_masks[i])
            off_border = int((torch.as_tensor(differ) & ~_near(plane, checker.threshold, eps)).sum())
            if off_border:
                result.violations.append(f"point {point}: {off_border} differing pixel(s) not borderline")
            elif not (checker.stability_ok(ref, plane, eps) and checker.stability_ok(cand, plane, eps)):
                result.violations.append(
                    f"point {point}: stability {cand['stability_score']:.7f} vs SAM's {ref['stability_score']:.7f}"
                )
            else:
                result.records_borderline += 1
        paired_refs, paired_cands = {i for i, _ in pairs}, {j for _, j in pairs}
        unpaired = [(refs[i], ref_masks[i], "SAM only") for i in range(len(refs)) if i not in paired_refs]
        unpaired += [(cands[j], cand_masks[j], "ours only") for j in range(len(cands)) if j not in paired_cands]
        for record, mask, side in unpaired:
            if checker.unpaired_is_borderline(record, mask):
                result.unpaired_borderline += 1
            else:
                result.violations.append(f"point {point}: a mask of area {record['area']} in {side}")
    return result
