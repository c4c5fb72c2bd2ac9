"""One distillation step as an `nn.Module`: student + frozen teacher heads -> named loss terms.

Putting the whole step (student encoder, hard prompt iterations, final decoder pass) in one
`forward` lets DistributedDataParallel see exactly one forward per backward. The teacher side
reads cached embeddings, so only its prompt encoder and mask decoder live here.

Mask choice: where a prompt is a single point (ambiguous), a model's prediction is its multimask
output with the highest predicted IoU, otherwise mask token 0; this is SamPredictor's rule and it
drives both the hard prompt sampling and HMW. The output loss compares all four mask tokens.
The previous mask is not fed back as a dense prompt during the iterations (our choice: the paper
does not say, and SAM's no-mask embedding keeps teacher and student on the same input).

Batching: the prompts of all images of a batch are sampled together (`distill.prompts`) and decoded
in few calls. At hard-prompt iteration t every prompt still being refined has t + 2 sparse tokens (a
box's two corners stand where a point prompt has its first point and SAM's padding point), so one
decoder call per model serves all images, whatever their prompt kind; the final pass makes one call
per model for each distinct number of corrective points in the batch. The batch's layout
(`distill.data.DistillBatch`) is known on the host beforehand, so the step never waits for the
device: no `.item()`, no copies to the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import PromptEncoder, Sam
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.config import DistillConfig
from distill.data import DistillBatch, DistillItem
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
    PAD_LABEL,
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


@dataclass
class DecoderOutput:
    """masks: Rx4x256x256 logits (all mask tokens); iou: Rx4; tokens: RxTx256 two-way transformer outputs."""

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor

    def chosen(self, multimask: bool | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RxHxW logits, R predicted IoU) of each prompt's prediction (see the module docstring).

        multimask: one flag for all R prompts, or R bools.
        """
        best = self.iou[:, 1:].argmax(1) + 1
        if isinstance(multimask, bool):
            index = best if multimask else torch.zeros_like(best)
        else:
            index = torch.where(multimask, best, 0)
        rows = torch.arange(len(index), device=index.device)
        return self.masks[rows, index], self.iou[rows, index]


def sparse_embeddings(encoder: PromptEncoder, prompts: PromptSet) -> torch.Tensor:
    """SAM's `PromptEncoder` sparse embeddings of R prompts (RxTx256), computed with `torch.where` where SAM indexes
    with boolean masks (each of which waits for the device to find the True entries)."""
    points, labels = prompts.points + 0.5, prompts.labels  # SAM's shift to the pixel centre
    if prompts.boxes is None:  # SAM's padding point (not shifted) where there is no box
        points = torch.cat([points, points.new_zeros((len(points), 1, 2))], dim=1)
        labels = torch.cat([labels, labels.new_full((len(labels), 1), float(PAD_LABEL))], dim=1)
    parts = []
    if labels.shape[1] > 0:
        embedded = encoder.pe_layer.forward_with_coords(points, encoder.input_image_size)
        label = labels[..., None]
        embedded = torch.where(label == PAD_LABEL, encoder.not_a_point_embed.weight, embedded)
        embedded = embedded + torch.where(label == 0, encoder.point_embeddings[0].weight, 0.0)
        parts.append(embedded + torch.where(label == 1, encoder.point_embeddings[1].weight, 0.0))
    if prompts.boxes is not None:
        corners = encoder.pe_layer.forward_with_coords(
            (prompts.boxes + 0.5).reshape(-1, 2, 2), encoder.input_image_size
        )
        parts.append(corners + torch.cat([encoder.point_embeddings[2].weight, encoder.point_embeddings[3].weight]))
    return _concat(parts, dim=1)


def decode(sam: Sam, embeddings: torch.Tensor, prompts: PromptSet | Sequence[PromptSet]) -> DecoderOutput:
    """SAM's prompt encoder and mask decoder for R prompts on I image embeddings (Ix256x64x64), in one call.

    `prompts`: one PromptSet, or several whose rows, concatenated, are the R = I x Q prompts: Q consecutive
    prompts per image, in the order of `embeddings`. The sets may be of different kinds (boxes, points) but
    must have the same number of tokens per prompt. This is `MaskDecoder.predict_masks` with an image embedding
    per prompt (SAM's repeats one embedding for all prompts), also returning the transformer's output tokens.
    """
    sets = [prompts] if isinstance(prompts, PromptSet) else list(prompts)
    rows = sum(p.num_prompts for p in sets)
    if rows % len(embeddings) or len({p.num_tokens for p in sets}) != 1:
        shapes = ", ".join(f"{p.num_prompts} prompts of {p.num_tokens} tokens" for p in sets)
        raise ValueError(f"decode needs the same prompt count per embedding and token count per prompt: {shapes}")
    encoder, decoder = sam.prompt_encoder, sam.mask_decoder
    sparse = [sparse_embeddings(encoder, p) for p in sets]
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # the prompt encoder's dense output without a mask
    src = (embeddings + dense).repeat_interleave(rows // len(embeddings), dim=0)
    image_pe = encoder.get_dense_pe().expand(rows, -1, -1, -1)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(rows, -1, -1)
    tokens = torch.cat([output_tokens, _concat(sparse)], dim=1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens]
    hyper_in = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0])
    return DecoderOutput(masks.float(), iou.float(), hs.float())


def decode_in_chunks(
    sam: Sam,
    embeddings: torch.Tensor,
    prompts: PromptSet | Sequence[PromptSet],
    images_per_call: int | None,
    recompute: bool = False,
) -> DecoderOutput:
    """`decode`, in calls of at most `images_per_call` images' prompts (None: one call), outputs concatenated.

    With `recompute` each call is checkpointed: its activations are not kept for the backward pass but
    recomputed there, one call at a time, so a training step holds one call's decoder activations (about
    115 MB per prompt in float32 for SAM's decoder, measured on the CPU) instead of all B x P prompts'.
    The gradients are the same; the price is one more decoder forward.
    """
    sets = [prompts] if isinstance(prompts, PromptSet) else list(prompts)
    images = len(embeddings)
    chunk = images_per_call or images
    if chunk >= images and not recompute:
        return decode(sam, embeddings, sets)
    per = sum(p.num_prompts for p in sets) // images
    outputs = []
    for first in range(0, images, chunk):
        stop = min(first + chunk, images)
        call = (embeddings[first:stop], _prompt_rows(sets, first * per, stop * per))
        outputs.append(checkpoint(decode, sam, *call, use_reentrant=False) if recompute else decode(sam, *call))
    return DecoderOutput(*(_concat([getattr(o, f) for o in outputs]) for f in ("masks", "iou", "tokens")))


def _prompt_rows(sets: Sequence[PromptSet], start: int, stop: int) -> list[PromptSet]:
    """Rows start..stop-1 of the concatenation of `sets`, as views of the sets they fall in."""
    out, offset = [], 0
    for p in sets:
        lo, hi = max(start, offset), min(stop, offset + p.num_prompts)
        if lo < hi:
            out.append(p.rows(lo - offset, hi - offset))
        offset += p.num_prompts
    return out


def check_embedding_shapes(student: torch.Tensor, teacher: torch.Tensor, student_name: str, teacher_name: str) -> None:
    if student.shape != teacher.shape:
        raise DistillError(
            f"embedding shape mismatch: student {student_name} gives {tuple(student.shape[1:])}, teacher "
            f"{teacher_name} gives {tuple(teacher.shape[1:])}; the student's neck must output the teacher's "
            f"embedding shape (256x64x64 for SAM)"
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


def _concat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def _take(parts: Sequence[_Part], tensor: torch.Tensor, per: int = 1) -> torch.Tensor:
    """The rows of `tensor` (per image, or `per` per image) that belong to the images of `parts`, in order."""
    return _concat([tensor[p.first * per : (p.first + len(p.iterations)) * per] for p in parts])


def _multimask(parts: Sequence[_Part], per: int, device: torch.device) -> bool | torch.Tensor:
    """Each prompt's multimask flag: one bool when the parts agree, else one per row."""
    flags = {p.prompts.multimask for p in parts}
    if len(flags) == 1:
        return flags.pop()
    return _concat([torch.full((p.prompts.num_prompts,), p.prompts.multimask, device=device) for p in parts])


class DistillStep(nn.Module):
    """forward(batch: a `DistillBatch` on the model's device) -> dict of loss terms (scalars), averaged over its
    B images."""

    def __init__(self, student: Sam, teacher_heads: Sam, config: DistillConfig, use_prompts: bool) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher_heads
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
        with phase("student_forward"):
            student_emb = self.student.image_encoder(batch.images)
        teacher_emb = batch.teacher_embeddings
        check_embedding_shapes(student_emb, teacher_emb, cfg.student, cfg.teacher)
        with phase("student_forward"):
            terms = embedding_loss(student_emb.float(), teacher_emb)
        if not self.use_prompts:
            return terms
        sums = self._prompt_terms(student_emb, teacher_emb, batch)
        for name in self.prompt_term_names():
            # Images without masks add zero, so the mean over B matches DDP's mean over ranks exactly,
            # and every rank reports the same names even when none of its images has a mask.
            terms[name] = sums[name] / len(batch) if name in sums else student_emb.new_zeros((), dtype=torch.float32)
        return terms

    def prompt_term_names(self) -> list[str]:
        """The names `_prompt_terms` returns for a batch with masks, under this config."""
        cfg = self.config
        names = ["prompt_iters"] + (["token"] if cfg.token_loss else [])
        if cfg.output_loss:
            names += ["output", "output_mask_l1", "output_iou_l1"] + (["hmw_mean"] if cfg.hmw else [])
        names += ["gt_mask", "gt_focal", "gt_dice"] if cfg.gt_mask_weight > 0 else []
        return names + (["gt_iou"] if cfg.gt_iou_weight > 0 else [])

    def _prompt_terms(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor, batch: DistillBatch) -> dict:
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
                self._add_points(parts, student_emb.detach(), teacher_emb, rows, iteration)
        return sums

    def _final_terms(self, student_emb, teacher_emb, parts: list[_Part], rows: dict, iteration: int) -> dict:
        """The decoders at the final prompts of `parts` (both models, one call each), and the token/output/GT terms
        against the teacher's: each the sum over these images of its mean over the image's prompts."""
        cfg = self.config
        phase = self.phases.phase
        per = cfg.prompts_per_image
        prompts = [p.prompts for p in parts]
        multimask = _multimask(parts, per, student_emb.device)
        chunk = cfg.decoder_images
        with torch.no_grad(), phase("teacher_decoder"):
            teacher_out = decode_in_chunks(self.teacher, _take(parts, teacher_emb), prompts, chunk)
        with phase("student_forward"):
            recompute = chunk is not None and torch.is_grad_enabled()
            student_out = decode_in_chunks(self.student, _take(parts, student_emb), prompts, chunk, recompute)
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
        multimask = _multimask(parts, per, student_emb.device)
        need_student = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "student"
        need_teacher = cfg.prompt_mode == "disagreement" or cfg.prompt_source == "teacher"
        student_mask = teacher_mask = None
        if need_student:
            with phase("student_forward"):
                student_out = decode_in_chunks(self.student, _take(parts, student_emb), prompts, cfg.decoder_images)
                student_mask = student_out.chosen(multimask)[0] > 0
        if need_teacher:
            with phase("teacher_decoder"):
                teacher_out = decode_in_chunks(self.teacher, _take(parts, teacher_emb), prompts, cfg.decoder_images)
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
    """1xCxHxW -> the embedding's mean over the image's cells (padding excluded), repeated at every cell."""
    stride = IMAGE_SIZE // embedding.shape[-1]
    height, width = (-(-s // stride) for s in input_size)
    mean = embedding[..., :height, :width].mean((2, 3), keepdim=True)
    return mean.expand_as(embedding).contiguous()


@torch.no_grad()
def fidelity(student: Sam, teacher_heads: Sam, items: Iterable[DistillItem], max_prompts: int) -> dict[str, float]:
    """Sums over validation prompts/images of the student's fidelity to the teacher, for the caller to average.

    `items` is consumed one at a time and nothing of an item is kept after it is scored, so a stream
    (`distill.data.stream_items`) keeps memory flat whatever the number of held-out images. The sums stay on
    the device until the end (one host sync).

    Returns {"iou": sum of mask IoU (token 0, logits > 0, image area only), "blind_iou": the same for an
    image-blind student, "logit_l1": sum of the mean |student - teacher| token-0 logit gap in the image area,
    "prompts": count, "embedding_l1": sum of per-image mean |student - teacher| embedding gap, "images":
    count}. Mask IoU is the headline; the L1 gaps also move when the masks are not confident (e.g.
    random-weight test teachers, whose logits sit near 0).

    The image-blind student gives every position the teacher embedding's mean over the image, so it knows
    the image's average but nothing of its layout; its mask IoU comes from the prompts and the decoder
    alone, and is the floor that a student's mask IoU should be read against.
    """
    device = next(student.parameters()).device
    names = ("iou", "blind_iou", "logit_l1", "embedding_l1")
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
    counts = {"prompts": 0, "images": 0}
    for item in items:
        student_emb = student.image_encoder(item.image[None].to(device)).float()
        teacher_emb = item.teacher_embedding[None].to(device)
        prompts = validation_prompts(item, max_prompts, device)
        s_logits = decode(student, student_emb, prompts).masks[:, 0]
        t_logits = decode(teacher_heads, teacher_emb, prompts).masks[:, 0]
        blind_logits = decode(teacher_heads, image_blind_embedding(teacher_emb, item.input_size), prompts).masks[:, 0]
        valid = valid_lowres_regions(torch.tensor([item.input_size]))[0].to(device)
        sums["iou"] += mask_iou((s_logits > 0) & valid, (t_logits > 0) & valid).sum()
        sums["blind_iou"] += mask_iou((blind_logits > 0) & valid, (t_logits > 0) & valid).sum()
        sums["logit_l1"] += ((s_logits - t_logits).abs() * valid).flatten(1).sum(1).sum() / valid.sum()
        sums["embedding_l1"] += (student_emb - teacher_emb).abs().mean()
        counts["prompts"] += prompts.num_prompts
        counts["images"] += 1
    values = torch.stack(list(sums.values())).tolist()
    return {**dict(zip(names, values, strict=True)), **{name: float(n) for name, n in counts.items()}}
