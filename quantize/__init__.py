"""Post-training quantization of SAM models (Q-TinySAM) and their ONNX / ONNX Runtime deployment.

The quantization itself (`quantize_`, the config, checkpoints) needs only PyTorch; the export and
the ONNX Runtime runner are imported on first use, so quantizing (on a GPU machine, say) never
loads ONNX or ONNX Runtime.
"""

from importlib import import_module

from quantize.checkpoint import load_quantized, save_quantized
from quantize.config import PTQConfig
from quantize.ptq import QuantReport, quantize_

_DEPLOYMENT = {
    "ExportCheckError": "quantize.onnx_export",
    "ExportResult": "quantize.onnx_export",
    "export_onnx": "quantize.onnx_export",
    "OnnxSam": "quantize.onnx_runtime",
}

__all__ = [
    "ExportCheckError",
    "ExportResult",
    "OnnxSam",
    "PTQConfig",
    "QuantReport",
    "export_onnx",
    "load_quantized",
    "quantize_",
    "save_quantized",
]


def __getattr__(name: str):
    if name in _DEPLOYMENT:
        return getattr(import_module(_DEPLOYMENT[name]), name)
    raise AttributeError(f"module 'quantize' has no attribute {name!r}")
