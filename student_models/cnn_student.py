"""CNN students from timm: for SAM, a backbone cut at stride 16 plus SAM's neck (EdgeSAM-style); for SAM 2,
the same kind of backbone as a four-level trunk (EdgeTAM-style).

EdgeSAM showed that a pure-CNN encoder (RepViT) distils well from SAM and runs fast on phones.
We take any timm model that offers ``features_only`` and keep its stride-16 feature map, so a
1024x1024 input yields 64x64 features, which the SAM neck maps to 256 channels. EdgeTAM puts the
same network's four stages (strides 4, 8, 16, 32) into SAM 2's FPN neck instead (`TimmTrunk`).
Both are built with ``pretrained=False``: nothing is downloaded.
"""

from __future__ import annotations

import timm
import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class TimmBackboneEncoder(nn.Module):
    """timm backbone (stride-16 features) + SAM neck: Bx3xSxS -> Bx256x(S/16)x(S/16)."""

    def __init__(self, backbone: str, img_size: int = 1024, out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = img_size
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        if 16 not in reductions:
            raise ValueError(f"timm model {backbone!r} has no stride-16 feature map (strides {reductions})")
        index = reductions.index(16)
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(index,))
        channels = self.backbone.feature_info.channels()[0]
        self.neck = nn.Sequential(
            nn.Conv2d(channels, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x)[0])


class TimmTrunk(nn.Module):
    """A timm backbone's feature maps at strides 4, 8, 16 and 32, as SAM 2's image encoder takes a trunk's.

    Bx3xSxS -> [BxC0x(S/4)x(S/4), BxC1x(S/8)x(S/8), BxC2x(S/16)x(S/16), BxC3x(S/32)x(S/32)], highest
    resolution first. ``channel_list`` is (C3, C2, C1, C0), lowest resolution first, as SAM 2's
    ``FpnNeck.backbone_channel_list``. The module layout (``body`` = timm's ``features_only`` model) is
    that of EdgeTAM's ``TimmBackbone``; timm's random initialisation, no pretrained weights.
    """

    STRIDES = (4, 8, 16, 32)

    def __init__(self, backbone: str) -> None:
        super().__init__()
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        missing = [stride for stride in self.STRIDES if stride not in reductions]
        if missing:
            raise ValueError(f"timm model {backbone!r} has no feature map at stride {missing} (strides {reductions})")
        indices = tuple(reductions.index(stride) for stride in self.STRIDES)
        self.body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=indices)
        self.channel_list = self.body.feature_info.channels()[::-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))
