"""Dense mode returns what segment_anything's SamAutomaticMaskGenerator returns, under the contract of
`hierarchical/agreement.py` (equal except where float rounding meets a threshold), on CPU and on CUDA.

Random weights predict IoUs around -0.1..0.2 and logits within +-0.2, so the thresholds are
permissive enough for masks to survive (and, where set, to filter some of them). Random masks
span the whole image, so box NMS keeps them only at box_nms_thresh=1.0 (NMS still runs and
still decides the order).
"""

import pytest
from segment_anything import SamAutomaticMaskGenerator

from hierarchical import GeneratorConfig, HierarchicalMaskGenerator
from hierarchical.agreement import agreement_with_sam
from tests.helpers import requires_cuda, synthetic_image, tiny_model

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


def assert_same(sam, image, reference, ours, settings):
    """Every record paired or allowed by the contract; report the agreement when it fails."""
    assert all(record.keys() == reference[0].keys() for record in ours)
    agreement = agreement_with_sam(sam, image, reference, ours, GeneratorConfig(**settings))
    assert agreement.holds, agreement.to_dict()
    assert agreement.records_equal + agreement.records_borderline > 0  # something was compared


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_mode_equals_sams_generator(tiny_sam, case):
    settings = dict(points_per_side=2, **CASES[case])
    image, _ = synthetic_image(1, (96, 128))
    reference = SamAutomaticMaskGenerator(tiny_sam, **settings).generate(image)
    generator = HierarchicalMaskGenerator(tiny_sam, hierarchical=False, **settings)
    ours = generator.generate(image)
    assert len(reference) > 1, "thresholds too strict for a meaningful comparison"
    assert_same(tiny_sam, image, reference, ours, settings)
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
    assert_same(sam, image, reference, ours, settings)


def test_dense_mode_equals_sams_generator_on_sam_vit():
    sam = tiny_model("sam_vit_test")
    settings = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    image, _ = synthetic_image(3, (64, 48))
    reference = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    ours = HierarchicalMaskGenerator(sam, hierarchical=False, **settings).generate(image)
    assert_same(sam, image, reference, ours, settings)


def test_dense_mode_equals_sams_generator_across_micro_batches(tiny_sam):
    """25 points in SAM batches of 11, 11, 3: decoder micro-batches of 4 and 7, and a short batch SAM decodes."""
    settings = dict(points_per_side=5, points_per_batch=11, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    settings["box_nms_thresh"] = 1.0
    image, _ = synthetic_image(4, (72, 96))
    reference = SamAutomaticMaskGenerator(tiny_sam, **settings).generate(image)
    ours = HierarchicalMaskGenerator(tiny_sam, hierarchical=False, decoder_micro_batch=4, **settings).generate(image)
    assert len(reference) == 75
    assert_same(tiny_sam, image, reference, ours, dict(settings, decoder_micro_batch=4))


@requires_cuda
@pytest.mark.parametrize("hierarchical", [False, True])
def test_generator_on_cuda_agrees_with_sams_generator(float32_cuda, hierarchical):
    """Both modes on a CUDA model; 16 points in prompt batches of 8 go through the micro-batched decoder.
    Hierarchical mode with nothing covered (tau above every logit) prompts the dense grid, sparse points first."""
    sam = tiny_model("tinyvit_test").cuda()
    settings = dict(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    settings["box_nms_thresh"] = 1.0
    image, _ = synthetic_image(5, (96, 128))
    reference = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    generator = HierarchicalMaskGenerator(sam, hierarchical=hierarchical, high_score_thresh=1e9, **settings)
    ours = generator.generate(image)
    assert len(reference) == 48 and generator.last_timing.points_prompted == 16
    assert_same(sam, image, reference, ours, settings)


@requires_cuda
def test_hierarchical_coverage_on_cuda_prompts_only_the_sparse_round(float32_cuda):
    """tau below every logit covers the whole image: only the sparse round's points, as SAM prompts them."""
    sam = tiny_model("tinyvit_test").cuda()
    settings = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    image, _ = synthetic_image(6, (96, 128))
    generator = HierarchicalMaskGenerator(sam, high_score_thresh=-1e9, **settings)
    ours = generator.generate(image)
    sparse_grid = generator.rounds[0].sparse_grid
    assert generator.last_timing.points_prompted == len(sparse_grid) == 4
    sam_settings = dict(settings, points_per_side=None, point_grids=[sparse_grid])
    reference = SamAutomaticMaskGenerator(sam, **sam_settings).generate(image)
    assert_same(sam, image, reference, ours, settings)
