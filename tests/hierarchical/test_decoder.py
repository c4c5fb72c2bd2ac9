"""SharedImageDecoder returns what SAM's MaskDecoder returns for the same prompts, to float rounding.

It computes the same function in another order (image-token projections folded into the prompt tokens,
the mask head as matrix products, micro-batches), so bits differ; the contract is float rounding: the
generator contract's LOGIT_EPS of the largest reference value (`hierarchical/agreement.py`, where it is
measured against float64), which no change of the computed function (a dropped term, a wrong token or
head, a scale error) stays within.
"""

import pytest
import torch

from hierarchical.agreement import LOGIT_EPS
from hierarchical.decoder import CPU_MICRO_BATCH, SharedImageDecoder, default_micro_batch


def _prompts(sam, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(count, 1, 2, generator=generator) * 1024
    labels = torch.ones(count, 1, dtype=torch.int)
    return sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)


@pytest.fixture(scope="module")
def image_embedding():
    return torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize(
    "count, micro_batch, multimask",
    # a SAM batch smaller than a micro-batch; exact micro-batches; short tails; single-mask output; one at a time
    [
        (1, 4, True),
        (3, 4, True),
        (8, 4, True),
        (13, 5, True),
        (30, 8, True),
        (13, 4, False),
        (7, 2, True),
        (3, 1, True),
    ],
)
def test_equals_sams_decoder(tiny_sam, image_embedding, count, micro_batch, multimask):
    sparse, dense = _prompts(tiny_sam, count, seed=count)
    image_pe = tiny_sam.prompt_encoder.get_dense_pe()
    reference = tiny_sam.mask_decoder(image_embedding, image_pe, sparse, dense, multimask)
    decoder = SharedImageDecoder(tiny_sam.mask_decoder, image_embedding, image_pe, dense[:1], micro_batch)
    masks, iou_pred = decoder(sparse, multimask_output=multimask)
    assert masks.shape == reference[0].shape and iou_pred.shape == reference[1].shape
    for got, expected in ((masks, reference[0]), (iou_pred, reference[1])):
        atol = LOGIT_EPS * float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_rejects_batched_images_and_bad_micro_batch(tiny_sam, image_embedding):
    image_pe = tiny_sam.prompt_encoder.get_dense_pe()
    _, dense = _prompts(tiny_sam, 2, seed=0)
    with pytest.raises(ValueError, match="one image"):
        SharedImageDecoder(tiny_sam.mask_decoder, image_embedding.expand(2, -1, -1, -1), image_pe, dense[:1])
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        SharedImageDecoder(tiny_sam.mask_decoder, image_embedding, image_pe, dense[:1], micro_batch=0)


def test_micro_batch_per_device():
    assert default_micro_batch(torch.device("cpu"), 64) == CPU_MICRO_BATCH
    assert default_micro_batch(torch.device("cuda", 0), 64) == 64  # one decoder call per prompt batch
    assert default_micro_batch(torch.device("cuda", 0), 1) == 1


@torch.no_grad()
@pytest.mark.parametrize("micro_batch", [3, 16])
def test_decode_returns_the_masks_that_pass_the_iou_filter(tiny_sam, image_embedding, micro_batch):
    """`decode` = SAM's multimask outputs filtered by predicted IoU > threshold, in SAM's (prompt, mask) order;
    micro-batches where every prompt, some prompts and no prompt keep a mask (the mask head runs on the
    prompts that need it only). The threshold lies midway between two of SAM's IoUs, far from rounding."""
    sparse, dense = _prompts(tiny_sam, 16, seed=3)
    image_pe = tiny_sam.prompt_encoder.get_dense_pe()
    masks, iou_pred = tiny_sam.mask_decoder(image_embedding, image_pe, sparse, dense, True)
    decoder = SharedImageDecoder(tiny_sam.mask_decoder, image_embedding, image_pe, dense[:1], micro_batch)
    ordered = iou_pred.flatten().sort().values
    for rank in (len(ordered) - 12, len(ordered) - 4, len(ordered) - 1):
        threshold = float(ordered[rank - 1 : rank + 1].mean())
        assert threshold > 0.0  # SAM's generator switches the filter off at 0 and below
        prompt, mask, low_res, iou = decoder.decode(sparse, threshold)
        expected_prompt, expected_mask = (iou_pred > threshold).nonzero(as_tuple=True)
        assert torch.equal(prompt, expected_prompt) and torch.equal(mask, expected_mask)
        atol = LOGIT_EPS * float(masks.abs().max())
        torch.testing.assert_close(low_res, masks[prompt, mask], rtol=0, atol=atol)
        torch.testing.assert_close(iou, iou_pred[prompt, mask], rtol=0, atol=LOGIT_EPS)
    assert len(decoder.decode(sparse, float(ordered[-1]) + 1e-3)[2]) == 0  # none passes: no mask head at all
    prompt, mask, low_res, _ = decoder.decode(sparse, 0.0)  # 0 switches the filter off, as in SAM
    assert len(prompt) == 48 and torch.equal(mask, torch.arange(3).repeat(16))
    torch.testing.assert_close(low_res, masks.flatten(0, 1), rtol=0, atol=LOGIT_EPS * float(masks.abs().max()))
