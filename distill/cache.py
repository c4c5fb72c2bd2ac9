"""The teacher-embedding cache: each image's 256x64x64 teacher embedding, once, on disk, in fp16.

Layout (one folder per fingerprint, so caches of different teachers never mix)::

    <cache_dir>/<fingerprint[:16]>/
        cache.json                 the fingerprint fields (teacher, checkpoint identity, preprocessing, data)
        teacher_heads.pt           the teacher's prompt encoder + mask decoder state dict
        embeddings/<xx>/<id>.npy   one fp16 256x64x64 array per image (xx: 2 hex digits of the id's hash)
        embeddings/<xx>/<id>.corrupt   marker for an image that could not be read (skipped, counted)

One ``.npy`` per image is streamable (opened with ``mmap_mode="r"``, nothing is loaded before it is
used), resumable (an image whose file exists is skipped; files are written to a temporary name and
renamed, so a killed run leaves no half-written array) and needs no coordination between ranks:
under torchrun, rank r embeds images r, r+world, r+2*world, ...

Training needs the teacher's prompt encoder and mask decoder but not its image encoder. The cache
step stores those two parts in ``teacher_heads.pt``; training builds them from there (SAM around an
empty encoder) and never builds the teacher's image encoder when the cache is complete. This also
keeps random-weight teachers (tests, benchmarks) consistent between the cache step and training.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn
from tqdm import tqdm

from student_models import EMBED_DIM, EMBED_SIDE, IMAGE_SIZE, assemble_sam, atomic_torch_save, build_sam
from student_models.checkpoints import resolve_checkpoint, sha256_file
from student_models.data import SegmentationDataset, SyntheticDataset
from student_models.preprocessing import PIXEL_MEAN, PIXEL_STD, prepare_image

EMBEDDING_SHAPE = (EMBED_DIM, EMBED_SIDE, EMBED_SIDE)
PREPROCESSING = f"resize-longest-{IMAGE_SIZE}/mean{list(PIXEL_MEAN)}/std{list(PIXEL_STD)}/pad-bottom-right"
HEAD_PREFIXES = ("prompt_encoder.", "mask_decoder.")


class CacheError(RuntimeError):
    """A cache that does not belong to this teacher, preprocessing or dataset, or is incomplete."""


def checkpoint_identity(checkpoint: str | None, seed: int) -> str:
    """What identifies the teacher's weights: the file's sha256, or the seed of random weights."""
    if checkpoint is None:
        return f"random-init(seed={seed})"
    return f"sha256:{sha256_file(resolve_checkpoint(checkpoint))}"


def data_identity(dataset: SegmentationDataset) -> str:
    """What identifies the images behind the ids: the dataset's kind and root (or generator settings)."""
    if isinstance(dataset, SyntheticDataset):
        return f"synthetic(seed={dataset.seed}, size={list(dataset.size)})"
    root = getattr(dataset, "root", None) or Path(dataset.paths[0]).parent
    return f"{dataset.kind}:{Path(root).resolve()}"


def fingerprint_fields(teacher: str, checkpoint: str | None, seed: int, dataset: SegmentationDataset) -> dict[str, Any]:
    return {
        "teacher": teacher,
        "weights": checkpoint_identity(checkpoint, seed),
        "preprocessing": PREPROCESSING,
        "data": data_identity(dataset),
        "dtype": "float16",
        "shape": list(EMBEDDING_SHAPE),
    }


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _safe_name(image_id: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)[:80]
    return f"{keep}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


@dataclass
class EmbeddingCache:
    """Read and write access to one fingerprinted cache folder."""

    root: Path
    fields: dict[str, Any]

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, fields: dict[str, Any], create: bool = True) -> EmbeddingCache:
        """The cache for `fields` under `cache_dir`; an existing folder must carry the same fingerprint."""
        digest = _digest(fields)
        root = Path(cache_dir) / digest[:16]
        meta_path = root / "cache.json"
        if meta_path.is_file():
            stored = json.loads(meta_path.read_text())
            if stored.get("fingerprint") != digest:
                old = stored.get("fields", {})
                diff = [f"{k}: cache has {old.get(k)!r}, run uses {v!r}" for k, v in fields.items() if old.get(k) != v]
                raise CacheError(
                    f"{root} was written for another teacher/preprocessing/data ({'; '.join(diff)}). "
                    f"Delete it or point cache_dir elsewhere."
                )
        elif create:
            root.mkdir(parents=True, exist_ok=True)
            tmp = meta_path.with_name(f".cache.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"fingerprint": digest, "fields": fields}, indent=2))
            os.replace(tmp, meta_path)
        else:
            raise CacheError(f"no teacher-embedding cache for this teacher and data at {root}")
        return cls(root, fields)

    def verify(self) -> None:
        """Re-read cache.json and check it matches this run (a clear error if someone swapped it)."""
        stored = json.loads((self.root / "cache.json").read_text())
        if stored.get("fingerprint") != _digest(self.fields):
            raise CacheError(f"{self.root}/cache.json does not match this teacher, preprocessing and data")

    def _path(self, image_id: str, suffix: str) -> Path:
        name = _safe_name(image_id)
        return self.root / "embeddings" / hashlib.sha1(image_id.encode()).hexdigest()[:2] / f"{name}{suffix}"

    def has(self, image_id: str) -> bool:
        return self._path(image_id, ".npy").is_file()

    def is_corrupt(self, image_id: str) -> bool:
        return self._path(image_id, ".corrupt").is_file()

    def done(self, image_id: str) -> bool:
        return self.has(image_id) or self.is_corrupt(image_id)

    def write(self, image_id: str, embedding: torch.Tensor) -> None:
        """Store a 256x64x64 embedding as fp16 (atomically: temporary file, then rename)."""
        if tuple(embedding.shape) != EMBEDDING_SHAPE:
            shape = tuple(embedding.shape)
            raise CacheError(f"teacher embedding for {image_id} has shape {shape}, expected {EMBEDDING_SHAPE}")
        path = self._path(image_id, ".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, embedding.detach().to("cpu", torch.float16).numpy())
        os.replace(tmp, path)

    def mark_corrupt(self, image_id: str) -> None:
        path = self._path(image_id, ".corrupt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def read(self, image_id: str) -> torch.Tensor:
        """The 256x64x64 embedding as float32 (the file is memory-mapped, not read whole in advance)."""
        path = self._path(image_id, ".npy")
        if not path.is_file():
            raise CacheError(f"no cached teacher embedding for image {image_id!r} in {self.root}")
        array = np.load(path, mmap_mode="r")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))

    @property
    def heads_path(self) -> Path:
        return self.root / "teacher_heads.pt"

    def save_heads(self, teacher: Sam) -> None:
        state = {k: v for k, v in teacher.state_dict().items() if k.startswith(HEAD_PREFIXES)}
        atomic_torch_save(state, self.heads_path)

    def load_heads(self) -> Sam:
        """The teacher's prompt encoder and mask decoder (inside a SAM with an empty image encoder), frozen."""
        if not self.heads_path.is_file():
            raise CacheError(f"{self.heads_path} is missing: run the cache step again")
        heads = assemble_sam(nn.Identity())
        heads.load_state_dict(torch.load(self.heads_path, map_location="cpu", weights_only=True), strict=True)
        return heads.eval().requires_grad_(False)


def build_teacher(name: str, checkpoint: str | None, seed: int) -> Sam:
    """The full teacher, frozen; random weights are made from `seed` so every rank builds the same ones."""
    torch.manual_seed(seed)
    return build_sam(name, checkpoint=checkpoint).requires_grad_(False)


@torch.no_grad()
def fill_cache(
    cache: EmbeddingCache,
    dataset: SegmentationDataset,
    teacher_name: str,
    teacher_checkpoint: str | None,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Embed this rank's share of the images that are not cached yet; returns counts and timings.

    `encode_seconds` is the time spent in the teacher's image encoder alone (the benchmark figure);
    `build_seconds` the time to build/load the teacher.
    The teacher is built only if some image is missing (or its heads are). Embeddings are computed
    in float32 on CPU and under `amp_dtype` autocast on CUDA, and stored as fp16.
    """
    mine = list(range(rank, len(dataset), world_size))
    todo = [i for i in mine if not cache.done(dataset.image_ids[i])]
    counts = {"cached": len(mine) - len(todo), "embedded": 0, "corrupt": 0, "build_seconds": 0.0, "encode_seconds": 0.0}
    if not todo and cache.heads_path.is_file():
        return counts
    start = time.perf_counter()
    teacher = build_teacher(teacher_name, teacher_checkpoint, seed).to(device)
    counts["build_seconds"] = time.perf_counter() - start
    if rank == 0:
        cache.save_heads(teacher)
    for index in tqdm(todo, desc=f"teacher embeddings [{teacher_name}]", disable=rank != 0 or not todo):
        sample = dataset[index]
        if sample is None:
            cache.mark_corrupt(dataset.image_ids[index])
            counts["corrupt"] += 1
            continue
        image = prepare_image(sample.image).tensor.to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            embedding = teacher.image_encoder(image)[0].float().cpu()  # .cpu() waits for the GPU: honest timing
        counts["encode_seconds"] += time.perf_counter() - start
        cache.write(sample.image_id, embedding)
        counts["embedded"] += 1
    return counts
