"""``python -m benchmarks distill``: distillation throughput of one configuration, split by phase.

It runs `distill.distill` itself (the real loop, not a copy) for `skip + measure` steps in a temporary run
folder, with an enabled `distill.phases.PhaseTimer`, and writes one record: images per second over the
measured steps, the mean milliseconds per step of each phase (data loading, prompt sampling, teacher
decoder, student forward, backward, optimiser, and `other`: time in no phase), the peak memory (CUDA:
the most allocated by PyTorch; CPU: the process's peak RSS, which includes everything the process loaded),
the mean GPU utilisation sampled during the run where PyTorch can read it (pynvml), and the teacher's
image-encoder rate during the cache step when the cache was filled in this run.

Settings follow `python -m distill`'s rule (without --data the offline demo, with --data TinySAM's recipe;
every distill flag is accepted and overrides either). The first `skip` steps are left out (allocator and
kernel warm-up). On CUDA every phase boundary synchronises the device, so the phase split is exact but the
images/s is a little below an unprofiled run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from benchmarks.records import device_name, git_commit, make_record, write_records
from distill import DistillConfig, distill
from distill.__main__ import add_settings, config_from_args
from distill.phases import PHASES, PhaseTimer
from distill.runtime import choose_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m distill`'s setting flags, the measured and skipped steps, and --out (the records folder)."""
    # What the benchmark sets itself: its own steps in a temporary run folder, no validation, one checkpoint.
    fixed = ("out", "steps", "resume", "overwrite", "cache_only", "log_every", "checkpoint_every")
    add_settings(parser, leave_out=(*fixed, "val_images", "val_fraction", "val_prompts_per_image"))
    parser.add_argument("--measure", type=int, default=5, help="steps measured (default 5)")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of the figures (default 1)")
    parser.add_argument("--out", required=True, help="folder for the JSON record")


class _UtilisationSampler:
    """Mean GPU utilisation (%) sampled every 0.2 s while running; None on the CPU, or where PyTorch cannot
    read it (no pynvml)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> _UtilisationSampler:
        if self.device.type != "cuda":
            return self
        try:
            torch.cuda.utilization(self.device)
        except Exception:  # pynvml missing or NVML unusable: no figure rather than a failed benchmark
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def benchmark_distill(config: DistillConfig, measure: int = 5, skip: int = 1) -> dict[str, Any]:
    """Run `config` for `skip + measure` steps in a temporary folder; return its "distill" record."""
    if measure < 1 or skip < 0:
        raise ValueError(f"--measure must be >= 1 and --skip >= 0, got {measure} and {skip}")
    device = choose_device(config.device)
    git_commit()  # pinned before measuring
    timer = PhaseTimer(enabled=True)
    with tempfile.TemporaryDirectory(prefix="distill_bench_") as folder:
        run = dataclasses.replace(
            config,
            out=str(Path(folder) / "run"),
            cache_dir=config.cache_dir or str(Path(folder) / "cache"),  # default: a fresh cache, its rate measured
            steps=skip + measure,
            checkpoint_every=skip + measure,
            val_images=0,
            log_every=1,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _UtilisationSampler(device) as sampler:
            result = distill(run, phases=timer)
        log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    measured = timer.steps[skip:]
    images = [r["images"] for r in log if "loss" in r][skip:]
    cache = next(r for r in log if r.get("event") == "cache")
    seconds = sum(step["total"] for step in measured)
    if device.type == "cuda":
        peak_mb, memory = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    else:
        peak_mb, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    amp = device.type == "cuda" and config.amp == "bf16"
    return make_record(
        "distill",
        model=f"{run.teacher}->{run.student}",
        checkpoint=run.student_checkpoint,
        precision="bf16-autocast" if amp else "float32",
        runtime="pytorch",
        threads=torch.get_num_threads(),
        device=device_name(device),
        config={**config.to_dict(), "measure": measure, "skip": skip},
        images_per_second=sum(images) / seconds,
        images_per_step=sum(images) / len(measured),
        measured_steps=len(measured),
        step_ms=1000 * seconds / len(measured),
        **{f"{name}_ms": 1000 * statistics.fmean(s[name] for s in measured) for name in (*PHASES, "other")},
        peak_memory_mb=peak_mb,
        peak_memory_kind=memory,
        gpu_utilization_percent=sampler.mean,
        teacher_images_per_second=cache["embedded"] / cache["encode_seconds"] if cache["embedded"] else None,
    )


def run(args: argparse.Namespace) -> None:
    """The CLI: benchmark the configuration the distill flags describe, print the figures, write the record."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "measure", "skip", "out")}
    record = benchmark_distill(config_from_args(argparse.Namespace(**values)), args.measure, args.skip)
    path = write_records([record], args.out, f"distill-{record['model'].replace('>', '')}-{record['precision']}")
    phases = ", ".join(f"{name} {record[f'{name}_ms']:.0f}" for name in (*PHASES, "other"))
    print(
        f"{record['model']} on {record['device']} ({record['precision']}): {record['images_per_second']:.3g} images/s "
        f"over {record['measured_steps']} steps of {record['images_per_step']:.3g} images, {record['step_ms']:.0f} "
        f"ms per step ({phases} ms); peak memory {record['peak_memory_mb']:.0f} MB ({record['peak_memory_kind']})"
    )
    print(f"record: {path}")
