"""Saving and loading quantized models as plain tensors and dicts (no pickled modules).

A quantized checkpoint holds: the format tag, the `student_models` model name, the `PTQConfig`
as a dict, the layout (each quantized layer's name and input kinds) and the state dict (float
parameters of the BN-folded, adapter-installed model plus every quantizer's scale/split buffers).
`torch.load(path, weights_only=True)` reads it. `load_quantized` rebuilds the model by name,
re-applies the same structural rewrites and quantized layers, and loads the state dict strictly.

Why this lives in `quantize` and not in `student_models.checkpoints` (the float format): rebuilding
a quantized model needs `quantize.ptq` and `quantize.modules`, and `student_models` imports no stage
(student_models <- distill, quantize, hierarchical <- benchmarks). The file handling is
`student_models.checkpoints`' (`load_torch_file`, `load_state_dict_strict`, `atomic_torch_save`), so
a quantized file that is missing, truncated or holds pickled code is refused as a float one is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from quantize.config import PTQConfig
from quantize.modules import ActQuantizer, QuantLayer, WeightQuantizer
from quantize.ptq import apply_quantized_layers, prepare_structure, quantized_layers
from student_models import CheckpointError, build_sam
from student_models.checkpoints import atomic_torch_save, load_state_dict_strict, load_torch_file
from student_models.registry import canonical_name

FORMAT = "sam-compress/quantized-v1"


def save_quantized(sam: Sam, path: str | os.PathLike, model_name: str | None = None, meta: dict | None = None) -> Path:
    """Write a quantized model to `path` (atomic). `model_name` defaults to the name `quantize_` recorded."""
    layers = quantized_layers(sam)
    if not layers:
        raise ValueError("save_quantized needs a quantized model (run quantize_ first); use save_checkpoint for float")
    name = model_name or getattr(sam, "quantized_model_name", None)
    if name is None:
        raise ValueError("save_quantized needs model_name (the student_models name the model was built with)")
    config: PTQConfig = sam.ptq_config
    payload = {
        "format": FORMAT,
        "model_name": canonical_name(name),
        "ptq_config": config.to_dict(),
        "layout": {layer_name: [q.kind for q in layer.input_quants] for layer_name, layer in layers.items()},
        "enabled": _enabled_flags(sam),
        "state_dict": {key: value.detach().cpu() for key, value in sam.state_dict().items()},
        "meta": dict(meta or {}),
    }
    atomic_torch_save(payload, path)
    return Path(path)


def _enabled_flags(sam: Sam) -> dict[str, bool]:
    return {name: m.enabled for name, m in sam.named_modules() if isinstance(m, (ActQuantizer, WeightQuantizer))}


def read_quantized(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents (weights_only load), checked to be a quantized checkpoint."""
    path = Path(path)
    payload = load_torch_file(path)  # names the file and what is wrong (missing, truncated, pickled code, ...)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a quantized checkpoint (format {found!r}, expected {FORMAT!r})")
    return payload


def load_quantized(path: str | os.PathLike, model_name: str | None = None) -> Sam:
    """Rebuild a quantized model from `save_quantized`'s file; `model_name`, if given, must match it."""
    payload = read_quantized(path)
    name = payload["model_name"]
    if model_name is not None and canonical_name(model_name) != name:
        raise CheckpointError(f"{path} holds a quantized {name!r} model, not {canonical_name(model_name)!r}")
    config = PTQConfig.from_dict(payload["ptq_config"])
    sam = build_sam(name)
    prepare_structure(sam)
    missing = [layer for layer in payload["layout"] if not _has_module(sam, layer)]
    if missing:
        raise CheckpointError(f"{path}: layers {missing[:5]} do not exist in a {name!r} model")
    apply_quantized_layers(sam, payload["layout"], config)
    load_state_dict_strict(sam, payload["state_dict"], str(path))
    modules = dict(sam.named_modules())
    for quantizer_name, enabled in payload["enabled"].items():
        modules[quantizer_name].enabled = bool(enabled)
    sam.ptq_config, sam.quantized_model_name = config, name
    return sam.eval()


def _has_module(sam: Sam, name: str) -> bool:
    try:
        return not isinstance(sam.get_submodule(name), QuantLayer)
    except AttributeError:
        return False
