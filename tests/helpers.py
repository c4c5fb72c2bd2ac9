"""Shared test helpers: tiny models, synthetic images and the optional shared COCO data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from student_models import build_sam
from student_models.synthetic import synthetic_sample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_ROOT = SHARED_DATA / "coco_val2017_tiny"
DEMO_IMAGES = SHARED_DATA / "images"

requires_coco = pytest.mark.skipif(
    not (COCO_ROOT / "annotations" / "instances_val2017.json").is_file(),
    reason=f"needs the 80-image COCO subset at {COCO_ROOT} (only beside the project checkout)",
)
# A CUDA path's test: skipped with a reason without a GPU, selected by ``-m cuda`` on a GPU machine.
CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none here)"),
)
# Parameters of a test that runs on every device this machine has.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def requires_cuda(test):
    """Mark a test of a CUDA path (`CUDA_MARKS`)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def tiny_model(name: str = "tinyvit_test", seed: int = 0):
    """A registered tiny model with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    return build_sam(name)


def synthetic_image(seed: int = 0, size: tuple[int, int] = (256, 320)) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, NxHxW bool masks) generated from `seed`."""
    return synthetic_sample(seed, size)
