"""GeneratorConfig: defaults, validation messages, dict round trip, SAM-compatible subset."""

import pytest
from segment_anything import SamAutomaticMaskGenerator

from hierarchical.config import ConfigError, GeneratorConfig


def test_defaults_are_the_papers_and_round_trip():
    config = GeneratorConfig()
    assert (config.points_per_side, config.sparse_points_per_side, config.high_score_thresh) == (32, 8, 8.5)
    assert (config.pred_iou_thresh, config.stability_score_thresh, config.box_nms_thresh) == (0.88, 0.95, 0.7)
    assert config.hierarchical is True and config.reprompt_rule == "lattice"
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    assert GeneratorConfig(points_per_side=16).sparse_points_per_side == 4
    assert GeneratorConfig(points_per_side=2).sparse_points_per_side == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"points_per_side": 0}, "points_per_side must be a positive integer"),
        ({"pred_iou_thresh": 1.5}, r"pred_iou_thresh must lie in \[0, 1\]"),
        ({"output_mode": "png"}, "output_mode must be one of"),
        ({"points_per_side": 8, "sparse_points_per_side": 16}, "must not exceed points_per_side"),
        ({"min_mask_region_area": -1}, "min_mask_region_area must be a non-negative integer"),
        ({"points_per_side": 2, "crop_n_layers": 1, "crop_n_points_downscale_factor": 4}, "crop layer 1 would get no"),
        ({"hierarchical": "yes"}, "hierarchical must be True or False"),
        ({"decoder_micro_batch": 0}, "decoder_micro_batch must be >= 1"),
        ({"reprompt_rule": "sam"}, r"reprompt_rule must be one of \('lattice', 'tinysam'\), got 'sam'"),
        (
            {"reprompt_rule": "tinysam", "points_per_side": 16, "sparse_points_per_side": 2},
            "prompts a sparse grid of points_per_side // 4 = 4 points per side, got sparse_points_per_side=2",
        ),
        ({"reprompt_rule": "tinysam", "points_per_side": 2}, "got sparse_points_per_side=1"),
        (
            {"reprompt_rule": "tinysam", "points_per_side": 8, "crop_n_layers": 1, "crop_n_points_downscale_factor": 4},
            "needs at least 4 points per side in every crop layer; layer 1 gets 2",
        ),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        GeneratorConfig(**settings)


def test_tinysam_grid_limits_apply_to_hierarchical_mode_only():
    assert GeneratorConfig(reprompt_rule="tinysam", points_per_side=2, hierarchical=False).points_per_side == 2
    assert GeneratorConfig(reprompt_rule="tinysam", points_per_side=10).sparse_points_per_side == 2


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match=r"unknown generator setting\(s\) \['points'\]"):
        GeneratorConfig.from_dict({"points": 4})


def test_sam_kwargs_are_accepted_by_sams_generator(tiny_sam):
    kwargs = GeneratorConfig(points_per_side=4).sam_kwargs()
    assert not {"hierarchical", "high_score_thresh", "reprompt_rule", "decoder_micro_batch"} & set(kwargs)
    generator = SamAutomaticMaskGenerator(tiny_sam, **kwargs)
    assert len(generator.point_grids[0]) == 16
