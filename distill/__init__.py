"""Full-stage knowledge distillation of a SAM student from a frozen SAM teacher (TinySAM, SPEC section 2).

from distill import DistillConfig, distill
result = distill(DistillConfig(teacher="vit_h", teacher_checkpoint="sam_vit_h_4b8939", data="path/to/sa1b"))
sam = student_models.build_sam("tinyvit_5m", checkpoint=result.checkpoint)
"""

from distill.cache import CacheError, EmbeddingCache, fill_cache, fingerprint_fields
from distill.config import DistillConfig
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
from distill.model import DistillError, DistillStep, agreement, decode
from distill.phases import PhaseTimer
from distill.prompts import PromptSet, error_points, initial_prompts, noisy_boxes, sample_in_masks
from distill.train import DistillResult, distill

__all__ = [
    "CacheError",
    "DistillConfig",
    "DistillError",
    "DistillResult",
    "DistillStep",
    "EmbeddingCache",
    "PhaseTimer",
    "PromptSet",
    "agreement",
    "decode",
    "dice_loss",
    "distill",
    "embedding_loss",
    "error_points",
    "fill_cache",
    "fingerprint_fields",
    "gt_iou_loss",
    "gt_mask_loss",
    "hmw_weights",
    "initial_prompts",
    "mask_iou",
    "noisy_boxes",
    "output_loss",
    "sample_in_masks",
    "token_loss",
    "weighted_total",
]
