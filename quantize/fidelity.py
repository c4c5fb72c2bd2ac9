"""Fidelity of a quantized SAM against its float model, and latency of ORT sessions.

Any model is run through the `OnnxSam` interface (`embed`, `decode`), so PyTorch models
(`TorchSam`) and ONNX files compare the same way. Figures per image, then averaged:
- SQNR (dB) of the 1x256x64x64 image embedding and of the Bx4x256x256 mask logits
  (10 log10(sum ref^2 / sum (ref - test)^2), each model with its own embedding);
- mean IoU of the binarised (logit > 0) 256x256 low-res masks, all four mask tokens per prompt.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from quantize.calibration import CalibItem, model_device
from student_models.masks import mask_iou
from student_models.sam_runner import PointPromptDecoder


class TorchSam:
    """A PyTorch SAM behind the `OnnxSam` interface (numpy in, numpy out), run on the model's device."""

    def __init__(self, sam: Sam) -> None:
        self.sam = sam.eval()
        self.decoder = PointPromptDecoder(sam)
        self.device = model_device(sam)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> np.ndarray:
        return self.sam.image_encoder(self._tensor(image)).cpu().numpy()

    @torch.no_grad()
    def decode(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks, iou = self.decoder(self._tensor(embedding), self._tensor(coords), self._tensor(labels))
        return masks.cpu().numpy(), iou.cpu().numpy()


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    signal = float((reference.astype(np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


@dataclass
class Outputs:
    """Per image: embedding (1x256x64x64), mask logits (Bx4x256x256)."""

    embeddings: list[np.ndarray]
    masks: list[np.ndarray]


def run_model(model, items: list[CalibItem]) -> Outputs:
    """Embed and decode every item with `model` (an `OnnxSam` or `TorchSam`)."""
    embeddings, masks = [], []
    for item in items:
        embedding = model.embed(item.image.numpy())
        logits, _ = model.decode(embedding, item.coords.numpy(), item.labels.numpy())
        embeddings.append(embedding)
        masks.append(logits)
    return Outputs(embeddings, masks)


def fidelity(reference: Outputs, test: Outputs) -> dict[str, float]:
    """Mean SQNR of embeddings and mask logits, and mean mask IoU, of `test` against `reference`."""
    return {
        "sqnr_embedding_db": float(
            np.mean([sqnr_db(r, t) for r, t in zip(reference.embeddings, test.embeddings, strict=True)])
        ),
        "sqnr_mask_logits_db": float(
            np.mean([sqnr_db(r, t) for r, t in zip(reference.masks, test.masks, strict=True)])
        ),
        "mask_iou": float(
            np.mean([mask_iou(r > 0, t > 0).mean() for r, t in zip(reference.masks, test.masks, strict=True)])
        ),
    }


def median_latency_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
