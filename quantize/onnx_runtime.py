"""ONNX Runtime on CPU: the session settings our graphs need, and `OnnxSam`, an exported SAM
(encoder.onnx + decoder.onnx) run with them as a `student_models.sam_runner.SamBackend`.

The files follow the contract written by `quantize.export_onnx`:
- encoder: "image" (1x3x1024x1024 float32, normalised and padded as `prepare_image` does)
  -> "image_embeddings" (1x256x64x64);
- decoder: "image_embeddings" (1x256x64x64), "point_coords" (BxNx2 float32, pixels in the
  1024-resized frame), "point_labels" (BxN float32: 1 foreground, 0 background, -1 padding,
  2/3 a box's top-left/bottom-right corner) -> "low_res_masks" (Bx4x256x256 logits; index 0 is the
  single-mask output, 1..3 the multimask outputs) and "iou_predictions" (Bx4).
"""

from __future__ import annotations

import abc
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from student_models.families import DECODER_OUTPUTS, PROMPT_NAMES, embedding_levels, family_of_graph

# Re-exported: callers (benchmarks) import the prompt helpers next to the runner that takes them.
from student_models.prompts import box_prompts, point_prompts  # noqa: F401
from student_models.sam2_pipeline import Sam2Features
from student_models.sam_runner import SamRunner

# ORT rewrites DequantizeLinear(int8 weight) -> MatMul with a float input (a layer whose input is left float) into
# MatMulNBits, whose default accuracy level 4 quantizes that float input again, per block of 32 values,
# on the fly: an extra rounding the simulated model does not have (it made 10-24% of the next layer's
# int8 inputs differ by up to 2 steps on tinyvit_test). Level 1 keeps the input in float32.
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
MATMULNBITS_FP32 = "1"

# On x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake) ORT's u8 x s8 kernels (MatMulIntegerToFloat,
# QLinearMatMul, QLinearConv) add pairs of products with VPMADDUBSW, which saturates at int16: two uint8
# activations near 255 times int8 weights near 127 overflow. In tests/quantize's fixture block, under QEMU's
# Haswell model (AVX2, no VNNI), 1.2% of fc1's pairs saturated and moved its outputs by up to 30% of their range
# (0.12 relative RMS at the block's output, as on a 2-core AMD EPYC; 1e-7 with this entry). The entry makes ORT
# convert int8 weights to uint8 and run its exact u8 x u8 kernels. It does so whatever the CPU, and those kernels
# are slower: on a VNNI CPU (exact u8 x s8 products, no saturation) a 4096x320x1280 product took 171 ms instead
# of 48 ms. So it is set only where the CPU lacks VNNI.
X64_QUANT_PRECISION_KEY = "session.x64quantprecision"


def u8s8_products_may_saturate() -> bool:
    """Whether ORT's uint8 x int8 kernels may saturate on this CPU: x86 without AVX512-VNNI.

    Read from numpy's run-time CPU feature detection (CPUID, as ORT's own kernels dispatch). Where numpy
    cannot tell, or the CPU has only the 256-bit AVX-VNNI numpy does not report, the answer is the safe one.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return not __cpu_features__.get("AVX512VNNI", False)


def session_options(num_threads: int | None = None, level: str = "all") -> ort.SessionOptions:
    """CPU session options: graph optimisation `level` ("basic", "extended", "all"); threads or ORT's default."""
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, MATMULNBITS_FP32)
    if u8s8_products_may_saturate():
        options.add_session_config_entry(X64_QUANT_PRECISION_KEY, "1")
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return options


# ORT's MatMulAddFusion turns MatMul + Add on static-shape 3-D inputs into Reshape -> Gemm, which
# hides the DQ -> MatMul pattern from the later QDQ fusion and leaves the product in float.
QDQ_DISABLED_OPTIMIZERS = ["MatMulAddFusion", "MatmulTransposeFusion"]


def is_qdq(path: str | os.PathLike) -> bool:
    """Whether an .onnx file holds DequantizeLinear nodes (False for .ort files, already optimised)."""
    if not os.fspath(path).endswith(".onnx"):
        return False
    return any(node.op_type == "DequantizeLinear" for node in onnx.load(os.fspath(path)).graph.node)


def open_session(
    path: str | os.PathLike, num_threads: int | None = None, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An ORT CPU session for an .onnx or .ort file (QDQ graphs keep their integer MatMuls, see above)."""
    disabled = QDQ_DISABLED_OPTIMIZERS if is_qdq(path) else []
    return ort.InferenceSession(
        os.fspath(path),
        sess_options=options or session_options(num_threads),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled,
    )


def count_kernels(path: str | os.PathLike) -> dict[str, int]:
    """Op types of the graph ORT actually runs (after ORT_ENABLE_ALL optimisation), with counts."""
    options = session_options(level="all")
    options.log_severity_level = 3  # the NCHWc note about hardware-specific graphs is expected here
    optimized = str(path) + ".optimized.tmp"
    options.optimized_model_filepath = optimized
    open_session(path, options=options)
    counts: dict[str, int] = {}
    for node in onnx.load(optimized).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    os.remove(optimized)
    return dict(sorted(counts.items()))


def write_ort_format(path: Path) -> Path:
    """Write the ORT-format (.ort) file ONNX Runtime Mobile loads, optimised at the portable "extended" level."""
    target = path.with_suffix(".ort")
    options = session_options(level="extended")
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    open_session(path, options=options)
    return target


def float32_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU float32 C-contiguous numpy view (a copy only where needed) of a tensor, for a runtime's feed."""
    return np.ascontiguousarray(torch.as_tensor(tensor).detach().cpu().numpy(), dtype=np.float32)


class CpuSamRunner(abc.ABC):
    """A `SamBackend` over two exported files run by a CPU runtime: the file contract and input checks,
    with the runtime left to `load` (open a file), `output_names` and `run` (outputs by name).

    ``encode`` and ``decode`` take and return tensors, as `TorchSamBackend`'s do, so `SamRunner`,
    quantization fidelity and the latency benchmark run any back-end the same way; inputs on another
    device are brought to the CPU, and numpy appears only at the runtime's call. The encoder file's outputs
    say the model family (`student_models.families`): a SAM encoder's embedding is a tensor, a SAM 2
    encoder's a `Sam2Features`.

    Args:
        encoder_path, decoder_path: the two exported files.
        num_threads: the runtime's threads (None: its default).
    """

    device = torch.device("cpu")

    def __init__(
        self, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike, num_threads: int | None = None
    ) -> None:
        self.encoder_path, self.decoder_path = os.fspath(encoder_path), os.fspath(decoder_path)
        self.num_threads = num_threads
        self.encoder = self.load(encoder_path, num_threads)
        self.decoder = self.load(decoder_path, num_threads)
        self.family = family_of_graph(self.output_names(self.encoder))

    def runner(self, chunk_size: int = 64) -> SamRunner:
        """A `SamRunner` on this back-end, with the geometry of its model's family."""
        return self.family.runner(self, chunk_size)

    @abc.abstractmethod
    def load(self, path: str | os.PathLike, num_threads: int | None):
        """The runtime's model for the file at `path`."""

    @abc.abstractmethod
    def output_names(self, model) -> list[str]:
        """The names of `model`'s outputs."""

    @abc.abstractmethod
    def run(self, model, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """`model`'s outputs `names` on `feeds`."""

    def encode(self, images: torch.Tensor) -> torch.Tensor | Sam2Features:
        """Bx3x1024x1024 float32 preprocessed images -> their embeddings (SAM: Bx256x64x64; SAM 2: `Sam2Features`),
        one call per image."""
        images = float32_array(images)
        if images.ndim != 4 or images.shape[1:] != (3, 1024, 1024):
            raise ValueError(
                f"{type(self).__name__}.encode expects Bx3x1024x1024 preprocessed images, got {images.shape}"
            )
        names = list(self.family.embedding_names)
        per_image = [self.run(self.encoder, names, {"image": images[i : i + 1]}) for i in range(len(images))]
        levels = [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in zip(*per_image, strict=True)]
        return self.family.embedding([torch.from_numpy(level) for level in levels])

    def decode(
        self, embedding: torch.Tensor | Sam2Features, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's embedding (as `encode` returns it), BxNx2 coords, BxN labels -> (Bx4x256x256 logits, Bx4 IoU)."""
        coords, labels = float32_array(coords), float32_array(labels)
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError(
                f"{type(self).__name__}.decode expects point_coords BxNx2 and point_labels BxN, got {coords.shape} "
                f"and {labels.shape}"
            )
        levels = [float32_array(level) for level in embedding_levels(embedding)]
        feeds = {**dict(zip(self.family.embedding_names, levels, strict=True)), PROMPT_NAMES[0]: coords,
                 PROMPT_NAMES[1]: labels}  # fmt: skip
        masks, iou = self.run(self.decoder, list(DECODER_OUTPUTS), feeds)
        return torch.from_numpy(masks), torch.from_numpy(iou)


class OnnxSam(CpuSamRunner):
    """SAM from two ONNX (or ORT-format) files, run by ONNX Runtime on CPU (`CpuSamRunner`).

    Args:
        encoder_path, decoder_path: files written by `quantize.export_onnx` (float32 or INT8 QDQ).
        num_threads: intra-op threads (None: ORT's default, all cores).
    """

    def load(self, path: str | os.PathLike, num_threads: int | None) -> ort.InferenceSession:
        return open_session(path, num_threads)

    def output_names(self, model: ort.InferenceSession) -> list[str]:
        return [output.name for output in model.get_outputs()]

    def run(self, model: ort.InferenceSession, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return model.run(names, feeds)
