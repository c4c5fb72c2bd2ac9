"""The two graphs users deploy: the image encoder, and the prompt-to-mask decoder.

`DecoderForExport` follows SAM's own ONNX model (`segment_anything.utils.onnx.SamOnnxModel`):
points and boxes arrive as one BxN point list whose labels say what each point is (boxes as
label-2/3 corner pairs), so one graph takes any number of points and boxes and a batch of B
prompts per image. Unlike SAM's, it returns all four mask tokens at 256x256 and leaves upscaling
and mask selection to the caller (the same as `Sam.mask_decoder` followed by slicing).
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


class DecoderForExport(nn.Module):
    """(1x256x64x64 embedding, BxNx2 coords, BxN labels) -> (Bx4x256x256 logits, Bx4 IoU).

    Numerically the same as `sam.prompt_encoder(points=(coords, labels), boxes=None)` followed by
    `sam.mask_decoder.predict_masks`, given that the caller appends SAM's padding point (label -1)
    when there is no box, as SAM's prompt encoder does itself.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BxNx2 coords, BxN labels -> BxNx256 sparse embeddings (label -1 = padding point)."""
        encoder = self.prompt_encoder
        embedding = encoder.pe_layer.forward_with_coords(coords + 0.5, encoder.input_image_size)
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i, point_embedding in enumerate(encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i)
        return embedding

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        side = self.image_pe.shape[-1]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, side, side)
        return self.mask_decoder.predict_masks(image_embeddings, self.image_pe, sparse, dense)
