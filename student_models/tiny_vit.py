"""TinyViT image encoder for SAM, as used by MobileSAM and TinySAM ("vit_t").

Written in this project's own words from the TinyViT paper (Wu et al., ECCV 2022) and the
MobileSAM release, with the same module names so that `mobile_sam.pt` and `tinysam_42.3.pth`
load without renaming: ``patch_embed.seq``, ``layers.N.blocks.M``, ``layers.N.downsample``,
``Conv2d_BN``-style ``.c``/``.bn`` pairs, ``attn.attention_biases``, ``norm_head``/``head``
(kept, unused by SAM, because the checkpoints carry them) and the SAM ``neck``.

SAM-specific change to TinyViT: the patch merging into the last stage keeps stride 1, so a
1024x1024 input gives a 64x64 token grid (stages at 1/4, 1/8, 1/16, 1/16), which the neck maps
to the Bx256x64x64 SAM embedding. MobileSAM decides the stride by the output width (320, 448
or 576, the last widths of TinyViT-5M/11M/21M); we decide it by position, which is the same for
those models and also holds for the small test variants.

`TinyViTTrunk` is the same network for SAM 2: TinyViT's own stride-2 mergings and its four stage
outputs (1/4 to 1/32), which SAM 2's FPN neck takes instead of SAM's single 1/16 map.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; children named ``c`` and ``bn``."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: Bx3xHxW -> BxCx(H/4)x(W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project) on BxCxHxW."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        # Zero-initialised last BN makes each block start as the identity.
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1, depthwise 3x3 (stride 2 or 1), 1x1.

    Takes BxCxHxW or BxLxC tokens on a ``resolution`` grid, returns Bx(L')xC' tokens.
    """

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.act = nn.GELU()
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            height, width = self.resolution
            x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm MLP on BxLxC tokens: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class MatMul(nn.Module):
    """``a @ b`` as a module, so quantizers can find and wrap attention products by name."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Attention(nn.Module):
    """Windowed multi-head self-attention with learned relative-position biases.

    The bias of a query/key pair depends only on the absolute offset (|dy|, |dx|) between their
    positions in the window, so a window of side w has w*w distinct offsets per head.
    Input and output: (B*windows)x(w*w)xC.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.qk_matmul = MatMul()
        self.av_matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)

        points = list(itertools.product(range(window_size), repeat=2))
        offsets: dict[tuple[int, int], int] = {}
        index = []
        for p in points:
            for q in points:
                offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                index.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(index).view(len(points), len(points)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = self.softmax(self.qk_matmul(q, k.transpose(-2, -1)) * self.scale + bias)
        out = self.av_matmul(attn, v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(out)


class TinyViTBlock(nn.Module):
    """Window attention, then a 3x3 depthwise conv, then an MLP, on BxLxC tokens."""

    def __init__(
        self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        batch, tokens, channels = x.shape
        w = self.window_size
        if height == w and width == w:
            attended = self.attn(x)
        else:
            grid = x.view(batch, height, width, channels)
            pad_b, pad_r = (-height) % w, (-width) % w
            # Zero padding on the bottom/right; padded tokens join the attention, as in TinyViT.
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = height + pad_b, width + pad_r
            nh, nw = ph // w, pw // w
            windows = grid.view(batch, nh, w, nw, w, channels).transpose(2, 3).reshape(-1, w * w, channels)
            windows = self.attn(windows)
            grid = windows.view(batch, nh, nw, w, w, channels).transpose(2, 3).reshape(batch, ph, pw, channels)
            attended = grid[:, :height, :width].reshape(batch, tokens, channels)
        x = x + attended
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.local_conv(x).view(batch, channels, tokens).transpose(1, 2)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on BxCxHxW, then patch merging to tokens."""

    def __init__(
        self, dim: int, out_dim: int, stride: int, depth: int, resolution: tuple[int, int], expand_ratio: float
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim, stride)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The stage's blocks then its patch merging; the blocks' output is also appended to `features` if given."""
        for block in self.blocks:
            x = block(x)
        if features is not None:
            features.append(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1..3: TinyViT blocks on BxLxC tokens, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        stride: int,
        depth: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio) for _ in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The stage's blocks then its patch merging, if any; the blocks' output is also appended to `features`."""
        for block in self.blocks:
            x = block(x)
        if features is not None:
            features.append(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: Bx3x1024x1024 -> Bx256x64x64.

    Args:
        embed_dims: channels per stage (four stages, at 1/4, 1/8, 1/16 and 1/16 of the input).
        depths, num_heads, window_sizes: per stage (stage 0 is convolutional: no heads/windows).
        mlp_ratio: MLP hidden width / embed width; also the MBConv expansion.
        num_classes: width of the unused classification ``head`` kept for checkpoint compatibility.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        side = img_size // 4
        self.layers = nn.ModuleList()
        if len(embed_dims) != 4:
            raise ValueError(f"TinyViT for SAM has 4 stages, got embed_dims={tuple(embed_dims)}")
        for i, dim in enumerate(embed_dims):
            out_dim = embed_dims[i + 1] if i < 3 else None
            stride = 2 if i < 2 else 1
            resolution = (side, side)
            if i == 0:
                stage: nn.Module = ConvStage(dim, out_dim, stride, depths[i], resolution, mlp_ratio)
            else:
                stage = AttentionStage(
                    dim, out_dim, stride, depths[i], resolution, num_heads[i], window_sizes[i], mlp_ratio
                )
            self.layers.append(stage)
            side //= stride
        self.out_side = side
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        batch, _, channels = x.shape
        x = x.view(batch, self.out_side, self.out_side, channels).permute(0, 3, 1, 2)
        return self.neck(x)


class TinyViTTrunk(nn.Module):
    """TinyViT's stages as a SAM 2 trunk: each stage's output at 1/4, 1/8, 1/16 and 1/32 of the input.

    Bx3xSxS -> [BxC0x(S/4)x(S/4), BxC1x(S/8)x(S/8), BxC2x(S/16)x(S/16), BxC3x(S/32)x(S/32)] with
    (C0..C3) = ``embed_dims``, highest resolution first; ``channel_list`` is ``embed_dims`` reversed, as
    SAM 2's ``FpnNeck.backbone_channel_list``. Unlike `TinyViT` for SAM, every patch merging has stride 2
    (TinyViT's own layout), because SAM 2's neck fuses the 1/32 level into the 1/16 one. Each stage's
    output is taken before the patch merging that leads to the next stage. The modules are named as in
    `TinyViT` (``patch_embed``, ``layers.N``) and have the same shapes (a stride is not a weight), so the
    trunk of a MobileSAM or TinySAM checkpoint fits this one; there is no SAM neck and no ``head``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(embed_dims) != 4:
            raise ValueError(f"TinyViT has 4 stages, got embed_dims={tuple(embed_dims)}")
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.sides = [img_size // 4 // 2**i for i in range(4)]
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            out_dim = embed_dims[i + 1] if i < 3 else None
            resolution = (self.sides[i], self.sides[i])
            if i == 0:
                stage: nn.Module = ConvStage(dim, out_dim, 2, depths[i], resolution, mlp_ratio)
            else:
                stage = AttentionStage(dim, out_dim, 2, depths[i], resolution, num_heads[i], window_sizes[i], mlp_ratio)
            self.layers.append(stage)
        self.channel_list = list(embed_dims)[::-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        features: list[torch.Tensor] = []
        for stage in self.layers:  # called as modules, so that an exported graph's names are the modules'
            x = stage(x, features)
        # Stage 0 works on BxCxHxW maps, the attention stages on BxLxC tokens.
        return [
            f if f.ndim == 4 else f.transpose(1, 2).reshape(f.shape[0], -1, side, side)
            for f, side in zip(features, self.sides, strict=True)
        ]
