"""A CNN student: a timm backbone cut at stride 16 plus SAM's neck (EdgeSAM-style).

EdgeSAM showed that a pure-CNN encoder (RepViT) distils well from SAM and runs fast on phones.
We take any timm model that offers ``features_only`` and keep its stride-16 feature map, so a
1024x1024 input yields 64x64 features, which the SAM neck maps to 256 channels.
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
