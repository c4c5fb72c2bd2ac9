"""DistillStep on hand-built items: a student identical to its teacher has zero distillation loss; a batch gives
the mean of its images' terms alone; the batched decoder is SAM's."""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch

from distill.config import DistillConfig
from distill.data import Collate, DistillItem, lowres_masks, stream_items
from distill.decoding import decode, decode_in_chunks, sparse_embeddings
from distill.families import DISTILL_FAMILIES
from distill.model import DistillStep, fidelity, image_blind_embedding
from distill.prompts import PromptSet
from student_models.preprocessing import prepare_image
from tests.helpers import requires_cuda, synthetic_image, tiny_model


@pytest.fixture(scope="module")
def item_and_models():
    student = tiny_model("tinyvit_test", seed=0)
    teacher = tiny_model("sam_vit_test", seed=1)
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    image, masks = synthetic_image(3)
    prepared = prepare_image(image)
    with torch.no_grad():
        embedding = student.image_encoder(prepared.tensor)[0]  # the "teacher" embedding equals the student's
    boxes = np.array([[0, 0, 64, 64]] * len(masks), dtype=np.float32)
    item = DistillItem(
        0, "img", prepared.tensor[0], embedding, prepared.input_size, lowres_masks(masks, prepared.input_size), boxes
    )
    return student, teacher, item


@pytest.mark.parametrize("mode, source", [("gt", "teacher"), ("disagreement", "student")])
def test_identical_student_has_zero_distillation_loss(item_and_models, mode, source):
    student, teacher, item = item_and_models
    config = DistillConfig(
        prompts_per_image=2,
        max_prompt_iters=2,
        box_prob=0.0,
        prompt_mode=mode,
        prompt_source=source,
        gt_mask_weight=1.0,
        gt_iou_weight=1.0,
        seed=4,
    )
    step = DistillStep(student, teacher, config, use_prompts=True).eval()
    terms = step(Collate(config.seed, 0, 2, 0.0, 2)([item]))
    assert set(terms) == {"embedding", *step.prompt_term_names()}
    for name in ("embedding", "token", "output", "output_mask_l1", "output_iou_l1"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert terms["hmw_mean"].item() == pytest.approx(0.5, abs=1e-5)  # equally good -> 0.5
    assert terms["gt_mask"].item() > 0 and terms["prompt_iters"].item() >= 0
    terms["gt_mask"].backward()  # the GT term reaches the student's encoder and decoder
    assert student.image_encoder.neck[0].weight.grad is not None
    assert student.mask_decoder.output_upscaling[0].weight.grad is not None
    student.zero_grad(set_to_none=True)


def _sam_decoder(sam, embedding, prompts):
    """SAM's own path (one image embedding for all prompts): the reference for `decode`."""
    points = (prompts.points, prompts.labels) if prompts.labels.shape[1] else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
    return sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)


def test_decode_is_sams_decoder_for_one_image_and_for_many_at_once(item_and_models):
    student, _, item = item_and_models
    points = PromptSet(torch.tensor([[[100.0, 80.0]], [[10.0, 10.0]]]), torch.ones(2, 1), None)
    boxes = PromptSet(torch.zeros(2, 0, 2), torch.zeros(2, 0), torch.tensor([[0.0, 0, 64, 64], [30, 40, 500, 300]]))
    embedding = item.teacher_embedding[None]
    with torch.no_grad():
        out = decode(student, embedding, points)
        masks, iou = _sam_decoder(student, embedding, points)
    assert out.masks.shape == (2, 4, 256, 256) and out.iou.shape == (2, 4)
    assert out.tokens.shape == (2, 5 + 2, 256)  # iou + 4 mask tokens + the point + SAM's padding point
    torch.testing.assert_close(out.masks, masks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.iou, iou, rtol=1e-5, atol=1e-5)
    logits, chosen_iou = out.chosen(multimask=True)
    assert logits.shape == (2, 256, 256) and torch.equal(chosen_iou, out.iou[:, 1:].max(1).values)
    # Two images in one call, box prompts for the first and point prompts for the second (both 2 tokens each):
    # each image's rows equal SAM's decoder on that image alone.
    other = embedding.flip(-1)
    with torch.no_grad():
        both = decode(student, torch.cat([embedding, other]), [boxes, points])
        first, second = _sam_decoder(student, embedding, boxes), _sam_decoder(student, other, points)
    torch.testing.assert_close(both.masks, torch.cat([first[0], second[0]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.iou, torch.cat([first[1], second[1]]), rtol=1e-5, atol=1e-5)
    flags = torch.tensor([False, False, True, True])
    logits, _ = both.chosen(flags)
    torch.testing.assert_close(logits[:2], both.masks[:2, 0])
    torch.testing.assert_close(logits[2:], both.masks[2 + torch.arange(2), both.iou[2:, 1:].argmax(1) + 1])
    with pytest.raises(ValueError, match="same prompt count per embedding and token count per prompt"):
        decode(student, embedding, [boxes, points.add_points(torch.zeros(2, 2), torch.ones(2))])


@pytest.mark.parametrize("images_per_call", [1, 2, None])
def test_decoding_in_chunks_gives_the_values_and_gradients_of_one_call(item_and_models, images_per_call):
    """Three images, 2 prompts each, boxes for the first and points for the other two (so a chunk of 2 spans
    both sets): chunked and checkpointed calls give one call's masks, IoU, tokens and gradient within float
    rounding."""
    student, _, item = item_and_models
    torch.manual_seed(0)
    boxes = PromptSet(torch.zeros(2, 0, 2), torch.zeros(2, 0), torch.rand(2, 4).sort(1).values * 512)
    points = PromptSet(torch.rand(4, 1, 2) * 1024, torch.ones(4, 1), None)
    base = torch.stack([item.teacher_embedding, item.teacher_embedding.flip(-1), item.teacher_embedding.flip(-2)])
    results = {}
    for name, call in {
        "one call": lambda e: decode(student, e, [boxes, points]),
        "chunked": lambda e: decode_in_chunks(
            DISTILL_FAMILIES["sam"].decode, student, (e,), [boxes, points], images_per_call, recompute=True
        ),
    }.items():
        embeddings = base.clone().requires_grad_(True)
        out = call(embeddings)
        (out.masks.square().mean() + out.iou.sum() + out.tokens.mean()).backward()
        results[name] = (out.masks, out.iou, out.tokens, embeddings.grad)
    for got, expected in zip(results["chunked"], results["one call"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_step_with_the_decoders_in_chunks_gives_the_terms_and_gradients_of_one_call(item_and_models):
    """--decoder-images 1: every decoder call takes one image's prompts and the student's is recomputed in
    backward; the loss terms and the student's gradients are those of whole-batch calls."""
    _, teacher, item = item_and_models
    items = [replace(item, index=i, image=item.image.roll(13 * i, dims=-1)) for i in range(3)]
    results = {}
    for chunk in (None, 1):
        student = tiny_model("tinyvit_test", seed=2)
        config = DistillConfig(
            prompts_per_image=3, max_prompt_iters=2, gt_mask_weight=1.0, seed=1, decoder_images=chunk
        )
        step = DistillStep(student, teacher, config, use_prompts=True).train()
        terms = step(Collate(config.seed, 0, 3, 0.5, 2)(items))
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[chunk] = ({n: v.detach() for n, v in terms.items()}, grads)
    (terms_one, grads_one), (terms_chunked, grads_chunked) = results[None], results[1]
    assert terms_one.keys() == terms_chunked.keys() and grads_one.keys() == grads_chunked.keys()
    assert any(n.startswith("mask_decoder.") for n in grads_one)  # the decoder is trained: the recompute is used
    for name in terms_one:
        torch.testing.assert_close(terms_chunked[name], terms_one[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in grads_one:
        torch.testing.assert_close(grads_chunked[name], grads_one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "mode, source", [pytest.param("gt", "student", marks=pytest.mark.slow), ("disagreement", "student")]
)
def test_a_batch_gives_the_mean_of_its_images_alone(item_and_models, mode, source):
    """Images of both prompt kinds and different numbers of corrective points, decoded together, give per image
    the terms of a batch of that image alone (prompts depend only on the image): batching changes no result."""
    student, teacher, item = item_and_models
    student = tiny_model("tinyvit_test", seed=2)  # a student unlike its teacher, so the terms are not all zero
    config = DistillConfig(
        prompts_per_image=3,
        max_prompt_iters=3,
        prompt_mode=mode,
        prompt_source=source,
        gt_mask_weight=1.0,
        gt_iou_weight=1.0,
        seed=1,
    )
    items = [replace(item, index=i, image=item.image.roll(13 * i, dims=-1)) for i in range(3)]
    items.append(replace(item, index=3, gt_masks=None, gt_boxes=None))  # no masks: the embedding loss only
    collate = Collate(config.seed, 0, 3, 0.5, 3)
    step = DistillStep(student, teacher, config, use_prompts=True).eval()
    batch = collate(items)
    assert set(batch.use_box) == {True, False} and len(set(batch.iterations)) > 1  # the cases worth batching
    with torch.no_grad():
        together = step(batch)
        alone = [step(collate([one])) for one in items]
    assert set(together) == {"embedding", *step.prompt_term_names()}
    for name, value in together.items():
        mean = sum(terms[name] for terms in alone) / len(items)
        torch.testing.assert_close(value, mean, rtol=2e-5, atol=1e-6, msg=name)
    assert together["prompt_iters"].item() == pytest.approx(sum(batch.iterations) / len(items))


def test_fidelity_counts_an_identical_student_as_perfect_and_reports_the_image_blind_floor(item_and_models):
    student, _, item = item_and_models  # the item's teacher embedding is this student's own
    sums = fidelity(student, student, [item], max_prompts=4)
    assert sums["iou"] == sums["prompts"] > 0 and sums["embedding_l1"] == 0 and sums["images"] == 1
    assert 0 <= sums["blind_iou"] < sums["prompts"]  # the image's average alone does not give its masks
    flat = replace(item, teacher_embedding=image_blind_embedding(item.teacher_embedding[None], item.input_size)[0])
    assert fidelity(student, student, [flat], max_prompts=4)["blind_iou"] == sums["prompts"]


def test_validation_holds_at_most_two_held_out_images_however_many_there_are(item_and_models):
    """`fidelity` over `stream_items`: images are read as they are scored and dropped after, so the number held
    at once is bounded (the one scored and the one being read), not the number of held-out images."""
    student, _, item = item_and_models

    class CountingHeldOut:
        """A held-out set whose items count how many of them are alive at once."""

        def __init__(self, size: int) -> None:
            self.size, self.alive, self.peak, self.read = size, 0, 0, []

        def __len__(self) -> int:
            return self.size

        def __getitem__(self, position: int) -> DistillItem:
            copy = replace(item, index=position)
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(copy, self._dropped)
            self.read.append(position)
            return copy

        def _dropped(self) -> None:
            self.alive -= 1

    for size in (3, 12):
        held_out = CountingHeldOut(size)
        sums = fidelity(student, student, stream_items(held_out, rank=1, world_size=2), max_prompts=2)
        assert held_out.read == list(range(1, size, 2)) and sums["images"] == len(held_out.read)  # rank 1's share
        assert held_out.peak <= 2 and held_out.alive == 0, (size, held_out.peak)  # a list would hold 6 of 12


def test_image_blind_embedding_is_the_mean_over_the_image_cells_only():
    embedding = torch.randn(1, 8, 64, 64)
    blind = image_blind_embedding(embedding, (500, 1024))  # ceil(500 / 16) = 32 rows of cells hold the image
    assert blind.shape == embedding.shape and torch.equal(blind[..., 0, 0], blind[..., 63, 63])
    torch.testing.assert_close(blind[..., 0, 0], embedding[..., :32, :].mean((2, 3)))


def test_sparse_embeddings_are_sams_prompt_encoder(item_and_models):
    """Our prompt encoding (torch.where instead of SAM's boolean indexing) gives SAM's embeddings exactly, for
    points of every label (padding among them), boxes alone and boxes with points."""
    student, _, _ = item_and_models
    encoder = student.prompt_encoder
    points = torch.tensor([[[100.0, 80.0], [3.0, 900.0], [0.0, 0.0]], [[500.0, 10.0], [10.0, 10.0], [77.0, 5.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, 1.0]])
    boxes = torch.tensor([[0.0, 0, 64, 64], [30, 40, 500, 300]])
    cases = [PromptSet(points, labels, None), PromptSet(points, labels, boxes)]
    cases.append(PromptSet(points[:, :0], labels[:, :0], boxes))
    with torch.no_grad():
        for prompts in cases:
            given = (prompts.points, prompts.labels) if prompts.labels.shape[1] else None
            expected, _ = encoder(points=given, boxes=prompts.boxes, masks=None)
            assert torch.equal(sparse_embeddings(encoder, prompts), expected)


HOST_ROUND_TRIPS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def test_the_step_makes_no_host_round_trip(item_and_models, monkeypatch):
    """Forward and backward of a batch with hard prompts call nothing that copies a tensor's values to the host
    (on a GPU each would wait for the device); CUDA's own check is the test below."""
    student, teacher, item = item_and_models
    config = DistillConfig(prompts_per_image=2, max_prompt_iters=2, gt_mask_weight=1.0, gt_iou_weight=1.0, seed=1)
    items = [replace(item, index=i) for i in range(3)]
    batch = Collate(config.seed, 0, 2, 0.5, 2)(items)
    assert set(batch.use_box) == {True, False} and max(batch.iterations) > 0
    step = DistillStep(student, teacher, config, use_prompts=True).train()

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the step")

        return method

    for name in HOST_ROUND_TRIPS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    terms = step(batch)
    sum(terms[name] for name in ("embedding", "token", "output", "gt_mask", "gt_iou")).backward()
    monkeypatch.undo()
    student.zero_grad(set_to_none=True)
    assert set(terms) == {"embedding", *step.prompt_term_names()}


@requires_cuda
@pytest.mark.parametrize("decoder_images", [None, 2])
def test_the_step_does_not_wait_for_the_gpu(item_and_models, decoder_images):
    """Under CUDA's sync debug mode, the step's own code (distill/) triggers no synchronisation, bf16 autocast on;
    also with the decoders in chunks and the student's recomputed in backward."""
    student, teacher, item = item_and_models
    device = torch.device("cuda")
    config = DistillConfig(
        prompts_per_image=4, max_prompt_iters=3, gt_mask_weight=1.0, gt_iou_weight=1.0, seed=1,
        decoder_images=decoder_images,
    )  # fmt: skip
    items = [replace(item, index=i) for i in range(4)]
    batch = Collate(config.seed, 0, 4, 0.5, 3)(items).pin_memory().to(device, non_blocking=True)
    step = DistillStep(copy.deepcopy(student), copy.deepcopy(teacher), config, use_prompts=True).to(device).train()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                terms = step(batch)
            terms["token"].add(terms["output"]).add(terms["gt_mask"]).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if f"{os.sep}distill{os.sep}" in w.filename]
    assert not ours, "\n".join(ours)
    assert all(torch.isfinite(v).all() for v in terms.values())
