"""One distillation step as an `nn.Module`: student + frozen teacher heads -> named loss terms.

Putting the whole step (student encoder, hard prompt iterations, final decoder pass) in one
`forward` lets DistributedDataParallel see exactly one forward per backward. The teacher side
reads cached embeddings, so only its prompt encoder and mask decoder live here.

The model family (SAM or SAM 2, `distill.families`) decides the embedding levels (SAM's one, SAM 2's three
decoder inputs), each matched by the embedding loss, and the decoder (`distill.decoding`).

Mask choice (`DecoderOutput.chosen`): the predictor's rule; it drives both the hard prompt sampling and HMW.
The output loss compares all four mask tokens. The previous mask is not fed back as a dense prompt during
the iterations (our choice: the paper does not say, and the no-mask embedding keeps teacher and student on
the same input).

Batching: the prompts of all images of a batch are sampled together (`distill.prompts`) and decoded
in few calls: per iteration one decoder call per model (SAM 2: per prompt kind), and in the final pass
one per distinct number of corrective points in the batch. The batch's layout
(`distill.data.DistillBatch`) is known on the host beforehand, so the step never waits for the
device: no `.item()`, no copies to the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.config import DistillConfig
from distill.data import DistillBatch, DistillItem
from distill.decoding import concat, decode_in_chunks
from distill.families import DistillFamily, distill_family_of
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
    error_points,
    initial_prompts,
    prompt_keys,
    to_input_coords,
    valid_lowres_regions,
)
from student_models.registry import IMAGE_SIZE


class DistillError(RuntimeError):
    """A distillation run that cannot go on (bad models or data, non-finite loss, incompatible resume)."""


# The embedding levels of B images (BxCxHxW each): SAM's one, SAM 2's three (`distill.families.EmbeddingLevels`).
Levels = tuple[torch.Tensor, ...]


def check_embedding_shapes(
    student: Levels, teacher: Levels, family: DistillFamily, student_name: str, teacher_name: str
) -> None:
    def shapes(levels: Sequence) -> str:
        return ", ".join("x".join(map(str, level)) for level in levels)

    got, expected = [level.shape[1:] for level in student], [level.shape[1:] for level in teacher]
    if got != expected:
        raise DistillError(
            f"embedding shape mismatch: student {student_name} gives {shapes(got)}, teacher {teacher_name} gives "
            f"{shapes(expected)}; the student's neck must output the teacher's embedding levels "
            f"({family.family.name}: {shapes(family.levels.shapes)})"
        )


@dataclass
class _Part:
    """Batch images first..first+len(iterations)-1 (P prompts each, iterations descending) and their prompts."""

    first: int
    iterations: list[int]
    prompts: PromptSet

    def split(self, iteration: int, per: int) -> tuple[_Part | None, _Part | None]:
        """(the images refined further after `iteration`, those whose prompts are final at it)."""
        going = sum(k > iteration for k in self.iterations)
        rows = going * per
        refined = _Part(self.first, self.iterations[:going], self.prompts.rows(0, rows)) if going else None
        done = self.iterations[going:]
        final = _Part(self.first + going, done, self.prompts.rows(rows, self.prompts.num_prompts)) if done else None
        return refined, final


def _take_levels(parts: Sequence[_Part], levels: Levels) -> Levels:
    """`_take` of each level."""
    return tuple(_take(parts, level) for level in levels)


def _take(parts: Sequence[_Part], tensor: torch.Tensor, per: int = 1) -> torch.Tensor:
    """The rows of `tensor` (per image, or `per` per image) that belong to the images of `parts`, in order."""
    return concat([tensor[p.first * per : (p.first + len(p.iterations)) * per] for p in parts])


def _multimask(parts: Sequence[_Part], per: int, device: torch.device) -> bool | torch.Tensor:
    """Each prompt's multimask flag: one bool when the parts agree, else one per row."""
    flags = {p.prompts.multimask for p in parts}
    if len(flags) == 1:
        return flags.pop()
    return concat([torch.full((p.prompts.num_prompts,), p.prompts.multimask, device=device) for p in parts])


class DistillStep(nn.Module):
    """forward(batch: a `DistillBatch` on the model's device) -> dict of loss terms (scalars), averaged over its
    B images."""

    def __init__(self, student: nn.Module, teacher_heads: nn.Module, config: DistillConfig, use_prompts: bool) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher_heads
        self.family = distill_family_of(student)
        self.config, self.use_prompts = config, use_prompts
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

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        phase = self.phases.phase
        family = self.family
        with phase("student_forward"):
            student_emb = family.encode(self.student, batch.images)
        teacher_emb = family.levels.unpack(batch.teacher_embeddings)
        check_embedding_shapes(student_emb, teacher_emb, family, cfg.student, cfg.teacher)
        with phase("student_forward"):
            student_float = [level.float() for level in student_emb]
            terms = embedding_loss(student_float, teacher_emb, cfg.level_weights, family.levels.names)
        if not self.use_prompts:
            return terms
        sums = self._prompt_terms(student_emb, teacher_emb, batch)
        zero = batch.images.new_zeros((), dtype=torch.float32)
        for name in self.prompt_term_names():
            # Images without masks add zero, so the mean over B matches DDP's mean over ranks exactly,
            # and every rank reports the same names even when none of its images has a mask.
            terms[name] = sums[name] / len(batch) if name in sums else zero
        return terms

    def prompt_term_names(self) -> list[str]:
        """The names `_prompt_terms` returns for a batch with masks, under this config."""
        cfg = self.config
        names = ["prompt_iters"] + (["token"] if cfg.token_loss else [])
        if cfg.output_loss:
            names += ["output", "output_mask_l1", "output_iou_l1"] + (["hmw_mean"] if cfg.hmw else [])
        names += ["gt_mask", "gt_focal", "gt_dice"] if cfg.gt_mask_weight > 0 else []
        return names + (["gt_iou"] if cfg.gt_iou_weight > 0 else [])

    def _prompt_terms(self, student_emb: Levels, teacher_emb: Levels, batch: DistillBatch) -> dict:
        """Hard prompt iterations on the batch's M prompted images, then the token/output/GT terms at the final
        prompts: each term summed over the images of its mean over the image's P prompts."""
        cfg = self.config
        phase = self.phases.phase
        count, per = batch.num_prompted, cfg.prompts_per_image
        if count == 0:
            return {}
        with phase("prompt_sampling"):
            keys = prompt_keys(batch.keys, per)
            gt, boxes = batch.gt_masks.flatten(0, 1), batch.gt_boxes.flatten(0, 1)
            valid = valid_lowres_regions(batch.input_sizes[:count]).repeat_interleave(per, dim=0)
            boxed = sum(batch.use_box)  # box-prompted images come first (DistillBatch's layout)
            parts = []
            for first, stop, as_box in ((0, boxed, True), (boxed, count, False)):
                if stop > first:
                    rows = slice(first * per, stop * per)
                    prompts = initial_prompts(
                        gt[rows], boxes[rows], keys[rows], as_box, cfg.box_noise_frac, cfg.box_noise_max
                    )
                    parts.append(_Part(first, batch.iterations[first:stop], prompts))
        rows = {"gt": gt, "valid": valid, "keys": keys}
        sums: dict[str, torch.Tensor] = {}
        for iteration in range(max(batch.iterations) + 1):
            splits = [part.split(iteration, per) for part in parts]
            final = [done for _, done in splits if done is not None]
            if final:
                for name, value in self._final_terms(student_emb, teacher_emb, final, rows, iteration).items():
                    sums[name] = sums[name] + value if name in sums else value
            parts = [going for going, _ in splits if going is not None]
            if not parts:
                break
            with torch.no_grad():
                self._add_points(parts, tuple(level.detach() for level in student_emb), teacher_emb, rows, iteration)
        return sums

    def _final_terms(self, student_emb, teacher_emb, parts: list[_Part], rows: dict, iteration: int) -> dict:
        """The decoders at the final prompts of `parts` (both models, one call each), and the token/output/GT terms
        against the teacher's: each the sum over these images of its mean over the image's prompts."""
        cfg = self.config
        phase = self.phases.phase
        per = cfg.prompts_per_image
        prompts = [p.prompts for p in parts]
        multimask = _multimask(parts, per, student_emb[0].device)
        chunk, decoder = cfg.decoder_images, self.family.decode
        with torch.no_grad(), phase("teacher_decoder"):
            teacher_out = decode_in_chunks(decoder, self.teacher, _take_levels(parts, teacher_emb), prompts, chunk)
        with phase("student_forward"):
            recompute = chunk is not None and torch.is_grad_enabled()
            levels = _take_levels(parts, student_emb)
            student_out = decode_in_chunks(decoder, self.student, levels, prompts, chunk, recompute)
            gt = _take(parts, rows["gt"], per)
            terms = {"prompt_iters": gt.new_full((len(gt),), float(iteration), dtype=torch.float32)}
            if cfg.token_loss:
                terms.update(token_loss(student_out.tokens, teacher_out.tokens))
            s_logits, s_iou = student_out.chosen(multimask)
            if cfg.output_loss:
                weights = None
                if cfg.hmw:
                    t_logits, _ = teacher_out.chosen(multimask)
                    weights = hmw_weights(t_logits > 0, s_logits > 0, gt, cfg.hmw_eps)
                    terms["hmw_mean"] = weights
                terms.update(
                    output_loss(student_out.masks, teacher_out.masks, student_out.iou, teacher_out.iou, weights)
                )
            if cfg.gt_mask_weight > 0:
                terms.update(gt_mask_loss(s_logits, gt, cfg.focal_weight, cfg.dice_weight))
            if cfg.gt_iou_weight > 0:
                terms.update(gt_iou_loss(s_iou, s_logits > 0, gt))
            return {name: value.view(-1, per).mean(1).sum() for name, value in terms.items()}

    def _add_points(self, parts: list[_Part], student_emb, teacher_emb, rows: dict, iteration: int) -> None:
        """Add one corrective point to every prompt of `parts` from its current error region (mode gt or
        disagreement): one decoder call per model whose masks are needed."""
        cfg = self.config
        phase = self.phases.phase
        per = cfg.prompts_per_image
        prompts = [p.prompts for p in parts]
        multimask = _multimask(parts, per, student_emb[0].device)
        decoder, chunk = self.family.decode, cfg.decoder_images
        need_student = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "student"
        need_teacher = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "teacher"
        student_mask = teacher_mask = None
        if need_student:
            with phase("student_forward"):
                student_out = decode_in_chunks(decoder, self.student, _take_levels(parts, student_emb), prompts, chunk)
                student_mask = student_out.chosen(multimask)[0] > 0
        if need_teacher:
            with phase("teacher_decoder"):
                teacher_out = decode_in_chunks(decoder, self.teacher, _take_levels(parts, teacher_emb), prompts, chunk)
                teacher_mask = teacher_out.chosen(multimask)[0] > 0
        with phase("prompt_sampling"):
            if cfg.prompt_mode == "disagreement":
                prediction, target = student_mask, teacher_mask
            else:
                prediction = student_mask if cfg.prompt_source == "student" else teacher_mask
                target = _take(parts, rows["gt"], per)
            keys, valid = _take(parts, rows["keys"], per), _take(parts, rows["valid"], per)
            coords, labels = error_points(prediction, target, keys, iteration, valid, cfg.negative_points)
            start = 0
            for part in parts:
                stop = start + part.prompts.num_prompts
                part.prompts = part.prompts.add_points(coords[start:stop], labels[start:stop])
                start = stop


def validation_prompts(item: DistillItem, max_prompts: int, device: torch.device | str = "cpu") -> PromptSet:
    """Fixed prompts for validation: the exact GT boxes (first `max_prompts`), else a 3x3 point grid."""
    if item.gt_boxes is not None and len(item.gt_boxes) > 0:
        boxes = torch.as_tensor(item.gt_boxes[:max_prompts], dtype=torch.float32, device=device)
        empty = boxes.new_zeros((len(boxes), 0, 2))
        return PromptSet(empty, empty[..., 0], boxes)
    height, width = (-(-s // 4) for s in item.input_size)
    ys, xs = np.meshgrid(np.linspace(0, height - 1, 5)[1:-1], np.linspace(0, width - 1, 5)[1:-1], indexing="ij")
    yx = torch.from_numpy(np.stack([ys.ravel(), xs.ravel()], 1).round().astype(np.int64)).to(device)
    return PromptSet(to_input_coords(yx)[:, None], yx.new_ones((len(yx), 1), dtype=torch.float32), None)


def image_blind_embedding(embedding: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """1xCxHxW (any level) -> the embedding's mean over the image's cells (padding excluded), repeated at every
    cell."""
    stride = IMAGE_SIZE // embedding.shape[-1]
    height, width = (-(-s // stride) for s in input_size)
    mean = embedding[..., :height, :width].mean((2, 3), keepdim=True)
    return mean.expand_as(embedding).contiguous()


@torch.no_grad()
def fidelity(
    student: nn.Module, teacher_heads: nn.Module, items: Iterable[DistillItem], max_prompts: int
) -> dict[str, float]:
    """Sums over validation prompts/images of the student's fidelity to the teacher, for the caller to average.

    `items` is consumed one at a time and nothing of an item is kept after it is scored, so a stream
    (`distill.data.stream_items`) keeps memory flat whatever the number of held-out images. The sums stay on
    the device until the end (one host sync).

    Returns {"iou": sum of mask IoU (token 0, logits > 0, image area only), "blind_iou": the same for an
    image-blind student, "logit_l1": sum of the mean |student - teacher| token-0 logit gap in the image
    area, "prompts": count, "embedding_l1": sum of per-image mean |student - teacher| embedding gap (SAM 2:
    the mean of its levels'), "images": count}. Mask IoU is the headline; the L1 gaps also move when the masks
    are not confident (e.g. random-weight test teachers, whose logits sit near 0). Token 0 of both models, not
    each one's choice of mask: SAM 2's predictor picks another token where token 0's mask is unstable, which for
    random-weight test teachers is everywhere, and two models' choices can differ where their masks agree.

    The image-blind student gives every position the teacher embedding's mean over the image (each level's), so it
    knows
    the image's average but nothing of its layout; its mask IoU comes from the prompts and the decoder
    alone, and is the floor that a student's mask IoU should be read against.
    """
    family = distill_family_of(student)
    device = next(student.parameters()).device
    names = ("iou", "blind_iou", "logit_l1", "embedding_l1")
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
    counts = {"prompts": 0, "images": 0}
    for item in items:
        student_emb = tuple(level.float() for level in family.encode(student, item.image[None].to(device)))
        teacher_emb = family.levels.unpack(item.teacher_embedding[None].to(device))
        blind_emb = tuple(image_blind_embedding(level, item.input_size) for level in teacher_emb)
        prompts = [validation_prompts(item, max_prompts, device)]
        s_out, t_out = family.decode(student, student_emb, prompts), family.decode(teacher_heads, teacher_emb, prompts)
        s_logits, t_logits = s_out.masks[:, 0], t_out.masks[:, 0]
        blind_logits = family.decode(teacher_heads, blind_emb, prompts).masks[:, 0]
        valid = valid_lowres_regions(torch.tensor([item.input_size]))[0].to(device)
        sums["iou"] += mask_iou((s_logits > 0) & valid, (t_logits > 0) & valid).sum()
        sums["blind_iou"] += mask_iou((blind_logits > 0) & valid, (t_logits > 0) & valid).sum()
        sums["logit_l1"] += ((s_logits - t_logits).abs() * valid).flatten(1).sum(1).sum() / valid.sum()
        gaps = [(s - t).abs().mean() for s, t in zip(student_emb, teacher_emb, strict=True)]
        sums["embedding_l1"] += sum(gaps) / len(gaps)
        counts["prompts"] += prompts[0].num_prompts
        counts["images"] += 1
    values = torch.stack(list(sums.values())).tolist()
    return {**dict(zip(names, values, strict=True)), **{name: float(n) for name, n in counts.items()}}
