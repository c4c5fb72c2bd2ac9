"""What distillation does differently per model family: SAM's one image embedding, SAM 2's three levels.

A SAM teacher gives one 256x64x64 embedding per image. A SAM 2 teacher gives what ``SAM2ImagePredictor``
keeps after ``set_image`` (`student_models.sam2_pipeline.encode`): the two high-resolution maps after the mask
decoder's ``conv_s0`` / ``conv_s1`` (32x256x256, 64x128x128) and the 64x64 embedding with ``no_mem_embed``,
the three inputs of its decoder. Distillation matches all three, so the student learns the decoder-ready
features, not the FPN levels before the teacher's projections.

Per family, `DistillFamily` says:

- how an image enters the model (`prepare`: SAM resizes the longest side to 1024 and pads, SAM 2 resizes to
  1024x1024, so its masks and boxes are scaled anisotropically) and a name for that preprocessing, part of
  the teacher cache's fingerprint;
- the embedding levels (`EmbeddingLevels`) and how one image's are stored in the cache: SAM's as the
  256x64x64 array, SAM 2's packed into one flat fp16 vector of 4,194,304 values (8.4 MB an image, twice
  SAM's 2.1 MB);
- how a model computes them (`encode`) and decodes prompts on them (`decode`: `distill.decoding`);
- which teacher weights the cache keeps for training (`head_prefixes`: prompt encoder, mask decoder and, for
  SAM 2, ``no_mem_embed``) and the model they are loaded into without an image encoder (`assemble_heads`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from distill.decoding import DecoderOutput, decode, decode_sam2
from distill.prompts import PromptSet
from student_models.families import FAMILIES, Family, family_named, family_of
from student_models.preprocessing import PIXEL_MEAN, PIXEL_STD
from student_models.registry import IMAGE_SIZE, assemble_sam
from student_models.sam2_models import assemble_sam2
from student_models.sam2_pipeline import LEVEL_SHAPES
from student_models.sam2_pipeline import encode as sam2_encode

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class EmbeddingLevels:
    """The teacher's embedding levels of one image (CxHxW each, in the decoder's input order) and their storage."""

    names: tuple[str, ...]
    shapes: tuple[Shape, ...]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The cache array of one image: the level itself when there is one, else all levels flattened end to end."""
        if len(self.shapes) == 1:
            return self.shapes[0]
        return (sum(math.prod(shape) for shape in self.shapes),)

    def pack(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """One image's levels (CxHxW each) -> its cache array (`stored_shape`)."""
        got = tuple(tuple(level.shape) for level in levels)
        if got != self.shapes:
            raise ValueError(f"embedding levels of shapes {got}, expected {self.shapes} ({', '.join(self.names)})")
        return levels[0] if len(levels) == 1 else torch.cat([level.reshape(-1) for level in levels])

    def unpack(self, stored: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """B cache arrays (Bx`stored_shape`) -> the B images' levels (BxCxHxW each, views of `stored`)."""
        if len(self.shapes) == 1:
            return (stored,)
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = stored.split(sizes, dim=1)
        return tuple(part.view(len(stored), *shape) for part, shape in zip(parts, self.shapes, strict=True))


# An image in the model's input frame (3x1024x1024), the (h, w) it covers there, and the map of its pixel (x, y)
# coordinates (...x2) to that frame.
Prepared = tuple[torch.Tensor, tuple[int, int], Callable[[np.ndarray], np.ndarray]]


class DistillFamily(ABC):
    """One family's geometry, embedding levels, encoder and decoder for distillation (see the module docstring)."""

    family: Family
    levels: EmbeddingLevels
    preprocessing: str
    head_prefixes: tuple[str, ...]

    def prepare(self, image: np.ndarray) -> Prepared:
        tensor, to_frame = self.family.prepare(image)
        return tensor[0], self.input_size(tuple(image.shape[:2])), to_frame

    @abstractmethod
    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) that an image of `image_hw` covers in the 1024 input frame (the rest is padding)."""

    @abstractmethod
    def encode(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Bx3x1024x1024 prepared images -> their embedding levels (BxCxHxW each)."""

    @abstractmethod
    def decode(self, model: nn.Module, levels: Sequence[torch.Tensor], prompts: Sequence[PromptSet]) -> DecoderOutput:
        """The family's decoder (`distill.decoding`) on I images' levels and their prompt sets."""

    @abstractmethod
    def assemble_heads(self) -> nn.Module:
        """The family's model without an image encoder, to hold a teacher's `head_prefixes` weights."""

    def mask_decoder(self, model: nn.Module) -> nn.Module:
        return self.family.heads(model)[1]

    def prompt_encoder(self, model: nn.Module) -> nn.Module:
        return self.family.heads(model)[0]


class SamDistill(DistillFamily):
    family = FAMILIES["sam"]
    levels = EmbeddingLevels(FAMILIES["sam"].embedding_names, ((256, 64, 64),))
    preprocessing = f"resize-longest-{IMAGE_SIZE}/mean{list(PIXEL_MEAN)}/std{list(PIXEL_STD)}/pad-bottom-right"
    head_prefixes = ("prompt_encoder.", "mask_decoder.")

    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return ResizeLongestSide.get_preprocess_shape(*image_hw, IMAGE_SIZE)

    def encode(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (model.image_encoder(images),)

    def decode(self, model: nn.Module, levels: Sequence[torch.Tensor], prompts: Sequence[PromptSet]) -> DecoderOutput:
        return decode(model, levels[0], prompts)

    def assemble_heads(self) -> nn.Module:
        return assemble_sam(nn.Identity())


class _NoImageEncoder(nn.Module):
    """Stands in for a SAM 2 image encoder that training never runs: ``SAM2Base`` reads the width of its heads
    from ``image_encoder.neck.d_model``."""

    def __init__(self, d_model: int = 256) -> None:
        super().__init__()
        self.neck = nn.Module()
        self.neck.d_model = d_model

    def forward(self, images: torch.Tensor) -> None:
        raise RuntimeError("the teacher heads have no image encoder: their embeddings come from the cache")


class Sam2Distill(DistillFamily):
    family = FAMILIES["sam2"]
    levels = EmbeddingLevels(FAMILIES["sam2"].embedding_names, LEVEL_SHAPES)
    # sam2's SAM2Transforms: a plain resize to 1024x1024, ImageNet mean/std on [0, 1] (PIXEL_MEAN / 255).
    preprocessing = f"resize-{IMAGE_SIZE}x{IMAGE_SIZE}/mean{list(PIXEL_MEAN)}/std{list(PIXEL_STD)}"
    head_prefixes = ("sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")

    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return (IMAGE_SIZE, IMAGE_SIZE)

    def encode(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return sam2_encode(model, images).levels

    def decode(self, model: nn.Module, levels: Sequence[torch.Tensor], prompts: Sequence[PromptSet]) -> DecoderOutput:
        return decode_sam2(model, levels, prompts)

    def assemble_heads(self) -> nn.Module:
        return assemble_sam2(_NoImageEncoder())


DISTILL_FAMILIES: dict[str, DistillFamily] = {"sam": SamDistill(), "sam2": Sam2Distill()}


def distill_family(model_name: str) -> DistillFamily:
    """The `DistillFamily` of the registered model `model_name`."""
    return DISTILL_FAMILIES[family_named(model_name).name]


def distill_family_of(model: nn.Module) -> DistillFamily:
    """The `DistillFamily` of a built model (a ``Sam`` or a ``SAM2Base``)."""
    return DISTILL_FAMILIES[family_of(model).name]
