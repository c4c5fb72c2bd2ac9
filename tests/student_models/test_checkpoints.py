from __future__ import annotations

import ast
import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

import student_models.checkpoints as checkpoints
from student_models import CheckpointError, build_sam, hashing, load_sam
from student_models.checkpoints import (
    KNOWN_CHECKPOINTS,
    KnownCheckpoint,
    load_torch_file,
    read_checkpoint,
    save_checkpoint,
)
from tests.helpers import tiny_model

OLD_NS = 1_600_000_000 * 10**9  # a modification time well in the past, so the hash memo keeps it


def test_round_trip_of_our_checkpoint_rebuilds_by_name(tmp_path):
    sam = tiny_model("tinyvit_test", seed=3)
    path = save_checkpoint(sam, "tinyvit_test", tmp_path / "student.pth", meta={"steps": 7})
    state, header = read_checkpoint(path)
    assert header["model_name"] == "tinyvit_test" and header["meta"] == {"steps": 7}
    assert header["model_config"]["embed_dims"] == (16, 32, 48, 64)
    loaded = build_sam(header["model_name"], checkpoint=path)
    for key, value in sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert not list(tmp_path.glob(".*tmp*")), "atomic save left a temporary file behind"


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_foreign_state_dicts_load_as_mobile_sam_files_do(tmp_path, wrapper):
    sam = tiny_model("tinyvit_test", seed=1)
    state = sam.state_dict()
    torch.save(state if wrapper is None else {wrapper: state}, tmp_path / "weights.pt")
    loaded = build_sam("tinyvit_test", checkpoint=tmp_path / "weights.pt")
    assert torch.equal(loaded.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pth' is neither an existing file nor a known checkpoint"):
        build_sam("tinyvit_test", checkpoint=tmp_path / "nowhere.pth")


def test_checkpoint_of_another_architecture_lists_keys_and_names_the_match(tmp_path):
    torch.save(tiny_model("sam_vit_test").state_dict(), tmp_path / "teacher.pth")
    with pytest.raises(CheckpointError) as info:
        build_sam("tinyvit_test", checkpoint=tmp_path / "teacher.pth")
    message = str(info.value)
    assert "missing keys" in message and "image_encoder.patch_embed.seq.0.c.weight" in message
    assert "unexpected keys" in message and "image_encoder.blocks.0.attn.qkv.weight" in message
    assert "It matches the registered model 'sam_vit_test'" in message


def test_our_checkpoint_names_its_own_model(tmp_path):
    path = save_checkpoint(tiny_model("sam_vit_test"), "sam_vit_test", tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"holds a 'sam_vit_test' model; build it with --model sam_vit_test"):
        build_sam("tinyvit_test", checkpoint=path)


def test_pickled_module_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*refused for safety"):
        build_sam("tinyvit_test", checkpoint=tmp_path / "module.pth")


def test_tinysam_w8a8_is_refused_with_the_alternative():
    with pytest.raises(
        CheckpointError, match=r"tinysam_w8a8\.pth is not supported: it is a pickled Python module.*tinysam_42\.3\.pth"
    ):
        build_sam("tinyvit_5m", checkpoint="tinysam_w8a8")


def test_known_name_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "cache_dir", lambda: tmp_path)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as info:
        build_sam("vit_b", checkpoint="sam_vit_b_01ec64")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert str(tmp_path / "sam_vit_b_01ec64.pth") in message and "--checkpoint /path/to/" in message


def test_known_checkpoint_for_another_model_is_refused():
    with pytest.raises(
        CheckpointError, match=r"mobile_sam\.pt is a tinyvit_5m checkpoint; build 'tinyvit_5m', not 'vit_b'"
    ):
        build_sam("vit_b", checkpoint="mobile_sam")


def test_load_sam_rebuilds_from_the_checkpoint_alone(tmp_path):
    ours = save_checkpoint(tiny_model("tinyvit_test", seed=2), "tinyvit_test", tmp_path / "ours.pth")
    torch.save(tiny_model("sam_vit_test").state_dict(), tmp_path / "foreign.pth")
    assert load_sam(ours).image_encoder.__class__.__name__ == "TinyViT"
    assert load_sam(tmp_path / "foreign.pth").image_encoder.__class__.__name__ == "ImageEncoderViT"
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth names no model and matches no registered one"):
        load_sam(tmp_path / "odd.pth")


# --- known checkpoints: published size and SHA-256 ------------------------------------------------


def test_sam_table_holds_the_published_sha256_and_sizes():
    # The values of ../shared/docs/SPEC.md section 1, spelled out here independently of the table.
    published = {
        "sam_vit_h_4b8939": ("a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
        "sam_vit_l_0b3195": ("3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
        "sam_vit_b_01ec64": ("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
        "mobile_sam": ("6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40_728_226),
    }
    for name, (sha256, size) in published.items():
        assert (KNOWN_CHECKPOINTS[name].sha256, KNOWN_CHECKPOINTS[name].size) == (sha256, size), name
        assert KNOWN_CHECKPOINTS[name].filename.startswith(name)
    # SAM's file-name suffix is the start of the MD5, not of the SHA-256: it must not be mistaken for it.
    for name in ("sam_vit_h_4b8939", "sam_vit_l_0b3195", "sam_vit_b_01ec64"):
        assert not KNOWN_CHECKPOINTS[name].sha256.startswith(name.rsplit("_", 1)[1])
    assert KNOWN_CHECKPOINTS["tinysam_42.3"].sha256 is None  # TinySAM publishes no hash


@pytest.fixture
def known_tiny(tmp_path, monkeypatch):
    """A tiny checkpoint registered as a known file with its own size and SHA-256."""
    path = tmp_path / "tiny_official.pth"
    torch.save(tiny_model("tinyvit_test", seed=4).state_dict(), path)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    data = path.read_bytes()
    known = KnownCheckpoint(
        "tinyvit_test", path.name, "https://example.org/tiny_official.pth", hashlib.sha256(data).hexdigest(), len(data)
    )
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "tiny_official", known)
    return path, known


def test_a_file_with_its_published_hash_loads_and_is_hashed_once(known_tiny, hash_calls):
    path, _ = known_tiny
    first = build_sam("tinyvit_test", checkpoint=path)
    second = build_sam("tinyvit_test", checkpoint=path)
    assert torch.equal(first.mask_decoder.iou_token.weight, second.mask_decoder.iou_token.weight)
    assert len(hash_calls) == 1, "the second load hashed the file again"


def test_a_one_byte_change_fails_naming_both_hashes(known_tiny, hash_calls):
    path, known = known_tiny
    build_sam("tinyvit_test", checkpoint=path)  # passes, and its hash is remembered
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # torch.load would accept this file: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        build_sam("tinyvit_test", checkpoint=path)
    message = str(info.value)
    assert f"{path} is not the official tiny_official.pth" in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message and known.sha256 in message
    assert known.url in message and str(checkpoints.cache_dir() / "tiny_official.pth") in message
    assert len(hash_calls) == 2


def test_a_wrong_size_fails_before_hashing(tmp_path, monkeypatch):
    def no_hashing(path):
        raise AssertionError("hashed a file whose size already shows it is wrong")

    monkeypatch.setattr(hashing, "_hash_file", no_hashing)
    path = tmp_path / "sam_vit_h_4b8939.pth"  # the official name, as a cut-off download would have
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError) as info:
        build_sam("vit_h", checkpoint=path)
    message = str(info.value)
    assert f"{path} is 1,000 bytes, but the official sam_vit_h_4b8939.pth is 2,564,550,879 bytes" in message
    assert "truncated" in message and "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in message


def test_a_download_that_fails_verification_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "cache_dir", lambda: tmp_path)

    def cut_off_download(url, dst, **kwargs):
        Path(dst).write_bytes(b"\0" * 10)

    monkeypatch.setattr(torch.hub, "download_url_to_file", cut_off_download)
    with pytest.raises(CheckpointError, match=r"download from .*sam_vit_b_01ec64\.pth was deleted.*is 10 bytes"):
        build_sam("vit_b", checkpoint="sam_vit_b_01ec64")
    assert not (tmp_path / "sam_vit_b_01ec64.pth").exists()


# --- files that are not checkpoints, or no longer whole --------------------------------------------


def test_garbage_bytes_are_not_a_pytorch_checkpoint(tmp_path):
    for name, content in [("text.pth", b"this is not a checkpoint"), ("noise.pth", random.Random(0).randbytes(5000))]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            build_sam("tinyvit_test", checkpoint=path)
        message = str(info.value)
        assert f"{path} is not a PyTorch checkpoint" in message and "corrupt file or the wrong file" in message
        assert "pickled" not in message and "safety" not in message


@pytest.mark.parametrize("keep", ["half", "all but the last 10 bytes"])
def test_a_truncated_checkpoint_is_named_truncated(tmp_path, keep):
    path = tmp_path / "last.pt"
    torch.save({"step": 3, "student": tiny_model("tinyvit_test").state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if keep == "half" else data[:-10])
    with pytest.raises(CheckpointError, match=rf"{path} is a truncated PyTorch checkpoint .*save, copy or download"):
        load_torch_file(path)


def test_a_truncated_legacy_checkpoint_and_an_empty_file(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:60])
    with pytest.raises(CheckpointError, match=rf"{legacy} is a truncated or corrupt PyTorch checkpoint"):
        load_torch_file(legacy)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty \(0 bytes\)"):
        load_torch_file(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"no checkpoint file at .*nowhere\.pt"):
        load_torch_file(tmp_path / "nowhere.pt")


def test_imports_run_one_way_registry_checkpoints_build():
    """registry <- checkpoints <- build: no module imports one above it, not even inside a function."""
    package = Path(checkpoints.__file__).parent

    def imported(module):
        tree = ast.parse((package / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }

    assert not {"student_models.checkpoints", "student_models.build"} & imported("registry")
    assert "student_models.build" not in imported("checkpoints")
