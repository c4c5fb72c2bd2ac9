"""The image-encoder graph users deploy; the decoder graph is `student_models.sam_runner.PointPromptDecoder`.

`PointPromptDecoder` follows SAM's own ONNX model (`segment_anything.utils.onnx.SamOnnxModel`):
points and boxes arrive as one BxN point list whose labels say what each point is (boxes as
label-2/3 corner pairs), so one graph takes any number of points and boxes and a batch of B
prompts per image. Unlike SAM's, it returns all four mask tokens at 256x256 and leaves upscaling
and mask selection to the caller, as `SamRunner` does for every back-end.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn


class EncoderForExport(nn.Module):
    """1x3x1024x1024 preprocessed image -> 1x256x64x64 embedding."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)
