"""ExecuTorch with XNNPACK: the calibrated model as ``encoder.pte`` / ``decoder.pte``, checked in ExecuTorch's
runtime, and `ExecuTorchSam` to run them.

The programs are lowered to XNNPACK (``to_edge_transform_and_lower`` with ``XnnpackPartitioner``) from the
PT2E quantized form, with our searched scales written in as constants, not re-calibrated by observers: each
activation quantizer becomes a ``quantized_decomposed`` quantize/dequantize pair on its signed int8 grid
(zero point 0: the same values as the ONNX graphs' uint8 with zero point 128), each weight an int8 constant
with its per-channel scales. XNNPACK's static int8 products quantize their outputs, so a Linear or
convolution runs on XNNPACK's int8 kernels where the model quantizes its output too (``PTQConfig.conv_outputs``
for convolutions, ``PTQConfig.product_outputs`` for Linear layers) and its input is
uniform; every other quantized layer (attention products, transposed convolutions, twin-uniform inputs, and
products without an output quantizer) computes in float32 on int8-grid values and dequantized weights,
exactly what the simulated model computes.

The INT8 programs are checked like the ONNX graphs in ONNX Runtime (`quantize.export_check`): an
instrumented program returns every quantizer's values as extra outputs, the simulated PyTorch model runs
with ExecuTorch's rounding decisions and every value rounded apart must be a tie; the shipped program must
give the instrumented one's outputs (XNNPACK runs the same kernels either way).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantize.core import int_range
from quantize.modules import ActQuantizer, QuantConv2d, QuantLayer, QuantLinear
from quantize.onnx_export import (
    TOLERANCE,
    ExportCheck,
    compare_forced,
    cpu_copy,
    export_mode,
    output_diffs,
    probe_parts,
    refuse_failed,
)
from quantize.onnx_runtime import CpuSamRunner
from student_models.extras import MissingExtraError
from student_models.families import FAMILIES
from student_models.sam2_pipeline import Sam2Features

# The decoder program takes one prompt of up to MAX_POINTS points (ExecuTorch plans memory for an upper bound):
# XNNPACK reshapes only one dynamic dimension, and a prompt batch with a varying point count would be two.
MAX_POINTS = 16
PRECISION_METHOD = "precision"  # a constant method of each program: "float32" or "int8"


def _executorch():
    try:
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError:
        raise MissingExtraError(
            'the ExecuTorch runtime needs the executorch extra: pip install -e ".[executorch]" -c constraints.txt'
        ) from None
    return XnnpackPartitioner, to_edge_transform_and_lower, Runtime


def require_executorch() -> str:
    """ExecuTorch's version, or `MissingExtraError` naming the extra (checked before any long step)."""
    _executorch()
    return importlib.metadata.version("executorch")


def _qdq(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, their float values): `x` on the signed int8 grid of `scale`, as the quantize/dequantize
    pair XNNPACK reads."""
    ops = torch.ops.quantized_decomposed
    q = ops.quantize_per_tensor(x, scale, 0, -128, 127, torch.int8)
    return q, ops.dequantize_per_tensor(q, scale, 0, -128, 127, torch.int8)


class Int8Grid(nn.Module):
    """An `ActQuantizer` as int8 quantize/dequantize pairs with its scales as constants of the program.

    A twin-uniform quantizer gives its two ranges as two pairs, added (one is an exact 0 at each position),
    as `ActQuantizer.twin_ranges_int8` writes them for ONNX. With `record` set, each pair's values are
    appended to it as int8 values with the quantizer's name (the instrumented program returns them).
    """

    def __init__(self, quantizer: ActQuantizer, name: str, record: list | None) -> None:
        super().__init__()
        self.name, self.kind, self.bits, self.record = name, quantizer.kind, quantizer.bits, record
        if quantizer.kind == "uniform":
            self.scales = (float(quantizer.scale),)
        else:
            self.scales = tuple(float(s) for s in quantizer.range_scales())
            self.split = float(torch.nextafter(quantizer.split, torch.tensor(-torch.inf)))

    def _ranges(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = 2 ** (self.bits - 1)
        if self.kind == "uniform":
            qmin, qmax = int_range(self.bits)
            return [torch.clamp(x, qmin * self.scales[0], qmax * self.scales[0]) if self.bits < 8 else x]
        low_scale, high_scale = self.scales
        if self.kind == "twin_softmax":  # [0, split) and [split, 1], each non-negative
            high = x * (x > self.split).to(x.dtype)
            low = x - high
            return [torch.clamp(low, max=(levels - 1) * low_scale), torch.clamp(high, max=(levels - 1) * high_scale)]
        # post-GELU: the sign decides the range (the low range's scale is GELU_MIN / levels)
        return [
            torch.clamp(x, min=-levels * low_scale, max=0.0),
            torch.clamp(x, min=0.0, max=(levels - 1) * high_scale),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = [_qdq(part, scale) for part, scale in zip(self._ranges(x), self.scales, strict=True)]
        if self.record is not None:  # the int8 values: a 4-D dequantized tensor as a program output crashes
            # XNNPACK's channels-last pass (ExecuTorch 1.5.1)
            self.record.extend((self.name, q) for q, _ in pairs)
        parts = [values for _, values in pairs]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _constant(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach().clone(), requires_grad=False)


class ExecutorchLayer(nn.Module):
    """A `QuantLayer` as the program computes it: `Int8Grid` inputs (and output), fixed weights and bias.

    On XNNPACK's int8 kernels (`runs_int8`): the weight is an int8 constant dequantized per channel, which
    the partitioner packs with the input and output pairs into one int8 product. Otherwise the weight is the
    simulated model's dequantized weight in float32. The bias is the simulated layer's (on the int32 grid of
    input scale x weight scale where it adds it inside an integer product: XNNPACK rounds it to that grid).
    """

    def __init__(self, layer: QuantLayer, name: str, record: list | None) -> None:
        super().__init__()
        grid = lambda q, n: Int8Grid(q, f"{name}.{n}", record) if q.enabled else nn.Identity()  # noqa: E731
        self.inputs = nn.ModuleList(grid(q, f"input_quants.{i}") for i, q in enumerate(layer.input_quants))
        output = getattr(layer, "output_quant", None)
        self.output = grid(output, "output_quant") if output is not None else nn.Identity()
        self.op = layer.float_forward  # the layer's hyperparameters; its own parameters are not read
        self.runs_int8 = runs_on_xnnpack_int8(layer)
        if layer.weight_axis is None:
            self.weight = self.bias = None
            return
        weight = layer.weight_quant(layer.weight)  # the simulated model's int8-grid weight
        self.bias = _constant(layer.quantized_bias())
        if self.runs_int8:
            view = [-1 if i == layer.weight_axis else 1 for i in range(weight.ndim)]
            self.weight = _constant(torch.round(weight / layer.weight_quant.scale.reshape(view)).to(torch.int8))
            self.register_buffer("weight_scale", layer.weight_quant.scale.detach().clone())
            self.register_buffer("weight_zero_point", torch.zeros_like(self.weight_scale, dtype=torch.int64))
            self.axis = layer.weight_axis
        else:
            self.weight = _constant(weight)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = tuple(grid(x) for grid, x in zip(self.inputs, inputs, strict=True))
        if self.weight is None:
            return self.output(self.op(*inputs))
        weight = self.weight
        if self.runs_int8:
            weight = torch.ops.quantized_decomposed.dequantize_per_channel(
                weight, self.weight_scale, self.weight_zero_point, self.axis, -128, 127, torch.int8
            )
        return self.output(self.op(*inputs, weight=weight, bias=self.bias))


def runs_on_xnnpack_int8(layer: QuantLayer) -> bool:
    """Whether XNNPACK runs `layer` on its int8 kernels: a Linear or convolution with uniform <= 8-bit input
    and weight quantizers and a quantized output."""
    output = getattr(layer, "output_quant", None)
    return (
        isinstance(layer, QuantLinear | QuantConv2d)
        and output is not None
        and output.enabled
        and layer.weight_quant.enabled
        and layer.weight_quant.bits <= 8
        and all(q.enabled and q.kind == "uniform" and q.bits <= 8 for q in layer.input_quants)
    )


def program_module(module: nn.Module, record: list | None = None) -> nn.Module:
    """A copy of `module` (a quantized graph of `probe_parts`, in int8 export mode) with every `QuantLayer`
    an `ExecutorchLayer`; quantizer names are `module`'s."""
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, QuantLayer)}
    replacements = {name: ExecutorchLayer(layer, name, record) for name, layer in layers.items()}
    # deepcopy's memo maps each layer to its replacement: the copy shares nothing else with `module`.
    memo = {id(layers[name]): replacement for name, replacement in replacements.items()}
    return copy.deepcopy(module, memo).requires_grad_(False)


class _Recording(nn.Module):
    """`module`'s outputs followed by every quantizer value its `Int8Grid`s recorded during the call."""

    def __init__(self, module: nn.Module, record: list) -> None:
        super().__init__()
        self.module, self.record = module, record

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.record.clear()
        out = self.module(*args)
        return (*(out if isinstance(out, tuple) else (out,)), *(part for _, part in self.record))


def _dynamic_shapes(part: str, args: tuple) -> tuple | None:
    """The encoder program takes one image; the decoder one one prompt of up to `MAX_POINTS` points."""
    if part == "encoder":
        return None
    points = torch.export.Dim("points", max=MAX_POINTS)
    return (*(None,) * (len(args) - 2), {1: points}, {1: points})


def per_prompt(part: str, args: tuple) -> list[tuple]:
    """`args` as the program takes them: the encoder's as they are, the decoder's one prompt at a time."""
    if part == "encoder":
        return [args]
    *levels, coords, labels = args
    return [(*levels, coords[i : i + 1], labels[i : i + 1]) for i in range(len(coords))]


def run_per_prompt(method, part: str, args: tuple) -> list[np.ndarray]:
    """A program's outputs on `args`, the decoder's prompts run one at a time and concatenated."""
    runs = [run_program(method, one) for one in per_prompt(part, args)]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def contiguous_constants(module: nn.Module) -> nn.Module:
    """`module` with every parameter and buffer in contiguous memory, in place.

    A .pte stores a constant's storage as it lies, without its strides: SAM's dense positional encoding
    (a permuted tensor, cloned with its strides) came back channels-last, 2% off the masks.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        tensor.data = tensor.data.contiguous()
    return module


def write_program(module: nn.Module, args: tuple, path: Path, part: str, precision: str) -> Path:
    """Export `module` on `args` with torch.export, lower it to XNNPACK and write the .pte at `path`, with a
    method "precision" that returns `precision` ("float32" or "int8": `program_precision`)."""
    partitioner, lower, _ = _executorch()
    args = per_prompt(part, args)[0]
    contiguous_constants(module)
    with torch.no_grad():
        shapes = _dynamic_shapes(part, args)
        if isinstance(module, _Recording) and shapes is not None:  # its forward takes *args: one argument
            shapes = (shapes,)
        exported = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        edge = lower(exported, partitioner=[partitioner()], constant_methods={PRECISION_METHOD: precision})
    path.write_bytes(edge.to_executorch().buffer)
    return path


def _program(path: str | os.PathLike, trace: bool = False):
    _, _, runtime = _executorch()
    return runtime.get().load_program(os.fspath(path), enable_etdump=trace)


def load_program(path: str | os.PathLike, num_threads: int | None = None):
    """The "forward" method of the .pte at `path`, loaded by ExecuTorch's runtime with its thread pool at
    `num_threads` (`set_threads` first: XNNPACK keeps the pool it loads with; None: the pool as it is)."""
    set_threads(num_threads)
    return _program(path).load_method("forward")


def load_traced_program(path: str | os.PathLike, num_threads: int | None = None):
    """The .pte at `path` as `load_program` loads it, with ExecuTorch's event tracer on: the program, whose
    ``load_method("forward")`` runs record each XNNPACK operator's time, written out by
    ``write_etdump_result_to_file`` (`benchmarks.op_profile.executorch_op_times` reads them)."""
    set_threads(num_threads)
    return _program(path, trace=True)


def program_precision(path: str | os.PathLike) -> str:
    """The precision `write_program` wrote into the .pte at `path`: "float32" or "int8"."""
    program = _program(path)
    if PRECISION_METHOD not in program.method_names:
        raise ValueError(f"{path}: an ExecuTorch program that python -m quantize did not write (no precision method)")
    return program.load_method(PRECISION_METHOD).execute([])[0]


def run_program(method, args: tuple) -> list[np.ndarray]:
    """Every output of a loaded program on `args` (tensors), as float32 arrays."""
    return [np.asarray(out.detach().numpy()) for out in method.execute([a.contiguous() for a in args])]


def set_threads(num_threads: int | None) -> None:
    """ExecuTorch's thread pool (one per process) at `num_threads` from now on (None: left as it is).

    XNNPACK takes the pool when it loads a program, and a new count replaces the pool (ExecuTorch's
    ``_unsafe_reset_threadpool``): a program loaded before the change must not run after it, so set the
    count first, then load. The pool is replaced only when the count changes.
    """
    from executorch.extension.pybindings import portable_lib

    if num_threads is not None and thread_count() != num_threads:
        portable_lib._unsafe_reset_threadpool(num_threads)


def thread_count() -> int:
    """The threads of ExecuTorch's pool."""
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


class ExecuTorchSam(CpuSamRunner):
    """SAM from two .pte files, run by ExecuTorch's runtime with XNNPACK (`CpuSamRunner`), as `OnnxSam` is.

    A .pte keeps no output names: the encoder's number of outputs says the family (one embedding for SAM,
    three levels for SAM 2). ExecuTorch's thread pool is one per process: `num_threads` sets it as the
    programs load (`load_program`), and a call after another instance changed it is refused.
    """

    def load(self, path: str | os.PathLike, num_threads: int | None):
        return load_program(path, num_threads)

    def output_names(self, model) -> list[str]:
        """The encoder program's outputs, by their number."""
        count = model.metadata.num_outputs()
        names = [family.embedding_names for family in FAMILIES.values() if len(family.embedding_names) == count]
        if len(names) != 1:
            raise ValueError(f"an encoder program with {count} outputs is no model family's")
        return list(names[0])

    def run(self, model, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All of `model`'s outputs, which are `names` in order (`CpuSamRunner` feeds and asks in program order)."""
        if self.num_threads is not None and thread_count() != self.num_threads:
            raise RuntimeError(
                f"ExecuTorch's thread pool now has {thread_count()} threads, not the {self.num_threads} these programs "
                "were loaded with (another ExecuTorchSam replaced it): run one thread count per process at a time, "
                "or create this ExecuTorchSam again"
            )
        outputs = run_program(model, tuple(torch.from_numpy(feed) for feed in feeds.values()))
        if len(outputs) != len(names):
            raise ValueError(f"the program gives {len(outputs)} outputs, not {len(names)} ({', '.join(names)})")
        return outputs

    def decode(
        self, embedding: torch.Tensor | Sam2Features, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`CpuSamRunner.decode`, one prompt per program call (the decoder program takes one of up to
        `MAX_POINTS` points)."""
        if coords.shape[1] > MAX_POINTS:
            raise ValueError(
                f"prompts of {coords.shape[1]} points: the ExecuTorch decoder program takes up to {MAX_POINTS} points "
                "per prompt (a box is two); give fewer points, or run decoder.onnx in ONNX Runtime"
            )
        if len(coords) <= 1:
            return super().decode(embedding, coords, labels)
        parts = [super(ExecuTorchSam, self).decode(embedding, coords[i : i + 1], labels[i : i + 1])
                 for i in range(len(coords))]  # fmt: skip
        return torch.cat([masks for masks, _ in parts]), torch.cat([iou for _, iou in parts])


@torch.no_grad()
def export_executorch(
    sam: nn.Module, out_dir: str | os.PathLike, precision: str, prefix: str = ""
) -> list[ExportCheck]:
    """Write ``{prefix}encoder.pte`` and ``{prefix}decoder.pte`` for `sam` in `precision` into `out_dir`, and check
    them in ExecuTorch's runtime.

    float32: the float model, outputs against PyTorch's (`TOLERANCE`); int8: the `program_module` copy, checked
    layer by layer with ExecuTorch's rounding decisions on an instrumented program (`compare_forced`) and the
    shipped program against the instrumented one. When a check fails, the files are removed and
    `ExportCheckError` names what failed.
    """
    out_dir = Path(out_dir)
    model = cpu_copy(sam).eval()
    parts = probe_parts(model, precision)
    checks, written = [], []
    for part in ("encoder", "decoder"):
        path = out_dir / f"{prefix}{part}.pte"
        written.append(path)
        checks.append(_write_and_check(part, parts[part], path, precision))
    refuse_failed(checks, written, "ExecuTorch", out_dir)
    return checks


@torch.no_grad()
def _write_and_check(part: str, probe: tuple, path: Path, precision: str) -> ExportCheck:
    """`export_executorch` for one graph ("encoder" or "decoder"), `probe` as `probe_parts` gives it."""
    module, args, _, expected, float_outputs = probe
    if precision == "float32":
        with export_mode(module, "float32"):
            write_program(copy.deepcopy(module).requires_grad_(False), args, path, part, precision)
        got = dict(zip(expected, run_per_prompt(load_program(path), part, args), strict=True))
        diffs, bounds = output_diffs(got, expected, TOLERANCE["float32"])
        return ExportCheck(path.name, precision, diffs, bounds, all(diffs[k] <= bounds[k] for k in diffs))
    with export_mode(module, "int8"):
        write_program(program_module(module), args, path, part, precision)
        record: list = []
        recording = _Recording(program_module(module, record), record)
        with tempfile.TemporaryDirectory() as tmp:
            write_program(recording, args, Path(tmp) / path.name, part, precision)
            names = [name for name, _ in record]
            instrumented = run_per_prompt(load_program(Path(tmp) / path.name), part, args)
    outputs = dict(zip(expected, instrumented, strict=False))
    tensors: dict[str, list[str]] = {}
    for k, (name, values) in enumerate(zip(names, instrumented[len(expected) :], strict=True)):
        key = f"{name}:{k}"
        tensors.setdefault(name, []).append(key)
        outputs[key] = (values.astype(np.int16) + 128).astype(np.uint8)
    shipped = dict(zip(expected, run_per_prompt(load_program(path), part, args), strict=True))
    diffs, bounds, info = compare_forced(module, args, tensors, outputs, shipped, expected, float_outputs)
    return ExportCheck(path.name, precision, diffs, bounds, all(diffs[k] <= bounds[k] for k in diffs), info)
