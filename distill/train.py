"""`distill(config)`: TinySAM full-stage distillation, one story from data to a student checkpoint.

Run it as ``python -m distill ...`` or, on several GPUs or nodes, ``torchrun --nproc_per_node N -m distill``.
The steps, top to bottom:

0. every input checked before anything long starts: writable output and cache folders, no earlier
   run in ``out`` that a fresh run would silently replace, the state to resume from;
1. data: COCO, SA-1B, a plain image folder or generated shapes (`student_models.data.open_dataset`);
2. the teacher-embedding cache (SAM: the image embedding; SAM 2: the decoder's three image inputs), filled
   where missing (shared across ranks), then the teacher's prompt encoder + mask decoder read back from it
   (its image encoder is never built again);
3. the student (built before step 2, so a bad checkpoint fails at once), its decoder initialised
   from the teacher's, a seeded train/validation split;
4. AdamW + warm-up/cosine schedule, resumed exactly from ``<out>/checkpoints/last.pt`` with ``resume``;
5. the loop, over the named steps of `distill.steps.TrainingRun`: a training step (one `DistillStep`
   forward: student encoder, hard prompt iterations, losses; backward, clipping, a NaN/inf guard), a
   JSON-lines log record, validation each epoch, an atomic checkpoint;
6. the final student checkpoint (`student_models.checkpoints.save_checkpoint`), config and metrics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from distill.cache import EmbeddingCache, cache_root, fill_cache, fingerprint_fields
from distill.config import DistillConfig
from distill.data import Collate, DistillDataset, split_indices
from distill.model import DistillError, DistillStep
from distill.phases import PhaseTimer
from distill.run_folder import JsonLog, check_resumable, check_writable, prepare_run_folder, read_state, run_identity
from distill.runtime import (
    Runtime,
    all_reduce_sum,
    barrier,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
    teardown_runtime,
)
from distill.steps import Pace, TrainingRun, autocast_dtype
from student_models import build_sam
from student_models.data import SegmentationDataset, open_dataset


@dataclass
class DistillResult:
    """Where a run left its results, and its final metrics."""

    checkpoint: Path
    out_dir: Path
    log_path: Path
    metrics: dict[str, Any]
    steps: int


def distill(config: DistillConfig, phases: PhaseTimer | None = None) -> DistillResult:
    """Distil `config.student` from `config.teacher`; see the module docstring. Works under torchrun.

    `phases`, an enabled `PhaseTimer`, records where each step's time goes (`benchmarks distill`).
    """
    runtime = setup_runtime(config.device)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if config.deterministic:
        # Some CPU backward kernels (e.g. in TinyViT) otherwise differ in the last bits from run to run.
        if runtime.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=runtime.device.type == "cuda")
    try:
        return _distill(config, runtime, phases or PhaseTimer())
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        teardown_runtime(runtime)


def _distill(cfg: DistillConfig, rt: Runtime, phases: PhaseTimer) -> DistillResult:
    # tqdm.write: a message printed while a progress bar is on screen gets a line of its own.
    say = tqdm.write if rt.is_main else (lambda *a, **k: None)
    out = Path(cfg.out)
    state_path = out / "checkpoints" / "last.pt"
    log = JsonLog(out / "log.jsonl", enabled=rt.is_main)
    amp_dtype = autocast_dtype(cfg, rt)

    # 0. Inputs that would otherwise fail late: a folder we cannot write, a run we would replace, a state
    # we cannot resume (the cache folder, data and checkpoints follow in 1).
    prepare_run_folder(cfg, rt, log, say)
    state = read_state(state_path) if cfg.resume and state_path.is_file() else None

    # 1. Data. A plain folder has no masks, so only the embedding loss can be computed.
    dataset, use_prompts = _open_data(cfg, say)
    # Reads the teacher file (its sha256). The device type and precision are part of it: bf16 != fp32 embeddings.
    fields = fingerprint_fields(cfg.teacher, cfg.teacher_checkpoint, cfg.seed, dataset, rt.device, amp_dtype)
    if not (cache_root(cfg.cache_path, fields) / "cache.json").is_file():
        # Only a cache still to be filled must be writable: a complete one may be read-only (shared).
        check_writable(Path(cfg.cache_path), "teacher-cache folder", "--cache-dir")
    identity = run_identity(cfg, fields)  # reads the student file
    if state is not None:
        check_resumable(state_path, state, cfg, identity, rt)

    # The student is built here, before the long cache step, so that a bad --student-checkpoint fails at
    # once. The RNG state after building it is put back after the cache step (which seeds its own teacher),
    # so training draws the same numbers whether the cache was empty or full.
    if not cfg.cache_only:
        seed_everything(cfg.seed)
        student = build_sam(cfg.student, checkpoint=cfg.student_checkpoint)
        rng_after_student = rng_state()
    say(_header(cfg, rt, dataset, use_prompts))

    # 2. Teacher embeddings: every rank fills its share, then all read the complete cache.
    cache, counts = _teacher_cache(cfg, rt, dataset, fields, amp_dtype, log)
    if cfg.cache_only:
        say(
            f"teacher cache: {cache.root} ({int(counts['embedded'])} embedded, of which {int(counts['repaired'])} "
            f"replaced broken files; {int(counts['cached'])} already there and verified; "
            f"{int(counts['corrupt'])} unreadable image(s))"
        )
        return DistillResult(None, out, log.path, counts, 0)
    usable = _readable_images(cfg, dataset, cache, say)
    teacher_heads = cache.load_heads()

    # 3. Student (decoder from the teacher unless a student checkpoint brings its own) and the split.
    set_rng_state(rng_after_student)
    family = cache.family
    if cfg.student_checkpoint is None:
        heads = {k: v for k, v in teacher_heads.state_dict().items() if k.startswith(family.head_prefixes)}
        student.load_state_dict(heads, strict=False)
    # Only the image encoder and the mask decoder learn; the prompt encoder and, for SAM 2, no_mem_embed and the
    # memory modules (which images never reach) stay as they are.
    student.requires_grad_(False)
    student.image_encoder.requires_grad_(True)
    family.mask_decoder(student).requires_grad_(cfg.train_decoder and use_prompts)
    train_set, val_set = _split(cfg, dataset, cache, usable)
    sampler = DistributedSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * batches_per_epoch
    epochs = f"{cfg.epochs} epochs" if cfg.steps is None else f"--steps {cfg.steps}"
    say(
        f"schedule: {total_steps} steps ({epochs}; {batches_per_epoch} steps per epoch of {len(train_set)} training "
        f"images, batch size {cfg.batch_size} x {rt.world_size} process(es)); {len(val_set)} held-out images"
    )

    # 4. Model, optimiser, schedule, resumed exactly where a checkpoint left them.
    if rt.distributed and rt.device.type == "cuda" and not cfg.freeze_bn:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)  # gloo has no SyncBatchNorm on CPU
        say(f"BatchNorm statistics synchronised across the {rt.world_size} process(es) (SyncBatchNorm)")
    model = DistillStep(student, teacher_heads, cfg, use_prompts).to(rt.device).train()
    model.phases = phases
    run = TrainingRun(cfg, rt, model, teacher_heads, val_set, total_steps, log, say, state_path, identity)
    if state is not None:
        run.restore(state)
        log.truncate_after(run.step)
        say(f"resumed from {state_path} at step {run.step}/{total_steps}")
    elif cfg.resume:
        say(f"--resume: no checkpoint at {state_path} yet, starting from step 0")
    if run.step == 0:
        run.validate(epoch=0)  # the untrained student's fidelity, the baseline to beat

    # 5. The loop. Data order and prompts depend only on (seed, epoch, image), so a resumed or
    # multi-process run sees exactly the images and prompts of an uninterrupted single run.
    # The host waits for the device only when it reads the step monitor: at log, checkpoint and validation
    # steps (a NaN/inf is caught there, before any checkpoint or validation could use it).
    # The bar is closed (its line ended) however the loop ends, so an error message starts a line of its own.
    pace = Pace(run.step)
    with tqdm(total=total_steps, initial=run.step, desc="distill", disable=not rt.is_main) as progress:
        while run.step < total_steps:
            epoch, first_batch = divmod(run.step, batches_per_epoch)
            loader = _epoch_loader(cfg, rt, train_set, sampler, epoch, first_batch, use_prompts)
            for batch in phases.timed(loader, "data"):
                step = run.step + 1  # the step this batch makes, counted from 1
                last_step, epoch_done = step == total_steps, step % batches_per_epoch == 0
                logged = step % cfg.log_every == 0 or last_step
                saved = step % cfg.checkpoint_every == 0 or last_step
                record = run.train_step(batch, read=logged or saved or epoch_done)
                pace.count(len(batch) * rt.world_size)
                progress.update(1)
                if logged:
                    run.log(record, epoch, pace)
                    progress.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in run.weights or k == "loss"})
                if epoch_done or last_step:
                    run.validate(epoch=epoch + 1)
                if saved:
                    run.save_state(loss=record["loss"])
                if last_step:
                    break

    # 6. The student, loadable with build_sam(cfg.student, checkpoint=...), and the run's records.
    result_path = run.finish(out, corrupt=len(dataset) - len(usable), train_images=len(train_set))
    return DistillResult(result_path, out, log.path, run.metrics, run.step)


def _open_data(cfg: DistillConfig, say: Callable[[str], None]) -> tuple[SegmentationDataset, bool]:
    """The dataset (its first `max_images`) and whether its masks give prompts for the prompt losses."""
    dataset = open_dataset(cfg.data, num_synthetic=cfg.num_synthetic, seed=cfg.seed)
    if cfg.max_images is not None:
        dataset.image_ids = dataset.image_ids[: cfg.max_images]  # datasets index their files by position
    use_prompts = cfg.uses_prompts and dataset.has_masks
    if cfg.uses_prompts and not dataset.has_masks:
        if cfg.embedding_weight == 0:
            raise DistillError(f"{cfg.data} is a plain image folder (no masks) and the embedding loss is off")
        say(
            f"{cfg.data} is a plain image folder without masks: only the embedding loss is used "
            f"(token, output and ground-truth losses need masks to make prompts)."
        )
    return dataset, use_prompts


def _header(cfg: DistillConfig, rt: Runtime, dataset: SegmentationDataset, use_prompts: bool) -> str:
    """What runs where, with which weights and settings: the first lines a run prints."""
    ddp = f" (DDP over {rt.backend})" if rt.backend else ""
    return (
        f"distill: {cfg.teacher} -> {cfg.student} on {len(dataset)} {dataset.kind} images, "
        f"{rt.world_size} process(es) on {rt.device}{ddp}\n"
        f"weights: teacher {_weights(cfg.teacher_checkpoint, cfg.seed)}, "
        f"student {_weights(cfg.student_checkpoint, cfg.seed)}\n"
        f"settings: {_settings(cfg, use_prompts)}"
    )


def _teacher_cache(
    cfg: DistillConfig,
    rt: Runtime,
    dataset: SegmentationDataset,
    fields: dict[str, Any],
    amp_dtype: torch.dtype | None,
    log: JsonLog,
) -> tuple[EmbeddingCache, dict[str, float]]:
    """The complete, verified teacher cache (each rank fills its share) and the counts summed over ranks."""
    if rt.is_main:
        EmbeddingCache.open(cfg.cache_path, fields)  # creates it and removes what killed writers left
    barrier(rt)
    cache = EmbeddingCache.open(cfg.cache_path, fields, create=False)
    counts = fill_cache(
        cache, dataset, cfg.teacher, cfg.teacher_checkpoint, cfg.seed, rt.device, rt.rank, rt.world_size, amp_dtype
    )
    counts = dict(zip(counts, all_reduce_sum(list(map(float, counts.values())), rt), strict=True))
    barrier(rt)
    cache.verify()
    cache.reload_index()  # the other ranks' records
    per_image = counts["encode_seconds"] / counts["embedded"] if counts["embedded"] else None
    log.write(
        {
            "event": "cache",
            "root": str(cache.root),
            "teacher": cfg.teacher,
            "device": str(rt.device),
            "processes": rt.world_size,
            **counts,
            "encode_seconds_per_image": per_image,
        }
    )
    return cache, counts


def _readable_images(
    cfg: DistillConfig, dataset: SegmentationDataset, cache: EmbeddingCache, say: Callable[[str], None]
) -> list[int]:
    """Positions in `dataset` of the images the cache holds; the others (unreadable) are named, or all are."""
    usable = [i for i, image_id in enumerate(dataset.image_ids) if cache.has(image_id)]
    corrupt = len(dataset) - len(usable)
    if corrupt:
        skipped = [image_id for image_id in dataset.image_ids if not cache.has(image_id)]
        named = "; ".join(f"{i} ({cache.corrupt_reason(i) or 'not in the cache'})" for i in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        say(
            f"skipped {corrupt} unreadable image(s): {named}{more}. They are tried again on every run "
            f"(markers: {cache.root}/embeddings/*/*.corrupt)."
        )
    if not usable:
        raise DistillError(f"no readable images in {cfg.data}: all {len(dataset)} were skipped as corrupt")
    return usable


def _split(
    cfg: DistillConfig, dataset: SegmentationDataset, cache: EmbeddingCache, usable: list[int]
) -> tuple[DistillDataset, DistillDataset]:
    """The seeded training and held-out sets over the readable images (at least one image trains)."""
    val_count = cfg.val_images if cfg.val_images is not None else round(cfg.val_fraction * len(usable))
    val_count = min(val_count, len(usable) - 1)
    train_positions, val_positions = split_indices(len(usable), val_count, cfg.seed)
    train_set = DistillDataset(dataset, cache, [usable[i] for i in train_positions], cache.family)
    val_set = DistillDataset(dataset, cache, [usable[i] for i in val_positions], cache.family)
    return train_set, val_set


def _epoch_loader(
    cfg: DistillConfig,
    rt: Runtime,
    train_set: DistillDataset,
    sampler: DistributedSampler,
    epoch: int,
    first_batch: int,
    use_prompts: bool,
) -> DataLoader:
    """This rank's batches of `epoch` from `first_batch` on (where a resumed run goes on), with the prompts
    of (seed, epoch, image)."""
    sampler.set_epoch(epoch)
    order = list(sampler)[first_batch * cfg.batch_size :]
    iterations = cfg.max_prompt_iters if cfg.hard_prompts else 0
    per_image = cfg.prompts_per_image if use_prompts else None
    return DataLoader(
        train_set,
        cfg.batch_size,
        sampler=order,
        collate_fn=Collate(cfg.seed, epoch, per_image, cfg.box_prob, iterations),
        num_workers=cfg.num_workers,
        pin_memory=rt.device.type == "cuda",  # DistillBatch.pin_memory
    )


def _weights(checkpoint: str | None, seed: int) -> str:
    return f"random (seed {seed})" if checkpoint is None else checkpoint


def _settings(cfg: DistillConfig, use_prompts: bool) -> str:
    """The settings that decide how long a run takes and what it learns from, in one line."""
    length = f"{cfg.steps} steps" if cfg.steps is not None else f"{cfg.epochs} epochs"
    if use_prompts:
        iterations = cfg.hard_prompts and cfg.max_prompt_iters > 0
        extra = f" + up to {cfg.max_prompt_iters} corrective points" if iterations else ""
        prompts = f"{cfg.prompts_per_image} prompts per image{extra}"
    else:
        prompts = "no prompts (embedding loss only)"
    held_out = f"{cfg.val_images} held-out images" if cfg.val_images is not None else f"{cfg.val_fraction:.0%} held out"
    return (
        f"{length}, batch size {cfg.batch_size} per process, {prompts}, lr {cfg.lr:g} "
        f"({cfg.warmup_steps} warm-up steps), {held_out}, out {cfg.out}"
    )
