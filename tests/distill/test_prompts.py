"""Hard prompt sampling on hand-made masks: where points land, their labels, empty regions, determinism; the
batched sampler against one image at a time, and its distributions against the earlier per-image numpy sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.data import Collate, DistillItem
from distill.prompts import (
    PAD_LABEL,
    PromptSet,
    below,
    choose_masks,
    draw_iterations,
    error_points,
    image_keys,
    initial_prompts,
    noisy_boxes,
    prompt_keys,
    random_bits,
    sample_in_masks,
    to_input_coords,
    use_boxes,
    valid_lowres_regions,
)
from tests.helpers import requires_cuda


def _box_mask(y0, y1, x0, x1, size=32):
    mask = torch.zeros((size, size), dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _pixel(coords):
    """1024-frame (x, y) -> low-res (y, x) pixel index."""
    return (coords.flip(1) / 4).long()


def _keys(count, seed=0):
    return image_keys(seed, 0, torch.arange(count))


def test_points_land_inside_masks_and_empty_masks_are_flagged():
    masks = torch.stack([_box_mask(2, 5, 3, 9), _box_mask(20, 21, 30, 31), torch.zeros((32, 32), dtype=torch.bool)])
    for seed in range(20):
        yx, found = sample_in_masks(masks, random_bits(_keys(3, seed), 5))
        assert found.tolist() == [True, True, False]
        assert masks[0, yx[0, 0], yx[0, 1]] and yx[1].tolist() == [20, 30] and yx[2].tolist() == [0, 0]
    coords = to_input_coords(torch.tensor([[20, 30]]))
    assert coords.tolist() == [[122.0, 82.0]]  # x then y, pixel centre in the 1024 frame


def test_error_points_labels_follow_the_error_region():
    target = torch.stack([_box_mask(0, 10, 0, 10)] * 3)
    prediction = torch.stack(
        [torch.zeros((32, 32), dtype=torch.bool), _box_mask(0, 10, 0, 20), _box_mask(0, 10, 0, 10)]
    )
    for seed in range(20):
        coords, labels = error_points(prediction, target, _keys(3, seed), iteration=0)
        yx = _pixel(coords)
        assert labels[0] == 1 and target[0, yx[0, 0], yx[0, 1]]  # missed GT -> positive, inside the GT
        assert labels[1] == 0 and yx[1, 1] >= 10  # predicted outside the GT -> negative, in that extra area
        assert labels[2] == PAD_LABEL and coords[2].tolist() == [0.0, 0.0]  # nothing wrong -> padding
    # Without negatives the extra-only prompt gets padding too.
    _, labels = error_points(prediction, target, _keys(3), iteration=0, negatives=False)
    assert labels.tolist() == [1, PAD_LABEL, PAD_LABEL]
    # Each iteration draws anew.
    one = torch.stack([_box_mask(0, 32, 0, 32)])
    drawn = {tuple(error_points(~one, one, _keys(1), iteration=i)[0][0].tolist()) for i in range(10)}
    assert len(drawn) > 5


def test_error_points_stay_in_the_valid_image_area():
    target = torch.stack([_box_mask(0, 32, 0, 32)])
    valid = valid_lowres_regions(torch.tensor([[40, 60], [1024, 8]]), side=32)  # a 10x15 low-res image area
    assert valid[0].sum() == 10 * 15 and valid[1].sum() == 32 * 2
    for seed in range(10):
        coords, labels = error_points(torch.zeros_like(target), target, _keys(1, seed), 0, valid[:1])
        y, x = _pixel(coords)[0]
        assert labels[0] == 1 and y < 10 and x < 15


def test_noisy_boxes_respect_sam_noise():
    boxes = torch.tensor([[100, 100, 200, 150], [0, 0, 1000, 1000]], dtype=torch.float32)
    jittered = noisy_boxes(boxes, _keys(2))
    assert torch.all((jittered - boxes).abs() <= 20.0 + 1e-4)  # at most 20 px, even for the large box
    many = noisy_boxes(boxes[:1].expand(400, 4), _keys(400))
    std = (many - boxes[0]).std(0)
    assert std[0].item() == pytest.approx(10.0, rel=0.2) and std[1].item() == pytest.approx(5.0, rel=0.2)  # 10% w, h
    assert torch.all(jittered >= 0) and torch.all(jittered <= 1024)


def test_initial_prompts_choices_and_determinism():
    masks = torch.stack([_box_mask(2, 5, 3, 9), _box_mask(10, 20, 10, 20)])
    boxes = torch.tensor([[12, 8, 36, 20], [40, 40, 80, 80]], dtype=torch.float32)
    points = initial_prompts(masks, boxes, _keys(2), boxes=False)
    assert points.boxes is None and points.points.shape == (2, 1, 2) and points.multimask and points.num_tokens == 2
    assert all(masks[i][tuple(_pixel(points.points[i])[0])] for i in range(2)) and torch.all(points.labels == 1)
    box = initial_prompts(masks, boxes, _keys(2), boxes=True)
    assert box.boxes.shape == (2, 4) and box.points.shape == (2, 0, 2) and not box.multimask and box.num_tokens == 2
    grown = box.add_points(torch.tensor([[4.0, 4.0], [8.0, 8.0]]), torch.tensor([1, 0]))
    assert grown.points.shape == (2, 1, 2) and grown.labels[:, 0].tolist() == [1.0, 0.0] and grown.num_tokens == 3
    assert grown.rows(1, 2).labels.tolist() == [[0.0]] and torch.equal(grown.rows(1, 2).boxes, box.boxes[1:])
    again = initial_prompts(masks, boxes, _keys(2), boxes=False)
    assert isinstance(again, PromptSet) and torch.equal(again.points, points.points)
    picked = choose_masks(_keys(1), torch.tensor([2]), 5)
    assert picked.shape == (1, 5) and set(picked[0].tolist()) <= {0, 1}
    assert sorted(choose_masks(_keys(1), torch.tensor([5]), 5)[0].tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one mask"):
        choose_masks(_keys(2), torch.tensor([3, 0]), 4)
    assert draw_iterations(_keys(50), 0).tolist() == [0] * 50
    assert set(draw_iterations(_keys(200), 3).tolist()) == {0, 1, 2, 3}


def test_random_bits_are_uniform_and_depend_on_every_word():
    bits = random_bits(_keys(40000), 3)
    assert bits.min() >= 0 and bits.max() < 2**32
    counts = torch.bincount(bits >> 28, minlength=16).double()  # 16 bins of 2500 expected
    assert ((counts - 2500) ** 2 / 2500).sum() < 50  # chi-square, 15 dof: 50 is far beyond p = 1e-5
    low = torch.bincount(bits & 15, minlength=16).double()  # the low bits too
    assert ((low - 2500) ** 2 / 2500).sum() < 50
    key = _keys(1)
    draws = {random_bits(key, a, b).item() for a in range(3) for b in range(3)} | {
        random_bits(_keys(2)[1:], 0, 0).item()
    }
    assert len(draws) == 10
    assert image_keys(0, 0, torch.tensor([7])).item() != image_keys(0, 1, torch.tensor([7])).item()
    assert image_keys(0, 0, torch.tensor([7])).item() != image_keys(1, 0, torch.tensor([7])).item()
    assert below(torch.tensor([0, 2**32 - 1]), 6).tolist() == [0, 5]


# ---- batched vs one image at a time ------------------------------------------------------------------------


def _item(index, num_masks, input_size, seed):
    """A DistillItem with random blob masks in its image area (low-res frame) and their boxes."""
    rng = np.random.default_rng(seed)
    height, width = (-(-s // 4) for s in input_size)
    masks = np.zeros((num_masks, 256, 256), dtype=bool)
    boxes = np.zeros((num_masks, 4), dtype=np.float32)
    for m in range(num_masks):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        y1, x1 = y0 + rng.integers(2, 9), x0 + rng.integers(2, 9)
        masks[m, y0:y1, x0:x1] = True
        boxes[m] = [x0 * 4, y0 * 4, x1 * 4, y1 * 4]
    return DistillItem(index, f"img{index}", torch.zeros(3, 8, 8), torch.zeros(1), input_size, masks, boxes)


def _sampled(batch, per):
    """Every image's initial prompts and two rounds of error points, computed for the whole batch at once.

    The prediction the error points are drawn against is the GT with a fixed per-image corruption, so it is the
    same whichever batch the image is in. Returns {image index: (points, labels, boxes)}.
    """
    keys = prompt_keys(batch.keys, per)
    gt, boxes = batch.gt_masks.flatten(0, 1), batch.gt_boxes.flatten(0, 1)
    valid = valid_lowres_regions(batch.input_sizes[: batch.num_prompted]).repeat_interleave(per, 0)
    results = {}
    for as_box in (True, False):
        kind = torch.tensor([b == as_box for b in batch.use_box], device=batch.keys.device)
        rows = kind.repeat_interleave(per)
        if not rows.any():
            continue
        prompts = initial_prompts(gt[rows], boxes[rows], keys[rows], as_box)
        shift = 1 + batch.indices[: batch.num_prompted].repeat_interleave(per)[rows] % 3
        prediction = torch.stack([m.roll(int(s), dims=1) for m, s in zip(gt[rows], shift, strict=True)])
        for iteration in range(2):
            coords, labels = error_points(prediction, gt[rows], keys[rows], iteration, valid[rows])
            prompts = prompts.add_points(coords, labels)
        images = batch.indices[: batch.num_prompted][kind].tolist()
        for i, index in enumerate(images):
            part = prompts.rows(i * per, (i + 1) * per)
            results[index] = (part.points, part.labels, part.boxes)
    return results


def test_batched_sampler_gives_each_image_the_prompts_it_gets_alone():
    """Prompts depend only on (seed, epoch, image): a batch of images of different sizes, mask counts and prompt
    kinds gets, image by image, exactly the masks, choices and points that each image gets in a batch of its own."""
    items = [
        _item(i, n, size, i)
        for i, (n, size) in enumerate(
            [
                (1, (1024, 700)),
                (5, (600, 1024)),
                (2, (1024, 1024)),
                (9, (300, 1024)),
                (3, (1024, 512)),
                (4, (800, 1024)),
            ]
        )
    ]
    items.append(DistillItem(99, "no_masks", torch.zeros(3, 8, 8), torch.zeros(1), (1024, 1024), None, None))
    collate = Collate(seed=3, epoch=2, prompts_per_image=4, box_prob=0.5, max_iters=9)
    batch = collate(items)
    assert batch.num_prompted == 6 and batch.image_ids[-1] == "no_masks" and len(batch) == 7
    assert set(batch.use_box) == {True, False}  # both kinds in the batch
    together = _sampled(batch, 4)
    for item in items[:-1]:
        alone = collate([item])
        position = batch.indices.tolist().index(item.index)
        assert torch.equal(alone.gt_masks[0], batch.gt_masks[position]), item.index
        assert torch.equal(alone.gt_boxes[0], batch.gt_boxes[position])
        assert (alone.use_box[0], alone.iterations[0]) == (batch.use_box[position], batch.iterations[position])
        for mine, theirs in zip(_sampled(alone, 4)[item.index], together[item.index], strict=True):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), item.index
    # The layout DistillStep relies on: boxes first, then points, each by corrective points, descending.
    order = [(not b, -k) for b, k in zip(batch.use_box, batch.iterations, strict=True)]
    assert order == sorted(order)


# ---- the same distributions as the per-image numpy sampler it replaces -------------------------------------
# The reference below is the earlier sampler (numpy, one image at a time, np.random.default_rng([seed, epoch,
# image])). The batched sampler draws other random numbers, so the prompts differ draw by draw; these tests check
# that they follow the same distributions.


def _numpy_point_in_mask(mask, rng):
    scores = rng.random(mask.shape, dtype=np.float32)
    scores[~mask] = -1.0
    return np.unravel_index(scores.argmax(), mask.shape)


def _numpy_noisy_box(box, rng, frac=0.1, max_px=20.0):
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    return np.clip(box + np.clip(rng.normal(size=4) * frac * sides, -max_px, max_px), 0, 1024)


def _numpy_choose(num_masks, num_prompts, rng):
    return rng.choice(num_masks, size=num_prompts, replace=num_masks < num_prompts)


DRAWS = 6000


def test_point_and_error_point_distributions_match_the_numpy_sampler():
    mask = np.zeros((8, 8), dtype=bool)
    mask[[1, 1, 2, 5, 7], [1, 6, 3, 5, 0]] = True  # 5 scattered pixels: each should get 1/5 of the draws
    old = np.zeros((8, 8))
    for seed in range(DRAWS):
        old[_numpy_point_in_mask(mask, np.random.default_rng([seed, 0, 0]))] += 1
    yx, _ = sample_in_masks(torch.from_numpy(mask).expand(DRAWS, 8, 8), random_bits(_keys(DRAWS), 5))
    new = np.zeros((8, 8))
    np.add.at(new, (yx[:, 0].numpy(), yx[:, 1].numpy()), 1)
    sigma = (DRAWS * 0.2 * 0.8) ** 0.5
    for counts in (old, new):
        assert counts[~mask].sum() == 0 and np.all(np.abs(counts[mask] - DRAWS / 5) < 5 * sigma), counts[mask]
    # Error points: 30 missed pixels and 10 extra ones -> positive with probability 3/4, for both samplers.
    target, prediction = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    target.flat[:30] = True
    prediction.flat[30:40] = True
    old_positive = np.mean(
        [target[_numpy_point_in_mask(target ^ prediction, np.random.default_rng(s))] for s in range(DRAWS)]
    )
    big = (DRAWS, 8, 8)
    _, labels = error_points(
        torch.from_numpy(prediction).expand(big), torch.from_numpy(target).expand(big), _keys(DRAWS), 0
    )
    sigma = (0.75 * 0.25 / DRAWS) ** 0.5
    assert abs(old_positive - 0.75) < 5 * sigma and abs(labels.mean().item() - 0.75) < 5 * sigma


def test_box_noise_mask_choice_and_iteration_distributions_match_the_numpy_sampler():
    box = np.array([100, 100, 200, 150], dtype=np.float32)
    old = np.stack([_numpy_noisy_box(box, np.random.default_rng(s)) for s in range(DRAWS)]) - box
    new = (noisy_boxes(torch.from_numpy(box).expand(DRAWS, 4), _keys(DRAWS)) - torch.from_numpy(box)).numpy()
    # Centred, std 10% of the side (w 100, h 50); the x0/x1 and y0/y1 swaps where they cross are rare at this size.
    np.testing.assert_allclose(new.mean(0), old.mean(0), atol=0.6)
    np.testing.assert_allclose(new.std(0), old.std(0), rtol=0.06)
    np.testing.assert_allclose(new.std(0), [10, 5, 10, 5], rtol=0.06)
    # Mask choice: 5 masks for 3 prompts -> distinct masks, each first with probability 1/5; 2 masks for 5 prompts
    # -> independent picks, so mask 0's count is Binomial(5, 1/2): mean 2.5, variance 1.25.
    keys = _keys(DRAWS)
    distinct = choose_masks(keys, torch.full((DRAWS,), 5), 3).numpy()
    old_distinct = np.stack([_numpy_choose(5, 3, np.random.default_rng(s)) for s in range(DRAWS)])
    for picks in (distinct, old_distinct):
        assert all(len(set(row)) == 3 for row in picks.tolist())
        first = np.bincount(picks[:, 0], minlength=5)
        assert np.all(np.abs(first - DRAWS / 5) < 5 * (DRAWS * 0.16) ** 0.5), first
    repeated = (choose_masks(keys, torch.full((DRAWS,), 2), 5) == 0).sum(1).double()
    old_repeated = np.array([(_numpy_choose(2, 5, np.random.default_rng(s)) == 0).sum() for s in range(DRAWS)])
    for count in (repeated.numpy(), old_repeated):
        assert abs(count.mean() - 2.5) < 0.05 and abs(count.var() - 1.25) < 0.1
    # Iterations k ~ U{0..9} and the box choice at box_prob 0.5 (the numpy sampler: rng.integers, rng.random < p).
    k = np.bincount(draw_iterations(keys, 9).numpy(), minlength=10)
    old_k = np.bincount([np.random.default_rng(s).integers(0, 10) for s in range(DRAWS)], minlength=10)
    for counts in (k, old_k):
        assert np.all(np.abs(counts - DRAWS / 10) < 5 * (DRAWS * 0.09) ** 0.5), counts
    assert abs(use_boxes(keys, 0.5).double().mean().item() - 0.5) < 5 * (0.25 / DRAWS) ** 0.5


@requires_cuda
def test_the_gpu_draws_the_cpu_prompts():
    """The integer draws are device-independent: on CUDA the same points and labels as on the CPU; the box noise's
    float arithmetic (log, cos) may differ in the last bits."""
    items = [_item(i, n, (1024, 1024), i) for i, n in enumerate([3, 6, 1, 4])]
    batch = Collate(seed=5, epoch=1, prompts_per_image=8, box_prob=0.5, max_iters=3)(items)
    on_cpu = _sampled(batch, 8)
    on_gpu = _sampled(batch.to(torch.device("cuda")), 8)
    for index, (points, labels, boxes) in on_cpu.items():
        gpu_points, gpu_labels, gpu_boxes = (t if t is None else t.cpu() for t in on_gpu[index])
        assert torch.equal(gpu_labels, labels)
        if boxes is None:
            assert torch.equal(gpu_points, points)
        else:
            torch.testing.assert_close(gpu_boxes, boxes, rtol=0, atol=1e-3)


def test_a_python_int_word_draws_what_the_same_int64_tensor_draws():
    """Int words are mixed on the host (no host-to-device copy on a GPU); the draws are the tensor path's."""
    keys = torch.arange(50, dtype=torch.int64) * 7919
    words = (3, 2**31 + 5, 0, 2**32 - 1)
    as_ints = random_bits(keys, *words, torch.arange(50))
    as_tensors = random_bits(keys, *(torch.tensor(w) for w in words), torch.arange(50))
    assert torch.equal(as_ints, as_tensors)
    assert as_ints.dtype == torch.int64 and int(as_ints.min()) >= 0 and int(as_ints.max()) < 2**32
