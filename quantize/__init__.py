"""Post-training quantization of SAM models (Q-TinySAM) and their ONNX / ONNX Runtime deployment."""

from quantize.checkpoint import load_quantized, read_quantized, save_quantized
from quantize.config import PTQConfig
from quantize.onnx_export import ExportCheckError, ExportResult, export_onnx
from quantize.onnx_runtime import OnnxSam, box_prompts, point_prompts
from quantize.ptq import QuantReport, quantize_, quantized_layers

__all__ = [
    "ExportCheckError",
    "ExportResult",
    "OnnxSam",
    "PTQConfig",
    "QuantReport",
    "box_prompts",
    "export_onnx",
    "load_quantized",
    "point_prompts",
    "quantize_",
    "quantized_layers",
    "read_quantized",
    "save_quantized",
]
