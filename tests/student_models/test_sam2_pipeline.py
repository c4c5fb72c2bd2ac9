"""The batched SAM 2 pipeline equals sam2's own SAM2ImagePredictor for box, point and segment-everything prompts.

Tolerance: the same modules run on the same values, but in other batch shapes (two images per encoder call,
several images' prompts per decoder call), so a kernel may sum in another order: logits and IoU agree to
1e-5 relative / 1e-4 absolute in float32 (measured on this CPU: identical bit for bit). On CUDA, TF32 is off,
as for every float32 contract here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_models.sam2_pipeline import (
    MASK_LOGIT_LIMIT,
    Sam2Runner,
    Sam2Transforms,
    TorchSam2Backend,
    box_points,
    choose_masks,
    decode,
    encode,
)
from tests.helpers import DEVICES, synthetic_image, tiny_model
from tests.student_models.test_sam2_models import requires_sam2

pytestmark = requires_sam2
CLOSE = dict(rtol=1e-5, atol=1e-4)
IMAGES = [synthetic_image(0, (256, 320))[0], synthetic_image(1, (300, 200))[0]]  # two sizes, two aspect ratios


def predictor_for(model, image):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    return predictor


@pytest.fixture
def model():
    return tiny_model("sam2_test").requires_grad_(False)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_features_of_a_batch_equal_the_predictors_per_image(model, device, float32_cuda):
    model = model.to(device)
    features = encode(model, Sam2Transforms(model.image_size).images(IMAGES).to(device))
    assert [tuple(level.shape) for level in features.levels] == [
        (2, 32, 256, 256),
        (2, 64, 128, 128),
        (2, 256, 64, 64),
    ]
    for i, image in enumerate(IMAGES):
        expected = predictor_for(model, image)._features
        torch.testing.assert_close(features.image_embed[i : i + 1], expected["image_embed"], **CLOSE)
        for ours, theirs in zip(features.high_res, expected["high_res_feats"], strict=True):
            torch.testing.assert_close(ours[i : i + 1], theirs, **CLOSE)


# Each prompt in pixels of its image: (points, labels, box); several images' prompts of one kind decode together.
PROMPTS = {
    "box": (None, None, [[20, 30, 180, 150]]),
    "one point": ([[60, 80]], [1], None),
    "two points": ([[60, 80], [120, 40]], [1, 0], None),
    "box and point": ([[90, 90]], [0], [[10, 10, 150, 190]]),
}


# (multimask output, the decoder's dynamic multimask): only single-mask output consults the latter.
MODES = {"multimask": (True, True), "dynamic-multimask": (False, True), "token-0": (False, False)}


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_prompts_of_two_images_decoded_together_equal_the_predictor(model, kind, mode, device, float32_cuda):
    """Low-resolution logits, IoU and the masks at the image's size, for each image's prompt."""
    multimask, dynamic = MODES[mode]
    model = model.to(device)
    model.sam_mask_decoder.dynamic_multimask_via_stability = dynamic
    points, labels, box = PROMPTS[kind]
    transforms = Sam2Transforms(model.image_size)
    features = encode(model, transforms.images(IMAGES).to(device))
    coords, point_labels, boxes = [], [], []
    for image in IMAGES:
        hw = image.shape[:2]
        if points is not None:
            coords.append(transforms.points(torch.tensor([points], dtype=torch.float32), hw))
            point_labels.append(torch.tensor([labels], dtype=torch.int))
        if box is not None:
            boxes.append(transforms.points(torch.tensor(box, dtype=torch.float32).reshape(1, 2, 2), hw).reshape(1, 4))
    if box is None:
        coords, point_labels = torch.cat(coords), torch.cat(point_labels)
    else:
        extra = (torch.cat(coords), torch.cat(point_labels)) if points is not None else (None, None)
        coords, point_labels = box_points(torch.cat(boxes), *extra)
    output = decode(model, features.rows(torch.arange(len(IMAGES))), coords.to(device), point_labels.to(device))
    logits, iou = choose_masks(model, output, multimask)
    for i, image in enumerate(IMAGES):
        predictor = predictor_for(model, image)
        masks, scores, low_res = predictor.predict(
            point_coords=None if points is None else np.array(points, dtype=np.float32),
            point_labels=None if labels is None else np.array(labels),
            box=None if box is None else np.array(box[0], dtype=np.float32),
            multimask_output=multimask,
            return_logits=True,
        )
        ours = logits[i].clamp(-MASK_LOGIT_LIMIT, MASK_LOGIT_LIMIT)
        torch.testing.assert_close(ours.cpu(), torch.from_numpy(low_res), **CLOSE)
        torch.testing.assert_close(iou[i].cpu(), torch.from_numpy(scores), **CLOSE)
        upscaled = transforms.masks(logits[i : i + 1], image.shape[:2])[0]
        torch.testing.assert_close(upscaled.cpu(), torch.from_numpy(masks), **CLOSE)


@torch.no_grad()
def test_a_grid_of_points_decodes_as_the_automatic_generator_prompts_it(model):
    """SAM2AutomaticMaskGenerator's prompt batches: one point each, multimask, through predictor._predict."""
    from sam2.utils.amg import build_point_grid

    transforms = Sam2Transforms(model.image_size)
    features = encode(model, transforms.images(IMAGES))
    for i, image in enumerate(IMAGES):
        hw = image.shape[:2]
        grid = torch.from_numpy(build_point_grid(4) * np.array(hw[::-1])).float()  # as the generator scales it
        coords = transforms.points(grid, hw)[:, None]
        labels = torch.ones((len(grid), 1), dtype=torch.int)
        output = decode(model, features.rows(torch.full((len(grid),), i)), coords, labels)
        logits, iou = choose_masks(model, output, multimask=True)
        _, scores, low_res = predictor_for(model, image)._predict(coords, labels, multimask_output=True)
        torch.testing.assert_close(logits.clamp(-MASK_LOGIT_LIMIT, MASK_LOGIT_LIMIT), low_res, **CLOSE)
        torch.testing.assert_close(iou, scores, **CLOSE)


def test_decode_refuses_prompts_without_their_features(model):
    features = encode(model, Sam2Transforms(model.image_size).images(IMAGES[:1]))
    with pytest.raises(ValueError, match="one image's features per prompt: 1 for 3 prompts"):
        decode(model, features, torch.zeros(3, 1, 2), torch.ones(3, 1, dtype=torch.int))


@torch.no_grad()
def test_the_backend_encodes_and_decodes_as_the_pipeline(model):
    """`TorchSam2Backend` (what benchmarks time) returns the pipeline's features and all four tokens."""
    transforms = Sam2Transforms(model.image_size)
    images = transforms.images(IMAGES)
    expected = encode(model, images)
    coords, labels = box_points(torch.tensor([[20.0, 30, 500, 600], [100, 100, 900, 800]]))
    backend = TorchSam2Backend(model)
    features = backend.encode(images)
    for ours, theirs in zip(features.levels, expected.levels, strict=True):
        torch.testing.assert_close(ours, theirs, **CLOSE)
    logits, iou = backend.decode(features.rows(slice(1, 2)), coords, labels)
    output = decode(model, expected.rows(torch.tensor([1, 1])), coords, labels)
    assert logits.shape == (2, 4, 256, 256) and iou.shape == (2, 4)
    torch.testing.assert_close(logits, output.masks, **CLOSE)
    torch.testing.assert_close(iou, output.iou, **CLOSE)
    with pytest.raises(ValueError, match="one image's features, got 2"):
        backend.decode(features, coords, labels)


@torch.no_grad()
def test_the_runner_predicts_points_and_boxes_as_the_predictor(model):
    """`Sam2Runner` (what benchmarks coco runs): SAM 2's geometry, SamRunner's prompts and mask choice."""
    image = IMAGES[1]
    runner = Sam2Runner(TorchSam2Backend(model))
    runner.set_image(image)
    predictor = predictor_for(model, image)
    points, labels = np.array([[[60.0, 80.0], [120.0, 40.0]]]), np.array([[1, 0]])
    ours = runner.predict(points, labels, multimask_output=True)
    masks, scores, low_res = predictor.predict(points[0], labels[0], multimask_output=True, return_logits=True)
    clamped = ours.low_res_logits[0].clamp(-MASK_LOGIT_LIMIT, MASK_LOGIT_LIMIT)
    torch.testing.assert_close(clamped, torch.from_numpy(low_res), **CLOSE)
    torch.testing.assert_close(ours.iou[0], torch.from_numpy(scores), **CLOSE)
    assert torch.equal(ours.masks[0], torch.from_numpy(masks > 0))
    boxes = np.array([[20.0, 30.0, 180.0, 150.0], [0.0, 0.0, 199.0, 299.0]])
    box_masks, box_scores = runner.predict_boxes(boxes)
    for box, mask, score in zip(boxes, box_masks, box_scores, strict=True):
        masks, scores, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
        best = int(np.argmax(scores))
        assert score.item() == pytest.approx(scores[best], rel=1e-5, abs=1e-5)
        assert torch.equal(mask, torch.from_numpy(masks[best] > 0))
    runner.set_image(image[..., 0])  # a grey image, as COCO has some
    assert runner.predict_boxes(boxes[:1])[0].shape == (1, *image.shape[:2])
