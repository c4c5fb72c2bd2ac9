from __future__ import annotations

import pytest
import torch

import student_models.checkpoints as checkpoints
from student_models import CheckpointError, build_sam, load_sam, read_checkpoint, save_checkpoint
from tests.helpers import tiny_model


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


def test_corrupt_file_says_download_again(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"cannot read .*broken\.pth: it is not a PyTorch checkpoint.*Download it again"
    ):
        build_sam("tinyvit_test", checkpoint=path)


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


def test_official_file_with_wrong_hash_is_refused(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"does not start with 01ec64.*corrupt or truncated.*download it again"):
        build_sam("vit_b", checkpoint=path)


def test_load_sam_rebuilds_from_the_checkpoint_alone(tmp_path):
    ours = save_checkpoint(tiny_model("tinyvit_test", seed=2), "tinyvit_test", tmp_path / "ours.pth")
    torch.save(tiny_model("sam_vit_test").state_dict(), tmp_path / "foreign.pth")
    assert load_sam(ours).image_encoder.__class__.__name__ == "TinyViT"
    assert load_sam(tmp_path / "foreign.pth").image_encoder.__class__.__name__ == "ImageEncoderViT"
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth names no model and matches no registered one"):
        load_sam(tmp_path / "odd.pth")
