from __future__ import annotations

import numpy as np
import pytest
import segment_anything
import torch
from segment_anything import SamPredictor

from student_models import build_sam, list_models
from tests.helpers import synthetic_image

# Forward passes of the big teachers take minutes on 2 CPU cores: their shapes are checked on
# the meta device; vit_b runs for real in test_official_parity.py.
CHEAP = ["tinyvit_5m", "repvit_m0_9", "sam_vit_test", "tinyvit_test"]


def test_registry_lists_every_required_model():
    names = list_models()
    for name in ["vit_h", "vit_l", "vit_b", "tinyvit_5m", "repvit_m0_9", "sam_vit_test", "tinyvit_test"]:
        assert name in names
    assert set(list_models("teacher", family="sam")) == {"vit_h", "vit_l", "vit_b"}
    assert build_sam("vit_t").image_encoder.__class__ is build_sam("tinyvit_5m").image_encoder.__class__


def test_unknown_model_names_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown model 'vit_x'.*tinyvit_5m"):
        build_sam("vit_x")


@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b"])
def test_teacher_embedding_shape_on_meta_device(name):
    from student_models.registry import assemble_sam, get_spec

    spec = get_spec(name)
    with torch.device("meta"):
        encoder = assemble_sam(spec.build_encoder(**spec.encoder_kwargs)).image_encoder
        assert encoder(torch.empty(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)


@pytest.mark.parametrize("name", CHEAP)
def test_embedding_shape_and_predictor(name):
    torch.manual_seed(0)
    sam = build_sam(name)
    with torch.no_grad():
        assert sam.image_encoder(torch.randn(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)
    image, masks = synthetic_image(1)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    ys, xs = np.nonzero(masks[0])
    pred, scores, low_res = predictor.predict(
        point_coords=np.array([[xs.mean(), ys.mean()]]), point_labels=np.array([1]), multimask_output=True
    )
    assert pred.shape == (3, *image.shape[:2]) and pred.dtype == bool
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert low_res.shape == (3, 256, 256)


def test_automatic_mask_generator_runs_on_a_student():
    torch.manual_seed(0)
    generator = segment_anything.SamAutomaticMaskGenerator(
        build_sam("tinyvit_test"), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    records = generator.generate(synthetic_image(2)[0])
    assert records and {"segmentation", "area", "bbox", "predicted_iou"} <= set(records[0])
