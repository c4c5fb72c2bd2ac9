"""A generated dataset of shapes with exact masks, deterministic by seed.

It lets the demo and the tests run every stage offline: images with textured backgrounds and
a few filled ellipses, rectangles and triangles whose masks are known to the pixel.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def synthetic_sample(
    seed: int, size: tuple[int, int] = (256, 320), max_shapes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8) and its instance masks (NxHxW bool, N >= 1), both from `seed`.

    Later shapes occlude earlier ones; a shape left with under 1% of the image is dropped.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, size=3)
    gradient = (yy / height)[..., None] * rng.uniform(-40, 40, size=3) + (xx / width)[..., None] * rng.uniform(
        -40, 40, size=3
    )
    image = base + gradient + rng.normal(0, 6, size=(height, width, 3))
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        canvas = Image.new("1", (width, height))
        draw = ImageDraw.Draw(canvas)
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.08, 0.25) * width, rng.uniform(0.08, 0.25) * height
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        else:
            draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=1)
        mask = np.array(canvas, dtype=bool)
        for earlier in masks:
            earlier &= ~mask
        image[mask] = rng.uniform(0, 255, size=3) + rng.normal(0, 4, size=(int(mask.sum()), 3))
        masks.append(mask)
    keep = [m for m in masks if m.mean() >= 0.01]
    if not keep:  # the largest survivor keeps the sample usable
        keep = [max(masks, key=lambda m: m.sum())]
    return np.clip(image, 0, 255).astype(np.uint8), np.stack(keep)
