"""`quantize_`: post-training quantization of a SAM model in place, from a calibration forward loop.

Steps: fuse re-parameterizable blocks, fold BatchNorms and install the attention adapters
(numerically identical rewrites); find the quantizable layers (Linear, Conv2d, ConvTranspose2d,
MatMul) of the chosen parts, minus the keep-float patterns; find which inputs come straight from a
Softmax or a GELU (twin-uniform candidates) with one probing pass; swap in quantized layers; run
the float model through the calibration forward loop collecting statistics (and task-loss
gradients for the Hessian metric); search each layer's scales; enable the quantizers. Layers never
called during calibration (TinyViT's unused classification head) stay float, and so do layers the task
outputs do not depend on (SAM 2's object-score head, which the image pipeline ignores and the exported
decoder graph does not contain).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from quantize.adapters import fold_batchnorms, fuse_reparameterizable, install_adapters, set_submodule
from quantize.calibration import (
    ForwardLoop,
    box_prompt_loop,
    collect,
    collect_outputs,
    model_device,
    parameter_gradients,
    prepare_calibration,
)
from quantize.config import PTQConfig
from quantize.core import int_range
from quantize.modules import ActQuantizer, QuantLayer, quantized_copy
from quantize.search import LayerSearchResult, search_layer, search_output_scale
from student_models.checkpoints import guess_model
from student_models.data import Sample
from student_models.families import family_of
from student_models.tiny_vit import MatMul

QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, MatMul)


@dataclass
class QuantReport:
    """What `quantize_` did: per-layer choices and errors, and the layers left in float."""

    config: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    num_calib: int = 0

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for info in self.layers.values():
            for kind in info["inputs"]:
                kinds[kind] = kinds.get(kind, 0) + 1
        searched = [info for info in self.layers.values() if info["error_minmax"] > 0]
        gain = [info["error"] / info["error_minmax"] for info in searched]
        return {
            "quantized_layers": len(self.layers),
            "input_quantizers": kinds,
            "kept_float": self.kept_float,
            "unused_float": self.unused,
            "num_calib": self.num_calib,
            "median_error_ratio_vs_minmax": float(np.median(gain)) if gain else None,
            # layers whose twin-uniform candidates were searched: kept twin or not, twin's error / uniform's,
            # and what each search took
            "twin_candidates": {
                name: {"twin": any(kind != "uniform" for kind in info["inputs"]),
                       "error_ratio": info["error_twin"] / max(info["error_uniform"], 1e-30),
                       "search_seconds": info["search_seconds"]}
                for name, info in self.layers.items() if "error_twin" in info
            },
        }  # fmt: skip


def prepare_structure(sam: nn.Module) -> None:
    """The numerically identical rewrites every quantized model gets (also re-applied on load)."""
    fuse_reparameterizable(sam)
    fold_batchnorms(sam)
    install_adapters(sam)


def find_layers(sam: nn.Module, config: PTQConfig) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept float by pattern) among the quantizable layers of the chosen parts."""
    prefixes = tuple(family_of(sam).part_prefixes[part] for part in config.parts)
    candidates = [name for name, m in sam.named_modules() if isinstance(m, QUANTIZABLE) and name.startswith(prefixes)]
    all_layers = [name for name, m in sam.named_modules() if isinstance(m, QUANTIZABLE)]
    for pattern in config.keep_float:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_layers):
            raise ValueError(
                f"keep_float pattern {pattern!r} matches no quantizable layer; layer names look like "
                f"{all_layers[0]!r} or {all_layers[-1]!r}"
            )
    kept = [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in config.keep_float)]
    return [name for name in candidates if name not in kept], kept


def layers_reaching_outputs(sam: nn.Module, names: list[str], loop: ForwardLoop) -> set[str]:
    """The layers among `names` whose outputs the task outputs (mask logits, IoU) depend on, found by autograd on
    the loop's first batch: a layer's output gets a gradient exactly when an output depends on it."""
    reached: set[str] = set()
    modules = dict(sam.named_modules())

    def watch(name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda grad: reached.add(name))

        return hook

    handles = [modules[name].register_forward_hook(watch(name)) for name in names]
    try:
        with parameter_gradients(sam, True):
            first = next(iter(loop(sam)), None)
            if first is None:
                raise ValueError("quantization needs at least one calibration batch; the forward loop ran none")
            masks, iou = first
            (masks.sum() + iou.sum()).backward()
    finally:
        for handle in handles:
            handle.remove()
    return reached


@torch.no_grad()
def probe_input_kinds(sam: nn.Module, names: list[str], loop: ForwardLoop, config: PTQConfig) -> dict[str, list[str]]:
    """For each layer, the kind of each input: twin_softmax / twin_gelu when it is a Softmax / GELU output
    (from the loop's first batch)."""
    twin = config.method != "minmax"
    produced: dict[int, str] = {}
    keep_alive = []
    handles = []
    for module in sam.modules():
        kind = (
            "twin_softmax" if isinstance(module, nn.Softmax) else "twin_gelu" if isinstance(module, nn.GELU) else None
        )
        if kind is not None:

            def remember(mod, inp, out, kind=kind):
                produced[id(out)] = kind
                keep_alive.append(out)

            handles.append(module.register_forward_hook(remember))
    kinds: dict[str, list[str]] = {}
    modules = dict(sam.named_modules())
    for name in names:

        def record(mod, inp, name=name):
            found = [produced.get(id(x), "uniform") for x in inp]
            twin_here = twin and (config.twin_convs or not isinstance(mod, nn.Conv2d | nn.ConvTranspose2d))
            wanted = {"twin_softmax": twin_here and config.twin_softmax, "twin_gelu": twin_here and config.twin_gelu}
            kinds[name] = [k if wanted.get(k, False) else "uniform" for k in found]

        handles.append(modules[name].register_forward_pre_hook(record))
    try:
        next(iter(loop(sam)))  # a batch exists: layers_reaching_outputs ran one
    finally:
        for handle in handles:
            handle.remove()
    return kinds


def apply_quantized_layers(sam: nn.Module, kinds: dict[str, list[str]], config: PTQConfig) -> dict[str, QuantLayer]:
    """Swap each named layer for a quantized copy with the given input kinds; returns them by name."""
    device = model_device(sam)
    layers = {}
    for name, input_kinds in kinds.items():
        layer = quantized_copy(
            sam.get_submodule(name), config.w_bits, config.a_bits, input_kinds, config.conv_outputs,
            config.product_outputs,
        )  # fmt: skip
        set_submodule(sam, name, layer.to(device))  # its quantizers' buffers next to the shared parameters
        layers[name] = layer
    return layers


def quantize_(
    sam: nn.Module,
    config: PTQConfig,
    calibration: ForwardLoop | Iterable[np.ndarray | Sample],
    show_progress: bool = True,
    model_name: str | None = None,
) -> QuantReport:
    """Quantize `sam` in place (fake-quantized weights and activations) and return a `QuantReport`.

    Calibration and the scale search run on the model's device (a CUDA model stays on its GPU).

    Args:
        sam: a float SAM or SAM 2 model (e.g. from `student_models.build_sam`), in eval mode.
        config: the `PTQConfig`.
        calibration: a forward loop, `loop(sam)` yielding (Bx4x256x256 mask logits, Bx4 IoU) per
            calibration batch (see `quantize.calibration`), or HxWx3 uint8 RGB images or dataset
            `Sample`s, whose boxes become the prompts (random boxes otherwise): the first
            `config.num_calib` are run through `box_prompt_loop`.
        model_name: the `student_models` name the model was built with (recorded for
            `save_quantized`); found from the state dict's keys and shapes when not given.
    """
    if any(isinstance(m, QuantLayer) for m in sam.modules()):
        raise ValueError("this model is already quantized; build a fresh float model to quantize again")
    model_name = model_name or guess_model(sam.state_dict())
    loop = calibration if callable(calibration) else image_loop(calibration, config, family_of(sam).name)
    sam.eval()
    prepare_structure(sam)
    names, kept = find_layers(sam, config)
    reaching = layers_reaching_outputs(sam, names, loop)
    kinds = probe_input_kinds(sam, [name for name in names if name in reaching], loop, config)
    unused = [name for name in names if name not in kinds]
    originals = {name: sam.get_submodule(name) for name in kinds}
    layers = apply_quantized_layers(sam, kinds, config)
    calibrators, batches = collect(sam, layers, loop, config.method == "hessian", config.search_tokens, config.seed)
    report = QuantReport(config.to_dict(), kept_float=kept, num_calib=batches)
    for name, calibrator in tqdm(calibrators.items(), desc=f"{config.method} scale search", disable=not show_progress):
        if not calibrator.called:  # no calibration data reached it: keep float
            set_submodule(sam, name, originals[name])
            unused.append(name)
            continue
        result: LayerSearchResult = search_layer(calibrator, config)
        report.layers[name] = {
            "type": type(calibrator.layer).__name__,
            "inputs": [q.kind for q in calibrator.layer.input_quants],
            "weight_alpha": result.weight_alpha,
            "input_params": result.input_params,
            "error_minmax": result.error_minmax,
            "error": result.error,
        }
        if result.error_twin is not None:
            report.layers[name].update(
                error_twin=result.error_twin, error_uniform=result.error_uniform,
                search_seconds={"twin": round(result.seconds_twin, 3), "uniform": round(result.seconds_uniform, 3)},
            )  # fmt: skip
        calibrator.reset()
    calibrate_output_quantizers(sam, report, loop, config)
    for consumer, producer in share_requantized_scales(sam, loop).items():
        report.layers[consumer.rpartition(".input_quants.")[0]]["input_scale_from"] = producer
    report.unused = unused
    sam.ptq_config, sam.quantized_model_name = config, model_name
    return report


def image_loop(images: Iterable[np.ndarray | Sample], config: PTQConfig, family: str) -> ForwardLoop:
    """The box-prompt forward loop over the first `config.num_calib` images (their boxes, else random ones),
    prepared for a model of `family`."""
    items = prepare_calibration(images, config.num_calib, config.max_prompts, config.seed, family)
    return box_prompt_loop(items)


@torch.no_grad()
def calibrate_output_quantizers(sam: nn.Module, report: QuantReport, loop: ForwardLoop, config: PTQConfig) -> None:
    """Set the scales of the layers' output quantizers (`wants_output_quantizer`) from one pass of the quantized
    model."""
    quantizers = {
        name: layer.output_quant
        for name, layer in quantized_layers(sam).items()
        if getattr(layer, "output_quant", None) is not None
    }
    stats = collect_outputs(sam, quantizers, loop, config.search_tokens * 1024, config.seed)
    qmax = int_range(config.a_bits)[1]
    for name, quantizer in quantizers.items():
        if name not in stats:
            continue
        amax, values = stats[name]
        alpha = search_output_scale(amax, values, quantizer.bits, config)
        quantizer.scale.copy_(alpha * amax / qmax)
        quantizer.enabled = True
        report.layers[name]["output_alpha"] = alpha


@torch.no_grad()
def share_requantized_scales(sam: nn.Module, loop: ForwardLoop) -> dict[str, str]:
    """Give each uniform input quantizer whose input lies on another uniform quantizer's grid that quantizer's
    scale.

    A layer's output quantizer feeding the next layer directly (RepViT's stem into its first token mixer,
    a strided depthwise conv into a 1x1 one), through a ReLU (an MLP's hidden layer) or through data movement
    only (reshapes, transposes, splits: attention's q, k and v out of a quantized qkv product) would round
    twice, to two grids. The runtimes merge such a requantization into one rounding (ONNX Runtime moves
    QuantizeLinear/DequantizeLinear through data movement and removes the pair between; XNNPACK requantizes
    in int8), so they would compute something the simulation does not. On one grid the second rounding is
    exact. Found from the loop's first batch, by value: every input value is a multiple of the producer's
    scale within its range (a non-zero input: a zero-initialised layer's zeros lie on every grid), the most
    recent producer first; returns {consumer quantizer: producer quantizer}.
    """
    quantizers = {m: name for name, m in sam.named_modules() if isinstance(m, ActQuantizer) and m.enabled}
    ran: dict[ActQuantizer, None] = {}  # uniform quantizers in the order they last ran (an ordered set)
    pairs: dict[ActQuantizer, ActQuantizer] = {}

    def remember(quantizer, inputs, output):
        if quantizer.kind == "uniform":
            ran.pop(quantizer, None)
            ran[quantizer] = None

    def on_grid(x: torch.Tensor, producer: ActQuantizer) -> bool:
        scale, (qmin, qmax) = producer.scale, int_range(producer.bits)
        head = x.flatten()[:256]  # most candidates differ here already: no full pass over the input
        for values in (head, x):
            in_range = qmin * scale <= values.min() and values.max() <= qmax * scale
            if not (in_range and torch.equal(torch.round(values / scale) * scale, values)):
                return False
        return True

    def find(quantizer, inputs):
        x = inputs[0]
        if quantizer.kind != "uniform" or ".input_quants." not in quantizers[quantizer] or not x.any():
            return
        producer = next((q for q in reversed(ran) if q is not quantizer and on_grid(x, q)), None)
        if producer is not None:
            pairs[quantizer] = producer

    handles = [h for q in quantizers for h in (q.register_forward_hook(remember), q.register_forward_pre_hook(find))]
    try:
        next(iter(loop(sam)))
    finally:
        for handle in handles:
            handle.remove()
    for consumer, producer in pairs.items():
        consumer.scale.copy_(producer.scale)
    return {quantizers[consumer]: quantizers[producer] for consumer, producer in pairs.items()}


def quantized_layers(sam: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of a model, by name."""
    return {name: m for name, m in sam.named_modules() if isinstance(m, QuantLayer)}
