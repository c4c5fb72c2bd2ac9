"""SAM 2.1 models for the image pipeline: the official Hiera teachers and students in SAM 2's FPN neck.

A SAM 2 model here is the `sam2` package's own ``SAM2Base``, whose ``image_encoder`` is ``sam2``'s
``ImageEncoder(trunk, FpnNeck, scalp=1)``. For a 1x3x1024x1024 input it returns ``backbone_fpn`` =
[1x256x256x256, 1x256x128x128, 1x256x64x64] (the trunk's four levels through the neck, whose top-down
fusion adds the 1/32 level into the 1/16 one before ``scalp`` drops the 1/32 level), ``vision_pos_enc``
(parameter-free sine encodings of the same shapes) and ``vision_features`` (the 64x64 level). A student
replaces the Hiera trunk only (timm RepViT, TinyViT's stages) and keeps that neck, so
``SAM2ImagePredictor(model)`` and ``SAM2AutomaticMaskGenerator(model)`` run on it unchanged.

Everything but the trunk is read from the ``sam2`` package's SAM 2.1 configs
(``sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``). The four differ only in ``image_encoder``, so one
assembler (`assemble_sam2`) serves every model, with the decoder settings ``sam2.build_sam.build_sam2``
applies by default (``apply_postprocessing=True``: fall back to multimask output when a single mask is
unstable). The memory attention and memory encoder are built because ``SAM2Base`` owns them and the
official checkpoints hold their weights; video (memory, tracking) is not used by the image pipeline.

``sam2`` is the optional extra ``sam2``: nothing here imports it at module level, and every builder
raises `MissingExtraError` naming the extra when it is not installed.
"""

from __future__ import annotations

import importlib.resources
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from student_models.cnn_student import TimmTrunk
from student_models.extras import MissingExtraError
from student_models.tiny_vit import TinyViTTrunk

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from sam2.modeling.sam2_base import SAM2Base

INSTALL_HINT = 'SAM2_BUILD_CUDA=0 pip install -e ".[sam2]" -c constraints.txt'

# The settings build_sam2 adds with apply_postprocessing=True (sam2/build_sam.py), so our teachers are the
# models its users get.
POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}
# All four SAM 2.1 configs agree outside image_encoder (tests/student_models/test_sam2_models.py checks it);
# the students' neck and every model's heads are read from this one.
REFERENCE_CONFIG = "sam2.1_hiera_l"


def require_sam2(what: str = "SAM 2 models") -> None:
    """Import ``sam2`` or raise `MissingExtraError` saying how to install the extra."""
    try:
        import sam2  # noqa: F401  (its import sets up hydra's config search path, as sam2 expects)
    except ImportError as exc:
        raise MissingExtraError(f"{what} need the sam2 extra: {INSTALL_HINT}") from exc


def official_config(config: str) -> DictConfig:
    """The ``sam2`` package's config ``configs/sam2.1/<config>.yaml`` with build_sam2's post-processing applied."""
    require_sam2()
    from omegaconf import OmegaConf

    path = importlib.resources.files("sam2") / "configs" / "sam2.1" / f"{config}.yaml"
    if not path.is_file():
        raise ValueError(f"sam2 has no config {config!r} (looked for {path})")
    cfg = OmegaConf.load(str(path))
    cfg.model.sam_mask_decoder_extra_args = dict(POSTPROCESSING)
    OmegaConf.resolve(cfg)
    return cfg


def _hiera(trunk_config: Any) -> nn.Module:
    """Hiera from its config. Hiera calls ``.item()`` on a tensor while it is built, which the meta device
    cannot do, so under ``torch.device("meta")`` it is built on the CPU and moved."""
    require_sam2()
    from hydra.utils import instantiate

    if torch.get_default_device().type != "meta":
        return instantiate(trunk_config)
    with torch.device("cpu"):
        return instantiate(trunk_config).to("meta")


def official_image_encoder(config: str) -> nn.Module:
    """The image encoder of an official SAM 2.1 model (Hiera + FpnNeck) as its config builds it."""
    require_sam2()
    from hydra.utils import instantiate
    from sam2.modeling.backbones.image_encoder import ImageEncoder

    encoder_config = official_config(config).model.image_encoder
    return ImageEncoder(
        trunk=_hiera(encoder_config.trunk), neck=instantiate(encoder_config.neck), scalp=encoder_config.scalp
    )


def fpn_image_encoder(trunk: nn.Module) -> nn.Module:
    """SAM 2's image encoder around any trunk: SAM 2.1's FpnNeck and scalp, fitted to ``trunk.channel_list``.

    ``trunk`` maps Bx3x1024x1024 to four maps at strides 4, 8, 16 and 32 (highest resolution first);
    ``trunk.channel_list`` lists their channels lowest resolution first.
    """
    require_sam2()
    from hydra.utils import instantiate
    from sam2.modeling.backbones.image_encoder import ImageEncoder

    encoder_config = official_config(REFERENCE_CONFIG).model.image_encoder
    neck = instantiate(encoder_config.neck, backbone_channel_list=list(trunk.channel_list))
    return ImageEncoder(trunk=trunk, neck=neck, scalp=encoder_config.scalp)


def hiera_image_encoder(**hiera_kwargs: Any) -> nn.Module:
    """A Hiera trunk of any size (``sam2.modeling.backbones.hieradet.Hiera`` arguments) in SAM 2.1's neck."""
    require_sam2()
    return fpn_image_encoder(_hiera({"_target_": "sam2.modeling.backbones.hieradet.Hiera", **hiera_kwargs}))


def timm_image_encoder(backbone: str) -> nn.Module:
    """A timm backbone's stride 4/8/16/32 maps (`TimmTrunk`, random weights) in SAM 2.1's neck: EdgeTAM's layout."""
    require_sam2()
    return fpn_image_encoder(TimmTrunk(backbone))


def tinyvit_image_encoder(**tinyvit_kwargs: Any) -> nn.Module:
    """TinyViT's four stage outputs (`TinyViTTrunk` arguments) in SAM 2.1's neck."""
    require_sam2()
    return fpn_image_encoder(TinyViTTrunk(**tinyvit_kwargs))


def assemble_sam2(image_encoder: nn.Module) -> SAM2Base:
    """SAM 2.1 (``SAM2Base``: prompt encoder, mask decoder, memory modules) around any SAM 2 image encoder.

    ``image_encoder`` maps Bx3x1024x1024 to SAM 2's dict (see the module docstring) and has
    ``neck.d_model`` = 256, the width of the heads.
    """
    require_sam2()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sam2.modeling.sam2_base import SAM2Base

    model_config = official_config(REFERENCE_CONFIG).model
    if model_config._target_ != "sam2.modeling.sam2_base.SAM2Base":
        raise ValueError(f"{REFERENCE_CONFIG} builds {model_config._target_}, not sam2.modeling.sam2_base.SAM2Base")
    settings = OmegaConf.to_container(model_config, resolve=True)
    for key in ("_target_", "image_encoder", "memory_attention", "memory_encoder"):
        del settings[key]
    return SAM2Base(
        image_encoder=image_encoder,
        memory_attention=instantiate(model_config.memory_attention),
        memory_encoder=instantiate(model_config.memory_encoder),
        **settings,
    )
