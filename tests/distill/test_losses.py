"""Each loss term against a few-line reference, and hard mask weighting's values. Prompt terms are per prompt."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import (
    dice_loss,
    embedding_loss,
    gt_iou_loss,
    gt_mask_loss,
    hmw_weights,
    mask_iou,
    output_loss,
    token_loss,
    weighted_total,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_embedding_and_token_l1_match_reference():
    s, t = _rand(2, 256, 8, 8, seed=1), _rand(2, 256, 8, 8, seed=2)
    reference = sum(abs(a - b) for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True)) / s.numel()
    assert embedding_loss(s, t)["embedding"].item() == pytest.approx(reference, rel=1e-5)
    s, t = _rand(3, 7, 256, seed=3), _rand(3, 7, 256, seed=4)
    per_prompt = token_loss(s, t)["token"]
    assert per_prompt.shape == (3,)
    for i in range(3):
        assert per_prompt[i].item() == pytest.approx((s[i] - t[i]).abs().mean().item(), rel=1e-6)


def test_output_loss_weights_each_prompt():
    sm, tm = _rand(3, 4, 16, 16, seed=5), _rand(3, 4, 16, 16, seed=6)
    si, ti = _rand(3, 4, seed=7), _rand(3, 4, seed=8)
    weights = torch.tensor([0.2, 0.5, 0.9])
    terms = output_loss(sm, tm, si, ti, weights)
    for i in range(3):  # the reference: per-prompt mask L1 + IoU L1, weighted
        mask_l1 = sum(abs(a - b) for a, b in zip(sm[i].flatten().tolist(), tm[i].flatten().tolist(), strict=True))
        iou_l1 = sum(abs(a - b) for a, b in zip(si[i].tolist(), ti[i].tolist(), strict=True))
        reference = weights[i].item() * (mask_l1 / sm[i].numel() + iou_l1 / 4)
        assert terms["output"][i].item() == pytest.approx(reference, rel=1e-5)
    unweighted = output_loss(sm, tm, si, ti)["output"].mean().item()
    assert unweighted == pytest.approx(((sm - tm).abs().mean() + (si - ti).abs().mean()).item(), rel=1e-5)


def _square(size=16, y0=0, x0=0, side=8):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_mask_iou_and_hmw_values():
    gt = _square()[None]
    half = _square(side=8)
    half[:, 4:] = False  # 32 of the 64 GT pixels
    assert mask_iou(half[None], gt).item() == pytest.approx(0.5)
    assert mask_iou(torch.zeros_like(gt), torch.zeros_like(gt)).item() == 1.0
    # Equal quality -> 0.5; student worse -> above 0.5; student better -> below.
    assert hmw_weights(gt, gt, gt).item() == pytest.approx(0.5, abs=1e-5)
    assert hmw_weights(half[None], half[None], gt).item() == pytest.approx(0.5, abs=1e-5)
    worse = hmw_weights(gt, half[None], gt).item()
    assert worse == pytest.approx(1 / (1 + math.exp(-(1.0 / 0.5 - 1))), rel=1e-4)
    assert hmw_weights(half[None], gt, gt).item() == pytest.approx(1 / (1 + math.exp(0.5)), rel=1e-4)


def test_gt_terms_match_reference():
    logits, gt = _rand(2, 16, 16, seed=9), torch.stack([_square(), _square(x0=4)])
    p, g = logits.sigmoid(), gt.float()
    ce = -(g * p.log() + (1 - g) * (1 - p).log())
    p_t = p * g + (1 - p) * (1 - g)
    focal = ((0.25 * g + 0.75 * (1 - g)) * ce * (1 - p_t) ** 2).flatten(1).mean(1)
    dice = 1 - (2 * (p * g).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + g.flatten(1).sum(1) + 1)
    terms = gt_mask_loss(logits, gt)
    torch.testing.assert_close(terms["gt_focal"], focal, rtol=1e-5, atol=0)
    torch.testing.assert_close(dice_loss(logits, gt), dice, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["gt_mask"], 20 * focal + dice, rtol=1e-5, atol=0)
    predicted = torch.tensor([0.9, 0.1])
    actual = mask_iou(logits > 0, gt)
    torch.testing.assert_close(gt_iou_loss(predicted, logits > 0, gt)["gt_iou"], (predicted - actual) ** 2)


def test_weighted_total_uses_only_weighted_terms():
    terms = {"embedding": torch.tensor(2.0), "token": torch.tensor(3.0), "hmw_mean": torch.tensor(0.5)}
    assert weighted_total(terms, {"embedding": 1.0, "token": 0.5, "output": 0.1}).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="no weighted loss term"):
        weighted_total({"hmw_mean": torch.tensor(0.5)}, {"embedding": 1.0})
