"""The named steps of `distill`'s training loop, as methods of the state they share (`TrainingRun`).

`distill.train` holds the story, set-up and loop; this module what each of the loop's steps does:
`TrainingRun.train_step` (forward, backward, clipping, the NaN/inf guard, the optimiser step), `log` (one
JSON-lines record), `validate` (the student's fidelity to the teacher on the held-out images), `save_state` (the atomic
checkpoint a resumed run starts from) and `finish` (the student checkpoint and the run's records).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from distill.config import DistillConfig
from distill.data import DistillBatch, DistillDataset, stream_items
from distill.losses import weighted_total
from distill.model import DistillError, DistillStep, fidelity
from distill.run_folder import JsonLog
from distill.runtime import Runtime, StepMonitor, all_reduce_sum, barrier, rng_state, set_rng_state, warmup_cosine
from student_models.checkpoints import atomic_torch_save, save_checkpoint
from student_models.io import atomic_write_text

# Names of the student-teacher mask IoU in checkpoints written before it was named so (it was "agreement").
_RENAMED_METRICS = {"val_agreement": "val_mask_iou", "val_agreement_blind": "val_mask_iou_blind"}


def saved_metrics(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics under today's names, so a resumed run keeps its untrained student's figures."""
    metrics = dict(state["metrics"])
    for old, new in _RENAMED_METRICS.items():
        for suffix in ("", "_initial"):
            if old + suffix in metrics:
                metrics.setdefault(new + suffix, metrics.pop(old + suffix))
    return metrics


class TrainingRun:
    """What the loop's steps share: the model with its optimiser and schedule, the step and metrics that a
    checkpoint saves, and where the run logs and checkpoints to."""

    def __init__(
        self,
        cfg: DistillConfig,
        rt: Runtime,
        model: DistillStep,
        teacher_heads: torch.nn.Module,
        val_set: DistillDataset,
        total_steps: int,
        log: JsonLog,
        say: Callable[[str], None],
        state_path: Path,
        identity: dict[str, Any],
    ) -> None:
        self.cfg, self.rt, self.model, self.teacher_heads, self.val_set = cfg, rt, model, teacher_heads, val_set
        self.json_log, self.say, self.state_path, self.identity = log, say, state_path, identity
        self.step_fn = DistributedDataParallel(model, find_unused_parameters=True) if rt.distributed else model
        # Decay only on matrices and kernels (nanoGPT's rule), the decoder (already the teacher's) at
        # decoder_lr_scale x lr.
        self.params = [p for p in model.student.parameters() if p.requires_grad]
        decoder = {id(p) for p in model.family.mask_decoder(model.student).parameters()}
        groups = []
        for in_decoder, lr in ((False, cfg.lr), (True, cfg.lr * cfg.decoder_lr_scale)):
            for decay, weight_decay in ((True, cfg.weight_decay), (False, 0.0)):
                chosen = [p for p in self.params if (id(p) in decoder) == in_decoder and (p.ndim >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "weight_decay": weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
        )
        self.weights = cfg.loss_weights
        self.monitor = StepMonitor(rt)
        self.step, self.metrics = 0, {}

    def restore(self, state: dict[str, Any]) -> None:
        """Weights, optimiser, schedule, RNG, step and metrics from `read_state`'s checkpoint."""
        self.model.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.metrics = state["step"], saved_metrics(state)

    def train_step(self, batch: DistillBatch | None, read: bool) -> dict[str, float] | None:
        """One optimiser step on `batch`. With `read`, the host waits for the device and gets the step's loss,
        gradient norm and loss terms (means over ranks); a NaN/inf since the last read stops the run there,
        before the weights change."""
        cfg, rt, phases = self.cfg, self.rt, self.model.phases
        amp_dtype = autocast_dtype(cfg, rt)
        if batch is None:
            raise DistillError(f"step {self.step + 1}: every image of the batch became unreadable after caching")
        with phases.phase("data"):
            batch = batch.to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            terms = self.step_fn(batch)
        with phases.phase("backward"):
            loss = weighted_total(terms, self.weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phases.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or float("inf"))
        self.monitor.update(self.step + 1, loss, grad_norm, terms)
        record = None
        if read:
            record, bad = self.monitor.read()
            if bad is not None:
                raise _non_finite(bad, self.step + 1, self.state_path)
        with phases.phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
        phases.end_step()
        self.step += 1
        return record

    def log(self, record: dict[str, float], epoch: int, pace: Pace) -> None:
        """One training record in the log: the step's loss terms, the learning rate and the pace since the last."""
        record.update(step=self.step, epoch=epoch, lr=self.scheduler.get_last_lr()[0], **pace.lap(self.step))
        self.json_log.write(record)

    def validate(self, epoch: int) -> None:
        """The student's fidelity to the teacher on the held-out images (each rank scores its share), logged and kept
        in the metrics; the first figures, the untrained student's, are kept as `<name>_initial` through resumes."""
        if not len(self.val_set):
            return
        cfg, rt, model = self.cfg, self.rt, self.model
        model.eval()
        mine = stream_items(self.val_set, rt.rank, rt.world_size)  # one held-out image in memory at a time
        sums = fidelity(model.student, self.teacher_heads, mine, cfg.val_prompts_per_image)
        sums = dict(zip(sums, all_reduce_sum(list(sums.values()), rt), strict=True))
        model.train()
        scores = {
            "val_mask_iou": sums["iou"] / max(sums["prompts"], 1),
            "val_mask_iou_blind": sums["blind_iou"] / max(sums["prompts"], 1),
            "val_logit_l1": sums["logit_l1"] / max(sums["prompts"], 1),
            "val_embedding_l1": sums["embedding_l1"] / max(sums["images"], 1),
        }
        for name, value in scores.items():
            self.metrics.setdefault(f"{name}_initial", value)
        self.metrics.update(scores, val_prompts=int(sums["prompts"]), val_epoch=epoch)
        self.json_log.write({"event": "val", "step": self.step, "epoch": epoch, **scores})
        self.say(
            f"epoch {epoch}: on {len(self.val_set)} held-out images, student-teacher mask IoU "
            f"{scores['val_mask_iou']:.3f} (image-blind {scores['val_mask_iou_blind']:.3f}), "
            f"logit L1 {scores['val_logit_l1']:.4f}, "
            f"embedding L1 {scores['val_embedding_l1']:.4f}"
        )

    def save_state(self, loss: float) -> None:
        """Everything a resumed run needs, written atomically by rank 0 (a kill never leaves half a file)."""
        self.metrics.update(step=self.step, loss=loss)
        if self.rt.is_main:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(
                {
                    "step": self.step,
                    "student": self.model.student.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(),
                    "metrics": dict(self.metrics),
                    "config": self.cfg.to_dict(),
                    "identity": self.identity,
                    "world_size": self.rt.world_size,
                },
                self.state_path,
            )
        barrier(self.rt)

    def finish(self, out: Path, corrupt: int, train_images: int) -> Path:
        """Write the student checkpoint ``out/student.pt`` (returned), config.json and metrics.json (rank 0), and say
        where they went."""
        cfg, metrics = self.cfg, self.metrics
        result_path = out / "student.pt"
        metrics.update(
            step=self.step,
            corrupt_images=corrupt,
            train_images=train_images,
            val_images=len(self.val_set),
            teacher=cfg.teacher,
            student=cfg.student,
        )
        if self.rt.is_main:
            save_checkpoint(
                self.model.student, cfg.student, result_path, meta={"distill_config": cfg.to_dict(), "metrics": metrics}
            )
            atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            summary = ", ".join(
                f"{name} {metrics[name + '_initial']:.4g} -> {metrics[name]:.4g}"
                for name in ("val_mask_iou", "val_logit_l1", "val_embedding_l1")
                if name in metrics
            )
            summary = f"({summary})" if summary else "(no held-out images: --val-images 0, so no fidelity figures)"
            log = self.json_log.path
            self.say(f"student checkpoint: {result_path}\nlog: {log}\nmetrics: {out / 'metrics.json'} {summary}")
        barrier(self.rt)
        return result_path


class Pace:
    """Steps, images and seconds since the previous log record: its step_seconds and images_per_second."""

    def __init__(self, step: int) -> None:
        self.step, self.images, self.start = step, 0, time.perf_counter()

    def count(self, images: int) -> None:
        self.images += images

    def lap(self, step: int) -> dict[str, float]:
        """The figures from the previous lap to `step`, and a new lap from here."""
        now = time.perf_counter()
        seconds = now - self.start
        figures = {
            "step_seconds": seconds / (step - self.step),
            "images": self.images,
            "images_per_second": self.images / seconds,
        }
        self.step, self.images, self.start = step, 0, now
        return figures


def autocast_dtype(cfg: DistillConfig, rt: Runtime) -> torch.dtype | None:
    """The autocast precision of the student's step and of the teacher's embeddings: bf16 on CUDA if asked."""
    return torch.bfloat16 if rt.device.type == "cuda" and cfg.amp == "bf16" else None


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
