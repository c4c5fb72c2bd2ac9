"""One way to run SAM's prompt path: encode images, decode many prompts at once, post-process masks.

Every stage that turns prompts into masks goes through `SamRunner`: COCO evaluation, quantization
fidelity, latency and export checks. Its back-end does only the two network calls, on tensors
that live on the back-end's device:

- ``encode(images Bx3xSxS) -> Bx256x64x64`` embeddings;
- ``decode(embedding 1x256x64x64, coords BxNx2, labels BxN) -> (Bx4x256x256 logits, Bx4 IoU)``,
  all four mask tokens, with points and boxes in one labelled point list as SAM's own ONNX model
  takes them (label 1/0 foreground/background point, 2/3 box corners, -1 padding).

`TorchSamBackend` runs a `Sam` module (float or simulated-quantized) on a device and dtype given
once, eager or through `torch.compile`; `quantize.OnnxSam` is the ONNX Runtime back-end with the
same two methods (on the CPU, numpy only inside it). The runner holds what the back-ends share:
SAM's preprocessing, the prompt transform to the 1024 frame, chunking, the choice among the
multimask outputs and the upscaling to the image. Code that has its images preprocessed and its
prompts in the 1024 frame already (quantization fidelity, latency) calls a back-end directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from student_models.masks import upscale_logits
from student_models.preprocessing import prepare_image
from student_models.prompts import box_prompts, point_prompts
from student_models.registry import IMAGE_SIZE

MASK_THRESHOLD = 0.0  # SAM's logit threshold (Sam.mask_threshold)


class PointPromptDecoder(nn.Module):
    """(1x256x64x64 embedding, BxNx2 coords, BxN labels) -> (Bx4x256x256 logits, Bx4 IoU).

    SAM's prompt encoder and mask decoder as `segment_anything.utils.onnx.SamOnnxModel` runs them:
    one labelled point list per prompt, so one graph takes any mix of points and boxes and B prompts
    per image. Numerically `sam.prompt_encoder(points=(coords, labels))` followed by
    `sam.mask_decoder.predict_masks`, returning all four mask tokens (token 0 is the single-mask
    output, 1..3 the multimask outputs). This is also the decoder graph that is exported to ONNX.
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


class SamBackend(Protocol):
    """The two network calls of SAM; tensors in and out live on ``device``."""

    device: torch.device

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def compile_mode(device: torch.device) -> str:
    """The `torch.compile` mode `TorchSamBackend(compile=True)` uses on ``device``.

    On CUDA "reduce-overhead": Inductor's kernels replayed as CUDA graphs, which removes the per-kernel
    launch cost that bounds a small encoder at batch 1 (tinyvit_5m measured launch-bound on an H200).
    "max-autotune" adds kernel autotuning to the same CUDA graphs at a much longer compile.
    Elsewhere "default": CUDA graphs do not apply.
    """
    return "reduce-overhead" if device.type == "cuda" else "default"


class TorchSamBackend:
    """A PyTorch `Sam` on ``device``; ``dtype`` bfloat16/float16 runs it under autocast (outputs are float32).

    The module is moved to ``device`` (not copied): pass a copy to keep the original where it is.
    ``compile=True`` runs the image encoder and the prompt decoder through `torch.compile` (mode
    `compile_mode(device)`); the first call of each input shape compiles, so warm up before timing.
    On the CPU the compiled kernels keep the thread count they were compiled under.
    """

    def __init__(
        self,
        sam: Sam,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.sam = sam.eval().to(self.device)
        self.compile_mode = compile_mode(self.device) if compile else None
        self.encoder, self.decoder = self.graphs(self.sam)
        if compile:
            self.encoder = torch.compile(self.encoder, mode=self.compile_mode)
            self.decoder = torch.compile(self.decoder, mode=self.compile_mode)

    @staticmethod
    def graphs(sam: Sam) -> tuple[nn.Module, nn.Module]:
        """(the module `encode` runs, the module `decode` runs) of `sam`: what ``compile`` compiles and what
        ``quantize`` exports to ONNX."""
        return sam.image_encoder, PointPromptDecoder(sam)

    def runner(self, chunk_size: int = 64) -> SamRunner:
        """A `SamRunner` on this back-end, with the geometry of its model's family."""
        return SamRunner(self, chunk_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``dtype``; float32 runs without one (on any device, the meta device included)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _own(self, output: torch.Tensor) -> torch.Tensor:
        """float32 output the caller may keep: a CUDA graph's output is overwritten by its next replay."""
        if self.compile_mode == "reduce-overhead" and output.dtype == torch.float32:
            return output.clone()
        return output.float()  # a copy unless already float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._own(self.encoder(images.to(self.device)))

    @torch.no_grad()
    def decode(
        self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, iou = self.decoder(embedding.to(self.device), coords.to(self.device), labels.to(self.device))
        return self._own(logits), self._own(iou)


@dataclass(frozen=True)
class Prediction:
    """What one call of `SamRunner.predict` gives, for N prompts and C masks per prompt (on the back-end's device).

    ``masks`` NxCxHxW bool at image size, ``iou`` NxC predicted IoU, ``low_res_logits`` NxCx256x256.
    """

    masks: torch.Tensor
    iou: torch.Tensor
    low_res_logits: torch.Tensor


class SamRunner:
    """Set an image once, then turn many point or box prompts into masks at image size.

    Args:
        backend: `TorchSamBackend`, `quantize.OnnxSam`, or anything with ``device``, ``encode``, ``decode``.
        chunk_size: prompts decoded together (one batch of the mask decoder).
    """

    def __init__(self, backend: SamBackend, chunk_size: int = 64) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.backend = backend
        self.chunk_size = chunk_size
        self.transform = ResizeLongestSide(IMAGE_SIZE)
        self.embedding: torch.Tensor | None = None
        self.input_size: tuple[int, int] | None = None
        self.original_size: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def set_image(self, image: np.ndarray) -> None:
        """HxWx3 uint8 RGB image: preprocess it as SAM does and embed it."""
        prepared = prepare_image(image)
        self.embedding = self.backend.encode(prepared.tensor.to(self.device))
        self.input_size, self.original_size = prepared.input_size, prepared.original_size

    # The model family's geometry: SAM resizes the longest side to 1024 and pads; a subclass may differ.

    def to_frame(self, coords: np.ndarray) -> np.ndarray:
        """...x2 pixel (x, y) coordinates of the set image -> the model's 1024 frame."""
        return self.transform.apply_coords(coords, self.original_size)

    def pad_points(self, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A point-only prompt list as the decoder takes it (SAM: one padding point appended)."""
        return point_prompts(coords, labels)

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        """...x256x256 low-resolution logits -> logits at the set image's size."""
        return upscale_logits(logits, self.input_size, self.original_size)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> Prediction:
        """N prompts in image pixels -> masks, like `SamPredictor.predict_torch` for a batch of prompts.

        Either NxKx2 points with NxK labels (1 foreground, 0 background), or Nx4 XYXY boxes, or both
        (prompt i is its points plus its box). ``multimask_output`` gives SAM's three masks per
        prompt, otherwise its single-mask output.
        """
        tokens = slice(1, 4) if multimask_output else slice(0, 1)
        logits, iou = [], []
        for chunk_logits, chunk_iou in self._decoded_chunks(point_coords, point_labels, boxes):
            logits.append(chunk_logits[:, tokens])
            iou.append(chunk_iou[:, tokens])
        low_res = torch.cat(logits)
        masks = self.upscale(low_res) > MASK_THRESHOLD
        return Prediction(masks, torch.cat(iou), low_res)

    def predict_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Nx4 XYXY boxes -> (NxHxW bool masks, N scores): per box, the multimask output SAM scores highest.

        Upscales only the chosen mask of each chunk, so memory stays at one chunk of image-size masks.
        """
        masks, scores = [], []
        for logits, iou in self._decoded_chunks(None, None, boxes):
            best_iou, best = iou[:, 1:].max(dim=1)
            chosen = logits[:, 1:][torch.arange(len(best), device=best.device), best][:, None]
            masks.append(self.upscale(chosen)[:, 0] > MASK_THRESHOLD)
            scores.append(best_iou)
        if not masks:
            empty = torch.zeros((0, *self.original_size), dtype=torch.bool, device=self.device)
            return empty, torch.zeros(0, device=self.device)
        return torch.cat(masks), torch.cat(scores)

    def _decoded_chunks(
        self, point_coords: np.ndarray | None, point_labels: np.ndarray | None, boxes: np.ndarray | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The back-end's (logits Cx4x256x256, IoU Cx4) for each chunk of at most `chunk_size` prompts."""
        if self.embedding is None or self.original_size is None:
            raise RuntimeError("call set_image(image) before predicting masks")
        coords, labels = self._prompt_list(point_coords, point_labels, boxes)
        for start in range(0, coords.shape[0], self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            yield self.backend.decode(self.embedding, coords[chunk].to(self.device), labels[chunk].to(self.device))

    def _prompt_list(
        self, point_coords: np.ndarray | None, point_labels: np.ndarray | None, boxes: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in image pixels -> the decoder's point list in the 1024 frame (CPU tensors)."""
        if point_coords is None and boxes is None:
            raise ValueError("give point_coords with point_labels, boxes, or both")
        parts_coords, parts_labels = [], []
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords needs point_labels (1 foreground, 0 background)")
            points = np.asarray(point_coords, dtype=np.float32)
            points = points.reshape(-1, 1, 2) if points.ndim == 2 else points
            parts_coords.append(self.to_frame(points))
            parts_labels.append(np.asarray(point_labels, dtype=np.float32).reshape(points.shape[:2]))
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            box_coords, box_labels = box_prompts(self.to_frame(boxes.reshape(-1, 2, 2)).reshape(-1, 4))
            parts_coords.append(box_coords)
            parts_labels.append(box_labels)
        elif parts_coords:
            parts_coords[0], parts_labels[0] = self.pad_points(parts_coords[0], parts_labels[0])
        if len({part.shape[0] for part in parts_coords}) > 1:
            raise ValueError(
                f"points give {parts_coords[0].shape[0]} prompts and boxes {parts_coords[1].shape[0]}: "
                "give one box per point set"
            )
        coords = torch.as_tensor(np.concatenate(parts_coords, axis=1), dtype=torch.float32)
        return coords, torch.as_tensor(np.concatenate(parts_labels, axis=1), dtype=torch.float32)
