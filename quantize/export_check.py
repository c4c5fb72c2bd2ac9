"""Checking an INT8 graph against the simulated-quantized PyTorch model with shared rounding decisions.

Why not only end to end: a quantized network is discontinuous, so two implementations that differ in
the last float bit (summation order, Erf, LayerNorm) round a few values to neighbouring integers,
and each such step grows downstream into more of them. Measured on tinyvit_test W8A8: scaling the
probe image by (1 + 1e-7) moves the simulated encoder's output by 2.1% RMS (the float model's by
4e-7), against a quantization error of 3.4%. The free-running difference between ORT and PyTorch
therefore sits at that floor whatever the graph does, and a bound on it cannot tell a correct graph
from one that is slightly wrong.

So the graph is run with every activation quantizer's output exposed (uint8 QuantizeLinear results,
two per call for a twin-uniform input, one per range), and the PyTorch model is run with those
values in place of its own rounding (teacher forcing). Then, with the rounding decisions shared:
- per quantizer, every value ORT rounds differently from PyTorch, given the same upstream values,
  must be a tie: PyTorch's own input to that quantizer lies within float error of a rounding
  boundary. The float error is measured (`float64_inputs`: the same pass in float64) and widened by
  `TIE_FLOAT_ERRORS`, plus `TIE_RELATIVE` of the value's magnitude or its range's, whichever is
  larger, for float ops whose last bits another implementation computes otherwise (Erf, LayerNorm's
  reductions). A layer that computes something else (a different scale, a weight rounded the other
  way, saturation, an extra rounding inside a fused kernel) moves values that lie nowhere near a
  boundary, and any one of them fails the check with its quantizer named;
- the outputs agree to float precision;
- the shipped file gives the same outputs as the instrumented one, which runs the same compute
  kernels (checked by op count; exposing tensors adds only Transpose and Q/DQ re-encodings).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from quantize.modules import ActQuantizer, WeightQuantizer
from quantize.onnx_runtime import count_kernels, open_session, write_ort_format

# Scope-named nodes of the TorchScript exporter: ".../input_quants.0/QuantizeLinear" (an input; a
# twin-uniform one has two per call, low range first) or ".../output_quant/QuantizeLinear" (a
# convolution's output); repeated nodes get "_1", "_2"... suffixes.
_QUANT_NODE = re.compile(r"^/(.*/(?:input_quants\.\d+|output_quant))/QuantizeLinear(_\d+)?$")
ZERO_POINT = 128  # activations are uint8 with zero point 128 (see quantize.modules)
# A correct layer's float error in a quantizer's input is measured, not assumed: the model is run again
# in float64 on the same (ORT's) upstream values, and |float32 input - float64 input| is PyTorch's own
# error at each value. ORT's integer products are exact, so where a product feeds the quantizer ORT's
# input sits near the float64 one; its float ops (LayerNorm, Erf, a fused bias and residual add) have
# errors of their own that float64 cannot see. So an output may round the other way only where its
# input lies within TIE_FLOAT_ERRORS times that value's measured error, plus TIE_RELATIVE of the larger
# of its magnitude and the top of its range, of a rounding boundary. 2^-14 is 1/128 of a step of an
# 8-bit range; the ties of a random tinyvit_5m export lie within 5e-4 steps of a boundary.
TIE_FLOAT_ERRORS = 4.0
TIE_RELATIVE = 2.0**-14


def _module_name(scope: str) -> str:
    """Exporter scope "image_encoder/patch_embed/seq/seq.0/c/input_quants.0" -> module name
    "image_encoder.patch_embed.seq.0.c.input_quants.0" (a container's own scope precedes "name.i")."""
    parts = scope.split("/")
    kept = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return ".".join(kept)


def quantizer_tensors(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Activation-quantizer module name -> the graph tensors holding its outputs, one per call, in graph order."""
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        match = _QUANT_NODE.match(node.name)
        if match:
            found.setdefault(_module_name(match.group(1)), []).append(node.output[0])
    return found


def instrument(path: str | os.PathLike, out_path: str | os.PathLike) -> dict[str, list[str]]:
    """Write a copy of the graph at `path` with every activation quantizer's output as an extra graph output."""
    model = onnx.load(os.fspath(path))
    tensors = quantizer_tensors(model)
    existing = {o.name for o in model.graph.output}
    for name in dict.fromkeys(t for names in tensors.values() for t in names):
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    onnx.save(model, os.fspath(out_path))
    return tensors


def _graph_name(name: str, tensors: dict[str, list[str]]) -> str:
    """The graph's name for module `name`: itself or its longest suffix found in the graph (a module
    reached through a method call, e.g. ``mask_decoder.predict_masks``, leaves no scope of its own)."""
    matches = [key for key in tensors if name == key or name.endswith("." + key)]
    return max(matches, key=len) if matches else name


def twin_steps(
    forced: list[torch.Tensor], own: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Largest difference between ORT's and PyTorch's twin-uniform values (low + high), in steps.

    A value's step is that of the range it lies in (non-zero high part: the high range). A value
    at the boundary that the two put in different ranges, after a last-bit difference upstream (a
    softmax value at the split), counts in steps of the coarser of the two ranges: one step is
    then a tie, as within a range; counted per part it would look like up to 2^(b-1) - 1 steps.
    """

    def step(parts) -> torch.Tensor:
        return torch.where(parts[1] != 0, scales[1], scales[0])

    unit = torch.maximum(step(forced), step(own))
    return float(((forced[0] + forced[1]) - (own[0] + own[1])).abs().div(unit).max())


def range_top(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of the range each of `x` falls in (a twin-uniform quantizer has two)."""
    levels = 2 ** (quantizer.bits - 1)
    if quantizer.kind == "uniform":
        return levels * quantizer.scale
    low_scale, high_scale = quantizer.range_scales()
    in_low = x < (quantizer.split if quantizer.kind == "twin_softmax" else 0.0)
    return torch.where(in_low, levels * low_scale, (levels - 1) * high_scale)


def range_steps(quantizer: ActQuantizer) -> tuple[torch.Tensor, ...]:
    """The step of each of `quantizer`'s ranges: one for a uniform quantizer, (low, high) for a twin-uniform one."""
    return (quantizer.scale,) if quantizer.kind == "uniform" else quantizer.range_scales()


def _total(values: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A quantizer's value: itself, or the sum of a twin-uniform input's two ranges (one is 0 at each position)."""
    return sum(values[1:], values[0]) if isinstance(values, tuple) else values


def tie_range(
    quantizer: ActQuantizer, x: torch.Tensor, float_error: torch.Tensor | float = 0.0, relative: float = TIE_RELATIVE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) value `quantizer` gives for an input within float error of `x`: the measured
    `float_error` of each value (|float32 - float64|) times `TIE_FLOAT_ERRORS`, plus `relative` (by default
    `TIE_RELATIVE`) of the larger of its magnitude and the top of its range (`range_top`).

    Quantization is monotone within a range, so a value another correct implementation rounds `x` to lies
    between the lowest and highest of its values at the interval's ends and at `x` (the middle one counts
    where the interval crosses a twin-softmax split: the top of the low range lies above the bottom of
    the high one).
    """
    delta = TIE_FLOAT_ERRORS * float_error + relative * torch.maximum(x.abs(), range_top(quantizer, x))
    # forward, not __call__: the bounds must not pass through the checking hook.
    values = torch.stack([_total(quantizer.forward(x + sign * delta)) for sign in (-1, 0, 1)])
    return values.amin(dim=0), values.amax(dim=0)


def unexplained_roundings(
    quantizer: ActQuantizer,
    x: torch.Tensor,
    got: torch.Tensor,
    float_error: torch.Tensor | float = 0.0,
    relative: float = TIE_RELATIVE,
) -> int:
    """How many of `got` (another implementation's quantized `x`) no tie explains (see `tie_range`)."""
    low, high = tie_range(quantizer, x, float_error, relative)
    slack = 1e-3 * min(float(step) for step in range_steps(quantizer))  # float noise of the value itself
    return int(((got < low - slack) | (got > high + slack)).sum())


def _dequantized(values: np.ndarray, scale: torch.Tensor) -> np.ndarray:
    """uint8 graph values as the float32 values they stand for."""
    return np.ascontiguousarray((values.astype(np.float32) - ZERO_POINT) * scale.float().numpy())


@contextlib.contextmanager
def forced_quantizers(
    module: nn.Module,
    tensors: dict[str, list[str]],
    values: dict[str, np.ndarray],
    reference_inputs: dict[str, torch.Tensor] | None = None,
    tie_relative: float = TIE_RELATIVE,
) -> Iterator[dict[str, dict[str, float]]]:
    """Make each activation quantizer of `module` return ORT's value instead of its own rounding.

    Yields a dict filled during the forward: quantizer call ("name", then "name#1", ...) ->
    {"mismatch": fraction of values whose own rounding differs from ORT's, "unexplained": fraction
    of values that differ and are not ties (`unexplained_roundings`, with the float error measured
    against `reference_inputs`: the quantizers' inputs by call, from `float64_inputs`), "float_error":
    the largest such error, "max_steps": largest difference in steps}. Quantizers without a graph tensor are
    listed with "unmatched" and every fraction 1.0. Without `reference_inputs`, the dict holds each
    call's "input" instead (the float64 pass). `tie_relative`: the runtime's float allowance (`tie_range`).
    """
    stats: dict[str, dict[str, float]] = {}
    calls: dict[str, int] = {}
    used: dict[str, int] = {}  # graph tensors consumed so far, per quantizer (a twin input of a product uses two)

    def hook(name: str) -> Callable:
        def replace(quantizer: ActQuantizer, inputs: tuple, own: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
            if not quantizer.enabled:
                return None
            call, start = calls.get(name, 0), used.get(name, 0)
            parts = own if isinstance(own, tuple) else (own,)
            calls[name], used[name] = call + 1, start + len(parts)
            graph = tensors.get(name, [])[start : start + len(parts)]
            if len(graph) < len(parts):
                stats[f"{name}#{call}"] = {"mismatch": 1.0, "unexplained": 1.0, "max_steps": float("inf"),
                                           "unmatched": 1.0}  # fmt: skip
                return None
            # A twin-uniform input's two ranges are each uniform, with their own scale.
            scales = quantizer.range_scales() if isinstance(own, tuple) else (quantizer.scale,)
            forced_parts = [
                torch.from_numpy(_dequantized(values[tensor], scale)).reshape(part.shape).to(part.dtype)
                for tensor, part, scale in zip(graph, parts, scales, strict=True)
            ]
            forced = tuple(forced_parts) if isinstance(own, tuple) else forced_parts[0]
            key = name if call == 0 else f"{name}#{call}"
            if reference_inputs is None:
                stats[key] = {"input": inputs[0]}
                return forced
            differs = sum(int((f != part).sum()) for f, part in zip(forced_parts, parts, strict=True))
            if isinstance(own, tuple):
                steps = twin_steps(forced_parts, parts, scales)
            else:
                steps = float(((forced - own).abs() / quantizer.scale).max())
            float_error = (inputs[0].double() - reference_inputs[key]).abs().to(inputs[0].dtype)
            unexplained = unexplained_roundings(quantizer, inputs[0], _total(forced), float_error, tie_relative)
            stats[key] = {"mismatch": differs / sum(part.numel() for part in parts),
                          "unexplained": unexplained / inputs[0].numel(), "float_error": float(float_error.max()),
                          "max_steps": steps}  # fmt: skip
            return forced

        return replace

    handles = [
        m.register_forward_hook(hook(_graph_name(n, tensors)))
        for n, m in module.named_modules()
        if isinstance(m, ActQuantizer)
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def float64_inputs(
    module: nn.Module, args: tuple, tensors: dict[str, list[str]], values: dict[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """Each activation quantizer's input, by call, in a float64 copy of `module` fed ORT's quantized values.

    With the same values upstream of every quantizer as the float32 pass, the difference between the two
    passes' inputs is the float32 error of the layers in between alone; the weights are the float32
    model's int8 values.
    """
    copy64 = copy.deepcopy(module).double()
    for part in copy64.modules():
        if isinstance(part, WeightQuantizer):
            part.scale.data = part.scale.float()  # what per-channel fake quantization takes; its output is replaced
        elif type(part).__name__ == "PositionEmbeddingRandom":  # segment_anything's, or sam2's copy of it
            part.float()  # casts its coordinates to float32 itself; its float32 encoding is the float32 pass's
    originals = dict(module.named_modules())
    for name, quantizer in copy64.named_modules():
        if isinstance(quantizer, WeightQuantizer):
            # The float32 model's int8 weights, exactly: rounding w / scale in float64 can break a tie the other way.
            quantizer.register_forward_hook(
                lambda _, inputs, out, same=originals[name]: same(inputs[0].float()).double()
            )
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    with forced_quantizers(copy64, tensors, values) as recorded:
        copy64(*args64)
    return {key: stat["input"] for key, stat in recorded.items() if "input" in stat}


def run_instrumented(
    path: Path, feeds: dict[str, np.ndarray], ort_format: bool
) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, int], dict[str, int]]:
    """Run the instrumented copy of `path` (an .onnx file, or the .onnx behind an .ort file, then
    converted the way the .ort file was).

    Returns (all outputs by name, quantizer tensors, op counts of the shipped and the instrumented
    graphs as ORT runs them).
    """
    source = path.with_suffix(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name
        tensors = instrument(source, copy)
        target = write_ort_format(copy) if ort_format else copy
        session = open_session(target)
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        counts = (count_kernels(source), count_kernels(copy))
    return outputs, tensors, *counts
