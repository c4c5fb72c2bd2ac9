"""SAM 2.1 teachers and students by name: shapes, sam2's predictor and generator, checkpoints by official name."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import student_models.checkpoints as checkpoints
from student_models import CheckpointError, build_sam, list_models, load_sam, sam2_models
from student_models.checkpoints import KNOWN_CHECKPOINTS, save_checkpoint
from student_models.cnn_student import TimmTrunk
from student_models.extras import MissingExtraError
from student_models.registry import build_architecture, get_spec
from student_models.tiny_vit import TinyViT, TinyViTTrunk
from tests.helpers import synthetic_image, tiny_model

requires_sam2 = pytest.mark.skipif(
    importlib.util.find_spec("sam2") is None,
    reason='needs the sam2 extra (SAM2_BUILD_CUDA=0 pip install -e ".[sam2]" -c constraints.txt)',
)
TEACHERS = ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"]
STUDENTS = ["repvit_m1_sam2", "tinyvit_5m_sam2"]
TINY = ["sam2_test", "sam2_test_student"]
LEVELS = [(256, 256, 256), (256, 128, 128), (256, 64, 64)]  # backbone_fpn for a 1024x1024 image


def shapes(features: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(f.shape[1:]) for f in features]


# --- names and the extra (no sam2 needed) ----------------------------------------------------------------


def test_the_sam2_models_are_registered_with_their_roles():
    assert list_models(family="sam2") == TEACHERS + STUDENTS + TINY
    assert [n for n in list_models() if "sam2" in n] == TEACHERS + STUDENTS + TINY
    assert list_models("teacher", family="sam2") == TEACHERS
    assert list_models("test", family="sam2") == TINY
    assert set(list_models(family="sam")).isdisjoint(list_models(family="sam2"))


def test_a_sam2_model_without_the_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)  # `import sam2` now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"'sam2_test' need the sam2 extra: SAM2_BUILD_CUDA=0 pip install"):
        build_sam("sam2_test")
    assert "sam2_test" in list_models()  # still listed: only building needs sam2
    for builder, kwargs in [
        (sam2_models.official_image_encoder, {"config": "sam2.1_hiera_t"}),
        (sam2_models.assemble_sam2, {"image_encoder": None}),
    ]:
        with pytest.raises(MissingExtraError, match=r"^SAM 2 models need the sam2 extra: SAM2_BUILD_CUDA=0 pip"):
            builder(**kwargs)


def test_trunks_give_four_levels_at_strides_4_to_32_without_sam2():
    image = torch.empty(1, 3, 1024, 1024, device="meta")
    with torch.device("meta"):
        repvit, tinyvit = TimmTrunk("repvit_m1"), TinyViTTrunk()
    assert repvit.channel_list == [384, 192, 96, 48]  # EdgeTAM's backbone_channel_list for RepViT-M1
    assert shapes(repvit(image)) == [(48, 256, 256), (96, 128, 128), (192, 64, 64), (384, 32, 32)]
    assert tinyvit.channel_list == [320, 160, 128, 64]
    assert shapes(tinyvit(image)) == [(64, 256, 256), (128, 128, 128), (160, 64, 64), (320, 32, 32)]


def test_a_timm_backbone_without_the_four_strides_is_refused_naming_them():
    with torch.device("meta"), pytest.raises(ValueError, match=r"'vit_tiny_patch16_224' has no feature map at stride"):
        TimmTrunk("vit_tiny_patch16_224")  # a plain ViT: every feature map at stride 16


def test_sam2_is_imported_only_inside_the_functions_that_use_it():
    import student_models.sam2_models as sam2_models

    tree = ast.parse(Path(sam2_models.__file__).read_text())
    top_level = set()
    for node in tree.body:  # module-level statements only; `if TYPE_CHECKING:` blocks are for annotations
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level.isdisjoint({"sam2", "hydra", "omegaconf"}), top_level
    assert "student_models" in top_level  # the check reads imports at all
    source = Path(sam2_models.__file__).read_text()
    assert not any(f"student_models.{module}" in source for module in ("registry", "checkpoints", "build"))


def test_tinyvit_trunk_has_the_state_dict_layout_of_mobile_sams_trunk():
    with torch.device("meta"):
        sam_encoder = TinyViT(**get_spec("tinyvit_5m").encoder_kwargs).state_dict()
        trunk = TinyViTTrunk(**get_spec("tinyvit_5m_sam2").encoder_kwargs).state_dict()
    trunk_only = {k: v.shape for k, v in sam_encoder.items() if not k.startswith(("neck.", "norm_head.", "head."))}
    assert {k: v.shape for k, v in trunk.items()} == trunk_only


def test_official_sam2_files_are_known_by_name_and_unverified():
    # The names and URLs of Meta's checkpoints/download_ckpts.sh, spelled out independently of the table.
    base = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    for size in ("tiny", "small", "base_plus", "large"):
        known = KNOWN_CHECKPOINTS[f"sam2.1_hiera_{size}"]
        assert (known.model, known.filename, known.url) == (
            f"sam2.1_hiera_{size}",
            f"sam2.1_hiera_{size}.pt",
            f"{base}sam2.1_hiera_{size}.pt",
        )
        assert get_spec(known.model).family == "sam2"
        assert known.sha256 is None and known.size is None  # Meta publishes neither


def test_a_missing_official_sam2_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "cache_dir", lambda: tmp_path)

    def offline(url, dst, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as info:
        checkpoints.read_checkpoint("sam2.1_hiera_large")
    message = str(info.value)
    assert "could not download sam2.1_hiera_large.pt from " in message
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt" in message
    assert f"put it at {tmp_path / 'sam2.1_hiera_large.pt'}" in message and "--checkpoint" in message


# --- models (sam2 needed) --------------------------------------------------------------------------------


@requires_sam2
@pytest.mark.parametrize(
    ("name", "encoder_millions", "model_millions"),
    [
        ("sam2.1_hiera_tiny", 27.2, 39.0),
        ("sam2.1_hiera_small", 34.3, 46.1),
        ("sam2.1_hiera_base_plus", 69.1, 80.9),
        ("sam2.1_hiera_large", 212.7, 224.4),
    ],
)
def test_teachers_have_sam2s_sizes_and_levels(name, encoder_millions, model_millions):
    with torch.device("meta"):  # a forward of hiera_large takes a minute on 2 CPU cores: shapes only
        model = build_architecture(name)
        out = model.image_encoder(torch.empty(1, 3, 1024, 1024))
    assert round(sum(p.numel() for p in model.image_encoder.parameters()) / 1e6, 1) == encoder_millions
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == model_millions
    assert shapes(out["backbone_fpn"]) == LEVELS and shapes(out["vision_pos_enc"]) == LEVELS
    assert out["vision_features"] is out["backbone_fpn"][-1]


@requires_sam2
def test_our_teacher_is_the_model_sam2s_build_sam2_builds():
    from sam2.build_sam import build_sam2

    # Same seed, same modules built in the same order: the same random weights, bit for bit.
    torch.manual_seed(0)
    ours = build_sam("sam2.1_hiera_tiny")
    torch.manual_seed(0)
    theirs = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert not ours.training and not theirs.training
    for attribute in ("dynamic_multimask_via_stability", "dynamic_multimask_stability_delta", "pred_obj_scores"):
        assert getattr(ours.sam_mask_decoder, attribute) == getattr(theirs.sam_mask_decoder, attribute), attribute
    assert ours.sam_mask_decoder.dynamic_multimask_via_stability  # build_sam2's default post-processing
    assert ours.image_size == 1024 and ours.use_high_res_features_in_sam and ours.directly_add_no_mem_embed


@requires_sam2
def test_the_four_sam2_configs_differ_only_in_the_image_encoder():
    from student_models.sam2_models import official_config

    configs = [official_config(get_spec(name).encoder_kwargs["config"]).model for name in TEACHERS]
    for config in configs:
        del config["image_encoder"]
    assert all(config == configs[0] for config in configs[1:])


@requires_sam2
@pytest.mark.parametrize("name", STUDENTS)
def test_students_give_sam2s_levels(name):
    with torch.device("meta"):
        model = build_architecture(name)
        out = model.image_encoder(torch.empty(1, 3, 1024, 1024))
    assert type(model).__name__ == "SAM2Base"
    assert shapes(out["backbone_fpn"]) == LEVELS and out["vision_features"] is out["backbone_fpn"][-1]


@requires_sam2
@pytest.mark.parametrize("name", TINY)
def test_tiny_models_give_sam2s_levels_and_decoder_features(name):
    model = tiny_model(name)
    with torch.no_grad():
        out = model.forward_image(torch.randn(1, 3, 1024, 1024))
    # forward_image applies the mask decoder's conv_s0 / conv_s1 to the two high-resolution levels.
    assert shapes(out["backbone_fpn"]) == [(32, 256, 256), (64, 128, 128), (256, 64, 64)]
    assert shapes(out["vision_pos_enc"]) == LEVELS
    assert out["vision_features"] is out["backbone_fpn"][-1] and torch.isfinite(out["vision_features"]).all()


@requires_sam2
def test_sam2s_predictor_and_generator_run_on_a_student():
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = tiny_model("sam2_test_student")
    image, masks = synthetic_image(1)
    ys, xs = np.nonzero(masks[0])
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    assert predictor._features["image_embed"].shape == (1, 256, 64, 64)
    assert [f.shape[1:] for f in predictor._features["high_res_feats"]] == [(32, 256, 256), (64, 128, 128)]
    pred, scores, low_res = predictor.predict(
        box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]), multimask_output=False
    )
    assert pred.shape == (1, *image.shape[:2]) and set(np.unique(pred)) <= {0.0, 1.0}
    assert scores.shape == (1,) and np.isfinite(scores).all() and low_res.shape == (1, 256, 256)
    records = SAM2AutomaticMaskGenerator(
        model, points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    ).generate(image)
    assert records and {"segmentation", "area", "bbox", "predicted_iou"} <= set(records[0])


# --- checkpoints (sam2 needed) ---------------------------------------------------------------------------


@requires_sam2
def test_a_file_in_sam2s_layout_loads_strictly(tmp_path):
    teacher = tiny_model("sam2_test", seed=1)
    torch.save({"model": teacher.state_dict()}, tmp_path / "sam2_test.pt")  # what sam2's _load_checkpoint reads
    loaded = build_sam("sam2_test", checkpoint=tmp_path / "sam2_test.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.state_dict().items())
    assert type(load_sam(tmp_path / "sam2_test.pt")).__name__ == "SAM2Base"  # told from its keys alone


@requires_sam2
def test_a_sam2_file_of_another_model_lists_keys_and_names_the_match(tmp_path):
    torch.save({"model": tiny_model("sam2_test").state_dict()}, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError) as info:
        build_sam("sam2_test_student", checkpoint=tmp_path / "teacher.pt")
    message = str(info.value)
    assert "missing keys" in message and "image_encoder.trunk.patch_embed.seq.0.c.weight" in message
    assert "unexpected keys" in message and "image_encoder.trunk.pos_embed" in message
    assert "It matches the registered model 'sam2_test'" in message


@requires_sam2
def test_an_official_sam2_file_given_to_another_model_names_the_right_one(tmp_path):
    (tmp_path / "sam2.1_hiera_large.pt").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=r"sam2\.1_hiera_large\.pt is a sam2\.1_hiera_large checkpoint; build"):
        build_sam("sam2_test", checkpoint=tmp_path / "sam2.1_hiera_large.pt")


@requires_sam2
def test_our_sam2_checkpoint_rebuilds_by_name_and_pickled_code_is_refused(tmp_path):
    student = tiny_model("sam2_test_student", seed=2)
    path = save_checkpoint(student, "sam2_test_student", tmp_path / "student.pth")
    loaded = load_sam(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in student.state_dict().items())
    torch.save({"model": student.image_encoder.trunk}, tmp_path / "pickled.pt")  # a module, not a state dict
    with pytest.raises(CheckpointError, match=r"pickled\.pt contains pickled Python objects.*refused for safety"):
        build_sam("sam2_test_student", checkpoint=tmp_path / "pickled.pt")
