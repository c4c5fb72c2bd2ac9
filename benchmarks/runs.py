"""The benchmark commands as library calls: load what to measure, measure it, write records.

Each ``run_*`` function takes plain arguments (the CLI passes only what the user set), writes
its records as JSON into ``out_dir`` and returns what it measured with the record file path.
Models come from the registry (`student_models.build_sam`), from a simulated-quantized file
(`quantize.load_quantized`) or from an exported pair: ONNX files run by ONNX Runtime (`quantize.OnnxSam`)
their OpenVINO IR run by OpenVINO (`quantize.openvino_runtime.OpenVinoSam`) or ExecuTorch programs
(`quantize.executorch_runtime.ExecuTorchSam`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from benchmarks.coco_eval import CocoEvalConfig, CocoEvalResult, evaluate_coco
from benchmarks.latency import LatencyConfig, OnnxPair, benchmark_latency
from benchmarks.records import device_name, git_commit, make_out_dir, make_record, write_records
from student_models import build_sam
from student_models.families import family_named
from student_models.registry import canonical_name
from student_models.sam_runner import SamRunner

# The runtime that runs an exported file, by its suffix, and the `SamBackend` class that runs it there.
RUNTIME_OF_SUFFIX = {".onnx": "onnxruntime", ".ort": "onnxruntime", ".xml": "openvino", ".pte": "executorch"}
RUNNERS = {
    "onnxruntime": ("quantize", "OnnxSam"),
    "openvino": ("quantize.openvino_runtime", "OpenVinoSam"),
    "executorch": ("quantize.executorch_runtime", "ExecuTorchSam"),
}
# The files `python -m quantize` writes for each runtime, what they are, and the --runtime choice that writes them.
PAIR_FILES = {
    "onnxruntime": ("encoder.onnx", "decoder.onnx", "ONNX graphs", "ort"),
    "openvino": ("encoder.xml", "decoder.xml", "OpenVINO IR", "openvino"),
    "executorch": ("encoder.pte", "decoder.pte", "ExecuTorch programs", "executorch"),
}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}


class StageMissingError(RuntimeError):
    """Another stage's API that this command needs is not available in this checkout."""


def stage_api(module: str, *names: str) -> Any:
    """``module.name`` (or a tuple of them), or a `StageMissingError` naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise StageMissingError(f"this command needs the `{module}` package, which cannot be imported: {exc}") from exc
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise StageMissingError(f"this command needs {', '.join(f'{module}.{n}' for n in missing)}, not found")
    values = tuple(getattr(mod, n) for n in names)
    return values[0] if len(values) == 1 else values


@dataclass
class LoadedModel:
    """What a benchmark measures: a PyTorch `Sam` and how to name it in records."""

    sam: Sam
    model: str
    checkpoint: str | None
    precision: str


def quantized_precision(sam: Sam) -> str:
    """ "w8a8-sim"-style label of a simulated-quantized model from its recorded config, else "fp32"."""
    config = getattr(sam, "ptq_config", None)  # set by quantize_ and load_quantized
    return "fp32" if config is None else f"w{config.w_bits}a{config.a_bits}-sim"


def load_torch_model(
    model: str, checkpoint: str | None = None, quantized: str | None = None, seed: int = 0
) -> LoadedModel:
    """A registered model (``checkpoint``, else random weights drawn from ``seed``), or a simulated-quantized file.

    Seeding makes a random-weight AP reproducible, and equal to that of an ONNX export of the same seed.
    """
    if quantized is not None:
        load_quantized = stage_api("quantize", "load_quantized")
        sam = load_quantized(quantized, model_name=model)
        return LoadedModel(sam, canonical_name(model), str(quantized), quantized_precision(sam))
    if checkpoint is None:
        torch.manual_seed(seed)
    return LoadedModel(build_sam(model, checkpoint=checkpoint), canonical_name(model), checkpoint, "fp32")


def onnx_precision(path: str | os.PathLike) -> str:
    """ "int8" for a graph with quantize/dequantize or integer ops (an IR: FakeQuantize nodes; an ExecuTorch
    program: the precision it was written with), else "fp32"."""
    if Path(path).suffix == ".xml":
        return "int8" if 'type="FakeQuantize"' in Path(path).read_text() else "fp32"
    if Path(path).suffix == ".pte":
        program_precision = stage_api("quantize.executorch_runtime", "program_precision")
        return "int8" if program_precision(path) == "int8" else "fp32"
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    return "int8" if any(node.op_type in _QDQ_OPS for node in graph.node) else "fp32"


def onnx_pair(encoder: str | os.PathLike, decoder: str | os.PathLike) -> OnnxPair:
    """An exported pair, checked to exist; its runtime read from the suffix, its precision from the encoder graph."""
    encoder, decoder = Path(encoder), Path(decoder)
    for path in (encoder, decoder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (export one with python -m quantize)")
    runtimes = {RUNTIME_OF_SUFFIX.get(path.suffix) for path in (encoder, decoder)}
    if len(runtimes) != 1 or None in runtimes:
        raise ValueError(
            f"{encoder.name} and {decoder.name}: give two .onnx/.ort files (ONNX Runtime), two .xml files (OpenVINO)"
            " or two .pte files (ExecuTorch)"
        )
    return OnnxPair(encoder, decoder, onnx_precision(encoder), runtimes.pop())


def onnx_pair_in(folder: str | os.PathLike, runtime: str = "onnxruntime") -> OnnxPair:
    """The pair that `python -m quantize` writes into ``folder`` for `runtime` (`PAIR_FILES`): ``encoder.onnx`` +
    ``decoder.onnx`` for ONNX Runtime, ``.xml`` (``--runtime openvino``) or ``.pte`` (``--runtime executorch``)."""
    encoder_file, decoder_file, files, choice = PAIR_FILES[runtime]
    encoder = Path(folder) / encoder_file
    if runtime != "onnxruntime" and not encoder.is_file():
        raise FileNotFoundError(f"{encoder}: no {files} here (export with python -m quantize --runtime {choice})")
    return onnx_pair(encoder, Path(folder) / decoder_file)


def runner_class(runtime: str):
    """The `SamBackend` class that runs an exported pair in `runtime` (its stage imported here, on first use)."""
    return stage_api(*RUNNERS[runtime])


def onnx_runner(pair: OnnxPair, num_threads: int | None = None):
    """`quantize.OnnxSam` (or OpenVinoSam, for an IR pair) over ``pair``."""
    return runner_class(pair.runtime)(pair.encoder, pair.decoder, num_threads=num_threads)


@dataclass
class OnnxModel:
    """An exported pair of a registered model, run by its runtime (``pair.runtime``)."""

    model: str
    pair: OnnxPair


def run_coco(
    target: LoadedModel | OnnxModel,
    *,
    coco_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: CocoEvalConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[CocoEvalResult, Path]:
    """COCO AP of a PyTorch model (run on ``device``) or of an exported pair (in its runtime, on the CPU);
    writes one "coco" record."""
    config = config or CocoEvalConfig()
    make_out_dir(out_dir)
    git_commit()  # pinned before measuring
    runner: SamRunner
    if isinstance(target, OnnxModel):
        runner, runtime = onnx_runner(target.pair).runner(config.chunk_size), target.pair.runtime
        name, ckpt, precision = canonical_name(target.model), str(target.pair.encoder.parent), target.pair.precision
    else:
        runner, runtime = family_named(target.model).backend(target.sam, device).runner(config.chunk_size), "pytorch"
        name, ckpt, precision = target.model, target.checkpoint, target.precision
    result = evaluate_coco(runner, coco_root, config, progress)
    record = make_record(
        "coco",
        model=name,
        checkpoint=ckpt,
        precision=precision,
        runtime=runtime,
        threads=None,
        device=device_name(runner.device),
        config={**config.to_dict(), "coco_root": str(coco_root)},
        num_images=result.num_images,
        num_prompts=result.num_prompts,
        seconds=round(result.seconds, 2),
        **result.metrics,
    )
    return result, write_records([record], out_dir, f"coco-{name}-{precision}-{runtime}")


def run_latency(
    target: LoadedModel,
    *,
    out_dir: str | os.PathLike,
    config: LatencyConfig | None = None,
    onnx_pairs: list[OnnxPair] = (),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Path]:
    """Encoder and decoder latency of a PyTorch model (on ``device``) and of its exported pairs (CPU)."""
    runners = {pair.runtime: runner_class(pair.runtime) for pair in onnx_pairs}
    make_out_dir(out_dir)
    git_commit()  # pinned before measuring
    records = benchmark_latency(
        target.sam,
        target.model,
        config,
        device=device,
        checkpoint=target.checkpoint,
        precision=target.precision,
        onnx_pairs=list(onnx_pairs),
        runner_classes=runners,
        progress=progress,
    )
    return records, write_records(records, out_dir, f"latency-{target.model}-{target.precision}")
