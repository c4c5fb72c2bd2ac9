"""Distillation on SAM 2 models: the three cached levels, SAM 2's geometry, its decoder for many images at once,
and a step whose student equals its teacher has zero distillation loss.

Tolerance: the batched decoder runs sam2's modules on the same values as the one-image path, in other batch
shapes, so logits and IoU agree to 1e-5 relative / 1e-4 absolute in float32 (as tests/student_models/
test_sam2_pipeline.py states for the predictor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.cache import EmbeddingCache, embedding_file_bytes, fingerprint_fields
from distill.config import DistillConfig
from distill.data import Collate, DistillDataset, DistillItem, lowres_masks
from distill.decoding import decode_sam2
from distill.families import DISTILL_FAMILIES, distill_family
from distill.model import DistillStep
from distill.prompts import PromptSet
from student_models.data import SyntheticDataset
from student_models.sam2_pipeline import Sam2Features, box_points, choose_masks, decode, encode
from tests.helpers import synthetic_image, tiny_model
from tests.student_models.test_sam2_models import requires_sam2

pytestmark = requires_sam2
CLOSE = dict(rtol=1e-5, atol=1e-4)
SAM2 = DISTILL_FAMILIES["sam2"]


def test_three_levels_pack_into_one_cache_file_of_8_4_mb_and_come_back(tmp_path):
    levels = [torch.randn(shape) for shape in SAM2.levels.shapes]
    stored = SAM2.levels.pack(levels)
    assert stored.shape == (4_194_304,) and embedding_file_bytes(stored.shape) == 8_388_736
    fields = fingerprint_fields("sam2_test", None, 0, SyntheticDataset(1))
    assert fields["levels"] == {"high_res_feats_0": [32, 256, 256], "high_res_feats_1": [64, 128, 128],
                                "image_embed": [256, 64, 64]}  # fmt: skip
    assert fields["preprocessing"] != fingerprint_fields("sam_vit_test", None, 0, SyntheticDataset(1))["preprocessing"]
    cache = EmbeddingCache.open(tmp_path, fields)
    cache.write("a", stored)
    assert cache.path("a").stat().st_size == 8_388_736 and cache.check("a") is None
    back = SAM2.levels.unpack(cache.read("a")[None])
    for got, level in zip(back, levels, strict=True):
        torch.testing.assert_close(got[0], level.half().float(), rtol=0, atol=0)  # fp16 storage, nothing else
    with pytest.raises(ValueError, match="expected"):
        SAM2.levels.pack(levels[::-1])


def test_sam2_geometry_is_a_plain_resize_of_image_masks_and_boxes():
    """SAM 2 resizes every image to 1024x1024: its whole frame is image, and masks and boxes scale per axis."""
    image, masks = synthetic_image(2, (200, 400))
    tensor, input_size, to_frame = SAM2.prepare(image)
    assert tensor.shape == (3, 1024, 1024) and input_size == (1024, 1024)
    np.testing.assert_allclose(to_frame(np.array([[400.0, 200.0], [100.0, 50.0]])), [[1024, 1024], [256, 256]])
    low = lowres_masks(masks, input_size)
    assert low.shape == (len(masks), 256, 256)
    # A mask's area fraction of the image is kept (area resize), whatever the aspect ratio.
    np.testing.assert_allclose(low.mean((1, 2)), masks.mean((1, 2)), atol=0.01)


def test_the_batched_decoder_is_sam2s_for_each_image_and_prompt_kind():
    """Two images, two prompts each: a box with a corrective point on the first, two points on the second, in one
    `decode_sam2`, against sam2's decoder on each image's features alone (the predictor's token layout)."""
    torch.manual_seed(0)
    model = tiny_model("sam2_test_student", seed=0)
    images = torch.randn(2, 3, 1024, 1024)
    with torch.no_grad():
        levels = encode(model, images).levels
        boxes = PromptSet(torch.rand(2, 1, 2) * 1024, torch.ones(2, 1), torch.rand(2, 4).sort(1).values * 1024)
        points = PromptSet(torch.rand(2, 2, 2) * 1024, torch.tensor([[1.0, 0.0], [1.0, -1.0]]), None)
        out = decode_sam2(model, levels, [boxes, points])
        for image, prompts in enumerate((boxes, points)):
            features = Sam2Features.from_levels([level[image : image + 1].expand(2, -1, -1, -1) for level in levels])
            coords, labels = (prompts.points, prompts.labels)
            if prompts.boxes is not None:
                coords, labels = box_points(prompts.boxes, coords, labels)
            expected = decode(model, features, coords, labels)
            rows = slice(2 * image, 2 * image + 2)
            torch.testing.assert_close(out.masks[rows], expected.masks, **CLOSE)
            torch.testing.assert_close(out.iou[rows], expected.iou, **CLOSE)
            torch.testing.assert_close(out.tokens[rows], expected.mask_tokens, **CLOSE)
            single, _ = choose_masks(model, expected, multimask=False)
            torch.testing.assert_close(out.chosen(False)[0][rows], single[:, 0], **CLOSE)


def test_a_sam2_student_equal_to_its_teacher_has_zero_distillation_loss():
    student = tiny_model("sam2_test_student", seed=0)
    teacher = SAM2.assemble_heads()
    heads = {k: v for k, v in student.state_dict().items() if k.startswith(SAM2.head_prefixes)}
    teacher.load_state_dict(heads, strict=False)
    teacher.eval().requires_grad_(False)
    image, masks = synthetic_image(3, (300, 400))
    tensor, input_size, to_frame = SAM2.prepare(image)
    with torch.no_grad():
        stored = SAM2.levels.pack([level[0] for level in SAM2.encode(student, tensor[None])])
    boxes = to_frame(np.array([[10.0, 20.0, 200.0, 150.0]] * len(masks)).reshape(-1, 2, 2)).reshape(-1, 4)
    item = DistillItem(0, "img", tensor, stored, input_size, lowres_masks(masks, input_size), boxes.astype(np.float32))
    config = DistillConfig(
        teacher="sam2_test", student="sam2_test_student", prompts_per_image=2, max_prompt_iters=2, seed=4
    )
    step = DistillStep(student, teacher, config, use_prompts=True).eval()
    for box_prob in (0.0, 1.0):
        terms = step(Collate(config.seed, 0, 2, box_prob, 2)([item]))
        names = {"embedding_high_res_feats_0", "embedding_high_res_feats_1", "embedding_image_embed"}
        assert set(terms) == {"embedding", *names, *step.prompt_term_names()}
        for name in ("embedding", *names, "token", "output", "output_mask_l1", "output_iou_l1"):
            assert terms[name].item() == pytest.approx(0.0, abs=2e-6), (box_prob, name)
        assert terms["hmw_mean"].item() == pytest.approx(0.5, abs=1e-5)
    student.zero_grad(set_to_none=True)
    student.sam_mask_decoder.conv_s0.weight.data += 0.01  # a high-resolution level off: its loss reaches conv_s0
    terms = step(Collate(config.seed, 0, 2, 1.0, 2)([item]))
    assert terms["embedding_high_res_feats_0"].item() > 0 and terms["embedding_image_embed"].item() == 0
    (terms["embedding"] + terms["output"]).backward()
    assert student.sam_mask_decoder.conv_s0.weight.grad.abs().sum() > 0


def test_a_dataset_item_for_sam2_holds_its_geometry_and_packed_levels(tmp_path):
    dataset = SyntheticDataset(1, size=(200, 300))
    cache = EmbeddingCache.open(tmp_path, fingerprint_fields("sam2_test", None, 0, dataset))
    cache.write(dataset.image_ids[0], torch.zeros(SAM2.levels.stored_shape))
    item = DistillDataset(dataset, cache, [0], distill_family("sam2_test"))[0]
    sample = dataset[0]
    assert item.image.shape == (3, 1024, 1024) and item.input_size == (1024, 1024)
    assert item.teacher_embedding.shape == SAM2.levels.stored_shape
    keep = lowres_masks(sample.masks, (1024, 1024)).reshape(len(sample.masks), -1).any(1)
    np.testing.assert_allclose(item.gt_boxes, sample.boxes[keep] * np.array([1024 / 300, 1024 / 200] * 2), rtol=1e-6)


def test_teacher_and_student_of_different_families_or_wrong_level_weights_are_refused():
    with pytest.raises(ValueError, match="sam2_test is a sam2 model and student tinyvit_test a sam one"):
        DistillConfig(teacher="sam2_test", student="tinyvit_test")
    with pytest.raises(ValueError, match="level_weights must be 3 weights"):
        DistillConfig(teacher="sam2_test", student="sam2_test_student", level_weights=[1.0])
    DistillConfig(teacher="sam2_test", student="sam2_test_student", level_weights=[0.5, 0.5, 1.0])
