"""ONNX Runtime's own static quantization of the float export: the baseline a user would pick instead.

`ort_quantize_static` runs `onnxruntime.quantization.quant_pre_process` then `quantize_static`
(QDQ format, per-channel int8 weights, uint8 activations, ORT's calibrators) on the float
encoder and decoder, calibrated on the same images and prompts as ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from quantize.calibration import CalibItem

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def ort_quantize_static(
    encoder_path: str | os.PathLike,
    decoder_path: str | os.PathLike,
    items: list[CalibItem],
    embeddings: list[dict[str, np.ndarray]],
    out_dir: str | os.PathLike,
    method: str = "minmax",
) -> tuple[Path, Path]:
    """Quantize the float `encoder_path`/`decoder_path` with ORT's `quantize_static`; returns the new paths.

    Args:
        items: calibration images and prompts; embeddings: their float embeddings as the decoder graph takes them,
            by input name (SAM: ``image_embeddings``; SAM 2: its three levels).
        method: "minmax", "percentile" or "entropy".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_feeds = [{"image": item.image.numpy()} for item in items]
    decoder_feeds = [
        {**emb, "point_coords": item.coords.numpy(), "point_labels": item.labels.numpy()}
        for item, emb in zip(items, embeddings, strict=True)
    ]
    outputs = []
    for name, path, feeds in (("encoder", encoder_path, encoder_feeds), ("decoder", decoder_path, decoder_feeds)):
        prepared = out_dir / f"{name}.prep.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        target = out_dir / f"ort_{method}_{name}.onnx"
        quantize_static(
            str(prepared),
            str(target),
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
        )
        prepared.unlink()
        outputs.append(target)
    return outputs[0], outputs[1]
