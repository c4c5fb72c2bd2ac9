"""The loss terms of full-stage distillation (SPEC section 2), each a small function returning named terms.

`weighted_total` reduces a dict of terms with the config's weights; every term is logged on its own.
Shapes: embeddings Bx256x64x64 (SAM 2: three levels); decoder tokens PxTx256; mask logits Px4x256x256 (all four mask
tokens, low-res frame); IoU predictions Px4; per-prompt masks PxHxW.

The prompt terms (token, output, GT) are vectors of P, one value per prompt, so that one call serves
the prompts of many images: `DistillStep` averages them over each image's prompts, then over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def embedding_loss(
    student: torch.Tensor | Sequence[torch.Tensor],
    teacher: torch.Tensor | Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """L1 between student and teacher image embeddings, mean over all elements: of SAM's one Bx256x64x64 tensor,
    or the weighted mean (`weights`, default equal) of the per-level L1s of SAM 2's three levels, each of which
    is also returned, unweighted, as ``embedding_<name>`` for the log."""
    if isinstance(student, torch.Tensor):
        return {"embedding": F.l1_loss(student, teacher)}
    levels = [F.l1_loss(s, t) for s, t in zip(student, teacher, strict=True)]
    weights = [1.0] * len(levels) if weights is None else list(weights)
    total = sum(w * level for w, level in zip(weights, levels, strict=True)) / sum(weights)
    named = zip(names, levels, strict=True) if names and len(levels) > 1 else ()
    return {"embedding": total, **{f"embedding_{name}": level.detach() for name, level in named}}


def token_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt (P), the L1 between the two-way transformer's output tokens (PxTx256) for the same prompts."""
    return {"token": (student_tokens - teacher_tokens).abs().flatten(1).mean(1)}


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two stacks of binary masks PxHxW -> P (1.0 where both are empty)."""
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def hmw_weights(
    teacher_masks: torch.Tensor, student_masks: torch.Tensor, gt_masks: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Hard mask weighting: H_i = sigmoid(IoU(M_T, M_GT) / (IoU(M_S, M_GT) + eps) - 1), PxHxW bool -> P.

    0.5 when student and teacher are equally good, towards 1 where the student is worse. No gradient.
    """
    ratio = mask_iou(teacher_masks, gt_masks) / (mask_iou(student_masks, gt_masks) + eps)
    return torch.sigmoid(ratio - 1.0).detach()


def output_loss(
    student_masks: torch.Tensor,
    teacher_masks: torch.Tensor,
    student_iou: torch.Tensor,
    teacher_iou: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-prompt L1 on mask logits (Px4x256x256) plus L1 on IoU predictions (Px4), weighted by H (P).

    Returns per prompt (P) H_i * (mask_l1_i + iou_l1_i), and both parts unweighted for the log.
    """
    mask_l1 = (student_masks - teacher_masks).abs().flatten(1).mean(1)
    iou_l1 = (student_iou - teacher_iou).abs().mean(1)
    weights = torch.ones_like(mask_l1) if weights is None else weights
    return {
        "output": weights * (mask_l1 + iou_l1),
        "output_mask_l1": mask_l1.detach(),
        "output_iou_l1": iou_l1.detach(),
    }


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per mask (PxHxW logits vs 0/1 targets) -> P."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1).float()
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def gt_mask_loss(
    logits: torch.Tensor, gt_masks: torch.Tensor, focal_weight: float = 20.0, dice_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """SAM's mask loss on the student's chosen masks (PxHxW logits vs bool GT), per prompt: 20*focal + 1*dice."""
    focal = sigmoid_focal_loss(logits, gt_masks.float(), alpha=0.25, gamma=2.0, reduction="none").flatten(1).mean(1)
    dice = dice_loss(logits, gt_masks)
    return {"gt_mask": focal_weight * focal + dice_weight * dice, "gt_focal": focal.detach(), "gt_dice": dice.detach()}


def gt_iou_loss(predicted_iou: torch.Tensor, masks: torch.Tensor, gt_masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt, the squared error of the predicted IoU (P) of the chosen masks against their actual IoU with the
    GT (PxHxW)."""
    return {"gt_iou": (predicted_iou - mask_iou(masks, gt_masks).detach()).square()}


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weights[k] * terms[k] over the weighted terms present; unweighted terms are logged only."""
    present = [weights[name] * value for name, value in terms.items() if name in weights and weights[name] != 0]
    if not present:
        raise ValueError(f"no weighted loss term among {sorted(terms)}")
    return torch.stack(present).sum()
