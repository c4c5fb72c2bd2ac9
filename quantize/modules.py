"""Quantized layers: Linear, Conv2d, ConvTranspose2d and MatMul with fake-quantized inputs and weights.

Each layer keeps its float parameters under the original names (so a quantized state dict is the
float one plus ``input_quants.N.*`` and ``weight_quant.scale`` buffers) and quantizes on the fly:
weights per output channel, each input activation per tensor. Until calibrated, or with
``enabled = False``, the quantizers pass values through.

In ``export_int8`` mode the uniform quantizers emit `torch.fake_quantize_*` ops, which the ONNX
exporter writes as QuantizeLinear/DequantizeLinear pairs: activations as uint8 with zero point
128 (the same grid as signed symmetric int8, the layout ONNX Runtime's x86 kernels prefer), weights
as int8 per channel. Widths under 8 bits are clipped to their own range first, so a 6-bit model
runs on the same int8 kernels with exactly its 6-bit values.

A twin-uniform input of a matrix product (Linear, 1x1 convolution, attention product) is exported
as two uniform int8 tensors, the values in its low range (zero elsewhere) and those in its high
range, each with its own scale; the product is linear in that input, so it is computed as the sum
of two integer products, ``W @ low + W @ high``. Each value lies in exactly one range and the other
tensor holds an exact zero there, so the sum is the twin-uniform product itself. A twin input of a
window op (depthwise or transposed convolution) is the same two tensors added back together: a
float convolution of int8-grid values.

A product that runs on integer kernels adds its bias inside them (`QuantLayer.integer_bias`): the
simulated layer rounds the bias to the int32 grid of input scale x weight scale (for a twin input,
its high range's), and the export writes Linear layers and 1x1 convolutions as 2-D Gemms, which ORT
fuses with that int32 bias into QGemm, instead of an integer product followed by a float Add.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantize.core import (
    GELU_MIN,
    channel_view,
    int_range,
    quantize_symmetric,
    twin_gelu_quant,
    twin_softmax_quant,
)
from student_models.tiny_vit import MatMul

ACT_KINDS = ("uniform", "twin_softmax", "twin_gelu")


class AtOrAbove(torch.autograd.Function):
    """``x`` where ``x > alpha``, else 0; exported as ONNX ThresholdedRelu(alpha).

    With alpha the float32 just below a twin-softmax split, ``x > alpha`` is ``x >= split``: the high
    range. One elementwise pass where ``x * (x < split)`` takes three (Less, Cast, Mul) and a
    Less + Where pair more again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: ANN001
        return x * (x > alpha).to(x.dtype)

    @staticmethod
    def symbolic(g, x, alpha: float):  # noqa: ANN001, ANN205
        return g.op("ThresholdedRelu", x, alpha_f=alpha)


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer; `kind` is "uniform", "twin_softmax" or "twin_gelu".

    Buffers: ``scale`` (the uniform scale, or the positive-range scale for twin_gelu) and
    ``split`` (the range boundary for twin_softmax).
    """

    def __init__(self, bits: int, kind: str = "uniform") -> None:
        super().__init__()
        if kind not in ACT_KINDS:
            raise ValueError(f"unknown activation quantizer kind {kind!r}; choose from {ACT_KINDS}")
        self.bits, self.kind = bits, kind
        self.enabled = False
        self.export_int8 = False
        self.feeds_product = False  # set by a layer that sums its product over a twin input's two ranges
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("split", torch.tensor(1.0))

    @property
    def runs_int8(self) -> bool:
        """Whether the exported graph can feed this input to an integer kernel."""
        return self.bits <= 8 and (self.kind == "uniform" or self.feeds_product)

    def range_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A twin-uniform quantizer's (low-range scale, high-range scale)."""
        levels = 2 ** (self.bits - 1)
        if self.kind == "twin_softmax":
            return self.split / levels, torch.ones_like(self.split) / (levels - 1)
        return torch.full_like(self.scale, GELU_MIN / levels), self.scale

    def twin_ranges_int8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high): `x`'s twin-uniform values as two uint8 QDQ tensors, each zero outside its range.

        The same values as `quantize` (low + high, one of them an exact 0 at each position): below the
        boundary (split, or 0 for GELU) the low range with 2^(b-1) levels (non-negative for softmax,
        non-positive for GELU), from the boundary up the high range with 2^(b-1) non-negative levels.
        The uint8 container's saturation is the 8-bit ranges' own clamp, so only narrower widths clamp.
        Few elementwise ops: post-GELU tensors are the largest activations of a CNN stage.
        """
        levels = 2 ** (self.bits - 1)
        low_scale, high_scale = self.range_scales()
        if self.kind == "twin_softmax":
            high = AtOrAbove.apply(x, float(torch.nextafter(self.split, torch.tensor(-torch.inf))))  # exact: x or 0
            low = x - high  # exact: 0 or x
            if self.bits < 8:
                low, high = (
                    torch.clamp(low, max=(levels - 1) * low_scale),
                    torch.clamp(high, max=(levels - 1) * high_scale),
                )
        else:  # GELU: the sign decides the range
            low_min = -levels * low_scale if self.bits < 8 else None
            high_max = (levels - 1) * high_scale if self.bits < 8 else None
            low, high = torch.clamp(x, min=low_min, max=0.0), torch.clamp(x, min=0.0, max=high_max)
        zero_point = torch.tensor(128, dtype=torch.int32)
        return (
            torch.fake_quantize_per_tensor_affine(low, low_scale, zero_point, 0, 255),
            torch.fake_quantize_per_tensor_affine(high, high_scale, zero_point, 0, 255),
        )

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `x` with explicit parameters (used by the scale search)."""
        if self.kind == "twin_softmax":
            return twin_softmax_quant(x, split, self.bits)
        if self.kind == "twin_gelu":
            return twin_gelu_quant(x, scale, self.bits)
        return quantize_symmetric(x, scale, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The quantized `x`; in int8 export mode a twin-uniform input gives its two ranges, (low, high)."""
        if not self.enabled:
            return x
        if self.export_int8 and self.bits <= 8 and self.kind != "uniform":
            return self.twin_ranges_int8(x)
        if self.export_int8 and self.runs_int8:
            qmin, qmax = int_range(self.bits)
            if self.bits < 8:
                x = torch.clamp(x, qmin * self.scale, qmax * self.scale)
            zero_point = torch.tensor(128, dtype=torch.int32)
            return torch.fake_quantize_per_tensor_affine(x, self.scale, zero_point, 0, 255)
        return self.quantize(x, self.scale, self.split)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, enabled={self.enabled}"


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer; ``scale`` has one entry per channel of `axis`."""

    def __init__(self, bits: int, channels: int, axis: int) -> None:
        super().__init__()
        self.bits, self.axis = bits, axis
        self.enabled = False
        self.export_int8 = False
        self.register_buffer("scale", torch.ones(channels))

    def quantize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Fake-quantize `w` with an explicit per-channel `scale` (used by the scale search)."""
        return quantize_symmetric(w, channel_view(scale, w.ndim, self.axis), self.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.export_int8 and self.bits <= 8:
            qmin, qmax = int_range(self.bits)
            view = channel_view(self.scale, w.ndim, self.axis)
            if self.bits < 8:
                w = torch.clamp(w, qmin * view, qmax * view)
            zero_points = torch.zeros_like(self.scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, self.scale, zero_points, self.axis, -128, 127)
        return self.quantize(w, self.scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, enabled={self.enabled}"


def summed_over_ranges(x: torch.Tensor | tuple[torch.Tensor, ...], product: Callable) -> torch.Tensor:
    """``product(x)``, or for a twin-uniform input exported as (low, high), ``product(low) + product(high)``."""
    if not isinstance(x, tuple):
        return product(x)
    out = product(x[0])
    for part in x[1:]:
        out = out + product(part)
    return out


def each_range(x: torch.Tensor | tuple[torch.Tensor, ...], fn: Callable) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(x)``, or for a twin-uniform input exported as (low, high), ``(fn(low), fn(high))``."""
    return tuple(fn(part) for part in x) if isinstance(x, tuple) else fn(x)


class QuantLayer(nn.Module, abc.ABC):
    """Common part: ``input_quants`` (one per activation input) and an optional ``weight_quant``."""

    weight_axis: int | None = 0
    num_inputs = 1

    @property
    def is_product(self) -> bool:
        """Whether the layer's op is a matrix product (linear in each input, no spatial window)."""
        return True

    def init_quantizers(self, w_bits: int, a_bits: int, input_kinds: list[str]) -> None:
        self.input_quants = nn.ModuleList(ActQuantizer(a_bits, kind) for kind in input_kinds)
        for quantizer in self.input_quants:
            quantizer.feeds_product = self.is_product and quantizer.kind != "uniform"
        if self.weight_axis is not None:
            weight = self.weight
            self.weight_quant = WeightQuantizer(w_bits, weight.shape[self.weight_axis], self.weight_axis)
        self.output_quant: ActQuantizer | None = None

    def add_output_quantizer(self, bits: int) -> None:
        """Quantize the layer's output too (`wants_output_quantizer`; disabled until calibrated)."""
        self.output_quant = ActQuantizer(bits)

    def quantized_output(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.output_quant is None else self.output_quant(out)

    @property
    def integer_bias(self) -> bool:
        """Whether the bias is added inside the integer product, on the int32 grid of input scale x weight
        scale (ORT's QGemm and QLinearConv take it so): the layer has a bias and its product runs on
        integer kernels. Layers that override `forward` to use `quantized_bias` say when."""
        return False

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias, rounded to the int32 grid of input scale x per-channel weight scale where `integer_bias`.

        A twin-uniform input's grid is its high range's: the bias rides in that range's product.
        """
        if not self.integer_bias:
            return self.bias
        quantizer = self.input_quants[0]
        scale = quantizer.scale if quantizer.kind == "uniform" else quantizer.range_scales()[1]
        step = scale * self.weight_quant.scale
        return torch.round(self.bias / step) * step

    def _products_run_int8(self) -> bool:
        """A bias, an enabled <= 8-bit weight quantizer and an enabled input quantizer ORT feeds to integer kernels."""
        quantizer = self.input_quants[0]
        return (
            self.bias is not None
            and quantizer.enabled
            and quantizer.runs_int8
            and self.weight_quant.enabled
            and self.weight_quant.bits <= 8
        )

    @abc.abstractmethod
    def float_forward(
        self, *inputs: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's op on given (already quantized or float) inputs, weight and bias (None: the layer's own)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = tuple(quant(x) for quant, x in zip(self.input_quants, inputs, strict=True))
        if not self.is_product:  # a window op: a twin input's two ranges are added back into one tensor first
            inputs = tuple(summed_over_ranges(x, lambda part: part) for x in inputs)
        if self.weight_axis is None:  # no weight, no bias
            return self.float_forward(*inputs)
        return self.float_forward(*inputs, weight=self.weight_quant(self.weight), bias=self.quantized_bias())


def integer_gemm(x: torch.Tensor | tuple[torch.Tensor, ...], weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` on 2-D rows, exported as one Gemm per range of `x` (the bias in the last).

    ORT fuses DQ -> Gemm <- DQ(int8 weight) with a DQ(int32) bias (`quantize.qdq_graph.quantize_bias`)
    into QGemm: the bias is added to the int32 accumulator, so no float Add pass over the output
    follows, as it does after MatMul (MatMulIntegerToFloat + Add). A twin-uniform input's bias is on
    its high range's grid.
    """
    parts = x if isinstance(x, tuple) else (x,)
    out = None
    for k, part in enumerate(parts):
        product = F.linear(part, weight, bias if k == len(parts) - 1 else None)
        out = product if out is None else out + product
    return out


def product_over_channels(
    x: torch.Tensor | tuple[torch.Tensor, ...], weight: torch.Tensor, bias: torch.Tensor | None, integer_bias: bool
) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension, as the INT8 export should see it.

    With ``integer_bias``: 2-D rows into `integer_gemm` (QGemm, the bias inside), reshaped back. Otherwise
    (no bias, or an input left float): MatMul (+ Add), which ORT fuses with a DQ input into its integer kernels.
    """
    if integer_bias:
        shape = (x[0] if isinstance(x, tuple) else x).shape
        if len(shape) == 2:  # already rows: no Reshape nodes in the exported graph
            return integer_gemm(x, weight, bias)
        rows = each_range(x, lambda part: part.reshape(-1, shape[-1]))
        return integer_gemm(rows, weight, bias).reshape(*shape[:-1], weight.shape[0])
    out = summed_over_ranges(x, lambda part: torch.matmul(part, weight.t()))
    return out + bias if bias is not None else out


class QuantLinear(QuantLayer, nn.Linear):
    """Linear with a quantized input and weight, and optionally a quantized output (``output_quant``); with an
    integer product its bias is on the int32 grid."""

    @property
    def integer_bias(self) -> bool:
        return self._products_run_int8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight_quant.export_int8:
            return self.quantized_output(super().forward(x))
        x, weight = self.input_quants[0](x), self.weight_quant(self.weight)
        return self.quantized_output(product_over_channels(x, weight, self.quantized_bias(), self.integer_bias))

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, self.weight if weight is None else weight, self.bias if bias is None else bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """Conv2d with a quantized input and weight, and optionally a quantized output (``output_quant``).

    With an output quantizer the bias is rounded to the int32 grid of input scale x weight scale,
    as ONNX Runtime's QLinearConv adds it, so the simulated layer is the integer one.
    """

    # In int8 export mode a pointwise layer is written as NHWC rows -> Gemm (what ONNX Runtime runs fastest);
    # False writes it as the 1x1 Conv it is, for runtimes with native int8 convolutions (OpenVINO).
    pointwise_as_gemm = True

    @property
    def is_product(self) -> bool:
        return self.is_pointwise

    @property
    def is_pointwise(self) -> bool:
        """A 1x1, stride-1, ungrouped, unpadded convolution: a matrix product over channels."""
        return (
            self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.groups == 1
            and self.padding in ((0, 0), "valid")
        )

    @property
    def integer_bias(self) -> bool:
        """With an output quantizer (QLinearConv) or as a pointwise product on integer kernels (QGemm)."""
        if self.output_quant is not None and not self.is_pointwise:
            return self.bias is not None and self.input_quants[0].enabled and self.weight_quant.enabled
        return self.is_pointwise and self._products_run_int8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.weight_quant.export_int8 and self.is_pointwise and self.pointwise_as_gemm):
            return self.quantized_output(super().forward(x))
        # Exported as NHWC rows -> Gemm (or MatMul) with a 2-D per-channel weight, so ORT runs it on its
        # integer kernels, the bias inside where `integer_bias` (ORT's ConvInteger kernel is slower than
        # its float Conv). 4-D NCHW <-> NHWC permutes (not 3-D transposes next to
        # reshapes) let ORT's transpose optimiser move them through Gelu/QuantizeLinear and cancel them
        # against QLinearConv's own NHWC layout.
        batch, channels, height, width = x.shape
        weight = self.weight_quant(self.weight.reshape(self.out_channels, channels))
        x = self.input_quants[0](x)
        bias = self.quantized_bias()
        rows = each_range(x, lambda part: part.permute(0, 2, 3, 1).reshape(-1, channels))
        out = product_over_channels(rows, weight, bias, self.integer_bias)
        return self.quantized_output(out.reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2))

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._conv_forward(x, self.weight if weight is None else weight, self.bias if bias is None else bias)


class QuantConvTranspose2d(QuantLayer, nn.ConvTranspose2d):
    weight_axis = 1  # weight is C_in x C_out/groups x kH x kW
    is_product = False

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight, bias = self.weight if weight is None else weight, self.bias if bias is None else bias
        return F.conv_transpose2d(
            x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


class QuantMatMul(QuantLayer):
    """``a @ b`` with both operands quantized per tensor (attention's Q*K^T and attn*V)."""

    weight_axis = None
    num_inputs = 2

    def float_forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return summed_over_ranges(a, lambda a_part: summed_over_ranges(b, lambda b_part: a_part @ b_part))


def _copy_params(source: nn.Module, target: nn.Module) -> nn.Module:
    for name, param in source.named_parameters(recurse=False):
        setattr(target, name, param)
    target.train(source.training)
    return target


def wants_output_quantizer(layer: QuantLayer, conv_outputs: bool, product_outputs: bool = False) -> bool:
    """Whether `layer` gets an output quantizer: with `conv_outputs` a non-pointwise Conv2d with int8-runnable
    input and weight; with `product_outputs` a Linear with uniform input (XNNPACK's int8 products take one
    range) and <= 8-bit weight."""
    if isinstance(layer, QuantConv2d) and not layer.is_pointwise:
        inputs_fit = conv_outputs and all(q.runs_int8 for q in layer.input_quants)
    else:
        inputs_fit = product_outputs and isinstance(layer, QuantLinear)
        inputs_fit = inputs_fit and all(q.kind == "uniform" and q.runs_int8 for q in layer.input_quants)
    return inputs_fit and layer.weight_quant.bits <= 8


def quantized_copy(
    module: nn.Module,
    w_bits: int,
    a_bits: int,
    input_kinds: list[str],
    conv_outputs: bool = False,
    product_outputs: bool = False,
) -> QuantLayer:
    """A quantized layer sharing `module`'s parameters (Linear, Conv2d, ConvTranspose2d or a MatMul).

    `conv_outputs` / `product_outputs`: output quantizers where `wants_output_quantizer` says (disabled until
    calibrated).
    """
    if isinstance(module, nn.Linear):
        layer: QuantLayer = QuantLinear(module.in_features, module.out_features, bias=module.bias is not None)
    elif isinstance(module, nn.ConvTranspose2d):
        layer = QuantConvTranspose2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.output_padding, module.groups, module.bias is not None, module.dilation,
        )  # fmt: skip
    elif isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"only zero-padded convolutions are quantized, got padding_mode={module.padding_mode!r}")
        layer = QuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None,
        )  # fmt: skip
    elif isinstance(module, MatMul):
        layer = QuantMatMul()
    else:
        raise TypeError(
            f"cannot quantize a {type(module).__name__}: quantized layers exist for Linear, Conv2d, ConvTranspose2d"
            " and MatMul (student_models.tiny_vit)"
        )
    _copy_params(module, layer)
    layer.init_quantizers(w_bits, a_bits, input_kinds)
    if wants_output_quantizer(layer, conv_outputs, product_outputs):
        layer.add_output_quantizer(a_bits)
    return layer
