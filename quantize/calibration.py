"""Calibration data: a forward loop in, per-layer statistics and search samples out.

Calibration takes a caller's forward loop, as NVIDIA ModelOpt's `quantize(model, config,
forward_loop)` does: `loop(sam)` runs the calibration data through `sam` on the model's own
device and yields, per batch, the task outputs (Bx4x256x256 mask logits, Bx4 IoU predictions).
It is called once per pass (probes of one batch, the float statistics pass, the output-quantizer
pass), so each call must run the same data; it must not switch gradients off, and each batch needs
its own forward pass (the Hessian metric backpropagates each batch's task loss). `box_prompt_loop`
is the loop over prepared images with box prompts (`prepare_calibration`, in the family's input frame)
that `quantize_` builds when given images.

`collect` runs the float model through the loop once with hooks on every quantizable layer and
fills each layer's `LayerCalibrator`: the running max of every input (`MaxCalibrator`), and a
small random selection of input values with, for the Hessian metric, the gradient of the task
loss at the matching output positions. `collect_outputs` runs the quantized model once more for the
output quantizers of convolutions (their input depends on the layer's own quantized input and weight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantize.modules import ActQuantizer, QuantConv2d, QuantConvTranspose2d, QuantLayer, QuantLinear
from student_models.data import Sample
from student_models.families import FAMILIES, family_of, graph_levels
from student_models.prompts import box_prompts


@dataclass
class CalibItem:
    """One calibration image: 1x3x1024x1024 preprocessed tensor, Bx2x2 box-corner coords, Bx2 labels (in the
    input frame of the model family it was prepared for)."""

    image: torch.Tensor
    coords: torch.Tensor
    labels: torch.Tensor


# loop(sam) -> per calibration batch, (Bx4x256x256 mask logits, Bx4 IoU predictions); see the module docstring.
ForwardLoop = Callable[[nn.Module], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s parameters (a SAM model lives on one device)."""
    return next(model.parameters()).device


def box_prompt_loop(items: list[CalibItem]) -> ForwardLoop:
    """The forward loop over prepared `items`: each moved to the model's device, encoded and decoded by the
    two graphs of the model's family."""

    def loop(sam: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = model_device(sam)
        encoder, decoder = family_of(sam).networks(sam)
        for item in items:
            levels = graph_levels(encoder(item.image.to(device)))
            yield decoder(*levels, item.coords.to(device), item.labels.to(device))

    return loop


def random_boxes(height: int, width: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random XYXY boxes inside an HxW image, sides 10-60% of the image's."""
    sides = rng.uniform(0.1, 0.6, size=(count, 2)) * (width, height)
    corners = rng.uniform(0, 1, size=(count, 2)) * ((width, height) - sides)
    return np.concatenate([corners, corners + sides], axis=1).astype(np.float32)


def prepare_calibration(
    images: Iterable[np.ndarray | Sample], num_calib: int, max_prompts: int, seed: int, family: str = "sam"
) -> list[CalibItem]:
    """Up to `num_calib` images -> CalibItems for a model of `family` ("sam", "sam2"); prompts are the
    sample's boxes, else random boxes."""
    rng = np.random.default_rng(seed)
    items = []
    for entry in images:
        if entry is None:  # a dataset's corrupt image
            continue
        if len(items) == num_calib:
            break
        image, boxes = (entry.image, entry.boxes) if isinstance(entry, Sample) else (entry, None)
        tensor, to_frame = FAMILIES[family].prepare(image)
        if boxes is None or len(boxes) == 0:
            boxes = random_boxes(*image.shape[:2], max_prompts, rng)
        elif len(boxes) > max_prompts:
            boxes = boxes[np.sort(rng.choice(len(boxes), max_prompts, replace=False))]
        corners = to_frame(np.asarray(boxes, dtype=np.float32).reshape(-1, 2, 2))
        coords, labels = box_prompts(corners.reshape(-1, 4))
        items.append(CalibItem(tensor, torch.from_numpy(coords), torch.from_numpy(labels)))
    if not items:
        raise ValueError("quantization needs at least one calibration image; none were given")
    return items


class MaxCalibrator:
    """Running max of |x| (or of x, `positive=True`) over everything collected (ModelOpt-style)."""

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive
        self.reset()

    def reset(self) -> None:
        self.amax = torch.tensor(0.0)

    def collect(self, x: torch.Tensor) -> None:
        value = x.detach().amax() if self.positive else x.detach().abs().amax()
        self.amax = torch.maximum(self.amax.to(value.device), value.float().clamp(min=0))

    def compute_amax(self) -> torch.Tensor:
        return self.amax.clamp(min=1e-8)


def _selection(layer: QuantLayer, inputs: tuple[torch.Tensor, ...], tokens: int, gen: torch.Generator):
    """Choose sample positions: (sampled inputs, output -> matching slice, op(inputs, weight) -> output)."""

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=gen)[: min(n, k)]  # on the CPU, where `gen` is

    def pick_with_peaks(magnitude: torch.Tensor, k: int) -> torch.Tensor:
        """k indices: the quarter with the largest `magnitude` (outliers decide clipping), the rest random."""
        top = magnitude.topk(min(len(magnitude), max(1, k // 4))).indices
        rest = pick(len(magnitude), k).to(magnitude.device)
        return torch.cat([top, rest[~torch.isin(rest, top)]])[: min(len(magnitude), k)]

    if isinstance(layer, QuantLinear):
        rows = inputs[0].reshape(-1, inputs[0].shape[-1])
        idx = pick_with_peaks(rows.abs().amax(dim=1), tokens)
        return (rows[idx],), lambda out: out.reshape(-1, out.shape[-1])[idx], layer.float_forward
    if isinstance(layer, QuantConv2d):
        x = inputs[0]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
        out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        side = max(1, int(tokens**0.5))
        th, tw = min(side, out_h), min(side, out_w)
        b = int(pick(x.shape[0], 1))
        oy, ox = int(pick(out_h - th + 1, 1)), int(pick(out_w - tw + 1, 1))
        if int(pick(2, 1)) == 0:  # half of the crops around the input's largest value
            peak = int(x[b].abs().amax(dim=0).argmax())
            py, px = (peak // x.shape[3] + ph) // sh, (peak % x.shape[3] + pw) // sw
            oy, ox = min(max(py - th // 2, 0), out_h - th), min(max(px - tw // 2, 0), out_w - tw)
        padded = F.pad(x[b : b + 1], (pw, pw, ph, ph))
        crop = padded[:, :, oy * sh : oy * sh + (th - 1) * sh + dh * (kh - 1) + 1,
                      ox * sw : ox * sw + (tw - 1) * sw + dw * (kw - 1) + 1]  # fmt: skip

        def conv(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
            weight = layer.weight if weight is None else weight
            return F.conv2d(x, weight, layer.bias, layer.stride, 0, layer.dilation, layer.groups)

        return (crop,), lambda out: out[b : b + 1, :, oy : oy + th, ox : ox + tw], conv
    if isinstance(layer, QuantConvTranspose2d):
        x = inputs[0]
        b = int(pick(x.shape[0], 1))
        stride = layer.stride
        exact_crop = (
            tuple(layer.kernel_size) == tuple(stride) and not any(layer.padding) and not any(layer.output_padding)
        )
        if not exact_crop:  # no clean crop: keep one whole batch entry
            return (x[b : b + 1],), lambda out: out[b : b + 1], layer.float_forward
        side = max(1, int(tokens**0.5) // stride[0])
        th, tw = min(side, x.shape[2]), min(side, x.shape[3])
        iy, ix = int(pick(x.shape[2] - th + 1, 1)), int(pick(x.shape[3] - tw + 1, 1))
        crop = x[b : b + 1, :, iy : iy + th, ix : ix + tw]
        return (
            (crop,),
            lambda out: out[
                b : b + 1, :, iy * stride[0] : (iy + th) * stride[0], ix * stride[1] : (ix + tw) * stride[1]
            ],
            layer.float_forward,
        )
    a, b_ = torch.broadcast_tensors(inputs[0][..., :1, :1], inputs[1][..., :1, :1])  # common batch shape
    batch = a.shape[:-2]
    a = inputs[0].expand(*batch, *inputs[0].shape[-2:]).reshape(-1, *inputs[0].shape[-2:])
    bm = inputs[1].expand(*batch, *inputs[1].shape[-2:]).reshape(-1, *inputs[1].shape[-2:])
    rows = pick_with_peaks(a.abs().amax(dim=(0, 2)), 64)
    groups = pick_with_peaks(
        torch.maximum(a.abs().amax(dim=(1, 2)), bm.abs().amax(dim=(1, 2))), max(1, tokens // len(rows))
    )
    return (
        (a[groups][:, rows], bm[groups]),
        lambda out: out.reshape(-1, *out.shape[-2:])[groups][:, rows],
        layer.float_forward,
    )


class LayerCalibrator:
    """What the scale search of one layer needs: input maxima, sampled inputs and output gradients."""

    def __init__(self, layer: QuantLayer) -> None:
        self.layer = layer
        self.amax = [MaxCalibrator(positive=q.kind == "twin_gelu") for q in layer.input_quants]
        self.inputs: list[tuple[torch.Tensor, ...]] = []
        self.grads: list[torch.Tensor] = []
        self.op: Callable[..., torch.Tensor] | None = None

    @property
    def called(self) -> bool:
        return bool(self.inputs)

    def reset(self) -> None:
        for calibrator in self.amax:
            calibrator.reset()
        self.inputs, self.grads = [], []

    def collect(
        self, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, tokens: int, gen: torch.Generator
    ) -> None:
        for calibrator, x in zip(self.amax, inputs, strict=True):
            calibrator.collect(x)
        sampled, take_output, self.op = _selection(self.layer, tuple(x.detach() for x in inputs), tokens, gen)
        self.inputs.append(tuple(x.clone() for x in sampled))
        if output.requires_grad:
            output.register_hook(lambda grad: self.grads.append(take_output(grad).detach().clone()))


def fisher_task_loss(masks: torch.Tensor, iou: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A loss whose squared gradient estimates the Hessian of KL(float || quantized) at the float model.

    masks: Bx4x256x256 logits, iou: Bx4. At the float model the KL and its gradient are zero; its
    Hessian is the Fisher information, E[g g^T] with g the gradient of -log p(y) for y drawn from
    the float model's own output distribution. So labels are sampled: per pixel y ~ Bernoulli(sigmoid(logit)),
    and one mask token ~ softmax(IoU scores); the loss is BCE (mean over pixels) + CE (mean over prompts).
    """
    pixel_labels = torch.bernoulli(torch.sigmoid(masks.detach()), generator=gen)
    token = torch.multinomial(torch.softmax(iou.detach(), dim=-1), 1, generator=gen).squeeze(-1)
    return F.binary_cross_entropy_with_logits(masks, pixel_labels) + F.cross_entropy(iou, token)


@contextlib.contextmanager
def parameter_gradients(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradients on (or off) for every parameter of `model` and for the code inside; afterwards each parameter's
    own ``requires_grad`` is back and its ``grad`` cleared.

    Every layer output must be on the autograd graph, including those that do not depend on the image (the
    first token self-attention), hence gradients through the parameters rather than from the input.
    """
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(enabled)
        with torch.set_grad_enabled(enabled):
            yield
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.grad = None
            p.requires_grad_(flag)


def collect(
    sam: nn.Module, layers: dict[str, QuantLayer], loop: ForwardLoop, with_grads: bool, tokens: int, seed: int
) -> tuple[dict[str, LayerCalibrator], int]:
    """Run the float model through `loop` with hooks on `layers`; gradients of `fisher_task_loss` if
    asked. Returns the calibrators and the number of batches the loop ran."""
    gen = torch.Generator().manual_seed(seed)  # sample positions: drawn on the CPU whatever the device
    label_gen = torch.Generator(model_device(sam)).manual_seed(seed)  # the loss's labels, next to the logits
    calibrators = {name: LayerCalibrator(layer) for name, layer in layers.items()}
    handles = [
        layer.register_forward_hook(lambda mod, inp, out, c=calibrators[name]: c.collect(inp, out, tokens, gen))
        for name, layer in layers.items()
    ]
    batches = 0
    try:
        with parameter_gradients(sam, with_grads):
            for masks, iou in tqdm(loop(sam), desc="calibration pass", leave=False):
                batches += 1
                if with_grads:
                    fisher_task_loss(masks, iou, label_gen).backward()
    finally:
        for handle in handles:
            handle.remove()
    return calibrators, batches


@torch.no_grad()
def collect_outputs(
    sam: nn.Module, quantizers: dict[str, ActQuantizer], loop: ForwardLoop, samples: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the (quantized) model through `loop` and return, per output quantizer, (max|x|, up to
    `samples` values per call drawn at random) of the tensor it receives."""
    gen = torch.Generator().manual_seed(seed)
    amax = {name: MaxCalibrator() for name in quantizers}
    values: dict[str, list[torch.Tensor]] = {name: [] for name in quantizers}

    def record(name: str, x: torch.Tensor) -> None:
        amax[name].collect(x)
        flat = x.detach().flatten()
        pick = torch.randperm(flat.numel(), generator=gen)[:samples].to(flat.device)
        values[name].append(flat[pick])

    handles = [q.register_forward_pre_hook(lambda m, inp, n=name: record(n, inp[0])) for name, q in quantizers.items()]
    try:
        for _ in loop(sam):
            pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: (amax[name].compute_amax(), torch.cat(values[name])) for name in quantizers if values[name]}
