"""Dense mode returns exactly what segment_anything's SamAutomaticMaskGenerator returns.

Random weights predict IoUs around -0.1..0.2 and logits within +-0.2, so the thresholds are
permissive enough for masks to survive (and, where set, to filter some of them). Random masks
span the whole image, so box NMS keeps them only at box_nms_thresh=1.0 (NMS still runs and
still decides the order).
"""

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator

from hierarchical import HierarchicalMaskGenerator
from hierarchical.compare import same_records
from tests.helpers import synthetic_image, tiny_model

CASES = {
    # every candidate kept: all 3 masks of all 4 points, in SAM's order
    "all_candidates_binary": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    # the IoU filter (now before upsampling) drops some, small regions cleaned, COCO RLE out
    "filtered_cleaned_coco": dict(
        pred_iou_thresh=0.01,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        min_mask_region_area=20,
        output_mode="coco_rle",
    ),
    # stability filter with a small offset, uncompressed RLE out
    "stability_uncompressed": dict(
        pred_iou_thresh=0.0,
        stability_score_thresh=0.3,
        stability_score_offset=0.02,
        box_nms_thresh=1.0,
        output_mode="uncompressed_rle",
    ),
}


def assert_same(reference, ours):
    assert len(ours) == len(reference)
    for ref, mine in zip(reference, ours, strict=True):
        assert mine.keys() == ref.keys()
        for key in ("area", "bbox", "point_coords", "crop_box"):
            assert mine[key] == ref[key], key
        assert mine["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-5)
        assert mine["stability_score"] == pytest.approx(ref["stability_score"], abs=1e-5)
        if isinstance(ref["segmentation"], np.ndarray):
            np.testing.assert_array_equal(mine["segmentation"], ref["segmentation"])
        else:
            assert mine["segmentation"] == ref["segmentation"]
    assert same_records(reference, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_mode_equals_sams_generator(tiny_sam, case):
    settings = dict(points_per_side=2, **CASES[case])
    image, _ = synthetic_image(1, (96, 128))
    reference = SamAutomaticMaskGenerator(tiny_sam, **settings).generate(image)
    generator = HierarchicalMaskGenerator(tiny_sam, hierarchical=False, **settings)
    ours = generator.generate(image)
    assert len(reference) > 1, "thresholds too strict for a meaningful comparison"
    assert_same(reference, ours)
    assert generator.last_timing.points_prompted == 4 and generator.last_timing.masks == len(ours)
    if case == "all_candidates_binary":
        assert len(ours) == 12
    else:
        assert len(ours) < 12


def test_dense_mode_equals_sams_generator_with_crops(tiny_sam):
    sam = tiny_sam
    settings = dict(
        points_per_side=2,
        crop_n_layers=1,
        crop_n_points_downscale_factor=2,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        crop_nms_thresh=1.0,
    )
    image, _ = synthetic_image(2, (80, 112))
    reference = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    generator = HierarchicalMaskGenerator(sam, hierarchical=False, **settings)
    ours = generator.generate(image)
    assert generator.last_timing.points_prompted == 4 + 4 * 1
    # Random masks span their crop, so the crop-edge filter removes the 4 crops' masks (in both).
    assert len(reference) > 1
    assert_same(reference, ours)


def test_dense_mode_equals_sams_generator_on_sam_vit():
    sam = tiny_model("sam_vit_test")
    settings = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    image, _ = synthetic_image(3, (64, 48))
    reference = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    assert_same(reference, HierarchicalMaskGenerator(sam, hierarchical=False, **settings).generate(image))


def test_dense_mode_equals_sams_generator_across_micro_batches(tiny_sam):
    """25 points in SAM batches of 11, 11, 3: decoder micro-batches of 4 and 7, and a short batch SAM decodes."""
    settings = dict(points_per_side=5, points_per_batch=11, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    settings["box_nms_thresh"] = 1.0
    image, _ = synthetic_image(4, (72, 96))
    reference = SamAutomaticMaskGenerator(tiny_sam, **settings).generate(image)
    ours = HierarchicalMaskGenerator(tiny_sam, hierarchical=False, decoder_micro_batch=4, **settings).generate(image)
    assert len(reference) == 75
    assert_same(reference, ours)
