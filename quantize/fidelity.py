"""Fidelity of a quantized SAM against its float model, and latency of ORT sessions.

Every model runs through a `student_models.sam_runner.SamBackend` (``encode``, ``decode``), so
PyTorch models (`TorchSamBackend`, on their device) and ONNX files (`quantize.OnnxSam`) compare
the same way. Figures per image, then averaged:
- SQNR (dB) of the 1x256x64x64 image embedding (SAM 2: its three levels together) and of the Bx4x256x256 mask logits
  (10 log10(sum ref^2 / sum (ref - test)^2), each model with its own embedding);
- mean IoU of the binarised (logit > 0) 256x256 low-res masks, all four mask tokens per prompt.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantize.calibration import CalibItem
from student_models.families import embedding_levels
from student_models.masks import mask_iou
from student_models.sam_runner import SamBackend


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    signal = float((reference.astype(np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


@dataclass
class Outputs:
    """Per image: embedding (1x256x64x64; SAM 2: its three levels, flattened and concatenated), mask logits
    (Bx4x256x256)."""

    embeddings: list[np.ndarray]
    masks: list[np.ndarray]


def run_model(backend: SamBackend, items: list[CalibItem]) -> Outputs:
    """Encode and decode every item with `backend` (e.g. `TorchSamBackend`, `OnnxSam`); outputs on the CPU."""
    embeddings, masks = [], []
    for item in items:
        embedding = backend.encode(item.image)
        logits, _ = backend.decode(embedding, item.coords, item.labels)
        embeddings.append(np.concatenate([level.cpu().numpy().ravel() for level in embedding_levels(embedding)]))
        masks.append(logits.cpu().numpy())
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
