"""The teacher-embedding cache: fp16 storage, memory-mapped reads, resume, fingerprint checks, teacher heads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill.cache import CacheError, EmbeddingCache, fill_cache, fingerprint_fields
from student_models.data import ImageFolderDataset, SyntheticDataset
from student_models.preprocessing import prepare_image
from tests.helpers import tiny_model

SAM_FILE_BYTES = 2_097_280  # a SAM teacher's cache file: the 128-byte .npy header + 256x64x64 fp16


def test_write_read_resume_and_fingerprint(tmp_path):
    dataset = SyntheticDataset(2, seed=0)
    fields = fingerprint_fields("sam_vit_test", None, 0, dataset)
    cache = EmbeddingCache.open(tmp_path, fields)
    embedding = torch.randn(256, 64, 64)
    cache.write("img/1", embedding)
    assert cache.has("img/1") and not cache.has("img/2")
    stored = np.load(next(cache.root.glob("embeddings/*/*.npy")), mmap_mode="r")
    assert stored.dtype == np.float16 and isinstance(stored, np.memmap)
    assert torch.allclose(cache.read("img/1"), embedding.half().float())
    with pytest.raises(CacheError, match="expected \\(256, 64, 64\\)"):
        cache.write("bad", torch.zeros(128, 64, 64))
    with pytest.raises(CacheError, match="no cached teacher embedding for image 'img/2'"):
        cache.read("img/2")
    # Another teacher gets another folder; a folder whose cache.json disagrees is refused by name.
    other = EmbeddingCache.open(tmp_path, fingerprint_fields("sam_vit_test", None, 1, dataset))
    assert other.root != cache.root and not other.has("img/1")
    (other.root / "cache.json").write_text((cache.root / "cache.json").read_text())
    message = r"weights: cache has 'random-init\(seed=0\)', run uses 'random-init\(seed=1\)'"
    with pytest.raises(CacheError, match=message):
        EmbeddingCache.open(tmp_path, fingerprint_fields("sam_vit_test", None, 1, dataset))
    with pytest.raises(CacheError, match="no teacher-embedding cache"):
        EmbeddingCache.open(tmp_path / "empty", fields, create=False)


def test_fill_cache_embeds_once_counts_corrupt_and_stores_heads(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    from tests.helpers import synthetic_image

    Image.fromarray(synthetic_image(0, size=(64, 80))[0]).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(folder)
    cache = EmbeddingCache.open(tmp_path / "cache", fingerprint_fields("sam_vit_test", None, 0, dataset))
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        counts = fill_cache(cache, dataset, "sam_vit_test", None, 0, torch.device("cpu"))
    assert {k: counts[k] for k in ("cached", "embedded", "corrupt")} == {"cached": 0, "embedded": 1, "corrupt": 1}
    assert counts["encode_seconds"] > 0
    assert cache.is_corrupt("b") and cache.has("a")
    teacher = tiny_model("sam_vit_test", seed=0)
    with torch.no_grad():
        expected = teacher.image_encoder(prepare_image(dataset[0].image).tensor)[0]
    assert torch.allclose(cache.read("a"), expected, atol=2e-3, rtol=2e-3)  # fp16 storage
    heads = cache.load_heads()
    assert torch.equal(heads.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight)
    assert not any(p.requires_grad for p in heads.parameters())
    assert "b.jpg: not a readable image" in cache.corrupt_reason("b")  # the marker says why
    # An unreadable image is tried again on the next pass: once restored, it is embedded and unmarked.
    Image.fromarray(synthetic_image(1, size=(64, 80))[0]).save(folder / "b.jpg")
    counts = fill_cache(cache, dataset, "sam_vit_test", None, 0, torch.device("cpu"))
    assert {k: counts[k] for k in ("cached", "embedded", "corrupt")} == {"cached": 1, "embedded": 1, "corrupt": 0}
    assert cache.has("b") and not cache.is_corrupt("b")
    # A pass that finds everything intact does not build the teacher.
    assert fill_cache(cache, dataset, "no_such_teacher", None, 0, torch.device("cpu"))["cached"] == 2


def test_a_cache_filled_under_one_precision_is_not_reused_under_another(tmp_path):
    """fp32 and bf16 teacher embeddings live in different fingerprinted folders: each precision embeds its own,
    they differ by more than fp16 storage rounding, and a cache cannot be filled in a precision it is not for."""
    dataset = SyntheticDataset(2, seed=0)
    fp32_fields = fingerprint_fields("sam_vit_test", None, 0, dataset, "cpu", None)
    bf16_fields = fingerprint_fields("sam_vit_test", None, 0, dataset, "cpu", torch.bfloat16)
    assert (fp32_fields["compute"], bf16_fields["compute"]) == ("cpu/float32", "cpu/bfloat16")
    assert fingerprint_fields("sam_vit_test", None, 0, dataset, torch.device("cuda", 1), torch.bfloat16)["compute"] == (
        "cuda/bfloat16"
    )
    fp32 = EmbeddingCache.open(tmp_path, fp32_fields)
    assert fill_cache(fp32, dataset, "sam_vit_test", None, 0, torch.device("cpu"))["embedded"] == 2
    bf16 = EmbeddingCache.open(tmp_path, bf16_fields)
    assert bf16.root != fp32.root
    counts = fill_cache(bf16, dataset, "sam_vit_test", None, 0, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert (counts["cached"], counts["embedded"]) == (0, 2)  # nothing of the fp32 cache was taken
    image_id = dataset.image_ids[0]
    assert (fp32.read(image_id) - bf16.read(image_id)).abs().max() > 1e-2  # fp16 storage rounds by ~1e-3
    with pytest.raises(CacheError, match=r"holds embeddings computed as cpu/float32, not cpu/bfloat16"):
        fill_cache(fp32, dataset, "sam_vit_test", None, 0, torch.device("cpu"), amp_dtype=torch.bfloat16)


def _two_entries(tmp_path):
    cache = EmbeddingCache.open(tmp_path, fingerprint_fields("sam_vit_test", None, 0, SyntheticDataset(2, seed=0)))
    embeddings = {name: torch.randn(256, 64, 64) for name in ("a", "b")}
    for name, embedding in embeddings.items():
        cache.write(name, embedding)
    return cache, embeddings


def test_check_compares_size_and_checksum_with_the_index(tmp_path):
    cache, _ = _two_entries(tmp_path)
    assert cache.check("a") is None and cache.check("b") is None and cache.check("c") == "missing"
    a, b = cache.path("a"), cache.path("b")
    a.write_bytes(a.read_bytes()[:1000])
    data = bytearray(b.read_bytes())
    data[500] ^= 1
    b.write_bytes(bytes(data))
    assert cache.check("a") == f"1000 bytes, the index records {SAM_FILE_BYTES} (truncated or overwritten)"
    assert cache.check("b").startswith("its CRC-32 differs from the index record")
    assert not cache.has("a") and cache.has("b")  # has() checks the size only; the cache step checks the CRC
    # Reading a broken file names it (numpy's own message names none).
    with pytest.raises(CacheError, match=rf"{a}: the cached teacher embedding of image 'a' is unreadable"):
        cache.read("a")


def test_records_survive_a_cut_line_and_unrecorded_files_are_adopted_only_when_complete(tmp_path):
    cache, embeddings = _two_entries(tmp_path)
    index_file = next((cache.root / "index").glob("*.jsonl"))
    with open(index_file, "a") as f:
        f.write('{"id": "c", "fi')  # a kill mid-append
    reopened = EmbeddingCache.open(tmp_path, cache.fields)
    assert set(reopened.index) == {"a", "b"}
    # A cache written before the index (or a kill between the rename and the record): adopted if complete.
    shutil.rmtree(cache.root / "index")
    cache.path("b").write_bytes(cache.path("b").read_bytes()[:-10])
    legacy = EmbeddingCache.open(tmp_path, cache.fields)
    assert legacy.index == {}
    assert legacy.check("a") is None and "a" in legacy.index
    assert torch.allclose(legacy.read("a"), embeddings["a"].half().float())
    problem = legacy.check("b")
    expected = f"{SAM_FILE_BYTES - 10} bytes, a complete array has {SAM_FILE_BYTES}, and the index has no"
    assert problem == f"{expected} record of it"
    assert "a" in EmbeddingCache.open(tmp_path, cache.fields).index  # the adoption was recorded


def test_open_removes_temporary_files_of_dead_writers_only(tmp_path):
    cache, _ = _two_entries(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    stale = [cache.path("a").parent / f".x.npy.tmp{dead}", cache.root / f".cache.json.tmp{dead}"]
    live = cache.path("a").parent / f".y.npy.tmp{os.getpid()}"
    for path in [*stale, live]:
        path.write_bytes(b"half")
    EmbeddingCache.open(tmp_path, cache.fields, create=False)  # other ranks never clean
    assert all(p.exists() for p in stale)
    EmbeddingCache.open(tmp_path, cache.fields)
    assert not any(p.exists() for p in stale) and live.exists()
