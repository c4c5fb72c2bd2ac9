from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor

from student_models import build_sam
from student_models.data import DatasetError, masks_to_boxes, open_dataset
from student_models.preprocessing import ImageError, load_image, prepare_image, to_rgb
from tests.helpers import COCO_ROOT, DEMO_IMAGES, requires_coco, synthetic_image


def _write_image(path, seed=0):
    Image.fromarray(synthetic_image(seed)[0]).save(path)


def test_synthetic_dataset_is_deterministic_and_exact():
    first, again = open_dataset(None, num_synthetic=3, seed=5), open_dataset(None, num_synthetic=3, seed=5)
    assert first.kind == "synthetic" and len(first) == 3
    a, b = first[1], again[1]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.masks.dtype == bool and a.masks.shape[1:] == a.image.shape[:2]
    assert not (a.masks.sum(0) > 1).any(), "instances must not overlap"
    assert np.array_equal(a.boxes, masks_to_boxes(a.masks))


def test_masks_to_boxes_on_a_known_mask():
    mask = np.zeros((1, 10, 12), dtype=bool)
    mask[0, 2:5, 3:9] = True
    assert masks_to_boxes(mask).tolist() == [[3, 2, 9, 5]]


def test_image_folder_and_corrupt_image_is_skipped_and_counted(tmp_path):
    for i in range(2):
        _write_image(tmp_path / f"img{i}.png", i)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    dataset = open_dataset(tmp_path)
    assert dataset.kind == "folder" and not dataset.has_masks and len(dataset) == 3
    with pytest.warns(UserWarning, match=r"skipping corrupt image \(1 so far\).*bad\.jpg"):
        samples = [dataset[i] for i in range(len(dataset))]
    assert sum(s is None for s in samples) == 1 and dataset.skipped == ["bad"]
    assert samples[1].masks is None and samples[1].image.shape == (256, 320, 3)


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"holds no images\. Expected a COCO root"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"no such folder"):
        open_dataset(tmp_path / "absent")


def _write_sa1b_pair(folder, number: int) -> np.ndarray:
    """sa_<number>.jpg + sa_<number>.json (COCO RLE masks) in `folder`; returns the masks."""
    image, masks = synthetic_image(number)
    Image.fromarray(image).save(folder / f"sa_{number}.jpg")
    annotations = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    image_info = {"file_name": f"sa_{number}.jpg"}
    (folder / f"sa_{number}.json").write_text(json.dumps({"image": image_info, "annotations": annotations}))
    return masks


def test_sa1b_layout(tmp_path):
    masks = _write_sa1b_pair(tmp_path, 1)
    dataset = open_dataset(tmp_path)
    assert dataset.kind == "sa1b"
    assert np.array_equal(dataset[0].masks, masks)


def test_sa1b_tar_shards_read_equal_to_the_unpacked_folder(tmp_path):
    """SA-1B as released (sa_000000.tar ..., members named ./sa_N.jpg) gives the unpacked folder's samples, in
    its order, without unpacking (the shard folder holds only the shards afterwards)."""
    unpacked, shards = tmp_path / "unpacked", tmp_path / "shards"
    unpacked.mkdir()
    shards.mkdir()
    for number in (1, 10, 2):
        _write_sa1b_pair(unpacked, number)
    for shard, numbers in (("sa_000000.tar", (10, 2)), ("sa_000001.tar", (1,))):
        with tarfile.open(shards / shard, "w") as tar:
            for number in numbers:
                for suffix in (".jpg", ".json"):
                    tar.add(unpacked / f"sa_{number}{suffix}", arcname=f"./sa_{number}{suffix}")
    folder, packed = open_dataset(unpacked), open_dataset(shards)
    assert (folder.kind, packed.kind) == ("sa1b", "sa1b_tar")
    assert packed.image_ids == folder.image_ids == ["sa_1", "sa_10", "sa_2"]
    for index in range(len(folder)):
        want, got = folder[index], packed[index]
        assert got.image_id == want.image_id and np.array_equal(got.image, want.image)
        assert np.array_equal(got.masks, want.masks) and np.array_equal(got.boxes, want.boxes)
    assert sorted(p.name for p in shards.iterdir()) == ["sa_000000.tar", "sa_000001.tar"]


def test_sa1b_shard_errors_name_the_shard(tmp_path):
    (tmp_path / "sa_000000.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DatasetError, match=r"sa_000000\.tar: not a readable uncompressed tar shard"):
        open_dataset(tmp_path)
    (tmp_path / "sa_000000.tar").unlink()
    _write_sa1b_pair(tmp_path, 1)
    with tarfile.open(tmp_path / "sa_000000.tar", "w") as tar:
        tar.add(tmp_path / "sa_1.jpg", arcname="sa_1.jpg")
        tar.add(tmp_path / "sa_1.json", arcname="sa_1.json")
    for name in ("sa_1.jpg", "sa_1.json"):
        (tmp_path / name).unlink()
    dataset = open_dataset(tmp_path)
    shard = tmp_path / "sa_000000.tar"
    shard.write_bytes(shard.read_bytes()[:1024])  # cut short after it was indexed: the image is skipped, named
    with pytest.warns(UserWarning, match=r"sa_000000\.tar: cut short, sa_1\.jpg ends \d+ bytes early"):
        assert dataset[0] is None
    assert dataset.skipped == ["sa_1"]


def test_unparsable_coco_annotations_name_the_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text("{ not json")
    with pytest.raises(DatasetError, match=r"instances_val\.json: not a COCO annotation file"):
        open_dataset(tmp_path)


@requires_coco
def test_coco_subset_loads_with_instance_masks():
    dataset = open_dataset(COCO_ROOT)
    assert dataset.kind == "coco" and len(dataset) == 80
    sample = dataset[0]
    assert sample.masks.shape[1:] == sample.image.shape[:2] and len(sample.boxes) == len(sample.masks)


def test_prepare_image_equals_sam_predictor_preprocessing():
    image = synthetic_image(4, size=(300, 200))[0]
    sam = build_sam("sam_vit_test")
    predictor = SamPredictor(sam)
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    prepared = prepare_image(image)
    assert torch.equal(prepared.tensor, sam.preprocess(resized))
    assert prepared.original_size == (300, 200) and prepared.input_size == (1024, 683)


def test_to_rgb_converts_gray_and_rgba_and_rejects_the_rest():
    assert to_rgb(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    rgba = np.arange(4 * 5 * 4, dtype=np.uint8).reshape(4, 5, 4)
    assert np.array_equal(to_rgb(rgba), rgba[:, :, :3])
    with pytest.raises(ImageError, match="empty"):
        to_rgb(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        to_rgb(np.zeros((4, 5, 3), np.float32))


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.txt: not a readable image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match=r"missing\.png: no such image file"):
        load_image(tmp_path / "missing.png")


@pytest.mark.skipif(not DEMO_IMAGES.is_dir(), reason="demo photos not present")
def test_demo_photo_loads_as_rgb():
    assert load_image(DEMO_IMAGES / "dog.jpg").shape == (534, 800, 3)
