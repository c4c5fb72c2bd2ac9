"""Training items: the SAM-ready image, its cached teacher embedding and its GT masks in the decoder's frame.

`DistillDataset` wraps any `student_models.data` dataset and the teacher cache. It does the
per-image work (decode, resize, normalise, read the memory-mapped embedding, shrink the masks to
the 256x256 low-res frame and the boxes to the 1024 frame) so DataLoader workers can do it. A
corrupt image gives None, which `collate` drops.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import Dataset

from distill.cache import EmbeddingCache
from distill.prompts import LOWRES_STRIDE
from student_models import IMAGE_SIZE
from student_models.data import SegmentationDataset
from student_models.preprocessing import prepare_image

LOWRES_SIDE = IMAGE_SIZE // LOWRES_STRIDE


@dataclass
class DistillItem:
    """One training image.

    image: 3x1024x1024 float32 (SAM-normalised, padded); teacher_embedding: 256x64x64 float32;
    input_size: (h, w) of the resized image inside the 1024 frame; gt_masks: Nx256x256 bool in the
    low-res frame and gt_boxes: Nx4 XYXY in the 1024 frame (None for a plain image folder).
    """

    index: int
    image_id: str
    image: torch.Tensor
    teacher_embedding: torch.Tensor
    input_size: tuple[int, int]
    gt_masks: np.ndarray | None
    gt_boxes: np.ndarray | None


def lowres_masks(masks: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """NxHxW bool at the original size -> Nx256x256 bool in the padded low-res frame (area-resized, >= 0.5)."""
    height, width = (-(-s // LOWRES_STRIDE) for s in input_size)
    resized = F.interpolate(torch.from_numpy(masks[:, None]).float(), size=(height, width), mode="area")
    padded = F.pad(resized[:, 0], (0, LOWRES_SIDE - width, 0, LOWRES_SIDE - height))
    return (padded >= 0.5).numpy()


class DistillDataset(Dataset):
    """`indices` of `base` whose teacher embeddings are in `cache`; items are `DistillItem`s or None."""

    def __init__(self, base: SegmentationDataset, cache: EmbeddingCache, indices: list[int]) -> None:
        self.base, self.cache, self.indices = base, cache, list(indices)
        self.transform = ResizeLongestSide(IMAGE_SIZE)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> DistillItem | None:
        index = self.indices[position]
        sample = self.base[index]
        if sample is None:
            return None
        prepared = prepare_image(sample.image)
        gt_masks = gt_boxes = None
        if sample.masks is not None:
            gt_masks = lowres_masks(sample.masks, prepared.input_size)
            keep = gt_masks.reshape(len(gt_masks), -1).any(1)  # masks too small to survive the 4x shrink go
            gt_masks = gt_masks[keep]
            gt_boxes = self.transform.apply_boxes(sample.boxes[keep], prepared.original_size).astype(np.float32)
        return DistillItem(
            index=index,
            image_id=sample.image_id,
            image=prepared.tensor[0],
            teacher_embedding=self.cache.read(sample.image_id),
            input_size=prepared.input_size,
            gt_masks=gt_masks,
            gt_boxes=gt_boxes,
        )


def stream_items(dataset: DistillDataset, rank: int = 0, world_size: int = 1) -> Iterator[DistillItem]:
    """This rank's share of `dataset` (items rank, rank + world_size, ...), read one at a time as it is consumed.

    Validation goes through held-out images this way, so a process holds one of them at a time, not all: at
    SA-1B 1% with a 10% split, holding them all took about 18 GB per process.
    """
    for position in range(rank, len(dataset), world_size):
        item = dataset[position]
        if item is not None:
            yield item


def collate(items: list[DistillItem | None]) -> list[DistillItem]:
    """Keep the readable items as a list (their masks differ in count, so they are not stacked)."""
    return [item for item in items if item is not None]


def split_indices(num_images: int, val_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) image indices: a seeded permutation, the last `val_count` held out."""
    order = np.random.default_rng(seed).permutation(num_images).tolist()
    cut = num_images - val_count
    return sorted(order[:cut]), sorted(order[cut:])
