"""Datasets shared by the stages: SA-1B (tar shards as released, or unpacked), COCO, a plain image folder,
and generated shapes.

Every dataset yields `Sample`s: an RGB image, its instance masks (or None for a plain folder)
and their boxes. `open_dataset` picks the layout from what is on disk. A corrupt image in a
large dataset is skipped with a warning and counted in `dataset.skipped`; an empty or
unrecognised folder, or an annotation file that does not parse, is an error naming the file.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from torch.utils.data import Dataset

from student_models.preprocessing import IMAGE_SUFFIXES, ImageError, decode_image, list_image_files, load_image
from student_models.synthetic import synthetic_sample


class DatasetError(ValueError):
    """A dataset that cannot be used as given."""


@dataclass
class Sample:
    """image: HxWx3 uint8 RGB; masks: NxHxW bool or None; boxes: Nx4 XYXY pixels or None."""

    image_id: str
    image: np.ndarray
    masks: np.ndarray | None
    boxes: np.ndarray | None


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """NxHxW bool -> Nx4 XYXY (inclusive-exclusive pixel edges); empty masks give zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


class SegmentationDataset(Dataset, abc.ABC):
    """Base class: subclasses implement `_load(index) -> (image, masks | None)`."""

    kind = "base"
    has_masks = True

    def __init__(self, image_ids: list[str], min_mask_area: int = 1) -> None:
        self.image_ids = image_ids
        self.min_mask_area = min_mask_area
        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}  # image id -> why it could not be read (missing, not an image)

    def __len__(self) -> int:
        return len(self.image_ids)

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its masks (NxHxW bool, or None without annotations)."""

    def __getitem__(self, index: int) -> Sample | None:
        """The sample, or None (with a warning, counted in `skipped`) for a corrupt image."""
        try:
            image, masks = self._load(index)
        except ImageError as exc:
            self.skipped.append(self.image_ids[index])
            self.skip_reasons[self.image_ids[index]] = str(exc)
            warnings.warn(f"skipping corrupt image ({len(self.skipped)} so far): {exc}", stacklevel=2)
            return None
        boxes = None
        if masks is not None:
            masks = masks[masks.reshape(len(masks), -1).sum(1) >= self.min_mask_area]
            boxes = masks_to_boxes(masks)
        return Sample(self.image_ids[index], image, masks, boxes)


class SyntheticDataset(SegmentationDataset):
    """`num_images` generated images with exact masks; image i is made from seed + i."""

    kind = "synthetic"

    def __init__(self, num_images: int = 16, seed: int = 0, size: tuple[int, int] = (256, 320)) -> None:
        super().__init__([f"synthetic_{seed + i:05d}" for i in range(num_images)])
        self.seed, self.size = seed, size

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_sample(self.seed + index, self.size)


class ImageFolderDataset(SegmentationDataset):
    """A folder of images without annotations: good for the embedding loss only."""

    kind = "folder"
    has_masks = False

    def __init__(self, root: str | os.PathLike) -> None:
        self.paths = list_image_files(root)
        if not self.paths:
            raise DatasetError(f"{root}: no images found (looked for {', '.join(('.jpg', '.png', '...'))})")
        super().__init__([p.stem for p in self.paths])

    def _load(self, index: int) -> tuple[np.ndarray, None]:
        return load_image(self.paths[index]), None


def _decode_rle(segmentation: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = dict(segmentation)
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return mask_utils.decode(rle).astype(bool)


def _sa1b_masks(text: str | bytes, where: str, image: np.ndarray) -> np.ndarray:
    """The NxHxW bool masks of an SA-1B annotation file's text (`where` names the file in errors)."""
    try:
        annotations = json.loads(text)["annotations"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{where}: not an SA-1B annotation file ({exc})") from exc
    masks = [_decode_rle(a["segmentation"]) for a in annotations]
    return np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)


class SA1BDataset(SegmentationDataset):
    """SA-1B unpacked: ``sa_N.jpg`` beside ``sa_N.json`` whose annotations hold COCO RLE masks."""

    kind = "sa1b"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.paths = [p for p in list_image_files(self.root) if p.with_suffix(".json").is_file()]
        if not self.paths:
            raise DatasetError(f"{root}: no SA-1B pairs (sa_N.jpg + sa_N.json) found")
        super().__init__([p.stem for p in self.paths])

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.paths[index]
        image = load_image(path)
        json_path = path.with_suffix(".json")
        return image, _sa1b_masks(json_path.read_text(), str(json_path), image)


@dataclass(frozen=True)
class TarMember:
    """Where a file's bytes lie inside an uncompressed tar shard."""

    shard: Path
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise ImageError(f"{self.shard}: {exc.strerror or exc} (reading {self.name})") from exc
        if len(data) != self.size:
            raise ImageError(f"{self.shard}: cut short, {self.name} ends {self.size - len(data)} bytes early")
        return data


def _index_shard(shard: Path) -> dict[str, TarMember]:
    """File name -> its `TarMember`, from the shard's headers only (tarfile seeks over the data)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            return {
                PurePosixPath(m.name).name: TarMember(shard, m.name, m.offset_data, m.size) for m in tar if m.isfile()
            }
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{shard}: not a readable uncompressed tar shard ({exc})") from exc


class SA1BShardDataset(SegmentationDataset):
    """SA-1B as released: tar shards (``sa_000000.tar`` ...) of ``sa_N.jpg`` + ``sa_N.json``, read in place.

    Opening reads each shard's headers once, an index of where every member's bytes lie; an item is then two
    reads at known offsets. Nothing is unpacked, no file handle is kept (DataLoader workers share only the
    index), and images come in the order of their names, as in the unpacked folder (`SA1BDataset`).
    """

    kind = "sa1b_tar"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards = sorted(self.root.glob("*.tar"))
        members: dict[str, TarMember] = {}
        for shard in self.shards:
            members.update(_index_shard(shard))
        images = sorted(n for n in members if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        self.pairs = [
            (members[n], members[f"{Path(n).stem}.json"]) for n in images if f"{Path(n).stem}.json" in members
        ]
        if not self.pairs:
            raise DatasetError(
                f"{root}: its {len(self.shards)} tar shard(s) hold no SA-1B pairs (sa_N.jpg + sa_N.json)"
            )
        super().__init__([Path(image.name).stem for image, _ in self.pairs])

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_member, json_member = self.pairs[index]
        image = decode_image(io.BytesIO(image_member.read()), f"{image_member.shard}:{image_member.name}")
        return image, _sa1b_masks(json_member.read(), f"{json_member.shard}:{json_member.name}", image)


class CocoDataset(SegmentationDataset):
    """COCO layout: ``annotations/instances_<split>.json`` and images in ``<split>/``.

    Crowd annotations are left out (their masks are not instances).
    """

    kind = "coco"

    def __init__(self, root: str | os.PathLike, split: str | None = None) -> None:
        from pycocotools.coco import COCO

        self.root = Path(root)
        annotation_files = sorted((self.root / "annotations").glob(f"instances_{split or '*'}.json"))
        if not annotation_files:
            raise DatasetError(f"{root}: no annotations/instances_{split or '*'}.json found")
        self.annotation_file = annotation_files[0]
        self.split = self.annotation_file.stem.removeprefix("instances_")
        try:
            # pycocotools prints progress lines; keep our output readable.
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                self.coco = COCO(str(self.annotation_file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{self.annotation_file}: not a COCO annotation file ({exc})") from exc
        self.image_dir = self.root / self.split
        self.coco_ids = sorted(self.coco.getImgIds())
        if not self.coco_ids:
            raise DatasetError(f"{self.annotation_file}: lists no images")
        super().__init__([str(i) for i in self.coco_ids])

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        info = self.coco.loadImgs(self.coco_ids[index])[0]
        image = load_image(self.image_dir / info["file_name"])
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"], iscrowd=False))
        masks = [self.coco.annToMask(a).astype(bool) for a in annotations]
        empty = np.zeros((0, *image.shape[:2]), dtype=bool)
        return image, np.stack(masks) if masks else empty


def open_dataset(path: str | os.PathLike | None, *, num_synthetic: int = 16, seed: int = 0) -> SegmentationDataset:
    """Detect the layout at `path`: COCO, SA-1B tar shards or unpacked, or a plain image folder; None -> synthetic."""
    if path is None:
        return SyntheticDataset(num_synthetic, seed)
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder. Pass a COCO root, an SA-1B folder or a folder of images")
    if (root / "annotations").is_dir():
        return CocoDataset(root)
    if any(root.glob("*.tar")):
        return SA1BShardDataset(root)
    images = list_image_files(root)
    if not images:
        raise DatasetError(
            f"{root}: the folder holds no images. Expected a COCO root (annotations/instances_*.json), "
            f"SA-1B pairs (sa_N.jpg + sa_N.json), SA-1B tar shards (sa_000000.tar ...) or image files"
        )
    if any(p.with_suffix(".json").is_file() for p in images):
        return SA1BDataset(root)
    return ImageFolderDataset(root)
