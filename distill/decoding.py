"""The decoders of distillation: each model family's prompt encoder and mask decoder for the prompts of many images
in few calls, returning all four mask tokens' logits and IoU and the transformer's output tokens (`DecoderOutput`).

SAM (`decode`): at hard-prompt iteration t every prompt still being refined has t + 2 sparse tokens (a box's two
corners stand where a point prompt has its first point and SAM's padding point), so one call serves all images,
whatever their prompt kind. SAM 2 (`decode_sam2`): the predictor's token layout, one call per prompt kind.
`decode_in_chunks` splits either into calls of a few images' prompts, recomputing activations in backward.

Mask choice (`DecoderOutput.chosen`): where a prompt is a single point (ambiguous), a model's prediction is its
multimask output with the highest predicted IoU, otherwise its one-mask output (SAM: token 0; SAM 2: token 0 or,
where it is unstable, the best of 1-3); this is the predictors' rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from segment_anything.modeling import PromptEncoder, Sam
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.prompts import PAD_LABEL, PromptSet
from student_models.sam2_pipeline import Sam2DecoderOutput, Sam2Features, box_points
from student_models.sam2_pipeline import decode as sam2_decode

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


@dataclass
class DecoderOutput:
    """masks: Rx4x256x256 logits (all mask tokens); iou: Rx4; tokens: RxTx256 transformer output tokens (SAM: all
    of them; SAM 2: its four mask tokens); single: R token indices of the one-mask output (None: token 0, SAM's)."""

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor
    single: torch.Tensor | None = None

    def chosen(self, multimask: bool | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RxHxW logits, R predicted IoU) of each prompt's prediction (see the module docstring).

        multimask: one flag for all R prompts, or R bools.
        """
        best = self.iou[:, 1:].argmax(1) + 1
        single = torch.zeros_like(best) if self.single is None else self.single
        if isinstance(multimask, bool):
            index = best if multimask else single
        else:
            index = torch.where(multimask, best, single)
        rows = torch.arange(len(index), device=index.device)
        return self.masks[rows, index], self.iou[rows, index]


# A family's decoder: (model, the I images' embedding levels, prompt sets) -> DecoderOutput.
LevelDecoder = Callable[[nn.Module, Sequence[torch.Tensor], Sequence[PromptSet]], DecoderOutput]


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
    return concat(parts, dim=1)


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
    tokens = torch.cat([output_tokens, concat(sparse)], dim=1)
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
    decoder: LevelDecoder,
    model: nn.Module,
    levels: Sequence[torch.Tensor],
    prompts: PromptSet | Sequence[PromptSet],
    images_per_call: int | None,
    recompute: bool = False,
) -> DecoderOutput:
    """`decoder(model, levels, prompts)`, in calls of at most `images_per_call` images' prompts (None: one call),
    outputs concatenated. `levels`: the I images' embedding levels (SAM: one, SAM 2: three), image-major.

    With `recompute` each call is checkpointed: its activations are not kept for the backward pass but
    recomputed there, one call at a time, so a training step holds one call's decoder activations (about
    115 MB per prompt in float32 for SAM's decoder, measured on the CPU) instead of all B x P prompts'.
    The gradients are the same; the price is one more decoder forward.
    """
    sets = [prompts] if isinstance(prompts, PromptSet) else list(prompts)
    images = len(levels[0])
    chunk = images_per_call or images
    if chunk >= images and not recompute:
        return decoder(model, levels, sets)
    per = sum(p.num_prompts for p in sets) // images
    outputs = []
    for first in range(0, images, chunk):
        stop = min(first + chunk, images)
        call = (tuple(level[first:stop] for level in levels), _prompt_rows(sets, first * per, stop * per))
        outputs.append(checkpoint(decoder, model, *call, use_reentrant=False) if recompute else decoder(model, *call))
    return concat_outputs(outputs)


def concat_outputs(outputs: Sequence[DecoderOutput]) -> DecoderOutput:
    """One `DecoderOutput` of the rows of `outputs`, in order."""
    if len(outputs) == 1:
        return outputs[0]
    single = None if outputs[0].single is None else concat([o.single for o in outputs])
    return DecoderOutput(*(concat([getattr(o, f) for o in outputs]) for f in ("masks", "iou", "tokens")), single)


def _prompt_rows(sets: Sequence[PromptSet], start: int, stop: int) -> list[PromptSet]:
    """Rows start..stop-1 of the concatenation of `sets`, as views of the sets they fall in."""
    out, offset = [], 0
    for p in sets:
        lo, hi = max(start, offset), min(stop, offset + p.num_prompts)
        if lo < hi:
            out.append(p.rows(lo - offset, hi - offset))
        offset += p.num_prompts
    return out


def concat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)


def decode_sam2(
    model: SAM2Base, levels: Sequence[torch.Tensor], prompts: PromptSet | Sequence[PromptSet]
) -> DecoderOutput:
    """SAM 2's prompt encoder and mask decoder for R prompts on I images' three levels (`Sam2Features.levels`), as
    `decode` for SAM: Q consecutive prompts per image, each set's rows a range of images.

    The prompts go in as ``SAM2ImagePredictor`` passes them: a box as its two corners (labels 2 and 3) before
    the points, and the prompt encoder's padding point after every prompt. So a box prompt has one token more
    than a point prompt with as many points, and each set is decoded in a call of its own. The one-mask output
    is the predictor's (`sam2_pipeline.choose_masks`): token 0, or the best of tokens 1-3 where token 0's mask
    is unstable; for both models the eval-mode rule, so that the student is judged as it will be used.
    """
    sets = [prompts] if isinstance(prompts, PromptSet) else list(prompts)
    rows = sum(p.num_prompts for p in sets)
    images = len(levels[0])
    if rows % images or any(p.num_prompts % (rows // images) for p in sets):
        shapes = ", ".join(str(p.num_prompts) for p in sets)
        raise ValueError(f"decode_sam2 needs the same prompt count per image, whole images per set: {shapes} prompts")
    per, first, outputs = rows // images, 0, []
    features = Sam2Features.from_levels(levels)
    for p in sets:
        count = p.num_prompts // per
        index = torch.arange(first, first + count, device=levels[0].device).repeat_interleave(per)
        coords, labels = (p.points, p.labels) if p.boxes is None else box_points(p.boxes, p.points, p.labels)
        out = sam2_decode(model, features.rows(index), coords, labels)
        outputs.append(DecoderOutput(out.masks.float(), out.iou.float(), out.mask_tokens.float(), _single(model, out)))
        first += count
    return concat_outputs(outputs)


def _single(model: SAM2Base, output: Sam2DecoderOutput) -> torch.Tensor:
    """R token indices of SAM 2's one-mask output: 0, or where token 0's mask is unstable, the best of tokens 1-3."""
    decoder = model.sam_mask_decoder
    zeros = torch.zeros(len(output.iou), dtype=torch.int64, device=output.iou.device)
    if not decoder.dynamic_multimask_via_stability:
        return zeros
    stable = decoder._get_stability_scores(output.masks[:, 0]) >= decoder.dynamic_multimask_stability_thresh
    return torch.where(stable, zeros, output.iou[:, 1:].argmax(1) + 1)  # sam2's score, the rule of choose_masks
