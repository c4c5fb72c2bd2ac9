"""Registry of SAM models by name: teachers, students and tiny test variants.

Every entry is a thin builder of an image encoder over one assembler per family, which adds the prompt
encoder and mask decoder (the same shapes for every model of the family), so students can reuse a
teacher's decoder as is:

- ``"sam"`` (SAM v1): `assemble_sam`; models are `segment_anything.modeling.Sam` instances (Bx3x1024x1024
  image -> Bx256x64x64 embedding) and work with `SamPredictor` and `SamAutomaticMaskGenerator` unchanged.
- ``"sam2"`` (SAM 2.1, the optional ``sam2`` extra): `student_models.sam2_models.assemble_sam2`; models are
  ``sam2``'s ``SAM2Base`` and work with ``SAM2ImagePredictor`` and ``SAM2AutomaticMaskGenerator`` unchanged.
  They are registered whether or not ``sam2`` is installed; building one without it raises
  `student_models.sam2_models.MissingExtraError` naming the extra.

This module knows names and architectures only; `student_models.checkpoints` (files) builds on
it, and `student_models.build.build_sam` (a model by name, optionally with weights) on both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from student_models import sam2_models
from student_models.cnn_student import TimmBackboneEncoder
from student_models.tiny_vit import TinyViT

IMAGE_SIZE = 1024
EMBED_DIM = 256
EMBED_SIDE = 64  # IMAGE_SIZE / 16: every encoder yields Bx256x64x64
FAMILIES = ("sam", "sam2")
ROLES = ("teacher", "student", "test")


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build its image encoder and what it is."""

    name: str
    build_encoder: Callable[..., nn.Module]
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    role: str = "student"  # "teacher", "student" or "test"
    description: str = ""
    family: str = "sam"  # "sam" (segment_anything's Sam) or "sam2" (sam2's SAM2Base)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"model {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.family not in FAMILIES:
            raise ValueError(f"model {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(spec: ModelSpec, aliases: tuple[str, ...] = ()) -> ModelSpec:
    """Add `spec` to the zoo under its name and `aliases`, so `build_sam(name)` builds it (a taken name: ValueError)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    for alias in aliases:
        _ALIASES[alias] = spec.name
    return spec


def list_models(role: str | None = None, family: str | None = None) -> list[str]:
    """Registered model names (aliases excluded), optionally only one role and/or one family ("sam", "sam2")."""
    return [
        name
        for name, spec in _REGISTRY.items()
        if (role is None or spec.role == role) and (family is None or spec.family == family)
    ]


def get_spec(name: str) -> ModelSpec:
    """The registered `ModelSpec` of `name` (a model name or an alias such as vit_t); KeyError lists the known names."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _REGISTRY:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise KeyError(f"unknown model {name!r}; registered models: {known}")
    return _REGISTRY[canonical]


def canonical_name(name: str) -> str:
    return get_spec(name).name


def build_architecture(name: str) -> nn.Module:
    """The registered model `name` with random weights, on the current default device (meta works).

    A ``"sam"`` model is a `Sam`, a ``"sam2"`` model a ``SAM2Base`` (MissingExtraError without ``sam2``).
    """
    spec = get_spec(name)
    if spec.family == "sam2":
        sam2_models.require_sam2(f"SAM 2 models such as {spec.name!r}")
        return sam2_models.assemble_sam2(spec.build_encoder(**spec.encoder_kwargs))
    return assemble_sam(spec.build_encoder(**spec.encoder_kwargs))


def assemble_sam(image_encoder: nn.Module) -> Sam:
    """SAM around any encoder that maps Bx3x1024x1024 to Bx256x64x64."""
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_SIDE, EMBED_SIDE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _sam_vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> ImageEncoderViT:
    return ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn_indexes,
        window_size=14,
        out_chans=EMBED_DIM,
    )


register_model(
    ModelSpec(
        "vit_h",
        _sam_vit,
        dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
        role="teacher",
        description="SAM ViT-H (632M encoder parameters), the default teacher",
    )
)
register_model(
    ModelSpec(
        "vit_l",
        _sam_vit,
        dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
        role="teacher",
        description="SAM ViT-L (307M encoder parameters)",
    )
)
register_model(
    ModelSpec(
        "vit_b",
        _sam_vit,
        dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
        role="teacher",
        description="SAM ViT-B (89.7M encoder parameters)",
    )
)
register_model(
    ModelSpec(
        "tinyvit_5m",
        TinyViT,
        dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7)),
        description="TinyViT-5M, the MobileSAM/TinySAM student (loads mobile_sam.pt and tinysam_42.3.pth)",
    ),
    aliases=("vit_t",),
)
register_model(
    ModelSpec(
        "repvit_m0_9",
        TimmBackboneEncoder,
        dict(backbone="repvit_m0_9"),
        description="timm RepViT-M0.9 cut at stride 16 + SAM neck (EdgeSAM-style CNN student)",
    )
)
register_model(
    ModelSpec(
        "sam_vit_test",
        _sam_vit,
        dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
        role="test",
        description="tiny SAM ViT teacher for CPU tests and the offline demo",
    )
)
register_model(
    ModelSpec(
        "tinyvit_test",
        TinyViT,
        dict(
            embed_dims=(16, 32, 48, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 3, 4),
            window_sizes=(7, 7, 14, 7),
            num_classes=10,
        ),
        role="test",
        description="tiny TinyViT student for CPU tests and the offline demo",
    )
)

# SAM 2.1 (the sam2 extra). Teachers: sam2's own configs (parameters: image encoder / whole model).
for _size, _config, _parameters in [
    ("tiny", "sam2.1_hiera_t", "27.2M / 39.0M"),
    ("small", "sam2.1_hiera_s", "34.3M / 46.1M"),
    ("base_plus", "sam2.1_hiera_b+", "69.1M / 80.9M"),
    ("large", "sam2.1_hiera_l", "212.7M / 224.4M"),
]:
    register_model(
        ModelSpec(
            f"sam2.1_hiera_{_size}",
            sam2_models.official_image_encoder,
            dict(config=_config),
            role="teacher",
            family="sam2",
            description=f"SAM 2.1 Hiera-{_size} ({_parameters} parameters, encoder / model)",
        )
    )
register_model(
    ModelSpec(
        "repvit_m1_sam2",
        sam2_models.timm_image_encoder,
        dict(backbone="repvit_m1"),
        family="sam2",
        description="timm RepViT-M1 at strides 4-32 in SAM 2.1's FPN neck (EdgeTAM's image encoder layout)",
    )
)
register_model(
    ModelSpec(
        "tinyvit_5m_sam2",
        sam2_models.tinyvit_image_encoder,
        dict(embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7)),
        family="sam2",
        description="TinyViT-5M's four stage outputs in SAM 2.1's FPN neck",
    )
)
register_model(
    ModelSpec(
        "sam2_test",
        sam2_models.hiera_image_encoder,
        # Global attention in stage 3, as in the real Hiera configs (a block that pools cannot be global).
        dict(
            embed_dim=8,
            num_heads=1,
            stages=(1, 1, 2, 1),
            global_att_blocks=(3,),
            window_pos_embed_bkg_spatial_size=(7, 7),
        ),
        role="test",
        family="sam2",
        description="tiny SAM 2.1 Hiera teacher for CPU tests and the offline demo",
    )
)
register_model(
    ModelSpec(
        "sam2_test_student",
        sam2_models.tinyvit_image_encoder,
        dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(7, 7, 14, 7)),
        role="test",
        family="sam2",
        description="tiny TinyViT student in SAM 2.1's FPN neck for CPU tests and the offline demo",
    )
)
del _size, _config, _parameters
