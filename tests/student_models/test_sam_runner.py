"""`SamRunner` against SAM's own `SamPredictor` on the same model: the one prompt path every stage uses.

Tolerances: the runner and SamPredictor run the same modules in the same order on the same device,
but through different code (batched point lists vs per-call prompt encoding), so a float may differ
by reassociation. Scores agree within 1e-4; a mask pixel may differ only where SAM's upscaled logit
lies within 1e-3 of the threshold.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from student_models.preprocessing import prepare_image
from student_models.sam_runner import (
    MASK_THRESHOLD,
    PointPromptDecoder,
    SamRunner,
    TorchSamBackend,
    compile_mode,
)
from tests.helpers import requires_cuda, synthetic_image, tiny_model

SCORE_ATOL = 1e-4
LOGIT_EPS = 1e-3


def _assert_masks_agree(masks: torch.Tensor, logits: torch.Tensor) -> None:
    """`masks` (ours) equal SAM's `logits > 0` except where |logit| < LOGIT_EPS."""
    differ = masks.cpu() != (logits.cpu() > MASK_THRESHOLD)
    assert not (differ & (logits.cpu().abs() >= LOGIT_EPS)).any()


def _prompts(image: np.ndarray, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    points = rng.uniform([0, 0], [w, h], size=(count, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(count, 2)).astype(np.float32)
    corners = rng.uniform([0, 0], [w, h], size=(count, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(np.float32)
    return points, labels, boxes


def _check_against_sam_predictor(device: torch.device) -> None:
    model = tiny_model("tinyvit_test")
    image, _ = synthetic_image(3)
    reference = SamPredictor(model.to(device))
    reference.set_image(image)
    runner = SamRunner(TorchSamBackend(model, device), chunk_size=3)
    runner.set_image(image)
    torch.testing.assert_close(runner.embedding, reference.features, atol=1e-5, rtol=1e-5)
    points, labels, boxes = _prompts(image, 5)
    transform = reference.transform
    cases = {
        "points": dict(point_coords=points, point_labels=labels),
        "boxes": dict(boxes=boxes),
        "points and boxes": dict(point_coords=points, point_labels=labels, boxes=boxes),
    }
    for name, prompt in cases.items():
        for multimask in (True, False):
            ours = runner.predict(**prompt, multimask_output=multimask)
            theirs_coords = theirs_labels = theirs_boxes = None
            if "point_coords" in prompt:
                theirs_coords = torch.as_tensor(transform.apply_coords(points, image.shape[:2]), device=device)
                theirs_labels = torch.as_tensor(labels, device=device)
            if "boxes" in prompt:
                theirs_boxes = torch.as_tensor(transform.apply_boxes(boxes, image.shape[:2]), device=device)
            logits, iou, low_res = reference.predict_torch(
                theirs_coords, theirs_labels, theirs_boxes, multimask_output=multimask, return_logits=True
            )
            torch.testing.assert_close(ours.iou, iou, atol=SCORE_ATOL, rtol=0, msg=name)
            torch.testing.assert_close(ours.low_res_logits, low_res, atol=LOGIT_EPS, rtol=0, msg=name)
            _assert_masks_agree(ours.masks, logits)
    masks, scores = runner.predict_boxes(boxes)
    logits, iou, _ = reference.predict_torch(
        None, None, torch.as_tensor(transform.apply_boxes(boxes, image.shape[:2]), device=device), return_logits=True
    )
    best = iou.argmax(dim=1)
    rows = torch.arange(len(boxes), device=device)
    torch.testing.assert_close(scores, iou[rows, best], atol=SCORE_ATOL, rtol=0)
    _assert_masks_agree(masks, logits[rows, best])


def test_runner_equals_sam_predictor_on_cpu():
    _check_against_sam_predictor(torch.device("cpu"))


@requires_cuda
def test_runner_equals_sam_predictor_on_cuda():
    _check_against_sam_predictor(torch.device("cuda"))


def test_point_prompt_decoder_equals_sams_prompt_encoder_and_decoder():
    model = tiny_model("tinyvit_test")
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.rand(4, 3, 2) * 1024
    labels = torch.tensor([[1.0, 0.0, -1.0]] * 4)
    sparse, dense = model.prompt_encoder(points=(coords[:, :2], labels[:, :2]), boxes=None, masks=None)
    logits, iou = model.mask_decoder.predict_masks(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense)
    ours_logits, ours_iou = PointPromptDecoder(model)(embedding, coords, labels)
    torch.testing.assert_close(ours_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_iou, iou, atol=1e-5, rtol=1e-5)


def test_bf16_backend_stays_close_to_float32():
    model = tiny_model("tinyvit_test")
    image, _ = synthetic_image(4)
    float_runner = SamRunner(TorchSamBackend(model))
    bf16_runner = SamRunner(TorchSamBackend(model, dtype=torch.bfloat16))
    float_runner.set_image(image)
    bf16_runner.set_image(image)
    assert bf16_runner.embedding.dtype == torch.float32
    relative = (bf16_runner.embedding - float_runner.embedding).norm() / float_runner.embedding.norm()
    assert relative < 0.05


def test_bad_prompts_are_named():
    runner = SamRunner(TorchSamBackend(tiny_model("tinyvit_test")))
    with pytest.raises(RuntimeError, match="set_image"):
        runner.predict(boxes=np.zeros((1, 4)))
    runner.set_image(synthetic_image(0)[0])
    with pytest.raises(ValueError, match="point_coords with point_labels, boxes, or both"):
        runner.predict()
    with pytest.raises(ValueError, match="needs point_labels"):
        runner.predict(point_coords=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="one box per point set"):
        runner.predict(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.zeros((3, 4)))


@functools.cache
def _inductor_failure() -> str | None:
    """Why `torch.compile` (Inductor) cannot run here, tried on a trivial function; None when it can."""
    try:
        torch.compile(lambda x: (x + 1).relu())(torch.ones(4))
    except Exception as exc:  # no C++ compiler, no Python headers, an unsupported platform
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def skip_without_inductor() -> None:
    reason = _inductor_failure()
    if reason is not None:
        pytest.skip(f"torch.compile cannot run on this machine ({reason})")


def _check_compiled_equals_eager(device: torch.device) -> None:
    model = tiny_model("tinyvit_test")
    compiled = TorchSamBackend(copy.deepcopy(model), device, compile=True)
    assert compiled.compile_mode == compile_mode(device)
    images = [prepare_image(synthetic_image(seed)[0]).tensor for seed in (3, 4)]
    first = compiled.encode(images[0])
    second = compiled.encode(images[1])  # must not overwrite `first` (a CUDA graph reuses its output memory)
    eager = TorchSamBackend(model, device)
    torch.testing.assert_close(first, eager.encode(images[0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, eager.encode(images[1]), atol=1e-4, rtol=1e-4)

    image, _ = synthetic_image(3)
    points, labels, boxes = _prompts(image, 5)
    results = []
    for backend in (compiled, eager):
        runner = SamRunner(backend, chunk_size=2)  # chunks of 2, 2 and 1: kept while the next one runs
        runner.set_image(image)
        results.append((runner.predict(point_coords=points, point_labels=labels), runner.predict_boxes(boxes)))
    (ours, (our_masks, our_scores)), (theirs, (their_masks, their_scores)) = results
    torch.testing.assert_close(ours.iou, theirs.iou, atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(ours.low_res_logits, theirs.low_res_logits, atol=LOGIT_EPS, rtol=0)
    torch.testing.assert_close(our_scores, their_scores, atol=SCORE_ATOL, rtol=0)
    assert (ours.masks != theirs.masks).float().mean() < 1e-3
    assert (our_masks != their_masks).float().mean() < 1e-3


@pytest.mark.slow
def test_compiled_backend_equals_eager_on_cpu():
    """torch.compile (Inductor's C++ kernels): about 2 minutes the first time on 2 cores, seconds from its cache."""
    skip_without_inductor()
    _check_compiled_equals_eager(torch.device("cpu"))


@requires_cuda
def test_compiled_backend_equals_eager_on_cuda():
    """Mode "reduce-overhead": CUDA graphs, whose outputs the back-end copies before the next replay."""
    _check_compiled_equals_eager(torch.device("cuda"))
