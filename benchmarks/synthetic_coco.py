"""Write the generated shapes dataset as a COCO-format folder, so the offline demo and the tests
run the same COCO evaluation as real data.

Layout: ``<root>/val2017/<id>.png`` and ``<root>/annotations/instances_val2017.json`` with RLE
masks, one category ("shape"), no crowd annotations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from pycocotools import mask as mask_utils

from student_models.io import atomic_write_text
from student_models.masks import encode_rle
from student_models.synthetic import synthetic_sample

SPLIT = "val2017"


def write_synthetic_coco(
    root: str | os.PathLike, num_images: int = 8, seed: int = 0, size: tuple[int, int] = (256, 320)
) -> Path:
    """Generate ``num_images`` synthetic samples (image i from ``seed + i``) as a COCO folder; return root."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    root = Path(root)
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, masks = synthetic_sample(seed + index, size)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        Image.fromarray(image).save(root / SPLIT / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": size[0], "width": size[1]})
        for rle in encode_rle(masks):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": f"synthetic shapes, seeds {seed}..{seed + num_images - 1}, size {size}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "shape", "supercategory": "shape"}],
    }
    atomic_write_text(root / "annotations" / f"instances_{SPLIT}.json", json.dumps(dataset))
    return root
