"""`distill(config)`: TinySAM full-stage distillation, one story from data to a student checkpoint.

Run it as ``python -m distill ...`` or, on several GPUs or nodes, ``torchrun --nproc_per_node N -m distill``.
The steps, top to bottom:

0. every input checked before anything long starts: writable output and cache folders, no earlier
   run in ``out`` that a fresh run would silently replace, the state to resume from;
1. data: COCO, SA-1B, a plain image folder or generated shapes (`student_models.data.open_dataset`);
2. the teacher-embedding cache, filled where missing (shared across ranks), then the teacher's
   prompt encoder + mask decoder read back from it (its image encoder is never built again);
3. the student (built before step 2, so a bad checkpoint fails at once), its decoder initialised
   from the teacher's, a seeded train/validation split;
4. AdamW + warm-up/cosine schedule, resumed exactly from ``<out>/checkpoints/last.pt`` with ``resume``;
5. the loop: one `DistillStep` forward (student encoder, hard prompt iterations, losses), backward,
   clipping, a NaN/inf guard, a JSON-lines log, atomic checkpoints, validation each epoch;
6. the final student checkpoint (`student_models.checkpoints.save_checkpoint`), config and metrics.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from distill.cache import EmbeddingCache, cache_root, fill_cache, fingerprint_fields
from distill.config import DistillConfig
from distill.data import Collate, DistillDataset, split_indices, stream_items
from distill.losses import weighted_total
from distill.model import DistillError, DistillStep, agreement
from distill.phases import PhaseTimer
from distill.run_folder import (
    RUN_FILES,
    JsonLog,
    check_resumable,
    check_writable,
    earlier_run,
    read_state,
    run_identity,
)
from distill.runtime import (
    Runtime,
    StepMonitor,
    all_reduce_sum,
    barrier,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
    teardown_runtime,
    warmup_cosine,
)
from student_models import build_sam
from student_models.checkpoints import atomic_torch_save, save_checkpoint
from student_models.data import open_dataset
from student_models.io import atomic_write_text, remove_stale_temp_files


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
    amp_dtype = torch.bfloat16 if rt.device.type == "cuda" and cfg.amp == "bf16" else None

    # 0. Inputs that would otherwise fail late: a folder we cannot write, a run we would replace, a state
    # we cannot resume (the cache folder, data and checkpoints follow in 1). Every rank checks (so all
    # stop together); only rank 0 deletes.
    check_writable(out, "output folder", "--out")
    if rt.is_main:
        for folder in (out, out / "checkpoints"):
            remove_stale_temp_files(folder)  # left by a killed run
    earlier = [] if cfg.resume or cfg.cache_only else earlier_run(out, log)
    if earlier and not cfg.overwrite:
        raise DistillError(
            f"{out} holds an earlier run ({', '.join(earlier)}) that a fresh run would replace. "
            f"Continue it with --resume, discard it with --overwrite, or choose another --out."
        )
    if earlier and rt.is_main:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        log.clear()
        say(f"--overwrite: removed the earlier run in {out} ({', '.join(earlier)})")
    barrier(rt)
    state = read_state(state_path) if cfg.resume and state_path.is_file() else None

    # 1. Data. A plain folder has no masks, so only the embedding loss can be computed.
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
    say(
        f"distill: {cfg.teacher} -> {cfg.student} on {len(dataset)} {dataset.kind} images, "
        f"{rt.world_size} process(es) on {rt.device}{f' (DDP over {rt.backend})' if rt.backend else ''}\n"
        f"weights: teacher {_weights(cfg.teacher_checkpoint, cfg.seed)}, "
        f"student {_weights(cfg.student_checkpoint, cfg.seed)}\n"
        f"settings: {_settings(cfg, use_prompts)}"
    )

    # 2. Teacher embeddings: every rank fills its share, then all read the complete cache.
    if rt.is_main:
        cache = EmbeddingCache.open(cfg.cache_path, fields)
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
    if cfg.cache_only:
        say(
            f"teacher cache: {cache.root} ({int(counts['embedded'])} embedded, of which {int(counts['repaired'])} "
            f"replaced broken files; {int(counts['cached'])} already there and verified; "
            f"{int(counts['corrupt'])} unreadable image(s))"
        )
        return DistillResult(None, out, log.path, counts, 0)
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
    teacher_heads = cache.load_heads()

    # 3. Student (decoder from the teacher unless a student checkpoint brings its own) and the split.
    set_rng_state(rng_after_student)
    if cfg.student_checkpoint is None:
        heads = {k: v for k, v in teacher_heads.state_dict().items() if k.startswith(("prompt_", "mask_"))}
        student.load_state_dict(heads, strict=False)
    student.prompt_encoder.requires_grad_(False)
    student.mask_decoder.requires_grad_(cfg.train_decoder and use_prompts)
    val_count = cfg.val_images if cfg.val_images is not None else round(cfg.val_fraction * len(usable))
    val_count = min(val_count, len(usable) - 1)
    train_positions, val_positions = split_indices(len(usable), val_count, cfg.seed)
    train_set = DistillDataset(dataset, cache, [usable[i] for i in train_positions])
    val_set = DistillDataset(dataset, cache, [usable[i] for i in val_positions])
    sampler = DistributedSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * batches_per_epoch
    epochs = f"{cfg.epochs} epochs" if cfg.steps is None else f"--steps {cfg.steps}"
    say(
        f"schedule: {total_steps} steps ({epochs}; {batches_per_epoch} steps per epoch of {len(train_set)} training "
        f"images, batch size {cfg.batch_size} x {rt.world_size} process(es)); {len(val_set)} held-out images"
    )

    # 4. Model, optimiser, schedule; decay only on matrices and kernels (nanoGPT's rule), the
    # decoder (already the teacher's) at decoder_lr_scale x lr.
    if rt.distributed and rt.device.type == "cuda" and not cfg.freeze_bn:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)  # gloo has no SyncBatchNorm on CPU
        say(f"BatchNorm statistics synchronised across the {rt.world_size} process(es) (SyncBatchNorm)")
    model = DistillStep(student, teacher_heads, cfg, use_prompts).to(rt.device).train()
    model.phases = phases
    step_fn = DistributedDataParallel(model, find_unused_parameters=True) if rt.distributed else model
    params = [p for p in model.student.parameters() if p.requires_grad]
    decoder = {id(p) for p in model.student.mask_decoder.parameters()}
    groups = []
    for in_decoder, lr in ((False, cfg.lr), (True, cfg.lr * cfg.decoder_lr_scale)):
        for decay, weight_decay in ((True, cfg.weight_decay), (False, 0.0)):
            chosen = [p for p in params if (id(p) in decoder) == in_decoder and (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    step, metrics = 0, {}
    if state is not None:
        step, metrics = _restore(state, model, optimizer, scheduler)
        log.truncate_after(step)
        say(f"resumed from {state_path} at step {step}/{total_steps}")
    elif cfg.resume:
        say(f"--resume: no checkpoint at {state_path} yet, starting from step 0")
    weights = {
        "embedding": cfg.embedding_weight,
        "token": cfg.token_weight,
        "output": cfg.output_weight,
        "gt_mask": cfg.gt_mask_weight,
        "gt_iou": cfg.gt_iou_weight,
    }

    def validate(epoch: int) -> None:
        if not len(val_set):
            return
        model.eval()
        mine = stream_items(val_set, rt.rank, rt.world_size)  # one held-out image in memory at a time
        sums = agreement(model.student, teacher_heads, mine, cfg.val_prompts_per_image)
        sums = dict(zip(sums, all_reduce_sum(list(sums.values()), rt), strict=True))
        model.train()
        scores = {
            "val_agreement": sums["iou"] / max(sums["prompts"], 1),
            "val_agreement_blind": sums["blind_iou"] / max(sums["prompts"], 1),
            "val_logit_l1": sums["logit_l1"] / max(sums["prompts"], 1),
            "val_embedding_l1": sums["embedding_l1"] / max(sums["images"], 1),
        }
        for name, value in scores.items():
            metrics.setdefault(f"{name}_initial", value)  # the untrained student's, kept through resumes
        metrics.update(scores, val_prompts=int(sums["prompts"]), val_epoch=epoch)
        log.write({"event": "val", "step": step, "epoch": epoch, **scores})
        say(
            f"epoch {epoch}: on {len(val_set)} held-out images, student-teacher mask IoU "
            f"{scores['val_agreement']:.3f} (image-blind {scores['val_agreement_blind']:.3f}), "
            f"logit L1 {scores['val_logit_l1']:.4f}, "
            f"embedding L1 {scores['val_embedding_l1']:.4f}"
        )

    if step == 0:
        validate(epoch=0)  # the untrained student's agreement, the baseline to beat

    # 5. The loop. Data order and prompts depend only on (seed, epoch, image), so a resumed or
    # multi-process run sees exactly the images and prompts of an uninterrupted single run.
    # The host waits for the device only when it reads the step monitor: at log, checkpoint and validation
    # steps (a NaN/inf is caught there, before any checkpoint or validation could use it).
    # The bar is closed (its line ended) however the loop ends, so an error message starts a line of its own.
    monitor = StepMonitor(rt)
    since = {"step": step, "images": 0, "time": time.perf_counter()}  # the previous log record
    with tqdm(total=total_steps, initial=step, desc="distill", disable=not rt.is_main) as progress:
        while step < total_steps:
            epoch, first_batch = divmod(step, batches_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)[first_batch * cfg.batch_size :]
            iterations = cfg.max_prompt_iters if cfg.hard_prompts else 0
            per_image = cfg.prompts_per_image if use_prompts else None
            loader = DataLoader(
                train_set,
                cfg.batch_size,
                sampler=order,
                collate_fn=Collate(cfg.seed, epoch, per_image, cfg.box_prob, iterations),
                num_workers=cfg.num_workers,
                pin_memory=rt.device.type == "cuda",  # DistillBatch.pin_memory
            )
            for batch in phases.timed(loader, "data"):
                if batch is None:
                    raise DistillError(f"step {step + 1}: every image of the batch became unreadable after caching")
                with phases.phase("data"):
                    batch = batch.to(rt.device, non_blocking=True)
                with torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    terms = step_fn(batch)
                with phases.phase("backward"):
                    loss = weighted_total(terms, weights)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                with phases.phase("optimizer"):
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                monitor.update(step + 1, loss, grad_norm, terms)
                last_step, epoch_done = step + 1 == total_steps, (step + 1) % batches_per_epoch == 0
                logged = (step + 1) % cfg.log_every == 0 or last_step
                saved = (step + 1) % cfg.checkpoint_every == 0 or last_step
                if logged or saved or epoch_done:
                    record, bad = monitor.read()
                    if bad is not None:
                        raise _non_finite(bad, step + 1, state_path)
                with phases.phase("optimizer"):
                    optimizer.step()
                    scheduler.step()
                phases.end_step()
                step += 1
                since["images"] += len(batch) * rt.world_size
                progress.update(1)
                if logged:
                    seconds = time.perf_counter() - since["time"]
                    record.update(
                        step=step,
                        epoch=epoch,
                        lr=scheduler.get_last_lr()[0],
                        step_seconds=seconds / (step - since["step"]),
                        images=since["images"],
                        images_per_second=since["images"] / seconds,
                    )
                    log.write(record)
                    progress.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in weights or k == "loss"})
                    since = {"step": step, "images": 0, "time": time.perf_counter()}
                if epoch_done or last_step:
                    validate(epoch=epoch + 1)
                if saved:
                    metrics.update(step=step, loss=record["loss"])
                    _save_state(state_path, model, optimizer, scheduler, step, metrics, cfg, identity, rt)
                if last_step:
                    break

    # 6. The student, loadable with build_sam(cfg.student, checkpoint=...), and the run's records.
    result_path = out / "student.pt"
    metrics.update(
        step=step,
        corrupt_images=corrupt,
        train_images=len(train_set),
        val_images=len(val_set),
        teacher=cfg.teacher,
        student=cfg.student,
    )
    if rt.is_main:
        save_checkpoint(
            model.student, cfg.student, result_path, meta={"distill_config": cfg.to_dict(), "metrics": metrics}
        )
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        summary = ", ".join(
            f"{name} {metrics[name + '_initial']:.4g} -> {metrics[name]:.4g}"
            for name in ("val_agreement", "val_logit_l1", "val_embedding_l1")
            if name in metrics
        )
        summary = f"({summary})" if summary else "(no held-out images: --val-images 0, so no agreement figures)"
        say(f"student checkpoint: {result_path}\nlog: {log.path}\nmetrics: {out / 'metrics.json'} {summary}")
    barrier(rt)
    return DistillResult(result_path, out, log.path, metrics, step)


def _non_finite(bad: tuple[int, dict[str, float]], step: int, state_path: Path) -> DistillError:
    """The error for a non-finite loss or gradient found by the step monitor at `step` (see `StepMonitor.read`)."""
    first, values = bad
    last = f"the last good checkpoint is {state_path}" if state_path.is_file() else "no checkpoint yet"
    if first == 0:
        where = f"on another process by step {step}"
    else:
        loss, grad_norm = values.pop("loss"), values.pop("grad_norm")
        where = f"at step {first} (loss={loss}, grad_norm={grad_norm}, terms={values})"
    stopped = "without updating the weights" if first == step else f"at step {step}, before any later checkpoint"
    return DistillError(
        f"non-finite loss or gradient {where}; stopped {stopped}, {last}. Lower --lr or check the data, then rerun "
        f"with --resume."
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


def _save_state(
    path: Path,
    model: DistillStep,
    optimizer,
    scheduler,
    step: int,
    metrics: dict,
    cfg: DistillConfig,
    identity: dict[str, Any],
    rt: Runtime,
) -> None:
    """Everything a resumed run needs, written atomically by rank 0 (a kill never leaves half a file)."""
    if rt.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "step": step,
                "student": model.student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "metrics": dict(metrics),
                "config": cfg.to_dict(),
                "identity": identity,
                "world_size": rt.world_size,
            },
            path,
        )
    barrier(rt)


def _restore(state: dict[str, Any], model: DistillStep, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    model.student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], dict(state["metrics"])
