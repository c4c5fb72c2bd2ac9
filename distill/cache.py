"""The teacher-embedding cache: each image's teacher embedding levels, once, on disk, in fp16.

A SAM teacher's one 256x64x64 embedding (2.1 MB an image), or a SAM 2 teacher's three decoder inputs packed into
one vector (8.4 MB an image; `distill.families`): 1% of SA-1B (about 110,000 images) takes about 230 GB for SAM
and 920 GB for SAM 2.

Layout (one folder per fingerprint, so caches of different teachers never mix)::

    <cache_dir>/<fingerprint[:16]>/
        cache.json                 the fingerprint fields (teacher, checkpoint identity, preprocessing, data,
                                   compute device type and precision)
        teacher_heads.pt           the teacher's prompt encoder + mask decoder state dict (SAM 2: + no_mem_embed)
        embeddings/<xx>/<id>.npy   one fp16 array per image, of the fingerprint's shape (xx: 2 hex digits of the
                                   id's hash)
        embeddings/<xx>/<id>.corrupt   marker for an image that could not be read (skipped, counted, retried)
        index/rank<r>.jsonl        one line per written array: image id, file, size in bytes, CRC-32

One ``.npy`` per image is streamable (opened with ``mmap_mode="r"``, nothing is loaded before it is
used), resumable and needs no coordination between ranks: under torchrun, rank r embeds images
r, r+world, r+2*world, ... and appends to its own index file.

What is reused is checked first: each run's cache step compares every array it would reuse with
its index record (size, then the CRC-32 of the whole file) and recomputes, with a warning naming the
file, any that is truncated or altered (a copy that ran out of disk, a bad sector). Arrays are
written to a temporary name, flushed and renamed, then recorded; an array without a record (a kill
between the rename and the record, or a cache written before the index existed) is adopted when its
size and header are right. Images marked ``.corrupt`` are tried again on every run, so a restored
file is used again. Temporary files left by a killed writer are removed when the cache is opened.

Training needs the teacher's prompt encoder and mask decoder but not its image encoder. The cache
step stores those two parts in ``teacher_heads.pt``; training builds them from there (the family's model
around an empty encoder, `DistillFamily.assemble_heads`) and never builds the teacher's image encoder when
the cache is complete. This also keeps random-weight teachers (tests, benchmarks) consistent between the
cache step and training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distill.families import DistillFamily, distill_family
from student_models import build_sam
from student_models.checkpoints import atomic_torch_save, resolve_checkpoint, sha256_file
from student_models.data import SegmentationDataset, SyntheticDataset
from student_models.io import atomic_write, atomic_write_text, remove_stale_temp_files

NPY_HEADER_BYTES = 128  # numpy's format 1.0 header for a small fp16 array (padded to 64-byte alignment)


def embedding_file_bytes(shape: tuple[int, ...]) -> int:
    """The size of a cache file holding one fp16 array of `shape`."""
    return NPY_HEADER_BYTES + 2 * math.prod(shape)


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


def compute_identity(device: torch.device | str, amp_dtype: torch.dtype | None) -> str:
    """How the teacher computes embeddings: device type and precision ("cpu/float32", "cuda/bfloat16").

    Part of the fingerprint because bf16 embeddings differ from fp32 ones by far more than fp16 storage
    rounding, so a cache filled on a GPU under autocast is not the fp32 CPU cache, nor the other way round.
    """
    return f"{torch.device(device).type}/{str(amp_dtype or torch.float32).removeprefix('torch.')}"


def fingerprint_fields(
    teacher: str,
    checkpoint: str | None,
    seed: int,
    dataset: SegmentationDataset,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """What a cache's embeddings depend on; `device` and `amp_dtype` are those `fill_cache` will be given.

    A SAM 2 teacher's fields also name its levels and their shapes (a SAM teacher's have no "levels", so that
    caches written before SAM 2 was supported keep their fingerprint)."""
    family = distill_family(teacher)
    fields = {
        "teacher": teacher,
        "weights": checkpoint_identity(checkpoint, seed),
        "preprocessing": family.preprocessing,
        "data": data_identity(dataset),
        "compute": compute_identity(device, amp_dtype),
        "dtype": "float16",
        "shape": list(family.levels.stored_shape),
    }
    if len(family.levels.names) > 1:
        levels = zip(family.levels.names, family.levels.shapes, strict=True)
        fields["levels"] = {name: list(shape) for name, shape in levels}
    return fields


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cache_root(cache_dir: str | os.PathLike, fields: dict[str, Any]) -> Path:
    """The folder of the cache for `fields` (teacher, weights, preprocessing, data) under `cache_dir`."""
    return Path(cache_dir) / _digest(fields)[:16]


def _safe_name(image_id: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)[:80]
    return f"{keep}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def _crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


@dataclass
class EmbeddingCache:
    """Read and write access to one fingerprinted cache folder."""

    root: Path
    fields: dict[str, Any]
    index: dict[str, dict[str, Any]] = field(default_factory=dict)  # image id -> its latest index record

    @property
    def family(self) -> DistillFamily:
        return distill_family(self.fields["teacher"])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one image's array (`EmbeddingLevels.stored_shape`)."""
        return tuple(self.fields["shape"])

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, fields: dict[str, Any], create: bool = True) -> EmbeddingCache:
        """The cache for `fields` under `cache_dir`; an existing folder must carry the same fingerprint.

        With `create` (rank 0 only, before the other ranks start writing) the folder is made if needed and
        temporary files left by killed writers are removed.
        """
        digest = _digest(fields)
        root = cache_root(cache_dir, fields)
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
            atomic_write_text(meta_path, json.dumps({"fingerprint": digest, "fields": fields}, indent=2))
        else:
            raise CacheError(f"no teacher-embedding cache for this teacher and data at {root}")
        if create:
            for pattern in (".*.tmp*", "embeddings/*/.*.tmp*"):
                remove_stale_temp_files(root, pattern)
        cache = cls(root, fields)
        cache.reload_index()
        return cache

    def verify(self) -> None:
        """Re-read cache.json and check it matches this run (a clear error if someone swapped it)."""
        stored = json.loads((self.root / "cache.json").read_text())
        if stored.get("fingerprint") != _digest(self.fields):
            raise CacheError(f"{self.root}/cache.json does not match this teacher, preprocessing and data")

    def reload_index(self) -> None:
        """Read every rank's index file (the latest record of an image wins; a line cut by a kill is ignored)."""
        self.index = {}
        for index_file in sorted((self.root / "index").glob("*.jsonl")):
            for line in index_file.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.index[record["id"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def _record(self, image_id: str, path: Path, size: int, crc: str, rank: int) -> None:
        record = {"id": image_id, "file": str(path.relative_to(self.root)), "bytes": size, "crc32": crc}
        index_file = self.root / "index" / f"rank{rank}.jsonl"
        index_file.parent.mkdir(exist_ok=True)
        with open(index_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.index[image_id] = record

    def path(self, image_id: str, suffix: str = ".npy") -> Path:
        """Where the embedding (or, with suffix ".corrupt", the unreadable-image marker) of an image lives."""
        name = _safe_name(image_id)
        return self.root / "embeddings" / hashlib.sha1(image_id.encode()).hexdigest()[:2] / f"{name}{suffix}"

    def has(self, image_id: str) -> bool:
        """A recorded embedding whose file is there at its recorded size (`check` also compares the checksum)."""
        record, path = self.index.get(image_id), self.path(image_id)
        return record is not None and path.is_file() and path.stat().st_size == record["bytes"]

    def check(self, image_id: str, rank: int = 0) -> str | None:
        """What is wrong with the stored embedding of `image_id` (None: present and intact).

        The file must have the size and CRC-32 its index record gives. A file without a record is adopted
        (and recorded) if it is exactly one fp16 array of the cache's shape with a readable header.
        """
        path = self.path(image_id)
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        record = self.index.get(image_id)
        if record is None:
            expected = embedding_file_bytes(self.shape)
            if size != expected:
                return f"{size} bytes, a complete array has {expected}, and the index has no record of it"
            try:
                with open(path, "rb") as f:
                    np.lib.format.read_magic(f)
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            except (ValueError, OSError) as exc:
                return f"unreadable header ({exc})"
            if shape != self.shape or fortran or dtype != np.float16:
                return f"holds a {dtype} {shape} array, expected float16 {self.shape}"
            self._record(image_id, path, size, _crc32_file(path), rank)
            return None
        if size != record["bytes"]:
            return f"{size} bytes, the index records {record['bytes']} (truncated or overwritten)"
        if _crc32_file(path) != record["crc32"]:
            return f"its CRC-32 differs from the index record {record['crc32']} (the bytes changed after writing)"
        return None

    def is_corrupt(self, image_id: str) -> bool:
        return self.path(image_id, ".corrupt").is_file()

    def corrupt_reason(self, image_id: str) -> str:
        """Why the image was marked unreadable (the marker's text), or "" if it is not marked."""
        marker = self.path(image_id, ".corrupt")
        return marker.read_text().strip() if marker.is_file() else ""

    def write(self, image_id: str, embedding: torch.Tensor, rank: int = 0) -> None:
        """Store one image's array (`shape`) as fp16 (atomically: temporary file, fsync, rename), then record it."""
        if tuple(embedding.shape) != self.shape:
            shape = tuple(embedding.shape)
            raise CacheError(f"teacher embedding for {image_id} has shape {shape}, expected {self.shape}")
        buffer = io.BytesIO()
        np.save(buffer, embedding.detach().to("cpu", torch.float16).numpy())
        data = buffer.getvalue()
        path = self.path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(data)
        self._record(image_id, path, len(data), f"{zlib.crc32(data):08x}", rank)
        self.path(image_id, ".corrupt").unlink(missing_ok=True)  # a restored image is usable again

    def mark_corrupt(self, image_id: str, reason: str = "") -> None:
        path = self.path(image_id, ".corrupt")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, reason + "\n")

    def read(self, image_id: str) -> torch.Tensor:
        """The image's array as float32 (the file is memory-mapped, not read whole in advance)."""
        path = self.path(image_id)
        if not path.is_file():
            raise CacheError(f"no cached teacher embedding for image {image_id!r} in {self.root}")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CacheError(
                f"{path}: the cached teacher embedding of image {image_id!r} is unreadable ({exc}); "
                f"run the same command again: the cache step recomputes broken files"
            ) from exc
        return torch.from_numpy(np.asarray(array, dtype=np.float32))

    @property
    def heads_path(self) -> Path:
        return self.root / "teacher_heads.pt"

    def save_heads(self, teacher: nn.Module) -> None:
        prefixes = self.family.head_prefixes
        state = {k: v for k, v in teacher.state_dict().items() if k.startswith(prefixes)}
        atomic_torch_save(state, self.heads_path)

    def load_heads(self) -> nn.Module:
        """The teacher's prompt encoder and mask decoder (in the family's model with an empty image encoder), frozen.

        Every weight under the family's `head_prefixes` must be in the file; a SAM 2 model's memory modules, which
        the image pipeline does not use, keep their initial values."""
        if not self.heads_path.is_file():
            raise CacheError(f"{self.heads_path} is missing: run the cache step again")
        heads = self.family.assemble_heads()
        try:
            state = torch.load(self.heads_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, garbage bytes: torch raises many kinds
            raise CacheError(f"{self.heads_path} is unreadable ({exc}); delete it and run again") from exc
        prefixes = self.family.head_prefixes
        missing, unexpected = heads.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(prefixes)]
        if missing or unexpected:
            raise CacheError(
                f"{self.heads_path} does not hold the heads of a {self.fields['teacher']} teacher (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}); delete it and run again"
            )
        return heads.eval().requires_grad_(False)


def build_teacher(name: str, checkpoint: str | None, seed: int) -> nn.Module:
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
    """Embed this rank's share of the images not cached yet (or cached broken); returns counts and timings.

    Counts: `cached` reused after the size and CRC-32 check, `embedded` computed now, `repaired` of those
    the ones whose cached file was broken (a warning names each), `corrupt` images that could not be read
    (marked, skipped, retried next run). `encode_seconds` is the time spent in the teacher's image encoder
    alone (the benchmark figure); `build_seconds` the time to build/load the teacher.
    The teacher is built only if some image is missing (or its heads are). Embeddings are computed
    under `amp_dtype` autocast (None: float32), as the cache's fingerprint says, and stored as fp16.
    """
    compute = compute_identity(device, amp_dtype)
    if cache.fields.get("compute") != compute:  # would mix precisions in one fingerprinted folder
        raise CacheError(f"{cache.root} holds embeddings computed as {cache.fields.get('compute')}, not {compute}")
    mine = list(range(rank, len(dataset), world_size))
    todo = []
    with tqdm(mine, desc="checking cached teacher embeddings", disable=rank != 0, delay=2) as bar:
        for index in bar:
            image_id = dataset.image_ids[index]
            problem = cache.check(image_id, rank)
            if problem is None:
                continue
            if problem != "missing":
                warnings.warn(
                    f"teacher cache: {cache.path(image_id)} is broken ({problem}); recomputing it", stacklevel=2
                )
            todo.append(index)
    counts = {"cached": len(mine) - len(todo), "embedded": 0, "repaired": 0, "corrupt": 0}
    counts.update(build_seconds=0.0, encode_seconds=0.0)
    if not todo and cache.heads_path.is_file():
        return counts
    start = time.perf_counter()
    teacher = build_teacher(teacher_name, teacher_checkpoint, seed).to(device)
    family = cache.family
    counts["build_seconds"] = time.perf_counter() - start
    if rank == 0:
        cache.save_heads(teacher)
    with tqdm(todo, desc=f"teacher embeddings [{teacher_name}]", disable=rank != 0 or not todo) as bar:
        for index in bar:
            image_id = dataset.image_ids[index]
            sample = dataset[index]
            if sample is None:
                reason = getattr(dataset, "skip_reasons", {}).get(image_id, "unreadable")
                cache.mark_corrupt(image_id, reason)
                counts["corrupt"] += 1
                continue
            image = family.prepare(sample.image)[0][None].to(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                levels = family.encode(teacher, image)
            # .cpu() waits for the GPU: honest timing
            embedding = family.levels.pack([level[0].float() for level in levels]).cpu()
            counts["encode_seconds"] += time.perf_counter() - start
            counts["repaired"] += cache.path(image_id).is_file()
            cache.write(sample.image_id, embedding, rank)
            counts["embedded"] += 1
    return counts
