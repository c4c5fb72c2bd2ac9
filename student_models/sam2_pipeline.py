"""SAM 2's image pipeline, batched over images and prompts: what ``SAM2ImagePredictor`` computes, for many at once.

``SAM2ImagePredictor`` embeds one image (``set_image``) and decodes the prompts of that image. Distillation,
evaluation and segment-everything need the same numbers for a batch of images whose prompts are decoded
together, and all four mask tokens rather than the predictor's choice among them. The steps are the
predictor's, on the same ``sam2`` modules:

- `Sam2Transforms`: ``sam2``'s own preprocessing (a plain resize to 1024x1024, ImageNet mean/std on [0, 1])
  and prompt transform to that frame, with the predictor's settings;
- `encode`: ``SAM2Base.forward_image`` (the mask decoder's ``conv_s0``/``conv_s1`` on the two high-resolution
  levels) and ``no_mem_embed`` added to the 64x64 level, as ``set_image`` does: `Sam2Features`;
- `decode`: the prompt encoder on a labelled point list (boxes as corner points labelled 2 and 3, as the
  predictor passes them) and ``MaskDecoder.predict_masks`` with one image's features per prompt;
- `choose_masks`: ``MaskDecoder.forward``'s choice (tokens 1-3 for multimask output, else token 0 or, when
  it is unstable, the best of 1-3);
- `TorchSam2Backend`: `encode` and `decode` as a `student_models.sam_runner.SamBackend` (device, dtype,
  ``torch.compile``), whose embedding is a `Sam2Features`: what `benchmarks latency` times;
- `Sam2Runner`: `SamRunner` with SAM 2's geometry (what `benchmarks coco` runs).

tests/student_models/test_sam2_pipeline.py checks the result against ``SAM2ImagePredictor`` for box, point
and segment-everything prompts. ``sam2`` is the optional extra ``sam2`` (see `student_models.sam2_models`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from student_models.preprocessing import to_rgb
from student_models.registry import IMAGE_SIZE
from student_models.sam2_models import require_sam2
from student_models.sam_runner import SamBackend, SamRunner, TorchSamBackend

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

MASK_LOGIT_LIMIT = 32.0  # SAM2ImagePredictor clamps the low-resolution logits it returns to +-32
# The CxHxW of the three levels of a 1024x1024 input, highest resolution first (SAM2ImagePredictor._bb_feat_sizes
# with the decoder's conv_s0 / conv_s1 widths).
LEVEL_SHAPES = ((32, 256, 256), (64, 128, 128), (256, 64, 64))


@dataclass
class Sam2Features:
    """The decoder's image inputs for B images: the 64x64 embedding and the two high-resolution maps.

    image_embed: Bx256x64x64 (``no_mem_embed`` added); high_res: (Bx32x256x256, Bx64x128x128), highest
    resolution first, as ``SAM2ImagePredictor._features["high_res_feats"]``.
    """

    image_embed: torch.Tensor
    high_res: tuple[torch.Tensor, torch.Tensor]

    @property
    def levels(self) -> tuple[torch.Tensor, ...]:
        """All three maps, highest resolution first."""
        return (*self.high_res, self.image_embed)

    @classmethod
    def from_levels(cls, levels: Sequence[torch.Tensor]) -> Sam2Features:
        s0, s1, embed = levels
        return cls(embed, (s0, s1))

    def __len__(self) -> int:
        return len(self.image_embed)

    def rows(self, index: torch.Tensor | slice) -> Sam2Features:
        """The features of the images `index` selects (a slice, or indices that may repeat)."""
        return Sam2Features.from_levels([level[index] for level in self.levels])

    def to(self, device: torch.device | str) -> Sam2Features:
        return Sam2Features.from_levels([level.to(device) for level in self.levels])

    @classmethod
    def random(cls, images: int = 1, generator: torch.Generator | None = None) -> Sam2Features:
        """Features of the shapes a 1024x1024 input gives, drawn from N(0, 1): a decoder's timing input."""
        return cls.from_levels([torch.randn(images, *shape, generator=generator) for shape in LEVEL_SHAPES])


class Sam2Transforms:
    """``sam2``'s ``SAM2Transforms`` as ``SAM2ImagePredictor`` sets it up for a model of input side `image_size`
    (``model.image_size``): images to the model's input, prompts to its frame, low-resolution logits back to
    the image."""

    def __init__(self, image_size: int, mask_threshold: float = 0.0) -> None:
        require_sam2("SAM 2's preprocessing")
        from sam2.utils.transforms import SAM2Transforms as Transforms

        self.image_size = image_size
        self.transforms = Transforms(resolution=image_size, mask_threshold=mask_threshold)

    def images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 images (any sizes; grey or RGBA as `to_rgb` takes them) -> Bx3xSxS float32, each resized to
        SxS and normalised."""
        return self.transforms.forward_batch([to_rgb(image) for image in images])

    def points(self, coords: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """...x2 pixel (x, y) coordinates of an image of `image_hw` -> the model's SxS frame."""
        return self.transforms.transform_coords(coords, normalize=True, orig_hw=image_hw)

    def masks(self, logits: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """...x256x256 logits -> ...xHxW logits at the image's size (``postprocess_masks``: bilinear resize)."""
        return self.transforms.postprocess_masks(logits, image_hw)


def encode(model: SAM2Base, images: torch.Tensor) -> Sam2Features:
    """Bx3xSxS preprocessed images -> their `Sam2Features`, as ``SAM2ImagePredictor.set_image_batch``."""
    levels = list(model.forward_image(images)["backbone_fpn"][-model.num_feature_levels :])
    if model.directly_add_no_mem_embed:
        # set_image adds no_mem_embed (1x1x256) to the flattened HWxBxC level; the same sum in BxCxHxW.
        levels[-1] = levels[-1] + model.no_mem_embed.view(1, -1, 1, 1)
    return Sam2Features.from_levels(levels)


@dataclass
class Sam2DecoderOutput:
    """masks: Rx4x256x256 logits (all mask tokens); iou: Rx4; mask_tokens: Rx4x256 (the transformer's output
    for the mask tokens); object_score: Rx1 logits (is an object there at all)."""

    masks: torch.Tensor
    iou: torch.Tensor
    mask_tokens: torch.Tensor
    object_score: torch.Tensor


def decode(model: SAM2Base, features: Sam2Features, coords: torch.Tensor, labels: torch.Tensor) -> Sam2DecoderOutput:
    """SAM 2's prompt encoder and mask decoder for R prompts, each on its own image's features.

    features: R rows (`Sam2Features.rows` repeats an image's features for its prompts); coords: RxNx2 in the
    model's frame; labels: RxN (1/0 foreground/background point, 2/3 box corners, -1 padding). A box goes
    first, as its two corners, then the prompt's points, as ``SAM2ImagePredictor._predict`` orders them.
    """
    if not len(features) == len(coords) == len(labels):
        raise ValueError(f"decode needs one image's features per prompt: {len(features)} for {len(coords)} prompts")
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou, mask_tokens, object_score = model.sam_mask_decoder.predict_masks(
        image_embeddings=features.image_embed,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=list(features.high_res),
    )
    return Sam2DecoderOutput(masks, iou, mask_tokens, object_score)


def box_points(
    boxes: torch.Tensor, coords: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords Rx(2+N)x2, labels Rx(2+N)) of R boxes (Rx4 x0 y0 x1 y1, the model's frame) followed by each row's
    N points, as ``SAM2ImagePredictor._predict`` concatenates them."""
    box_coords = boxes.reshape(-1, 2, 2)
    box_labels = torch.tensor([2, 3], dtype=torch.int, device=boxes.device).expand(len(boxes), 2)
    if coords is None:
        return box_coords, box_labels
    return torch.cat([box_coords, coords], dim=1), torch.cat([box_labels, labels.to(box_labels.dtype)], dim=1)


def choose_masks(model: SAM2Base, output: Sam2DecoderOutput, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RxCx256x256 logits, RxC IoU) that ``MaskDecoder.forward`` returns for `output`: tokens 1-3 (C = 3) with
    `multimask`, else C = 1: token 0, or with the decoder's dynamic multimask (SAM 2.1's default, in eval mode)
    the best of tokens 1-3 where token 0's mask is unstable."""
    decoder = model.sam_mask_decoder
    if multimask:
        return output.masks[:, 1:], output.iou[:, 1:]
    if decoder.dynamic_multimask_via_stability and not decoder.training:
        return decoder._dynamic_multimask_via_stability(output.masks, output.iou)  # sam2's rule, not a copy
    return output.masks[:, :1], output.iou[:, :1]


class _Encoder(nn.Module):
    """Bx3xSxS images -> the three levels of their `Sam2Features` (a module, so that it can be compiled)."""

    def __init__(self, model: SAM2Base) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return encode(self.model, images).levels


class _PointDecoder(nn.Module):
    """One image's three levels + R labelled point lists -> (Rx4x256x256 logits, Rx4 IoU), all four tokens."""

    def __init__(self, model: SAM2Base) -> None:
        super().__init__()
        self.model = model

    def forward(self, s0, s1, embed, coords, labels) -> tuple[torch.Tensor, torch.Tensor]:
        rows = coords.shape[0]  # every prompt on the one image (a view, as SAM2ImagePredictor repeats it); not
        # len(), which an ONNX export would fix to the probe's count
        features = Sam2Features.from_levels([level.expand(rows, *level.shape[1:]) for level in (s0, s1, embed)])
        output = decode(self.model, features, coords, labels)
        return output.masks, output.iou


class TorchSam2Backend(TorchSamBackend):
    """A PyTorch SAM 2 model as a `SamBackend` (`TorchSamBackend`'s device, dtype and compile rules).

    ``encode(Bx3xSxS preprocessed images) -> Sam2Features``; ``decode(features of 1 image, coords RxNx2,
    labels RxN) -> (Rx4x256x256 logits, Rx4 IoU)``, prompts as `decode` takes them.
    """

    @staticmethod
    def graphs(model: SAM2Base) -> tuple[nn.Module, nn.Module]:
        return _Encoder(model), _PointDecoder(model)

    def runner(self, chunk_size: int = 64) -> Sam2Runner:
        return Sam2Runner(self, chunk_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Sam2Features:
        with self._autocast():
            levels = self.encoder(images.to(self.device))
        return Sam2Features.from_levels([self._own(level) for level in levels])

    @torch.no_grad()
    def decode(
        self, embedding: Sam2Features, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(embedding) != 1:
            raise ValueError(f"decode takes one image's features, got {len(embedding)}")
        with self._autocast():
            levels = [level.to(self.device) for level in embedding.levels]
            logits, iou = self.decoder(*levels, coords.to(self.device), labels.to(self.device))
        return self._own(logits), self._own(iou)


class Sam2Runner(SamRunner):
    """`SamRunner` for a SAM 2 back-end (`TorchSam2Backend`, or an exported SAM 2 model's `quantize.OnnxSam`,
    whose graphs take 1024x1024 images): SAM 2's preprocessing, prompt frame and upscaling (`Sam2Transforms`);
    prompts, chunking and the choice of mask as `SamRunner`'s. Its point-only prompts get no padding point of
    their own: SAM 2's prompt encoder appends one to every prompt."""

    def __init__(self, backend: SamBackend, chunk_size: int = 64) -> None:
        super().__init__(backend, chunk_size)
        image_size = backend.sam.image_size if isinstance(backend, TorchSam2Backend) else IMAGE_SIZE
        self.sam2_transforms = Sam2Transforms(image_size)

    def set_image(self, image: np.ndarray) -> None:
        self.embedding = self.backend.encode(self.sam2_transforms.images([image]).to(self.device))
        self.original_size = tuple(image.shape[:2])
        self.input_size = (self.sam2_transforms.image_size,) * 2

    def to_frame(self, coords: np.ndarray) -> np.ndarray:
        return self.sam2_transforms.points(torch.from_numpy(coords), self.original_size).numpy()

    def pad_points(self, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return coords, labels

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sam2_transforms.masks(logits, self.original_size)
