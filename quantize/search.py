"""Per-layer scale search (SPEC 3): alternate weight and activation scales over a candidate grid.

For one layer, with its sampled float inputs X and the float output O = op(X, W), a setting of the
scales gives O_q = op(q(X), q(W)); candidates are ranked by
- "hessian": mean((dL/dO * (O - O_q))^2), dL/dO the task-loss gradient at the float model (PTQ4ViT);
- "mse": mean((O - O_q)^2).
The search starts from the min/max scales and only accepts a candidate that lowers the error, so
its result is never worse than min/max on the layer's own metric. Each round searches the weight
scale (alpha * per-channel max|W| / qmax), then each input in turn: uniform and twin-GELU inputs
over alpha * max / qmax, twin-softmax inputs over splits 2^-k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from quantize.calibration import LayerCalibrator
from quantize.config import PTQConfig
from quantize.core import int_range, quantize_symmetric


def _stack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate along dim 0 the tensors whose other dims agree (fewer, larger ops in the search)."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(tuple(t.shape[1:]), []).append(t)
    return [torch.cat(group) for group in groups.values()]


@dataclass
class LayerSearchResult:
    """Chosen parameters and the layer's error (its own metric) at min/max and after the search."""

    weight_alpha: float | None
    input_params: list[float] = field(default_factory=list)  # alpha (uniform/twin_gelu) or split (twin_softmax)
    error_minmax: float = 0.0
    error: float = 0.0
    error_twin: float | None = None  # for a layer with twin-uniform candidates: the error with them twin
    error_uniform: float | None = None  # ... and with them uniform (the kept kinds are the layer's)
    seconds_twin: float | None = None  # the time each of the two searches took
    seconds_uniform: float | None = None


class LayerSearch:
    """Holds one layer's samples and evaluates the layer error for given quantizer parameters."""

    def __init__(self, calibrator: LayerCalibrator, use_grads: bool) -> None:
        layer = self.layer = calibrator.layer
        self.op = calibrator.op
        self.has_weight = layer.weight_axis is not None
        num_inputs = len(layer.input_quants)
        # Samples grouped by shape; each group holds all inputs and (optionally) the gradients.
        if use_grads and len(calibrator.grads) != len(calibrator.inputs):
            raise RuntimeError(f"{len(calibrator.grads)} gradients for {len(calibrator.inputs)} samples of a layer")
        keys = [tuple(x.shape[1:] for x in sample) for sample in calibrator.inputs]
        self.groups: list[tuple[list[torch.Tensor], torch.Tensor | None]] = []
        for key in dict.fromkeys(keys):
            members = [i for i, k in enumerate(keys) if k == key]
            inputs = [torch.cat([calibrator.inputs[i][j] for i in members]) for j in range(num_inputs)]
            grads = torch.cat([calibrator.grads[i] for i in members]) if use_grads else None
            self.groups.append((inputs, grads))
        weight = layer.weight.detach() if self.has_weight else None
        with torch.no_grad():
            self.refs = [self.run(inputs, weight) for inputs, _ in self.groups]
        self.count = sum(ref.numel() for ref in self.refs)

    def run(self, inputs: list[torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
        """The layer's float computation on `inputs`, with `weight` where the layer has one (not a MatMul)."""
        return self.op(*inputs, weight=weight) if self.has_weight else self.op(*inputs)

    def quantized_inputs(self, index: int, scale: torch.Tensor, split: torch.Tensor) -> list[torch.Tensor]:
        quantizer = self.layer.input_quants[index]
        return [quantizer.quantize(inputs[index], scale, split) for inputs, _ in self.groups]

    @torch.no_grad()
    def error(self, weight: torch.Tensor | None, inputs: list[list[torch.Tensor]]) -> float:
        """inputs[j][g]: the (quantized) input j of sample group g; weight: the (quantized) weight."""
        total = 0.0
        for g, (ref, (_, grads)) in enumerate(zip(self.refs, self.groups, strict=True)):
            diff = self.run([x[g] for x in inputs], weight) - ref
            if grads is not None:
                diff = diff * grads
            total += float(diff.pow(2).sum())
        return total / max(self.count, 1)


def _alpha_grid(config: PTQConfig) -> list[float]:
    """The scale multipliers searched: `num_alphas` values from `alpha_min` to `alpha_max`."""
    return torch.linspace(config.alpha_min, config.alpha_max, config.num_alphas).tolist()


def search_layer(calibrator: LayerCalibrator, config: PTQConfig) -> LayerSearchResult:
    """Set the layer's quantizer buffers to the chosen scales and return what was chosen.

    A layer with twin-uniform inputs is searched twice, with those inputs twin and with them uniform,
    and keeps twin only where that lowers its error (its own metric, as ranked by the search) by more
    than `config.twin_margin`: a twin input costs a second integer product (or a float one) in the
    exported graph, so it has to pay for it. The result says which was kept, and both errors and times.
    """
    layer = calibrator.layer
    twin = [q for q in layer.input_quants if q.kind != "uniform"]
    searched = config.method != "minmax" and calibrator.called
    # One set of samples and float references for both searches: they depend on the inputs, not on the kinds.
    search = LayerSearch(calibrator, use_grads=config.method == "hessian") if searched else None
    start = time.perf_counter()
    result = _search_and_set(calibrator, config, search)
    if not twin or search is None:
        return result
    seconds_twin = time.perf_counter() - start
    kinds = [q.kind for q in twin]
    for quantizer in twin:
        quantizer.kind = "uniform"
    uniform = _search_and_set(calibrator, config, search)
    seconds_uniform = time.perf_counter() - start - seconds_twin
    kept = result if result.error < (1 - config.twin_margin) * uniform.error else uniform
    kept.error_twin, kept.error_uniform = result.error, uniform.error
    kept.seconds_twin, kept.seconds_uniform = seconds_twin, seconds_uniform
    if kept is result:  # twin pays for itself: back to its kinds and scales
        for quantizer, kind in zip(twin, kinds, strict=True):
            quantizer.kind = kind
        _set_scales(calibrator, config, result)
    return kept


def _weight_max(layer) -> torch.Tensor | None:
    """Per-channel max|W| of a layer with a weight, else None."""
    if layer.weight_axis is None:
        return None
    dims = [d for d in range(layer.weight.ndim) if d != layer.weight_axis]
    return layer.weight.detach().abs().amax(dim=dims).clamp(min=1e-8)


def _input_scale(quantizer, amax: torch.Tensor, value: float, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, split) of an input quantizer for a searched `value`: a split for twin-softmax, else an alpha."""
    one = torch.ones((), device=amax.device)  # on the model's device, as amax is
    if quantizer.kind == "twin_softmax":
        return one, one * value
    return value * amax / qmax, one


def _set_scales(calibrator: LayerCalibrator, config: PTQConfig, result: LayerSearchResult) -> None:
    """Write `result`'s scales into the layer's quantizers and enable them."""
    layer = calibrator.layer
    qmax, wqmax = int_range(config.a_bits)[1], int_range(config.w_bits)[1]
    with torch.no_grad():
        if result.weight_alpha is not None:
            layer.weight_quant.scale.copy_(result.weight_alpha * _weight_max(layer) / wqmax)
            layer.weight_quant.enabled = True
        for quantizer, amax, value in zip(layer.input_quants, calibrator.amax, result.input_params, strict=True):
            scale, split = _input_scale(quantizer, amax.compute_amax(), value, qmax)
            quantizer.scale.copy_(scale)
            quantizer.split.copy_(split)
            quantizer.enabled = True


def _search_and_set(calibrator: LayerCalibrator, config: PTQConfig, search: LayerSearch | None) -> LayerSearchResult:
    """`search_layer` for the input kinds the layer has now (min/max scales where `search` is None)."""
    layer = calibrator.layer
    qmax = int_range(config.a_bits)[1]
    wqmax = int_range(config.w_bits)[1]
    alphas = _alpha_grid(config)
    splits = [2.0**-k for k in range(config.max_split_exponent + 1)]
    amax = [c.compute_amax() for c in calibrator.amax]
    w_max = _weight_max(layer)

    # Min/max start: alpha 1 for every uniform scale, split 1 (one range) for twin-softmax.
    w_alpha = 1.0 if w_max is not None else None
    params = [1.0 for _ in layer.input_quants]

    def input_scale(j: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _input_scale(layer.input_quants[j], amax[j], value, qmax)

    def weight_q(alpha: float | None) -> torch.Tensor | None:
        if alpha is None:
            return None
        return layer.weight_quant.quantize(layer.weight.detach(), alpha * w_max / wqmax)

    if search is not None:
        q_inputs = [search.quantized_inputs(j, *input_scale(j, params[j])) for j in range(len(params))]
        q_weight = weight_q(w_alpha)
        best = error_minmax = search.error(q_weight, q_inputs)
        for _ in range(config.rounds):
            if w_alpha is not None:
                for alpha in alphas:
                    err = search.error(weight_q(alpha), q_inputs)
                    if err < best:
                        best, w_alpha = err, alpha
                q_weight = weight_q(w_alpha)
            for j, quantizer in enumerate(layer.input_quants):
                for value in splits if quantizer.kind == "twin_softmax" else alphas:
                    trial = [*q_inputs[:j], search.quantized_inputs(j, *input_scale(j, value)), *q_inputs[j + 1 :]]
                    err = search.error(q_weight, trial)
                    if err < best:
                        best, params[j] = err, value
                q_inputs[j] = search.quantized_inputs(j, *input_scale(j, params[j]))
        result = LayerSearchResult(w_alpha, params, error_minmax, best)
    else:
        result = LayerSearchResult(w_alpha, params)
    _set_scales(calibrator, config, result)
    return result


def search_output_scale(amax: torch.Tensor, values: torch.Tensor, bits: int, config: PTQConfig) -> float:
    """Alpha of an output quantizer's scale alpha * amax / qmax: min/max (1.0) for "minmax", else the
    candidate with the lowest MSE on the sampled output values (the output's own error; no layer
    after it is simulated here, so "hessian" ranks by MSE too). Returns the alpha."""
    if config.method == "minmax":
        return 1.0
    qmax = int_range(bits)[1]
    best, best_alpha = float("inf"), 1.0
    for alpha in [1.0, *_alpha_grid(config)]:
        err = float((quantize_symmetric(values, alpha * amax / qmax, bits) - values).pow(2).mean())
        if err < best:
            best, best_alpha = err, alpha
    return best_alpha
