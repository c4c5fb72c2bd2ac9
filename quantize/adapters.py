"""Structural rewrites that make a SAM model quantizable, all numerically identical (up to float rounding).

- `fuse_reparameterizable`: RepViT's token mixer (timm's ``RepVggDw``: a depthwise 3x3 conv + a
  depthwise 1x1 conv + identity, then BatchNorm) becomes the one depthwise 3x3 conv it is at
  inference (its own ``fuse()``, as RepViT and EdgeSAM deploy it): one quantized layer and one
  integer kernel instead of three branches, each rounded on its own.
- `fold_batchnorms`: Conv2d + BatchNorm2d pairs in an nn.Sequential (TinyViT's ``ConvBN``, timm's
  ``ConvNorm``) become one Conv2d with a bias and an Identity: the deployed graph has no BN, so the
  quantized weight must be the folded one.
- Attention adapters: segment_anything's ViT ``Attention`` and the mask decoder's
  ``transformer.Attention`` (and SAM 2's, the same layer through ``scaled_dot_product_attention``)
  compute their matrix products inline; the adapters re-express the
  same forward with named ``qk_matmul`` / ``av_matmul`` modules and an ``nn.Softmax`` module, as
  TinyViT's attention already has, so the products can be quantized and the softmax found.
  Parameter names are unchanged, so state dicts still match.
- `SqueezeExciteAdapter`: timm's ``SEModule`` (RepViT) pools with ``x.mean((2, 3))``, a ReduceMean
  that ONNX Runtime runs in whichever layout its transpose optimiser leaves the input in: NHWC in the
  shipped INT8 graph, NCHW where the INT8 check exposes that input. The two summation orders then
  flip a near-tie at the next quantizer, and the shipped graph failed the check by 2.7% (repvit_m0_9,
  hessian, 4 COCO images). The adapter pools with GlobalAveragePool, which ONNX defines on NCHW, so
  both graphs sum in the same order; the check then passes with the same encoder latency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder as sam_vit
from segment_anything.modeling import transformer as sam_transformer
from timm.layers.squeeze_excite import SEModule
from timm.models.repvit import RepVggDw
from torch import nn

from student_models.tiny_vit import MatMul


class ViTAttentionAdapter(nn.Module):
    """SAM ViT attention (input BxHxWxC) with named matmuls; same parameters and result as the original."""

    def __init__(self, original: sam_vit.Attention) -> None:
        super().__init__()
        self.num_heads, self.scale, self.use_rel_pos = original.num_heads, original.scale, original.use_rel_pos
        self.qkv, self.proj = original.qkv, original.proj
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = original.rel_pos_h, original.rel_pos_w
        self.qk_matmul, self.av_matmul, self.softmax = MatMul(), MatMul(), nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, height * width, -1).unbind(0)
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        if self.use_rel_pos:
            size = (height, width)
            attn = sam_vit.add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, size, size)
        attn = self.softmax(attn)
        x = self.av_matmul(attn, v).view(batch, self.num_heads, height, width, -1)
        return self.proj(x.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


class DecoderAttentionAdapter(nn.Module):
    """Mask-decoder attention (q, k, v: BxNxC) with named matmuls; same parameters and result."""

    def __init__(self, original: sam_transformer.Attention) -> None:
        super().__init__()
        self.embedding_dim, self.internal_dim = original.embedding_dim, original.internal_dim
        self.num_heads = original.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            original.q_proj, original.k_proj, original.v_proj, original.out_proj,
        )  # fmt: skip
        self.qk_matmul, self.av_matmul, self.softmax = MatMul(), MatMul(), nn.Softmax(dim=-1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = self.qk_matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
        out = self.av_matmul(self.softmax(attn), v)
        batch, heads, tokens, channels = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * channels))


class SqueezeExciteAdapter(nn.Module):
    """timm's ``SEModule`` pooled with a layout-fixed GlobalAveragePool in ONNX (see the module docstring)."""

    def __init__(self, original: SEModule) -> None:
        super().__init__()
        if original.add_maxpool:
            raise ValueError("SEModule(add_maxpool=True) has no adapter: its max-pool branch is not supported")
        self.fc1, self.bn, self.act, self.fc2, self.gate = (
            original.fc1, original.bn, original.act, original.fc2, original.gate,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.fc2(self.act(self.bn(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * self.gate(x_se)


ADAPTERS: dict[type, type] = {
    sam_vit.Attention: ViTAttentionAdapter,
    sam_transformer.Attention: DecoderAttentionAdapter,
    SEModule: SqueezeExciteAdapter,
}


def sam2_adapters(model: nn.Module) -> dict[type, type]:
    """SAM 2's mask-decoder attention -> `DecoderAttentionAdapter` where `model` holds sam2 modules (the extra
    is then installed); its parameters and product are SAM's, without dropout at inference."""
    if not any(type(m).__module__.startswith("sam2.") for m in model.modules()):
        return {}
    from sam2.modeling.sam.transformer import Attention

    return {Attention: DecoderAttentionAdapter}


def install_adapters(model: nn.Module) -> list[str]:
    """Replace every module of a type in `ADAPTERS` (and `sam2_adapters`) by its adapter; returns the names
    replaced."""
    adapters = {**ADAPTERS, **sam2_adapters(model)}
    replaced = []
    for name, module in list(model.named_modules()):
        adapter = adapters.get(type(module))
        if adapter is not None:
            set_submodule(model, name, adapter(module))
            replaced.append(name)
    return replaced


# Blocks whose fuse() returns the single layer they compute at inference (timm's re-parameterization).
REPARAMETERIZABLE = (RepVggDw,)


@torch.no_grad()
def fuse_reparameterizable(model: nn.Module) -> list[str]:
    """Replace each re-parameterizable block by its fused layer (eval mode: BatchNorm statistics); returns the names."""
    fused = []
    for name, module in list(model.named_modules()):
        if isinstance(module, REPARAMETERIZABLE):
            set_submodule(model, name, module.fuse())
            fused.append(name)
    return fused


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold each BatchNorm2d that directly follows a Conv2d inside an nn.Sequential; returns the conv names."""
    folded = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or not bn.track_running_stats:
                continue
            factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
            setattr(seq, bn_name, nn.Identity())
            folded.append(f"{seq_name}.{conv_name}" if seq_name else conv_name)
    return folded


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (torch's set_submodule refuses ModuleList indices in old versions)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
