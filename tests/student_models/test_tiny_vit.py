"""TinyViT against the reference key layout and against timm's independent TinyViT port.

The official MobileSAM code is not a package we can install, so the numerical reference is timm's
TinyViT (a port of the same official code): we copy our weights into timm's modules, block by
block, and compare outputs. The stride-1 last merging (SAM's only change) is checked by shape.
"""

from __future__ import annotations

import json

import pytest
import torch
from timm.models import tiny_vit as timm_tiny_vit

from student_models import build_sam
from student_models.tiny_vit import MBConv, PatchEmbed, PatchMerging, TinyViTBlock
from tests.helpers import SHARED_DATA

REFERENCE_KEYS = SHARED_DATA / "reference" / "vit_t_state_dict_keys.json"
TOLERANCE = 1e-5


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere, BN statistics and attention biases included, then eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def _copy_into_timm(ours: torch.nn.Module, theirs: torch.nn.Module, rename: dict[str, str] | None = None) -> None:
    state = {}
    for key, value in ours.state_dict().items():
        key = key.replace(".c.", ".conv.")
        for old, new in (rename or {}).items():
            key = key.replace(old, new)
        state[key] = value
    theirs.load_state_dict(state, strict=True)
    theirs.eval()


@pytest.mark.skipif(not REFERENCE_KEYS.is_file(), reason=f"reference key list {REFERENCE_KEYS} not present")
def test_tinyvit_5m_state_dict_matches_mobilesam_keys_and_shapes():
    reference = json.loads(REFERENCE_KEYS.read_text())
    ours = [(k, list(v.shape)) for k, v in build_sam("tinyvit_5m").state_dict().items()]
    assert len(ours) == reference["num_tensors"] == 439
    assert ours == [(k, list(s)) for k, s in reference["state_dict"]]


def test_tinyvit_5m_parameter_counts():
    sam = build_sam("vit_t")
    encoder = sam.image_encoder
    assert sum(p.numel() for p in encoder.parameters()) == 6_065_532
    assert sum(v.numel() for v in encoder.state_dict().values()) == 6_075_415
    assert sum(p.numel() for p in sam.parameters()) == 10_130_092


@pytest.mark.parametrize("side", [14, 20])  # one window exactly, and a grid that needs padding
def test_block_matches_timm(side):
    dim, heads, window = 40, 2, 7 if side == 20 else 14
    ours = _randomise(TinyViTBlock(dim, (side, side), heads, window, mlp_ratio=4.0))
    theirs = timm_tiny_vit.TinyVitBlock(dim, num_heads=heads, window_size=window, mlp_ratio=4.0)
    _copy_into_timm(ours, theirs)
    tokens = torch.randn(2, side * side, dim)
    with torch.no_grad():
        expected = theirs(tokens.view(2, side, side, dim)).reshape(2, side * side, dim)
        torch.testing.assert_close(ours(tokens), expected, atol=TOLERANCE, rtol=0)


def test_conv_parts_match_timm():
    x = torch.randn(1, 3, 64, 64)
    embed = _randomise(PatchEmbed(3, 32))
    timm_embed = timm_tiny_vit.PatchEmbed(3, 32, torch.nn.GELU)
    _copy_into_timm(embed, timm_embed, {"seq.0.": "conv1.", "seq.2.": "conv2."})
    mbconv = _randomise(MBConv(32, 4.0), seed=1)
    timm_mbconv = timm_tiny_vit.MBConv(32, 32, 4.0, torch.nn.GELU, 0.0)
    _copy_into_timm(mbconv, timm_mbconv)
    merge = _randomise(PatchMerging((16, 16), 32, 48, stride=2), seed=2)
    timm_merge = timm_tiny_vit.PatchMerging(32, 48, torch.nn.GELU)
    _copy_into_timm(merge, timm_merge, {"act.": "act1."})
    with torch.no_grad():
        ours = merge(mbconv(embed(x)))
        theirs = timm_merge(timm_mbconv(timm_embed(x))).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE, rtol=0)


def test_merging_into_last_stage_keeps_the_64x64_grid():
    encoder = build_sam("tinyvit_5m").image_encoder
    strides = [stage.downsample.conv2.c.stride for stage in encoder.layers[:3]]
    assert strides == [(2, 2), (2, 2), (1, 1)]
    resolutions = [stage.blocks[0].resolution for stage in encoder.layers[1:]]
    assert resolutions == [(128, 128), (64, 64), (64, 64)]
