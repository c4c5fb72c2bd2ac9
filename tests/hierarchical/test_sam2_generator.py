"""TinySAM's two rounds on a SAM 2 model: with the hierarchy off the records are SAM2AutomaticMaskGenerator's; with it
on and nothing covered it prompts SAM 2's dense grid and finds its masks; what the sparse round covers is not
prompted again.

Tolerance: the two rounds decode the dense grid's points in other batches than sam2 does, so a kernel may sum in
another order; records are compared by their masks (exact) and scores to 1e-5 (measured on this CPU: identical).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import synthetic_image, tiny_model
from tests.student_models.test_sam2_models import requires_sam2

pytestmark = requires_sam2
IMAGE = synthetic_image(0, (256, 320))[0]
# Filters off, so that a random-weight model's masks survive and every point's masks reach the NMS.
SETTINGS = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("sam2_test_student", seed=0)


def _sam2_records(model, **settings):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    return SAM2AutomaticMaskGenerator(model, **settings).generate(IMAGE)


def _key(record: dict) -> tuple:
    return (tuple(record["bbox"]), record["area"], np.packbits(record["segmentation"]).tobytes())


def test_with_the_hierarchy_off_the_records_are_sam2s(model):
    from hierarchical.sam2_generator import HierarchicalSam2MaskGenerator

    generator = HierarchicalSam2MaskGenerator(model, hierarchical=False, **SETTINGS)
    ours, theirs = generator.generate(IMAGE), _sam2_records(model, **SETTINGS)
    assert len(ours) == len(theirs) > 0 and generator.points_prompted == 64
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and _key(a) == _key(b)
        assert a["predicted_iou"] == b["predicted_iou"] and a["point_coords"] == b["point_coords"]


def test_with_nothing_covered_the_two_rounds_prompt_sam2s_grid_and_find_its_masks(model):
    from hierarchical.sam2_generator import HierarchicalSam2MaskGenerator

    generator = HierarchicalSam2MaskGenerator(model, high_score_thresh=float("inf"), **SETTINGS)
    ours, theirs = generator.generate(IMAGE), _sam2_records(model, **SETTINGS)
    assert generator.points_prompted == 64  # 2x2 sparse points, then the other 60 of the 8x8 grid
    by_mask = {_key(r): r for r in theirs}
    assert sorted(by_mask) == sorted(_key(r) for r in ours)
    for record in ours:
        expected = by_mask[_key(record)]
        assert record["predicted_iou"] == pytest.approx(expected["predicted_iou"], rel=1e-5)
        assert record["stability_score"] == pytest.approx(expected["stability_score"], rel=1e-5)


def test_what_the_sparse_round_covers_is_not_prompted_again(model):
    from hierarchical.sam2_generator import HierarchicalSam2MaskGenerator

    everything = HierarchicalSam2MaskGenerator(model, high_score_thresh=-float("inf"), **SETTINGS)
    records = everything.generate(IMAGE)
    # Every pixel is covered by the sparse round's masks: its 2x2 points are all that is prompted. (Which points
    # a partial coverage leaves is the rules' business, tests/hierarchical/test_reprompt.py; a random model's
    # masks cover all of the grid or none of it.)
    assert everything.points_prompted == 4 and records
    sparse = {tuple(point) for point in everything.rounds[0].sparse_points(IMAGE.shape[:2])}
    assert len(sparse) == 4 and {tuple(r["point_coords"][0]) for r in records} <= sparse


def test_settings_the_two_rounds_cannot_honour_are_refused(model):
    from hierarchical.config import ConfigError
    from hierarchical.sam2_generator import HierarchicalSam2MaskGenerator

    with pytest.raises(ConfigError, match="use_m2m"):
        HierarchicalSam2MaskGenerator(model, use_m2m=True)
    with pytest.raises(ConfigError, match="tinysam"):
        HierarchicalSam2MaskGenerator(model, reprompt_rule="tinysam", sparse_points_per_side=4)
    HierarchicalSam2MaskGenerator(model, use_m2m=True, hierarchical=False)
