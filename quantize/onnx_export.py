"""ONNX export of a (quantized) SAM or SAM 2 model: encoder.onnx + decoder.onnx, checked in ONNX Runtime, plus
.ort files.

The two graphs are the family's (`student_models.families`): SAM's encoder gives ``image_embeddings``,
SAM 2's the three levels its decoder takes (``high_res_feats_0``, ``high_res_feats_1``, ``image_embed``); the
decoder graph takes them, then ``point_coords`` and ``point_labels``, and returns all four mask tokens.

- "float32": the float model (a quantized model is exported with its quantizers off).
- "int8": a QDQ model. Uniform quantizers become QuantizeLinear/DequantizeLinear pairs (uint8
  activations with zero point 128, int8 per-channel weights stored as int8 initializers), so ORT
  fuses DQ -> Gemm (Linear layers and 1x1 convolutions, int32 bias) into QGemm, DQ -> MatMul
  (attention products) into QLinearMatMul / MatMulIntegerToFloat and DQ -> Conv -> Q (convolutions
  with an output quantizer, int32 bias) into QLinearConv, and runs them on its integer kernels. A
  twin-uniform input is two such uint8 tensors, one per range: a product takes each in an integer
  product and adds them (`quantize.modules`). What integer kernels
  cannot run computes in float on int8-grid values: convolutions without an output quantizer (such
  as depthwise ones after a GELU), transposed convolutions, and any layer left float.
  Widths under 8 bits are clipped to their range and ride in int8 containers.

After writing each file, ORT runs it on a probe input and its outputs are compared with PyTorch
(the int8 graph with the simulated-quantized PyTorch model); a failed check raises `ExportCheckError`.
Both the export and the check run on the CPU: a model on a GPU is exported from a CPU copy.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from quantize.export_check import TIE_RELATIVE, float64_inputs, forced_quantizers, run_instrumented
from quantize.modules import ActQuantizer, QuantConv2d, QuantConvTranspose2d, QuantLayer, WeightQuantizer
from quantize.onnx_runtime import count_kernels, open_session, write_ort_format
from quantize.qdq_graph import (
    fold_weight_quantization,
    fold_weight_transpose,
    prune,
    quantize_bias,
    unshare_weight_dequantize,
)
from student_models.families import DECODER_OUTPUTS, family_of, graph_levels

OPSET = 20
# Closeness required between ORT and PyTorch, relative to the reference output's scale:
# rms = RMS(ort - torch) / RMS(torch) and max = max|ort - torch| / max|torch|. float32 differs by
# summation order only. An int8 graph is checked against the simulated-quantized PyTorch model with
# the rounding decisions shared (see quantize.export_check for why and how): then, too, only float
# arithmetic differs, and every value rounded the other way must be a tie (export_check.TIE_RELATIVE).
# Measured (ORT 1.32): tinyvit_test W8A8 encoder rms 3e-7, max 6e-7; a random tinyvit_5m calibrated
# with mse on 8 COCO images: at most 1.7e-5 of a quantizer's values rounded apart (decoder 9.5e-6),
# every one a tie. Free-running, the same graphs differ from the simulation by
# 2.3% (tinyvit_test) / 5.6% RMS, the model's own sensitivity to a 1e-7 change of its input (2.1% /
# 5.5%), against a quantization error of 3.4% / 7.7%: reported in ExportCheck.info, not bounded.
TOLERANCE = {"float32": {"rms": 1e-4, "max": 1e-3}, "int8": {"rms": 1e-4, "max": 1e-3}}
INT8_ROUNDING_MAX_STEPS = 1.001  # a tie moves a value by one step; more means the layer computes something else
# Ops that only move or re-encode values exactly: exposing a tensor as a graph output makes ORT keep
# it in NCHW and in its own Q/DQ pair, so the instrumented graph has more of them; the compute
# kernels must be the same, and the outputs identical.
LAYOUT_OPS = {"Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear"}
ULP_PROBE = 1e-7  # relative input change used to measure the model's own rounding sensitivity


class ExportCheckError(RuntimeError):
    """An exported graph whose runtime's outputs disagree with PyTorch beyond the tolerance; ``checks`` holds
    every check of the export (the failed ones with ``passed`` False)."""

    def __init__(self, message: str, checks: list[ExportCheck] | None = None) -> None:
        super().__init__(message)
        self.checks = checks or []


@dataclass
class ExportCheck:
    """ORT vs PyTorch on the probe inputs: checked differences (`rel_diff`, each with its bound in
    `tolerance`) and unchecked figures (`info`: quantization error, free-running difference)."""

    file: str
    precision: str
    rel_diff: dict[str, float]
    tolerance: dict[str, float]
    passed: bool
    info: dict[str, float | str] = field(default_factory=dict)


@dataclass
class ExportResult:
    """Paths written, their sizes, the checks, and which layers run in int8 vs float/simulated."""

    precision: str
    files: dict[str, str] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)
    checks: list[ExportCheck] = field(default_factory=list)
    int8_layers: list[str] = field(default_factory=list)
    simulated_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    ort_kernels: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def export_mode(model: torch.nn.Module, precision: str) -> Iterator[None]:
    """Switch every quantizer of `model` to QDQ-emitting mode ("int8") or off ("float32"), then restore."""
    quantizers = [m for m in model.modules() if isinstance(m, (ActQuantizer, WeightQuantizer))]
    saved = [(q.enabled, q.export_int8) for q in quantizers]
    for q in quantizers:
        if precision == "float32":
            q.enabled = False
        q.export_int8 = precision == "int8"
    try:
        yield
    finally:
        for q, (enabled, export_int8) in zip(quantizers, saved, strict=True):
            q.enabled, q.export_int8 = enabled, export_int8


def write_onnx(
    module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic
) -> None:
    """Export `module` on `args` to `path` (under `export_mode` for an INT8 graph) with its weights folded to int8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    model = onnx.load(str(path))
    fold_weight_quantization(model)
    fold_weight_transpose(model)
    quantize_bias(model)
    unshare_weight_dequantize(model)
    prune(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def relative_rms(value: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((value - ref) ** 2).mean() / max((ref**2).mean(), 1e-12)))


def _run(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def output_diffs(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor], tolerance: dict[str, float]):
    """{"<out>.rms", "<out>.max"} relative differences of `got` against `expected`, and their bounds."""
    diffs, bounds = {}, {}
    for key, ref in expected.items():
        ref = ref.detach().numpy().astype(np.float64)
        diffs[f"{key}.rms"] = relative_rms(got[key], ref)
        diffs[f"{key}.max"] = float(np.abs(got[key] - ref).max() / max(np.abs(ref).max(), 1e-6))
        bounds.update({f"{key}.rms": tolerance["rms"], f"{key}.max": tolerance["max"]})
    return diffs, bounds


def _compare(session, feeds: dict[str, np.ndarray], expected: dict[str, torch.Tensor], name: str) -> ExportCheck:
    diffs, bounds = output_diffs(_run(session, feeds), expected, TOLERANCE["float32"])
    return ExportCheck(name, "float32", diffs, bounds, all(diffs[k] <= bounds[k] for k in diffs))


@torch.no_grad()
def check_int8(
    model: torch.nn.Module, path: Path, args: tuple, input_names: list[str], expected: dict[str, torch.Tensor],
    float_outputs: dict[str, torch.Tensor],
) -> ExportCheck:  # fmt: skip
    """Check the int8 graph at `path` (.onnx or .ort), exported from `model`, in ONNX Runtime.

    The graph runs on `args` (fed as `input_names`) with its quantizers' outputs exposed, and is
    compared with `model` run on the same values in int8 export mode with ORT's rounding decisions
    (quantize.export_check). `expected` holds the model's own free-running outputs and
    `float_outputs` those with quantizers off, by graph output name (for the unchecked figures).
    """
    path = Path(path)
    feeds = {name: arg.numpy() for name, arg in zip(input_names, args, strict=True)}
    shipped = _run(open_session(path), feeds)
    outputs, tensors, shipped_ops, instrumented_ops = run_instrumented(path, feeds, ort_format=path.suffix == ".ort")
    diffs, bounds, info = compare_forced(model, args, tensors, outputs, shipped, expected, float_outputs)
    compute_ops = (shipped_ops.keys() | instrumented_ops.keys()) - LAYOUT_OPS
    diffs["kernel_count_difference"] = float(
        sum(abs(shipped_ops.get(op, 0) - instrumented_ops.get(op, 0)) for op in compute_ops)
    )
    bounds["kernel_count_difference"] = 0.0
    passed = all(diffs[k] <= bounds[k] for k in diffs)
    return ExportCheck(path.name, "int8", diffs, bounds, passed, info)


def compare_forced(
    model: torch.nn.Module,
    args: tuple,
    tensors: dict[str, list[str]],
    outputs: dict[str, np.ndarray],
    shipped: dict[str, np.ndarray],
    expected: dict[str, torch.Tensor],
    float_outputs: dict[str, torch.Tensor],
    tie_relative: float = TIE_RELATIVE,
) -> tuple[dict[str, float], dict[str, float], dict[str, float | str]]:
    """(checked differences, their bounds, unchecked figures) of a runtime's INT8 graph against `model`.

    `outputs` are the runtime's outputs of the instrumented graph (every quantizer's values, `tensors` by
    quantizer), `shipped` those of the file as shipped, both on `args`; `model` runs on the same values with
    the runtime's rounding decisions (quantize.export_check), with `tie_relative` as the runtime's float
    allowance. Any runtime that can expose the quantizers' outputs is checked this way.
    """
    with export_mode(model, "int8"):
        reference_inputs = float64_inputs(model, args, tensors, outputs)
    with (
        export_mode(model, "int8"),
        forced_quantizers(model, tensors, outputs, reference_inputs, tie_relative) as rounding,
    ):
        forced = model(*args)
    with export_mode(model, "int8"):  # the image or the embedding levels moved by ULP_PROBE, the prompts not
        perturbed = model(*(arg * (1 + ULP_PROBE) if arg.ndim == 4 else arg for arg in args))
    as_dict = lambda out: dict(zip(expected, out if isinstance(out, tuple) else (out,), strict=True))  # noqa: E731
    forced, perturbed = as_dict(forced), as_dict(perturbed)
    diffs, bounds = output_diffs(outputs, forced, TOLERANCE["int8"])
    info: dict[str, float | str] = {}
    for key, ref in expected.items():
        ref = ref.numpy()
        scale = max(np.abs(ref).max(), 1e-6)
        diffs[f"{key}.shipped_vs_instrumented.max"] = float(np.abs(shipped[key] - outputs[key]).max() / scale)
        bounds[f"{key}.shipped_vs_instrumented.max"] = TOLERANCE["float32"]["max"]
        info[f"{key}.free_running_rms"] = relative_rms(shipped[key], ref)
        info[f"{key}.ulp_sensitivity_rms"] = relative_rms(perturbed[key].numpy(), ref)
        info[f"{key}.quant_error_rms"] = relative_rms(float_outputs[key].numpy(), ref)
    worst = max(rounding, key=lambda name: (rounding[name]["unexplained"], rounding[name]["mismatch"]))
    diffs["rounding_unexplained"] = rounding[worst]["unexplained"]
    diffs["rounding_max_steps"] = max(stat["max_steps"] for stat in rounding.values())
    bounds.update({"rounding_unexplained": 0.0, "rounding_max_steps": INT8_ROUNDING_MAX_STEPS})
    info["worst_rounding_quantizer"] = worst
    info["rounding_mismatch"] = max(stat["mismatch"] for stat in rounding.values())  # ties included
    info["forced_quantizers"] = float(len(rounding))
    return diffs, bounds, info


def probe_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 1x3x1024x1024 image-like tensor, and 2 prompts of 3 points (point, point, padding) for the decoder."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 1024, 1024, generator=gen).clamp(-2.5, 2.5)
    coords = torch.rand(2, 3, 2, generator=gen) * 1024
    labels = torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]])
    return image, coords, labels


def layer_placement(sam: torch.nn.Module, precision: str) -> tuple[list[str], list[str], list[str]]:
    """(layers whose products run on ORT's integer kernels, layers simulated in float, float layers).

    Integer: Linear, pointwise convolutions and attention products with int8-runnable inputs
    (QGemm / MatMulIntegerToFloat / QLinearMatMul), and other convolutions with a quantized output
    (QLinearConv). Simulated: everything else quantized (twin-uniform inputs, convolutions without
    an output quantizer and transposed convolutions compute in float on int8-grid values).
    """
    int8, simulated = [], []
    for name, layer in sam.named_modules():
        if isinstance(layer, QuantLayer):
            runs_int8 = all(q.runs_int8 for q in layer.input_quants) and (
                layer.weight_axis is None or layer.weight_quant.bits <= 8
            )
            if isinstance(layer, QuantConvTranspose2d):
                runs_int8 = False
            elif isinstance(layer, QuantConv2d) and not layer.is_pointwise:
                runs_int8 = runs_int8 and layer.output_quant is not None and layer.output_quant.enabled
            (int8 if precision == "int8" and runs_int8 else simulated).append(name)
    float_layers = [
        n
        for n, m in sam.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.ConvTranspose2d) and not isinstance(m, QuantLayer)
    ]
    return int8, simulated, float_layers


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself when it is on the CPU, else a copy on the CPU (the original stays on its device).

    The copy takes each parameter and buffer to the CPU one tensor at a time, so the GPU never holds
    two models.
    """
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if all(t.device.type == "cpu" for t in tensors):
        return model
    memo = {id(p): torch.nn.Parameter(p.detach().cpu(), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach().cpu() for b in model.buffers()})
    return copy.deepcopy(model, memo)


@torch.no_grad()
def export_onnx(
    sam: torch.nn.Module,
    out_dir: str | os.PathLike,
    precision: str = "float32",
    ort_format: bool = True,
    prefix: str = "",
) -> ExportResult:
    """Write ``{prefix}encoder.onnx`` and ``{prefix}decoder.onnx`` (and .ort files) for `sam` and check them.

    Files are written and checked in a hidden staging folder inside `out_dir` and moved into place only
    when every check passes, so `out_dir` never holds a graph that failed. A failed export is kept, with
    its ``export_{precision}.json``, in ``{prefix}{precision}.failed/`` for debugging.

    Args:
        sam: a float or quantized SAM or SAM 2 model, on any device (exported from a CPU copy).
        precision: "float32", or "int8" (the QDQ graph; needs a model quantized to <= 8 bits).
        ort_format: also write the .ort files ONNX Runtime Mobile loads.
    Raises:
        ExportCheckError: ORT and PyTorch disagree beyond `TOLERANCE[precision]`.
    """
    if precision not in TOLERANCE:
        raise ValueError(f"precision must be one of {sorted(TOLERANCE)}, got {precision!r}")
    sam = cpu_copy(sam)
    layers = [m for m in sam.modules() if isinstance(m, QuantLayer)]
    if precision == "int8":
        if not layers:
            raise ValueError("int8 export needs a quantized model: run quantize_ (or load_quantized) first")
        wide = sorted(
            {
                q.bits
                for m in layers
                for q in m.modules()
                if isinstance(q, (ActQuantizer, WeightQuantizer)) and q.bits > 8
            }
        )
        if wide:
            raise ValueError(f"int8 export needs widths <= 8 bits; this model has {wide}-bit quantizers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging_prefix = f".{prefix}export_{precision}-"
    for stale in out_dir.glob(f"{staging_prefix}*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=out_dir))
    kept = out_dir / f"{prefix}{precision}.failed"
    try:
        result = _write_and_check(sam, staging, precision, ort_format, prefix)
        report = f"{prefix}export_{precision}.json"
        (staging / report).write_text(json.dumps(result.to_dict(), indent=2))
        failed = [c for c in result.checks if not c.passed]
        shutil.rmtree(kept, ignore_errors=True)  # an earlier failure's graphs, now out of date either way
        if failed:
            staging.rename(kept)
            raise ExportCheckError(
                "ONNX Runtime disagrees with PyTorch: "
                + "; ".join(describe_failure(c) for c in failed)
                + f". Nothing was written to {out_dir}; the failed graphs are in {kept} for debugging."
            )
        for name in [*(Path(f).name for f in result.files.values()), report]:
            os.replace(staging / name, out_dir / name)
        result.files = {key: str(out_dir / Path(f).name) for key, f in result.files.items()}
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_failed(checks: list[ExportCheck], written: list[Path], runtime: str, folder: Path) -> None:
    """Remove `written` and raise `ExportCheckError` naming every failed check, if any of `checks` failed."""
    failed = [check for check in checks if not check.passed]
    if failed:
        for path in written:
            path.unlink(missing_ok=True)
        raise ExportCheckError(
            f"{runtime} disagrees with PyTorch: " + "; ".join(describe_failure(check) for check in failed)
            + f". No {runtime} file was kept in {folder}.",
            checks,
        )  # fmt: skip


def describe_failure(check: ExportCheck) -> str:
    """ "decoder.onnx: rounding_unexplained 0.03 > 0 (worst quantizer: ...)": the figures over their bounds."""
    over = [f"{key} {value:.3g} > {check.tolerance[key]:.3g}" for key, value in check.rel_diff.items()
            if value > check.tolerance[key]]  # fmt: skip
    worst = check.info.get("worst_rounding_quantizer")
    return f"{check.file}: {', '.join(over)}" + (f" (worst quantizer: {worst})" if worst else "")


# The decoder takes any number of prompts (B) of any number of points (N).
DYNAMIC_AXES = {
    "encoder": None,
    "decoder": {"point_coords": {0: "B", 1: "N"}, "point_labels": {0: "B", 1: "N"},
                "low_res_masks": {0: "B"}, "iou_predictions": {0: "B"}},
}  # fmt: skip


def probe_parts(sam: torch.nn.Module, precision: str) -> dict[str, tuple]:
    """The two graphs of `sam` on the probe inputs, as checks need them: {"encoder" | "decoder": (module, args,
    input names, {output name: the model's output in `precision`}, {output name: float output} or None)}.

    The float outputs (quantizers off, same inputs) are there for an int8 model only.
    """
    family = family_of(sam)
    image, coords, labels = probe_inputs()
    encoder, decoder = family.networks(sam)
    with export_mode(sam, precision):
        levels = graph_levels(encoder(image))
        decoded = decoder(*levels, coords, labels)
    float_enc = float_dec = None
    if precision == "int8":
        with export_mode(sam, "float32"):
            float_enc = dict(zip(family.embedding_names, graph_levels(encoder(image)), strict=True))
            float_dec = dict(zip(DECODER_OUTPUTS, decoder(*levels, coords, labels), strict=True))
    return {
        "encoder": (encoder, (image,), ["image"], dict(zip(family.embedding_names, levels, strict=True)), float_enc),
        "decoder": (decoder, (*levels, coords, labels), list(family.decoder_inputs),
                    dict(zip(DECODER_OUTPUTS, decoded, strict=True)), float_dec),
    }  # fmt: skip


def _write_and_check(
    sam: torch.nn.Module, out_dir: Path, precision: str, ort_format: bool, prefix: str
) -> ExportResult:
    """`export_onnx`'s work in `out_dir`: export both graphs, check them in ORT, count kernels.

    A failed check is recorded in the result, not raised: the caller decides where the files go.
    """
    sam.eval()
    result = ExportResult(precision)
    result.int8_layers, result.simulated_layers, result.float_layers = layer_placement(sam, precision)
    parts = probe_parts(sam, precision)
    enc_path, dec_path = out_dir / f"{prefix}encoder.onnx", out_dir / f"{prefix}decoder.onnx"
    with export_mode(sam, precision):
        for part, path in (("encoder", enc_path), ("decoder", dec_path)):
            module, args, inputs, expected, _ = parts[part]
            write_onnx(module, args, path, inputs, list(expected), DYNAMIC_AXES[part])
    paths = {"encoder": enc_path, "decoder": dec_path}
    if ort_format:
        paths.update({"encoder_ort": write_ort_format(enc_path), "decoder_ort": write_ort_format(dec_path)})
    for key, path in paths.items():
        module, args, names, expected, float_outputs = parts[key.split("_")[0]]
        if precision == "float32":
            feeds = {name: arg.numpy() for name, arg in zip(names, args, strict=True)}
            check = _compare(open_session(path), feeds, expected, path.name)
        else:
            check = check_int8(module, path, args, names, expected, float_outputs)
        result.checks.append(check)
        result.files[key] = str(path)
        result.sizes_mb[key] = round(path.stat().st_size / 2**20, 3)
    for key in ("encoder", "decoder"):
        result.ort_kernels[key] = count_kernels(paths[key])
    return result
