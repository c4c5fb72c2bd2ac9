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
- per quantizer, the fraction of values PyTorch would round differently from ORT given the same
  upstream values is only exact ties (~1e-6) when each layer of the graph computes what the
  simulation computes; a layer that does not (a different scale, layout, or an extra rounding
  inside a fused kernel) shows up as a large fraction or a difference of more than one step;
- the outputs agree to float precision;
- the shipped file gives the same outputs as the instrumented one, which runs the same compute
  kernels (checked by op count; exposing tensors adds only Transpose and Q/DQ re-encodings).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from quantize.modules import ActQuantizer
from quantize.onnx_runtime import count_kernels, open_session, write_ort_format

# Scope-named nodes of the TorchScript exporter: ".../input_quants.0/QuantizeLinear" (an input; a
# twin-uniform one has two per call, low range first) or ".../output_quant/QuantizeLinear" (a
# convolution's output); repeated nodes get "_1", "_2"... suffixes.
_QUANT_NODE = re.compile(r"^/(.*/(?:input_quants\.\d+|output_quant))/QuantizeLinear(_\d+)?$")
ZERO_POINT = 128  # activations are uint8 with zero point 128 (see quantize.modules)


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


@contextlib.contextmanager
def forced_quantizers(
    module: nn.Module, tensors: dict[str, list[str]], values: dict[str, np.ndarray]
) -> Iterator[dict[str, dict[str, float]]]:
    """Make each activation quantizer of `module` return ORT's value instead of its own rounding.

    Yields a dict filled during the forward: quantizer name -> {"mismatch": fraction of values
    whose own rounding differs from ORT's, "max_steps": largest difference in steps}.
    Quantizers without a graph tensor are listed under "unmatched" with mismatch 1.0.
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
                stats[f"{name}#{call}"] = {"mismatch": 1.0, "max_steps": float("inf"), "unmatched": 1.0}
                return None
            # A twin-uniform input's two ranges are each uniform, with their own scale.
            scales = quantizer.range_scales() if isinstance(own, tuple) else (quantizer.scale,)
            forced_parts, differs, steps = [], 0, 0.0
            for tensor, part, scale in zip(graph, parts, scales, strict=True):
                value = (values[tensor].astype(np.float32) - ZERO_POINT) * scale.numpy()
                forced = torch.from_numpy(np.ascontiguousarray(value)).reshape(part.shape)
                differs += int((forced != part).sum())
                steps = max(steps, float(((forced - part).abs() / scale).max()))
                forced_parts.append(forced)
            if isinstance(own, tuple):
                steps = twin_steps(forced_parts, parts, scales)
            key = name if call == 0 else f"{name}#{call}"
            stats[key] = {"mismatch": differs / sum(part.numel() for part in parts), "max_steps": steps}
            return tuple(forced_parts) if isinstance(own, tuple) else forced_parts[0]

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
