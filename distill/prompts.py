"""Hard prompt sampling (TinySAM section 3.2, SAM's interactive training), batched over images, on any device.

Masks here are boolean tensors in the decoder's low-resolution frame (256x256 for a 1024 input, one
pixel = 4 input pixels); prompt coordinates are returned in the 1024 input frame that SAM's prompt
encoder expects (the centre of the low-res pixel). Every function works on R prompt rows at once
(all prompts of all images of a batch) with tensor operations only, so on a GPU the sampling runs
where the masks are, without host round trips.

Random numbers come from a counter-based generator: a draw is a 32-bit hash (`random_bits`) of the
image's key (`image_keys`: the run's seed, the epoch and the image's index in the dataset), the
prompt's number in the image, what the draw is for and the iteration. So an image's prompts depend
on nothing else: not on the other images of its batch, the batch size, the number of processes or
the device (the integer draws are equal on CPU and GPU; the box noise's float arithmetic may differ
in the last bit), and a resumed run redraws them exactly.

A prompt starts from a noisy ground-truth box (with probability `box_prob`, one choice per image, so
all prompts of an image have the same tokens) or from one point drawn uniformly inside the
ground-truth mask. Each later point is drawn uniformly from the error region of a prediction against
a target: target-minus-prediction gives a positive point (label 1), prediction-minus-target a
negative one (label 0). When the region is empty the point is padding (label -1, which SAM's prompt
encoder embeds as "not a point"), so every prompt keeps the same number of points. The caller picks
the target: the ground truth (TinySAM, mode "gt") or the teacher's mask (EdgeSAM, mode "disagreement").

The per-image choices that need only an image's key and its number of masks (which masks to prompt,
box or point, how many corrective points) are made on the host by the DataLoader's collate
(`distill.data.Collate`): they decide how the batch is laid out for batched decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Which draws a seed gives: 1, numpy's PCG per image (the first sampler); 2, the counter-based hash above.
# Part of a run's identity, so a checkpoint of version 1 is not resumed with other prompts.
SAMPLER_VERSION = 2
LOWRES_STRIDE = 4  # 1024 input pixels / 256 low-res pixels
PAD_LABEL = -1

# What a draw is for: the first word hashed after the key, so draws for different purposes never share numbers.
MASK_ORDER, MASK_PICK, BOX_CHOICE, ITERATIONS, FIRST_POINT, BOX_NOISE, ERROR_POINT = range(1, 8)
_MASK32 = 0xFFFFFFFF
_TWO32 = float(2**32)


@dataclass(frozen=True)
class PromptSet:
    """R prompts of one kind: points RxNx2 float32 (x, y) and labels RxN float32 in the 1024 frame; boxes Rx4
    XYXY, or None for point prompts (SAM's prompt encoder then appends one padding point).

    `multimask` is True while each prompt is a single point without a box (SAM then picks among its
    three multimask outputs, because one point is ambiguous).
    """

    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None

    @property
    def num_prompts(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        """Sparse tokens per prompt in SAM's prompt encoder: the points, plus 2 box corners or 1 padding point."""
        return self.labels.shape[1] + (2 if self.boxes is not None else 1)

    @property
    def multimask(self) -> bool:
        return self.boxes is None and self.labels.shape[1] == 1

    def add_points(self, coords: torch.Tensor, labels: torch.Tensor) -> PromptSet:
        """Append one point per prompt: coords Rx2 (x, y), labels R."""
        points = torch.cat([self.points, coords[:, None].to(self.points.dtype)], dim=1)
        return PromptSet(points, torch.cat([self.labels, labels[:, None].to(self.labels.dtype)], 1), self.boxes)

    def rows(self, start: int, stop: int) -> PromptSet:
        """Prompts start..stop-1 (views, no copy)."""
        boxes = None if self.boxes is None else self.boxes[start:stop]
        return PromptSet(self.points[start:stop], self.labels[start:stop], boxes)


# ---- the counter-based generator -------------------------------------------------------------------------


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """x * c mod 2**32 for x in [0, 2**32) (int64 tensor or int), in 16-bit halves so that no product leaves int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32 (C. Wellons' hash prospector): a bijection of 32-bit integers whose output bits all flip with
    probability ~1/2 when one input bit does."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(key: torch.Tensor, *words: torch.Tensor | int) -> torch.Tensor:
    """Uniform 32-bit draws (int64 in [0, 2**32)): a hash of `key` and `words`, broadcast together.

    Equal arguments give equal draws on any device; different arguments independent-looking ones.
    """
    bits = key.to(torch.int64) & _MASK32
    for word in words:
        # A Python int is mixed in Python (the same 32-bit arithmetic): a CUDA tensor made from it would be
        # a host-to-device copy, which waits for the GPU.
        if isinstance(word, torch.Tensor):
            word = word.to(device=bits.device, dtype=torch.int64)
        bits = _mix32(bits ^ _mix32((word + 0x9E3779B9) & _MASK32))
    return bits


def image_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """The key of each image (its dataset index) in this run and epoch: B int64."""
    start = torch.full_like(indices, 0x2545F491, dtype=torch.int64)
    return random_bits(start, seed & _MASK32, seed >> 32, epoch, indices.to(torch.int64))


def prompt_keys(keys: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """The key of each prompt of each image: B keys -> B*P, image-major (P consecutive prompts per image)."""
    number = torch.arange(num_prompts, device=keys.device).repeat(len(keys))
    return random_bits(keys.repeat_interleave(num_prompts), number)


def below(bits: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """An integer in [0, n) from 32 uniform bits (multiply and shift; n <= 2**31, bias below n / 2**32)."""
    return (bits * n) >> 32


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """A float64 in [0, 1) from 32 uniform bits."""
    return bits.to(torch.float64) / _TWO32


def normal(bits_a: torch.Tensor, bits_b: torch.Tensor) -> torch.Tensor:
    """A standard normal float64 from two 32-bit draws (Box-Muller)."""
    radius = torch.sqrt(-2.0 * torch.log((bits_a.to(torch.float64) + 0.5) / _TWO32))
    return radius * torch.cos(2.0 * math.pi * uniform(bits_b))


# ---- per-image choices (host, in the collate) ------------------------------------------------------------


def choose_masks(keys: torch.Tensor, num_masks: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Indices (BxP) of the GT masks to prompt in each image: P of its masks without repetition in random order,
    or, when it has fewer than P, P independent uniform picks. keys, num_masks: B."""
    if len(num_masks) and int(num_masks.min()) < 1:
        raise ValueError("an image needs at least one mask to sample prompts")
    most = max(int(num_masks.max()), 1) if len(num_masks) else 1
    slots = torch.arange(most)
    order = random_bits(keys[:, None], MASK_ORDER, slots[None])
    order = torch.where(slots[None] < num_masks[:, None], order, 2**32)  # an image's missing masks sort last
    permutation = order.argsort(dim=1, stable=True)  # uniform: 32-bit keys tie with probability ~n^2 / 2**33
    prompt = torch.arange(num_prompts)
    distinct = permutation[:, prompt.clamp(max=most - 1)]  # used only where the image has >= P masks
    repeated = below(random_bits(keys[:, None], MASK_PICK, prompt[None]), num_masks[:, None])
    return torch.where(num_masks[:, None] >= num_prompts, distinct, repeated)


def use_boxes(keys: torch.Tensor, box_prob: float) -> torch.Tensor:
    """B bool: whether each image's prompts start from noisy GT boxes (else from one point each)."""
    return uniform(random_bits(keys, BOX_CHOICE)) < box_prob


def draw_iterations(keys: torch.Tensor, max_iters: int) -> torch.Tensor:
    """B int64, k ~ U{0..max_iters}: how many corrective points each image's prompts get."""
    return below(random_bits(keys, ITERATIONS), max_iters + 1)


# ---- prompts (device) ------------------------------------------------------------------------------------


def sample_in_masks(masks: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly inside each of R masks (RxHxW bool), from one 32-bit draw each (R).

    The draw picks a rank r in [0, pixels in the mask); the pixel is the one where the mask's running pixel
    count reaches r + 1. Returns (yx Rx2 int64, found R bool); an empty mask gives found=False and yx=(0, 0).
    """
    flat = masks.flatten(1)
    counts = flat.sum(1)
    running = flat.cumsum(1, dtype=torch.int32)
    target = (below(bits, counts) + 1).to(torch.int32)[:, None]
    position = torch.searchsorted(running, target).squeeze(1)
    found = counts > 0
    position = torch.where(found, position, 0)
    width = masks.shape[-1]
    return torch.stack([position // width, position % width], dim=1), found


def to_input_coords(yx: torch.Tensor) -> torch.Tensor:
    """Low-res pixel indices Rx2 (y, x) -> Rx2 (x, y) float32 at the pixel centres in the 1024 frame."""
    return (yx.flip(1).to(torch.float32) + 0.5) * LOWRES_STRIDE


def noisy_boxes(
    boxes: torch.Tensor, keys: torch.Tensor, frac: float = 0.1, max_px: float = 20.0, limit: float = 1024.0
) -> torch.Tensor:
    """SAM's box jitter: each coordinate moves by N(0, (frac*side)^2), clipped to +-max_px, kept in [0, limit].

    boxes: Rx4 XYXY in the 1024 frame (the x coordinates use the box width, the y ones its height); keys: R
    prompt keys.
    """
    boxes = boxes.to(torch.float32)
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)  # w, h, w, h
    coordinate = torch.arange(4, device=boxes.device)[None]
    noise = normal(
        random_bits(keys[:, None], BOX_NOISE, coordinate, 0), random_bits(keys[:, None], BOX_NOISE, coordinate, 1)
    )
    shift = (noise.to(torch.float32) * frac * sides).clamp(-max_px, max_px)
    jittered = (boxes + shift).clamp(0.0, limit)
    x0, x1 = torch.minimum(jittered[:, 0], jittered[:, 2]), torch.maximum(jittered[:, 0], jittered[:, 2])
    y0, y1 = torch.minimum(jittered[:, 1], jittered[:, 3]), torch.maximum(jittered[:, 1], jittered[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def initial_prompts(
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor,
    keys: torch.Tensor,
    boxes: bool,
    noise_frac: float = 0.1,
    noise_max: float = 20.0,
) -> PromptSet:
    """First prompt for each of R masks: its noisy GT box (`boxes`) or one point drawn inside it.

    gt_masks: RxHxW bool low-res; gt_boxes: Rx4 XYXY in the 1024 frame; keys: R prompt keys.
    """
    rows = len(gt_masks)
    if boxes:
        jittered = noisy_boxes(gt_boxes, keys, noise_frac, noise_max)
        empty = gt_boxes.new_zeros((rows, 0, 2), dtype=torch.float32)
        return PromptSet(empty, empty[..., 0], jittered)
    yx, found = sample_in_masks(gt_masks, random_bits(keys, FIRST_POINT))
    labels = torch.where(found, 1.0, float(PAD_LABEL)).to(torch.float32)
    return PromptSet(to_input_coords(yx)[:, None], labels[:, None], None)


def error_points(
    prediction: torch.Tensor,
    target: torch.Tensor,
    keys: torch.Tensor,
    iteration: int,
    valid: torch.Tensor | None = None,
    negatives: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next corrective point for each of R prompts.

    prediction, target: RxHxW bool; keys: R prompt keys; iteration: which corrective point this is (0, 1, ...);
    valid: RxHxW (or HxW) bool, the image area outside the padding, or None. Draws uniformly from
    target-minus-prediction (label 1) and, if `negatives`, prediction-minus-target (label 0). Returns
    (coords Rx2 (x, y) in the 1024 frame, labels R float32; -1 and (0, 0) where nothing is wrong).
    """
    missed = target & ~prediction
    extra = prediction & ~target if negatives else torch.zeros_like(missed)
    if valid is not None:
        missed, extra = missed & valid, extra & valid
    yx, found = sample_in_masks(missed | extra, random_bits(keys, ERROR_POINT, iteration))
    width = missed.shape[-1]
    positive = missed.flatten(1).gather(1, (yx[:, 0] * width + yx[:, 1])[:, None]).squeeze(1)
    labels = torch.where(found, positive.to(torch.float32), float(PAD_LABEL))
    coords = torch.where(found[:, None], to_input_coords(yx), 0.0)
    return coords, labels


def valid_lowres_regions(input_sizes: torch.Tensor, side: int = 256) -> torch.Tensor:
    """Bx2 (h, w) sizes of the resized images in the 1024 frame -> BxHxW bool: the low-res pixels that cover
    each image (not its zero padding)."""
    extent = -(-input_sizes.to(torch.int64) // LOWRES_STRIDE)  # ceil
    pixels = torch.arange(side, device=input_sizes.device)
    rows = pixels[None, :, None] < extent[:, 0, None, None]
    cols = pixels[None, None, :] < extent[:, 1, None, None]
    return rows & cols
