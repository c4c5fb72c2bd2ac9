"""DistillConfig: defaults, validation messages, dict round-trip, the demo's tiny models."""

from __future__ import annotations

import pytest

from distill.config import DEMO_SETTINGS, DistillConfig


def test_defaults_resolve_models_and_round_trip():
    demo = DistillConfig()
    assert (demo.teacher, demo.student) == ("sam_vit_test", "tinyvit_test")  # no data: the offline demo
    real = DistillConfig(data="/some/coco")
    assert (real.teacher, real.student) == ("vit_h", "tinyvit_5m")
    named = DistillConfig(teacher="vit_b")
    assert named.student == "tinyvit_5m"
    assert DistillConfig(student="vit_t", data="/x").student == "tinyvit_5m"  # aliases are canonicalised
    config = DistillConfig(data="/d", lr=3e-4, hmw=False, prompt_mode="disagreement", steps=10)
    assert DistillConfig.from_dict(config.to_dict()) == config
    assert config.cache_path.endswith("teacher_cache")
    assert DistillConfig.demo(steps=3).steps == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"teacher": "vit_x"}, "unknown teacher 'vit_x': registered models: "),
        ({"student": "nope"}, "unknown student 'nope'"),
        ({"prompt_mode": "random"}, "prompt_mode must be one of gt, disagreement"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"output_weight": -1.0}, "output_weight must be >= 0"),
        ({"box_prob": 1.5}, r"box_prob must be in \[0, 1\]"),
        ({"embedding_weight": 0.0, "token_loss": False, "output_loss": False}, "every loss is off"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"decoder_images": 0}, "decoder_images must be >= 1"),
    ],
)
def test_bad_values_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="unknown DistillConfig fields: colour"):
        DistillConfig.from_dict({"colour": "red"})


def test_the_demo_settings_apply_whenever_there_is_no_data():
    """One rule (CLI: no --data -> demo settings); naming the demo's own teacher does not leave the demo."""
    assert DistillConfig.demo(teacher="sam_vit_test") == DistillConfig.demo()
    demo = DistillConfig.demo()
    assert {k: getattr(demo, k) for k in DEMO_SETTINGS} == DEMO_SETTINGS
    recipe = DistillConfig(data="/d")
    assert (recipe.epochs, recipe.batch_size, recipe.prompts_per_image, recipe.warmup_steps) == (8, 8, 64, 250)
    assert not recipe.overwrite and "overwrite" in DistillConfig.from_dict(recipe.to_dict()).to_dict()
