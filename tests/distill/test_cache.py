"""The teacher-embedding cache: fp16 storage, memory-mapped reads, resume, fingerprint checks, teacher heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.cache import CacheError, EmbeddingCache, fill_cache, fingerprint_fields
from student_models.data import ImageFolderDataset, SyntheticDataset
from student_models.preprocessing import prepare_image
from tests.helpers import tiny_model


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
    # A second pass finds everything done and does not build the teacher.
    assert fill_cache(cache, dataset, "no_such_teacher", None, 0, torch.device("cpu"))["cached"] == 2
