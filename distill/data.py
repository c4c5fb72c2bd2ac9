"""Training items: the SAM-ready image, its cached teacher embedding and its GT masks in the decoder's frame.

`DistillDataset` wraps any `student_models.data` dataset and the teacher cache. It does the
per-image work (decode, resize, normalise, read the memory-mapped embedding, shrink the masks to
the 256x256 low-res frame and the boxes to the 1024 frame) so DataLoader workers can do it. A
corrupt image gives None, which `Collate` drops.

`Collate` turns a batch's items into one `DistillBatch` of stacked tensors, which the DataLoader
pins (its `pin_memory` method) so that the copy to the GPU can overlap. It also makes each image's
host-side prompt choices (which masks, box or point, how many corrective points; `distill.prompts`)
and orders the images so that `DistillStep` can prompt and decode them in a few batched calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distill.cache import EmbeddingCache
from distill.families import DistillFamily
from distill.prompts import LOWRES_STRIDE, choose_masks, draw_iterations, image_keys, use_boxes
from student_models.data import SegmentationDataset
from student_models.registry import IMAGE_SIZE

LOWRES_SIDE = IMAGE_SIZE // LOWRES_STRIDE


@dataclass
class DistillItem:
    """One training image.

    image: 3x1024x1024 float32 (the family's input: SAM's normalised and padded, SAM 2's resized to the square);
    teacher_embedding: the cached levels as float32 (SAM: 256x64x64; SAM 2: packed, `EmbeddingLevels`);
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
    """NxHxW bool at the original size -> Nx256x256 bool in the padded low-res frame (area-resized, >= 0.5).

    `input_size` (1024, 1024), SAM 2's, resizes each side on its own, as SAM 2 resizes the image."""
    height, width = (-(-s // LOWRES_STRIDE) for s in input_size)
    resized = F.interpolate(torch.from_numpy(masks[:, None]).float(), size=(height, width), mode="area")
    padded = F.pad(resized[:, 0], (0, LOWRES_SIDE - width, 0, LOWRES_SIDE - height))
    return (padded >= 0.5).numpy()


class DistillDataset(Dataset):
    """`indices` of `base` whose teacher embeddings are in `cache`, prepared for `family`'s models; items are
    `DistillItem`s or None."""

    def __init__(
        self, base: SegmentationDataset, cache: EmbeddingCache, indices: list[int], family: DistillFamily
    ) -> None:
        self.base, self.cache, self.indices, self.family = base, cache, list(indices), family

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> DistillItem | None:
        index = self.indices[position]
        sample = self.base[index]
        if sample is None:
            return None
        image, input_size, to_frame = self.family.prepare(sample.image)
        gt_masks = gt_boxes = None
        if sample.masks is not None:
            gt_masks = lowres_masks(sample.masks, input_size)
            keep = gt_masks.reshape(len(gt_masks), -1).any(1)  # masks too small to survive the 4x shrink go
            gt_masks = gt_masks[keep]
            corners = to_frame(sample.boxes[keep].reshape(-1, 2, 2).astype(np.float64))
            gt_boxes = corners.reshape(-1, 4).astype(np.float32)
        return DistillItem(
            index=index,
            image_id=sample.image_id,
            image=image,
            teacher_embedding=self.cache.read(sample.image_id),
            input_size=input_size,
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


@dataclass
class DistillBatch:
    """B training images as stacked tensors, laid out for batched prompting.

    The first M images have masks to prompt; box-prompted images come before point-prompted ones, and within
    each kind images with more corrective points come first (`iterations`, descending), so that the images
    still being prompted at any iteration, or finishing at it, are contiguous ranges. The last B - M images
    have no masks (the embedding loss only).

    image_ids: B names; indices: B int64 (dataset indices); images: Bx3x1024x1024 float32; teacher_embeddings:
    B cache arrays (`DistillItem.teacher_embedding`); input_sizes: Bx2 int64 (h, w in the 1024 frame); keys: M
    int64 image keys (`image_keys`);
    gt_masks: MxPx256x256 bool and gt_boxes: MxPx4 float32, the masks chosen for the P prompts of each image;
    use_box, iterations: M host values, each image's first-prompt kind and corrective points.
    """

    image_ids: list[str]
    indices: torch.Tensor
    images: torch.Tensor
    teacher_embeddings: torch.Tensor
    input_sizes: torch.Tensor
    keys: torch.Tensor
    gt_masks: torch.Tensor
    gt_boxes: torch.Tensor
    use_box: list[bool]
    iterations: list[int]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_prompted(self) -> int:
        """M: the images with masks to prompt."""
        return len(self.iterations)

    def _map_tensors(self, fn) -> DistillBatch:
        return replace(
            self, **{f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        )

    def pin_memory(self) -> DistillBatch:
        """Page-locked copies of the tensors (the DataLoader calls this when pin_memory=True)."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def to(self, device: torch.device, non_blocking: bool = False) -> DistillBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass(frozen=True)
class Collate:
    """DataLoader items -> one `DistillBatch` (None when no item is readable), with the epoch's prompt choices.

    prompts_per_image: P, or None when the run uses no prompts (then every image counts as without masks);
    box_prob, max_iters: as `DistillConfig.box_prob` and `max_prompt_iters` (0 without hard prompts).
    """

    seed: int
    epoch: int
    prompts_per_image: int | None
    box_prob: float = 0.5
    max_iters: int = 0

    def __call__(self, items: list[DistillItem | None]) -> DistillBatch | None:
        items = [item for item in items if item is not None]
        if not items:
            return None
        prompted = [i for i, item in enumerate(items) if self.prompts_per_image and _has_masks(item)]
        keys = image_keys(self.seed, self.epoch, torch.tensor([items[i].index for i in prompted], dtype=torch.int64))
        boxes = use_boxes(keys, self.box_prob).tolist()
        iterations = draw_iterations(keys, self.max_iters).tolist()
        layout = sorted(range(len(prompted)), key=lambda j: (not boxes[j], -iterations[j], j))
        unprompted = [i for i in range(len(items)) if i not in set(prompted)]
        order = [prompted[j] for j in layout] + unprompted
        items, keys = [items[i] for i in order], keys[layout]
        masks, picked_boxes = _picked_masks(items[: len(prompted)], keys, self.prompts_per_image or 0)
        return DistillBatch(
            image_ids=[item.image_id for item in items],
            indices=torch.tensor([item.index for item in items], dtype=torch.int64),
            images=torch.stack([item.image for item in items]),
            teacher_embeddings=torch.stack([item.teacher_embedding for item in items]),
            input_sizes=torch.tensor([item.input_size for item in items], dtype=torch.int64),
            keys=keys,
            gt_masks=masks,
            gt_boxes=picked_boxes,
            use_box=[boxes[j] for j in layout],
            iterations=[iterations[j] for j in layout],
        )


def _has_masks(item: DistillItem) -> bool:
    return item.gt_masks is not None and len(item.gt_masks) > 0


def _picked_masks(items: list[DistillItem], keys: torch.Tensor, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GT masks (MxPx256x256 bool) and boxes (MxPx4) that the P prompts of each of M images start from."""
    if not items:
        return torch.zeros((0, num_prompts, LOWRES_SIDE, LOWRES_SIDE), dtype=torch.bool), torch.zeros(
            (0, num_prompts, 4)
        )
    picks = choose_masks(keys, torch.tensor([len(item.gt_masks) for item in items]), num_prompts)
    masks = torch.stack([torch.from_numpy(item.gt_masks)[pick] for item, pick in zip(items, picks, strict=True)])
    boxes = torch.stack([torch.from_numpy(item.gt_boxes)[pick] for item, pick in zip(items, picks, strict=True)])
    return masks, boxes.to(torch.float32)


def split_indices(num_images: int, val_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) image indices: a seeded permutation, the last `val_count` held out."""
    order = np.random.default_rng(seed).permutation(num_images).tolist()
    cut = num_images - val_count
    return sorted(order[:cut]), sorted(order[cut:])
