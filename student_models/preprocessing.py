"""SAM's image preprocessing in one place: read an image, resize its longest side, normalise, pad.

Every stage (teacher cache, training, calibration, evaluation, export checks) goes through
`prepare_image`, so a student always sees exactly what its teacher saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide

from student_models.registry import IMAGE_SIZE

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file that cannot be read, or an array that is not an image."""


@dataclass(frozen=True)
class PreparedImage:
    """``tensor``: 1x3xSxS normalised and zero-padded; sizes are (height, width) in pixels."""

    tensor: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped) -> HxWx3 uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"the image is empty (shape {image.shape})")
    if image.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {image.dtype}; scale to 0..255 and cast to uint8")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (grayscale, palette and RGBA are converted)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    return decode_image(path, str(path))


def decode_image(source: str | os.PathLike | BinaryIO, name: str) -> np.ndarray:
    """Decode an image from a path or a binary file object (e.g. a member of a tar shard) as HxWx3 uint8 RGB.

    `name` says in errors where the image came from.
    """
    try:
        with Image.open(source) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:  # Pillow's own message repeats the path: say it once
        raise ImageError(
            f"{name}: not a readable image (not a format Pillow knows); remove or replace the file"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc}); remove or replace the file") from exc


def prepare_image(image: np.ndarray, image_size: int = IMAGE_SIZE) -> PreparedImage:
    """HxWx3 uint8 -> SAM input: longest side resized to `image_size`, normalised, padded."""
    image = to_rgb(image)
    transform = ResizeLongestSide(image_size)
    resized = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    normalised = (resized - mean) / std
    height, width = normalised.shape[-2:]
    padded = F.pad(normalised, (0, image_size - width, 0, image_size - height))
    return PreparedImage(padded[None], (int(height), int(width)), tuple(image.shape[:2]))


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
