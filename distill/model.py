"""One distillation step as an `nn.Module`: student + frozen teacher heads -> named loss terms.

Putting the whole step (student encoder, hard prompt iterations, final decoder pass) in one
`forward` lets DistributedDataParallel see exactly one forward per backward. The teacher side
reads cached embeddings, so only its prompt encoder and mask decoder live here.

Mask choice: where a prompt is a single point (ambiguous), a model's prediction is its multimask
output with the highest predicted IoU, otherwise mask token 0; this is SamPredictor's rule and it
drives both the hard prompt sampling and HMW. The output loss compares all four mask tokens.
The previous mask is not fed back as a dense prompt during the iterations (our choice: the paper
does not say, and SAM's no-mask embedding keeps teacher and student on the same input).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn

from distill.config import DistillConfig
from distill.data import DistillItem
from distill.losses import (
    embedding_loss,
    gt_iou_loss,
    gt_mask_loss,
    hmw_weights,
    mask_iou,
    output_loss,
    token_loss,
)
from distill.phases import PhaseTimer
from distill.prompts import (
    PromptSet,
    choose_masks,
    draw_iterations,
    error_points,
    initial_prompts,
    to_input_coords,
    valid_lowres_region,
)
from student_models import IMAGE_SIZE


class DistillError(RuntimeError):
    """A distillation run that cannot go on (bad models or data, non-finite loss, incompatible resume)."""


@dataclass
class DecoderOutput:
    """masks: Px4x256x256 logits (all mask tokens); iou: Px4; tokens: PxTx256 two-way transformer outputs."""

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor

    def chosen(self, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(PxHxW logits, P predicted IoU) of each prompt's prediction (see the module docstring)."""
        index = self.iou[:, 1:].argmax(1) + 1 if multimask else torch.zeros_like(self.iou[:, 0], dtype=torch.long)
        rows = torch.arange(len(index), device=index.device)
        return self.masks[rows, index], self.iou[rows, index]


def decode(sam: Sam, embedding: torch.Tensor, prompts: PromptSet) -> DecoderOutput:
    """Run SAM's prompt encoder and mask decoder on one 1x256x64x64 embedding for P prompts.

    The decoder tokens are read with a forward hook on `mask_decoder.transformer` (its first output).
    """
    device = embedding.device
    points = None
    if prompts.labels.shape[1] > 0:
        points = (torch.from_numpy(prompts.points).to(device), torch.from_numpy(prompts.labels).to(device))
    boxes = None if prompts.boxes is None else torch.from_numpy(prompts.boxes).to(device)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    captured: dict[str, torch.Tensor] = {}

    def keep_tokens(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        captured["hs"] = output[0]  # returning None leaves the transformer's output unchanged

    handle = sam.mask_decoder.transformer.register_forward_hook(keep_tokens)
    try:
        masks, iou = sam.mask_decoder.predict_masks(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
    finally:
        handle.remove()
    return DecoderOutput(masks.float(), iou.float(), captured["hs"].float())


def check_embedding_shapes(student: torch.Tensor, teacher: torch.Tensor, student_name: str, teacher_name: str) -> None:
    if student.shape != teacher.shape:
        raise DistillError(
            f"embedding shape mismatch: student {student_name} gives {tuple(student.shape[1:])}, teacher "
            f"{teacher_name} gives {tuple(teacher.shape[1:])}; the student's neck must output the teacher's "
            f"embedding shape (256x64x64 for SAM)"
        )


class DistillStep(nn.Module):
    """forward(images Bx3x1024x1024, items) -> dict of loss terms (scalars), averaged over the B images."""

    def __init__(self, student: Sam, teacher_heads: Sam, config: DistillConfig, use_prompts: bool) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher_heads
        self.config, self.use_prompts = config, use_prompts
        self.epoch = 0  # set by the training loop; seeds the prompts with (seed, epoch, image index)
        self.phases = PhaseTimer()  # disabled; `benchmarks distill` enables it to split a step's time by phase

    def train(self, mode: bool = True) -> DistillStep:
        """Train the student (BatchNorm frozen if configured); the teacher heads always stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.config.freeze_bn:
            for module in self.student.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor, items: Sequence[DistillItem]) -> dict[str, torch.Tensor]:
        cfg = self.config
        phase = self.phases.phase
        with phase("student_forward"):
            student_emb = self.student.image_encoder(images)
        with phase("data"):
            teacher_emb = torch.stack([item.teacher_embedding for item in items]).to(student_emb.device)
        check_embedding_shapes(student_emb, teacher_emb, cfg.student, cfg.teacher)
        with phase("student_forward"):
            terms = embedding_loss(student_emb.float(), teacher_emb)
        if not self.use_prompts:
            return terms
        per_image = [
            self._prompt_terms(student_emb[i : i + 1], teacher_emb[i : i + 1], item) for i, item in enumerate(items)
        ]
        for name in self.prompt_term_names():
            # Images without masks add zero, so the mean over B matches DDP's mean over ranks exactly,
            # and every rank reports the same names even when none of its images has a mask.
            values = [t[name] for t in per_image if name in t]
            terms[name] = torch.stack(values).sum() / len(items) if values else student_emb.new_zeros(()).float()
        return terms

    def prompt_term_names(self) -> list[str]:
        """The names `_prompt_terms` returns for an image with masks, under this config."""
        cfg = self.config
        names = ["prompt_iters"] + (["token"] if cfg.token_loss else [])
        if cfg.output_loss:
            names += ["output", "output_mask_l1", "output_iou_l1"] + (["hmw_mean"] if cfg.hmw else [])
        names += ["gt_mask", "gt_focal", "gt_dice"] if cfg.gt_mask_weight > 0 else []
        return names + (["gt_iou"] if cfg.gt_iou_weight > 0 else [])

    def _prompt_terms(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, item: DistillItem) -> dict:
        """Hard prompt iterations on one image, then the token/output/GT terms at the final prompts."""
        cfg = self.config
        phase = self.phases.phase
        if item.gt_masks is None or len(item.gt_masks) == 0:
            return {}
        with phase("prompt_sampling"):
            rng = np.random.default_rng([cfg.seed, self.epoch, item.index])
            picked = choose_masks(len(item.gt_masks), cfg.prompts_per_image, rng)
            gt_np, boxes = item.gt_masks[picked], item.gt_boxes[picked]
            prompts = initial_prompts(gt_np, boxes, rng, cfg.box_prob, cfg.box_noise_frac, cfg.box_noise_max)
            iterations = draw_iterations(rng, cfg.max_prompt_iters) if cfg.hard_prompts else 0
            valid = valid_lowres_region(item.input_size)
        with torch.no_grad():
            for _ in range(iterations):
                prompts = self._next_prompts(prompts, gt_np, student_emb.detach(), teacher_emb, valid, rng)
            with phase("teacher_decoder"):
                teacher_out = decode(self.teacher, teacher_emb, prompts)
        with phase("student_forward"):
            return self._final_terms(student_emb, teacher_out, prompts, gt_np, iterations)

    def _final_terms(self, student_emb, teacher_out: DecoderOutput, prompts: PromptSet, gt_np, iterations) -> dict:
        """The student's decoder at the final prompts, and the token/output/GT terms against the teacher's."""
        cfg = self.config
        student_out = decode(self.student, student_emb, prompts)
        gt = torch.from_numpy(gt_np).to(student_emb.device)
        terms = {"prompt_iters": torch.tensor(float(iterations), device=gt.device)}
        if cfg.token_loss:
            terms.update(token_loss(student_out.tokens, teacher_out.tokens))
        s_logits, s_iou = student_out.chosen(prompts.multimask)
        if cfg.output_loss:
            weights = None
            if cfg.hmw:
                t_logits, _ = teacher_out.chosen(prompts.multimask)
                weights = hmw_weights(t_logits > 0, s_logits > 0, gt, cfg.hmw_eps)
                terms["hmw_mean"] = weights.mean()
            terms.update(output_loss(student_out.masks, teacher_out.masks, student_out.iou, teacher_out.iou, weights))
        if cfg.gt_mask_weight > 0:
            terms.update(gt_mask_loss(s_logits, gt, cfg.focal_weight, cfg.dice_weight))
        if cfg.gt_iou_weight > 0:
            terms.update(gt_iou_loss(s_iou, s_logits > 0, gt))
        return terms

    def _next_prompts(self, prompts, gt_np, student_emb, teacher_emb, valid, rng) -> PromptSet:
        """Add one corrective point per prompt from the current error region (mode gt or disagreement)."""
        cfg = self.config
        phase = self.phases.phase
        need_student = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "student"
        need_teacher = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "teacher"
        student_mask = teacher_mask = None
        if need_student:
            with phase("student_forward"):
                student_mask = decode(self.student, student_emb, prompts).chosen(prompts.multimask)[0] > 0
        if need_teacher:
            with phase("teacher_decoder"):
                teacher_mask = decode(self.teacher, teacher_emb, prompts).chosen(prompts.multimask)[0] > 0
        with phase("prompt_sampling"):
            if cfg.prompt_mode == "disagreement":
                prediction, target = student_mask.cpu().numpy(), teacher_mask.cpu().numpy()
            else:
                prediction = (student_mask if cfg.prompt_source == "student" else teacher_mask).cpu().numpy()
                target = gt_np
            coords, labels = error_points(prediction, target, rng, valid, cfg.negative_points)
            return prompts.add_points(coords, labels)


def validation_prompts(item: DistillItem, max_prompts: int) -> PromptSet:
    """Fixed prompts for agreement: the exact GT boxes (first `max_prompts`), else a 3x3 point grid."""
    if item.gt_boxes is not None and len(item.gt_boxes) > 0:
        boxes = item.gt_boxes[:max_prompts]
        return PromptSet(np.zeros((len(boxes), 0, 2), np.float32), np.zeros((len(boxes), 0), np.float32), boxes)
    height, width = (-(-s // 4) for s in item.input_size)
    ys, xs = np.meshgrid(np.linspace(0, height - 1, 5)[1:-1], np.linspace(0, width - 1, 5)[1:-1], indexing="ij")
    yx = np.stack([ys.ravel(), xs.ravel()], 1).round().astype(np.int64)
    return PromptSet(to_input_coords(yx)[:, None], np.ones((len(yx), 1), np.float32), None)


def image_blind_embedding(embedding: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """1xCxHxW -> the embedding's mean over the image's cells (padding excluded), repeated at every cell."""
    stride = IMAGE_SIZE // embedding.shape[-1]
    height, width = (-(-s // stride) for s in input_size)
    mean = embedding[..., :height, :width].mean((2, 3), keepdim=True)
    return mean.expand_as(embedding).contiguous()


@torch.no_grad()
def agreement(student: Sam, teacher_heads: Sam, items: Iterable[DistillItem], max_prompts: int) -> dict[str, float]:
    """Sums over validation prompts/images of student-teacher agreement, for the caller to reduce and average.

    `items` is consumed one at a time and nothing of an item is kept after it is scored, so a stream
    (`distill.data.stream_items`) keeps memory flat whatever the number of held-out images.

    Returns {"iou": sum of mask IoU (token 0, logits > 0, image area only), "blind_iou": the same for an
    image-blind student, "logit_l1": sum of the mean |student - teacher| token-0 logit gap in the image area,
    "prompts": count, "embedding_l1": sum of per-image mean |student - teacher| embedding gap, "images":
    count}. Mask IoU is the headline; the L1 gaps also move when the masks are not confident (e.g.
    random-weight test teachers, whose logits sit near 0).

    The image-blind student gives every position the teacher embedding's mean over the image, so it knows
    the image's average but nothing of its layout; its agreement comes from the prompts and the decoder
    alone, and is the floor that a student's agreement should be read against.
    """
    device = next(student.parameters()).device
    sums = dict.fromkeys(("iou", "blind_iou", "logit_l1", "prompts", "embedding_l1", "images"), 0.0)
    for item in items:
        student_emb = student.image_encoder(item.image[None].to(device)).float()
        teacher_emb = item.teacher_embedding[None].to(device)
        prompts = validation_prompts(item, max_prompts)
        s_logits = decode(student, student_emb, prompts).masks[:, 0]
        t_logits = decode(teacher_heads, teacher_emb, prompts).masks[:, 0]
        blind_logits = decode(teacher_heads, image_blind_embedding(teacher_emb, item.input_size), prompts).masks[:, 0]
        valid = torch.from_numpy(valid_lowres_region(item.input_size)).to(device)
        sums["iou"] += float(mask_iou((s_logits > 0) & valid, (t_logits > 0) & valid).sum())
        sums["blind_iou"] += float(mask_iou((blind_logits > 0) & valid, (t_logits > 0) & valid).sum())
        sums["logit_l1"] += float(((s_logits - t_logits).abs() * valid).flatten(1).sum(1).sum() / valid.sum())
        sums["prompts"] += prompts.num_prompts
        sums["embedding_l1"] += float((student_emb - teacher_emb).abs().mean())
        sums["images"] += 1
    return sums
