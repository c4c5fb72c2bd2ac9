"""OpenVINO on CPU: the exported graphs as OpenVINO IR, checked in OpenVINO, and `OpenVinoSam` to run them.

The IR (``encoder.xml`` / ``.bin``, ``decoder.xml`` / ``.bin``) is converted from the same calibrated
model as the ONNX files `quantize.export_onnx` wrote, so it carries the searched scales unchanged:
OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and runs the products on
its integer kernels. The float32 IR is converted from the float32 ONNX file itself; the INT8 one from
a graph of the same model with its 1x1 convolutions written as convolutions (`pointwise_convolutions`):
ONNX Runtime's graph writes them as NHWC Gemms, whose transposes ONNX Runtime cancels and OpenVINO runs
(64% of repvit_m0_9's INT8 encoder time, docs/BENCHMARKS.md). The IR keeps float32 weights where the
ONNX file had them (no fp16 compression).

Inference precision is float32 (``INFERENCE_PRECISION_HINT``): on CPUs with bfloat16 (AVX512_BF16,
AMX) OpenVINO's CPU plugin otherwise runs the float parts in bfloat16, which the INT8 model's
requantization chains do not survive (docs/BENCHMARKS.md has the measurement).

The INT8 IR is checked like the ONNX file in ONNX Runtime (`quantize.export_check`): an instrumented
copy exposes every quantizer's uint8 values, the simulated PyTorch model runs with OpenVINO's rounding
decisions, and every value OpenVINO rounds apart must be a tie. OpenVINO's float normalisations
(LayerNorm as MVN) differ from PyTorch's by up to ~1e-4 of a value, more than float64 can see in
PyTorch's own arithmetic, hence its larger tie allowance `OPENVINO_TIE_RELATIVE`. On x86 CPUs without
VNNI, integer products of uint8 activations and int8 weights are summed in pairs in int16 and can
saturate; the check then fails there, as it should (quantize such models with ``--w-bits 7``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from quantize.export_check import instrument
from quantize.modules import QuantConv2d
from quantize.onnx_export import (
    DYNAMIC_AXES,
    TOLERANCE,
    ExportCheck,
    compare_forced,
    cpu_copy,
    export_mode,
    output_diffs,
    probe_parts,
    refuse_failed,
    relative_rms,
    write_onnx,
)
from quantize.onnx_runtime import CpuSamRunner, open_session
from student_models.extras import MissingExtraError

# OpenVINO's MVN normalises with up to 1.6e-4 relative error of a value (measured on tinyvit_5m: 0.013
# steps at most, 0.3% of a LayerNorm output's values rounded apart); 2^-12 of the value or its range.
OPENVINO_TIE_RELATIVE = 2.0**-12
PRECISION = {"INFERENCE_PRECISION_HINT": "f32"}
# Exposing the quantizers' outputs changes which ops OpenVINO fuses and which products it runs in int8
# (docs/quantize.md), so the shipped IR does not give the instrumented copy's outputs bit for bit (ONNX
# Runtime does). The shipped IR is checked free-running, a weaker check (the layer-by-layer one above is
# the strict one, of the copy's kernels): its outputs may differ from the
# simulation's by at most FREE_RUNNING_FACTOR times what rounding ties flipped elsewhere cost this model
# (the larger of ONNX Runtime's free-running distance, its graph being checked exactly, and the model's
# sensitivity to a 1e-7 change of its input), or QUANT_ERROR_FRACTION of the quantization error itself:
# on a small probe either flip measure can be ~0 by chance (a handful of ties). Measured (RMS, OpenVINO
# / ORT): tinyvit_test W8A8 encoder 2.7% / 2.6%, masks 1.5-2.1% / 0.07-2.0%; random tinyvit_5m encoder
# 5.3% / 5.2%; random repvit_m0_9 masks 2.2% / 1.3%.
QUANT_ERROR_FRACTION = 0.5
FREE_RUNNING_FACTOR = 3.0


def _openvino():
    try:
        import openvino
    except ImportError:
        raise MissingExtraError(
            'the OpenVINO runtime needs the openvino extra: pip install -e ".[openvino]" -c constraints.txt'
        ) from None
    return openvino


def require_openvino() -> str:
    """OpenVINO's version, or `MissingExtraError` naming the extra (checked before any long step)."""
    return _openvino().__version__


def write_openvino(onnx_path: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Convert the ONNX file at `onnx_path` into OpenVINO IR at `target` (default: beside it, same name, .xml
    and .bin); returns the .xml."""
    ov = _openvino()
    target = Path(onnx_path).with_suffix(".xml") if target is None else Path(target)
    ov.save_model(ov.convert_model(os.fspath(onnx_path)), os.fspath(target), compress_to_fp16=False)
    return target


@contextlib.contextmanager
def pointwise_convolutions(model: torch.nn.Module) -> Iterator[None]:
    """Within: `model`'s 1x1 convolutions with uniform inputs export as Conv, not as NHWC Gemms (restored after).

    A twin-uniform input (``PTQConfig.twin_convs``) keeps the Gemm form, which sums its two ranges' products.
    """
    layers = [
        m for m in model.modules()
        if isinstance(m, QuantConv2d) and m.is_pointwise and all(q.kind == "uniform" for q in m.input_quants)
    ]  # fmt: skip
    for layer in layers:
        layer.pointwise_as_gemm = False
    try:
        yield
    finally:
        for layer in layers:
            del layer.pointwise_as_gemm  # back to the class default


def compile_model(path: str | os.PathLike, num_threads: int | None = None, config: dict | None = None):
    """An OpenVINO CPU model for an .xml or .onnx file, in float32 inference precision (`config`: instead of
    `PRECISION`; ``{}`` is OpenVINO's default)."""
    ov = _openvino()
    config = dict(PRECISION if config is None else config)
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = num_threads
    return ov.Core().compile_model(os.fspath(path), "CPU", config)


def run_model(compiled, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of a compiled model on `feeds`, under each of its tensor names."""
    results = compiled(feeds)
    return {name: np.asarray(results[output]) for output in compiled.outputs for name in output.get_names()}


def run_instrumented_openvino(
    onnx_path: str | os.PathLike, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """(all outputs by name, quantizer tensors) of an instrumented copy of `onnx_path` run by OpenVINO."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(onnx_path).name
        tensors = instrument(onnx_path, copy)
        outputs = run_model(compile_model(copy), feeds)
    return outputs, tensors


class OpenVinoSam(CpuSamRunner):
    """SAM from two OpenVINO IR (or ONNX) files, run by OpenVINO on CPU (`CpuSamRunner`), as `OnnxSam` is.

    Args:
        encoder_path, decoder_path: files written by `write_openvino` (float32 or INT8).
        num_threads: inference threads (None: OpenVINO's default).
    """

    def load(self, path: str | os.PathLike, num_threads: int | None):
        return compile_model(path, num_threads)

    def output_names(self, model) -> list[str]:
        return [output.get_any_name() for output in model.outputs]

    def run(self, model, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = run_model(model, feeds)
        return [outputs[name] for name in names]


@torch.no_grad()
def export_openvino(sam: Sam, onnx_dir: str | os.PathLike, precision: str, prefix: str = "") -> list[ExportCheck]:
    """Write ``{prefix}encoder.xml`` and ``{prefix}decoder.xml`` (+ .bin) beside the ONNX files `export_onnx` wrote
    for `sam` in `precision` into `onnx_dir`, and check the IR in OpenVINO. float32: converted from those files;
    int8: from the same model exported with `pointwise_convolutions` (the ONNX file for it is not kept).

    float32: the IR's outputs against PyTorch's (`TOLERANCE`); int8: the layer-by-layer check with
    OpenVINO's rounding decisions on an instrumented copy (`compare_forced`, `OPENVINO_TIE_RELATIVE`), and
    the shipped IR free-running (`FREE_RUNNING_FACTOR`, `QUANT_ERROR_FRACTION`). When a check fails, the IR
    files are removed and `ExportCheckError` names what failed.
    """
    onnx_dir = Path(onnx_dir)
    model = cpu_copy(sam).eval()
    parts = probe_parts(model, precision)
    checks, written = [], []
    with tempfile.TemporaryDirectory() as tmp, pointwise_convolutions(model):
        for part in ("encoder", "decoder"):
            onnx_path = onnx_dir / f"{prefix}{part}.onnx"
            checks.append(_write_and_check(part, parts[part], onnx_path, precision, Path(tmp)))
            written += [onnx_dir / checks[-1].file, (onnx_dir / checks[-1].file).with_suffix(".bin")]
    refuse_failed(checks, written, "OpenVINO", onnx_dir)
    return checks


def _write_and_check(part: str, probe: tuple, onnx_path: Path, precision: str, tmp: Path) -> ExportCheck:
    """`export_openvino` for one graph ("encoder" or "decoder"): `probe` as `probe_parts` gives it, `onnx_path`
    ONNX Runtime's checked file, `tmp` a folder for the INT8 graph OpenVINO reads."""
    module, args, names, expected, float_outputs = probe
    source = onnx_path
    if precision == "int8":  # the graph OpenVINO reads: this model's 1x1 convolutions as Conv
        source = tmp / onnx_path.name
        with export_mode(module, "int8"):
            write_onnx(module, args, source, names, list(expected), DYNAMIC_AXES[part])
    xml = write_openvino(source, onnx_path.with_suffix(".xml"))
    feeds = {name: arg.numpy() for name, arg in zip(names, args, strict=True)}
    shipped = run_model(compile_model(xml), feeds)
    if precision == "float32":
        diffs, bounds = output_diffs(shipped, expected, TOLERANCE["float32"])
        info = {}
    else:
        outputs, tensors = run_instrumented_openvino(source, feeds)
        diffs, bounds, info = compare_forced(
            module, args, tensors, outputs, shipped, expected, float_outputs, OPENVINO_TIE_RELATIVE
        )
        ort_outputs = dict(zip(list(expected), open_session(onnx_path).run(list(expected), feeds), strict=True))
        for key, ref in expected.items():  # the shipped IR is fused otherwise than the instrumented copy
            del diffs[f"{key}.shipped_vs_instrumented.max"], bounds[f"{key}.shipped_vs_instrumented.max"]
            info[f"{key}.ort_free_running_rms"] = relative_rms(ort_outputs[key], ref.numpy())
            flips = max(info[f"{key}.ulp_sensitivity_rms"], info[f"{key}.ort_free_running_rms"])
            diffs[f"{key}.shipped_free_running.rms"] = info[f"{key}.free_running_rms"]
            bounds[f"{key}.shipped_free_running.rms"] = max(
                FREE_RUNNING_FACTOR * flips, QUANT_ERROR_FRACTION * info[f"{key}.quant_error_rms"]
            )
    passed = all(diffs[key] <= bounds[key] for key in diffs)
    return ExportCheck(xml.name, precision, diffs, bounds, passed, info)
