"""Render masks over an image so a person can judge them at a glance."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NO_MASKS_LABEL = "no masks found"


def mask_colors(count: int, seed: int = 0) -> np.ndarray:
    """Kx3 uint8 distinct-ish colours (fixed seed: the same masks get the same colours every run)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(count, 3), dtype=np.uint8)


def label_image(image: np.ndarray, text: str) -> np.ndarray:
    """HxWx3 uint8 -> a copy with `text` in white on a black band at the top left, sized to the image."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(image.shape[:2]) // 12))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 4)
    draw.rectangle((0, 0, right + 2 * pad, bottom + 2 * pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def render_overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.55) -> np.ndarray:
    """HxWx3 uint8 image + K HxW bool masks -> HxWx3 uint8 with each mask tinted and outlined.

    Larger masks are painted first so small ones stay visible on top; each mask's outline (pixels
    of the mask with a 4-neighbour outside it) is drawn in its full colour. Without masks the image
    says "no masks found", so an empty result never passes for an untouched photo.
    """
    if not masks:
        return label_image(image, NO_MASKS_LABEL)
    canvas = image.astype(np.float32).copy()
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    colors = mask_colors(len(masks)).astype(np.float32)
    for i in order:
        mask = masks[i].astype(bool)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colors[i]
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        canvas[mask & ~inner] = colors[i]
    return np.clip(canvas, 0, 255).astype(np.uint8)
