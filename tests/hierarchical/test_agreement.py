"""The exactness contract (`hierarchical/agreement.py`): it passes rounding and refuses real differences,
and its epsilons cover the float32 rounding measured on this machine (and on a GPU when there is one)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import build_point_grid

from hierarchical import GeneratorConfig
from hierarchical import agreement as contract
from hierarchical.agreement import (
    LOGIT_EPS,
    SCORE_ATOL,
    ReferenceLogits,
    agreement_with_sam,
    decode_segmentation,
    rounding_spread,
)
from tests.helpers import requires_cuda, synthetic_image, tiny_model

SETTINGS = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def case(tiny_sam):
    """SAM's own records on a small image: every candidate kept (12 = 4 points x 3 masks)."""
    image, _ = synthetic_image(1, (96, 128))
    records = SamAutomaticMaskGenerator(tiny_sam, **SETTINGS).generate(image)
    assert len(records) == 12
    return image, records


def edited(records, index, **changes):
    return [dict(r, **changes) if i == index else dict(r) for i, r in enumerate(records)]


def check(sam, image, reference, candidate, **settings):
    return agreement_with_sam(sam, image, reference, candidate, GeneratorConfig(**{**SETTINGS, **settings}))


def test_the_same_records_agree_exactly(tiny_sam, case):
    image, records = case
    agreement = check(tiny_sam, image, records, list(reversed(records)))  # order is not part of the contract
    assert agreement.holds and agreement.records_equal == 12 and agreement.pixels_differing == 0


def test_a_flipped_pixel_is_allowed_only_when_borderline(tiny_sam, case, monkeypatch):
    image, records = case
    record = records[0]
    planes = ReferenceLogits(tiny_sam, image)(tuple(record["point_coords"][0]), tuple(record["crop_box"]))
    mask = decode_segmentation(record["segmentation"])
    logits = min(planes, key=lambda plane: int(((plane > 0).numpy() ^ mask).sum()))
    row, col = np.unravel_index(int(logits.abs().argmin()), mask.shape)  # the pixel closest to the threshold
    distance = abs(float(logits[row, col])) / float(logits.abs().max())  # in units of the mask's largest |logit|
    flipped = mask.copy()
    flipped[row, col] = ~flipped[row, col]
    candidate = edited(records, 0, segmentation=flipped)
    # Random weights rarely put a pixel within LOGIT_EPS of the threshold: set the epsilon around this one.
    monkeypatch.setattr(contract, "LOGIT_EPS", 2 * distance)
    within = check(tiny_sam, image, records, candidate)
    assert within.holds, within.violations
    assert (within.records_borderline, within.pixels_differing) == (1, 1)
    monkeypatch.setattr(contract, "LOGIT_EPS", distance / 2)
    assert "1 differing pixel(s) not borderline" in " ".join(check(tiny_sam, image, records, candidate).violations)


def test_a_real_difference_breaks_the_contract(tiny_sam, case):
    image, records = case
    mask = decode_segmentation(records[0]["segmentation"])
    blotted = mask.copy()
    blotted[:10, :10] = ~blotted[:10, :10]
    cases = {
        "differing pixel(s) not borderline": edited(records, 0, segmentation=blotted),
        "predicted IoU": edited(records, 3, predicted_iou=records[3]["predicted_iou"] + 1e-3),
        "stability": edited(records, 5, stability_score=records[5]["stability_score"] + 0.05),
        "in SAM only": records[1:],
    }
    for message, candidate in cases.items():
        agreement = check(tiny_sam, image, records, candidate)
        assert not agreement.holds and message in " ".join(agreement.violations), message
        assert agreement.records_equal + agreement.records_borderline == 11  # all but the bad one


def test_a_record_missing_at_a_threshold_is_borderline(tiny_sam, case):
    image, records = case
    iou = records[4]["predicted_iou"]
    # as if pred_iou_thresh sat on this record's score: one run keeps it, the other drops it
    agreement = check(tiny_sam, image, records, records[:4] + records[5:], pred_iou_thresh=iou + SCORE_ATOL / 2)
    assert agreement.holds and agreement.unpaired_borderline == 1


def test_segmentation_formats_decode_alike(case):
    _, records = case
    mask = decode_segmentation(records[0]["segmentation"])
    coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    flat = mask.T.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    uncompressed = {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}
    assert np.array_equal(decode_segmentation(coco), mask)
    assert np.array_equal(decode_segmentation(uncompressed), mask)


def _spreads(model, device):
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    coords = torch.as_tensor(build_point_grid(4) * 1024, dtype=torch.float32, device=device)  # 16 prompts
    return rounding_spread(model, embedding, coords, micro_batches=(None, 1, 2, 4, 16)).values()


@pytest.mark.parametrize("name", ["tinyvit_test", "sam_vit_test"])
def test_epsilons_cover_this_cpus_float32_rounding(name):
    for logit_error, iou_error in _spreads(tiny_model(name), "cpu"):
        assert logit_error <= LOGIT_EPS / 2 and iou_error <= SCORE_ATOL / 2, (logit_error, iou_error)


@requires_cuda
def test_epsilons_cover_the_gpus_float32_rounding(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for logit_error, iou_error in _spreads(tiny_model("tinyvit_test").cuda(), "cuda"):
        assert logit_error <= LOGIT_EPS / 2 and iou_error <= SCORE_ATOL / 2, (logit_error, iou_error)
