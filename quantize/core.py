"""The quantizer arithmetic: pure functions on tensors, shared by the modules, search and tests.

Uniform symmetric quantization (SPEC 3): x_q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1), and
the fake-quantized (simulated) value is x_q * s. Rounding is half-to-even, as in torch.round and
ONNX QuantizeLinear. Twin-uniform variants (PTQ4ViT) for the two non-Gaussian activations:
- post-softmax values in [0, 1]: [0, split) with scale split / 2^(b-1) and [split, 1] with scale
  1 / (2^(b-1) - 1), each with 2^(b-1) unsigned levels (one bit says which range);
- post-GELU values in [-0.17, inf): negatives with the fixed scale 0.16997 / 2^(b-1) on
  2^(b-1) levels, non-negatives with a searched scale on 2^(b-1) levels.
"""

from __future__ import annotations

import torch

GELU_MIN = 0.16997  # -min(GELU(x)) = 0.16997... at x = -0.7518


def int_range(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range of a `bits`-wide quantizer: (-2^(b-1), 2^(b-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize: clamp(round(x / scale), qmin, qmax) * scale (scale broadcasts against x)."""
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Signed symmetric `bits`-wide fake quantization with `scale` (a scalar or broadcastable tensor)."""
    return fake_quant(x, scale, *int_range(bits))


def channel_view(scale: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A length-C per-channel vector reshaped to broadcast along `axis` of an `ndim`-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def twin_softmax_quant(x: torch.Tensor, split: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Two-range quantization of post-softmax values in [0, 1] (see the module docstring)."""
    levels = 2 ** (bits - 1)
    low = fake_quant(x, split / levels, 0, levels - 1)
    high = fake_quant(x, 1.0 / (levels - 1), 0, levels - 1)
    return torch.where(x < split, low, high)


def twin_gelu_quant(x: torch.Tensor, pos_scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Two-range quantization of post-GELU values: fixed negative scale, searched positive one."""
    levels = 2 ** (bits - 1)
    negative = fake_quant(x, GELU_MIN / levels, -levels, 0)
    positive = fake_quant(x, pos_scale, 0, levels - 1)
    return torch.where(x < 0, negative, positive)
