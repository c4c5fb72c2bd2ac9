"""Box-prompt predictors: one image embedding, many box prompts, the best of SAM's three masks.

`BoxPredictor` holds everything the back-ends share (SAM's preprocessing, box transform,
chunking, mask selection and upscaling); a back-end only embeds an image and decodes box
prompts. Selection, upscaling and thresholding run where the back-end's outputs are (the GPU for
a CUDA model): only the bool masks come back to the CPU. `TorchBoxPredictor` runs a `Sam` module
(float, or simulated-quantized: it is still a `Sam`) on a device; `OnnxBoxPredictor` runs an ONNX
Runtime encoder/decoder pair through any object with ``embed``/``decode`` as `quantize.OnnxSam`
has, so an exported INT8 model is measured as shipped.
"""

from __future__ import annotations

import abc

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from student_models import IMAGE_SIZE
from student_models.masks import upscale_logits
from student_models.preprocessing import prepare_image

MASK_THRESHOLD = 0.0  # SAM's logit threshold


class BoxPredictor(abc.ABC):
    """Set an image once, then predict one mask per box prompt.

    Args:
        chunk_size: box prompts decoded together (a batch of the mask decoder).
    """

    runtime = "base"

    def __init__(self, chunk_size: int = 16) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.transform = ResizeLongestSide(IMAGE_SIZE)
        self._embedding: torch.Tensor | None = None
        self._sizes: tuple[tuple[int, int], tuple[int, int]] | None = None

    @abc.abstractmethod
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """1x3x1024x1024 preprocessed image -> 1x256x64x64 embedding."""

    @abc.abstractmethod
    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx4 XYXY boxes in the 1024 frame -> multimask logits Bx3x256x256 and predicted IoU Bx3 (on any device)."""

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """HxWx3 uint8 RGB image: preprocess and embed it."""
        prepared = prepare_image(image)
        self._embedding = self.embed(prepared.tensor)
        self._sizes = (prepared.input_size, prepared.original_size)

    @torch.no_grad()
    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nx4 XYXY boxes in image pixels -> (NxHxW bool masks, N predicted IoU of each chosen mask).

        Each mask is the one of SAM's three multimask outputs with the highest predicted IoU.
        """
        if self._embedding is None or self._sizes is None:
            raise RuntimeError("call set_image(image) before predict_boxes(boxes)")
        input_size, original_size = self._sizes
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        masks = np.zeros((len(boxes), *original_size), dtype=bool)
        scores = np.zeros(len(boxes), dtype=np.float32)
        for start in range(0, len(boxes), self.chunk_size):
            chunk = boxes[start : start + self.chunk_size]
            resized = torch.as_tensor(self.transform.apply_boxes(chunk, original_size), dtype=torch.float32)
            low_res, iou = self.decode_boxes(self._embedding, resized)
            best = iou.argmax(dim=1)
            rows = torch.arange(len(chunk), device=iou.device)
            chosen = low_res[rows, best][:, None]
            upscaled = upscale_logits(chosen.float(), input_size, original_size)[:, 0]
            masks[start : start + len(chunk)] = (upscaled > MASK_THRESHOLD).cpu().numpy()
            scores[start : start + len(chunk)] = iou[rows, best].float().cpu().numpy()
        return masks, scores


class TorchBoxPredictor(BoxPredictor):
    """A PyTorch `Sam` (float or simulated-quantized) on `device`."""

    runtime = "pytorch"

    def __init__(self, sam: Sam, chunk_size: int = 16, device: str | torch.device = "cpu") -> None:
        super().__init__(chunk_size)
        self.device = torch.device(device)
        self.sam = sam.eval().to(self.device)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(image.to(self.device))

    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes.to(self.device), masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        return low_res, iou


class OnnxBoxPredictor(BoxPredictor):
    """An ONNX Runtime encoder/decoder pair behind ``runner.embed`` / ``runner.decode``.

    ``runner.decode(embedding, point_coords BxNx2, point_labels BxN)`` returns all four mask
    tokens (Bx4x256x256, Bx4); tokens 1..3 are SAM's multimask outputs. A box is the point pair
    (top-left, label 2) + (bottom-right, label 3) without a padding point, as SAM's ONNX model takes it.
    """

    runtime = "onnxruntime"

    def __init__(self, runner, chunk_size: int = 16) -> None:
        super().__init__(chunk_size)
        self.runner = runner

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.runner.embed(image.numpy().astype(np.float32))))

    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from quantize.onnx_runtime import box_prompts

        coords, labels = box_prompts(boxes.numpy())
        low_res, iou = self.runner.decode(embedding.numpy(), coords, labels)
        return torch.as_tensor(np.asarray(low_res))[:, 1:], torch.as_tensor(np.asarray(iou))[:, 1:]
