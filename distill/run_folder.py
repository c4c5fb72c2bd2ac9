"""The run folder: whether it may be written, what an earlier run left there, resuming it, its log.

A fresh run never replaces an earlier one silently (`earlier_run` names what would be lost); a
resumed run must be the same run (`run_identity`: every setting that changes the result, with the
data and the checkpoints compared by what they hold, not by how their paths are spelled); the log
is append-only JSON lines, and a line cut short by a kill is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill.cache import checkpoint_identity
from distill.config import DistillConfig
from distill.model import DistillError
from distill.prompts import SAMPLER_VERSION
from distill.runtime import Runtime, barrier
from student_models.io import atomic_write_text, remove_stale_temp_files, writable_folder

# Fields that may change between a run and its resumption without changing the result. Where the run
# folder and the cache live is one of them (a moved folder, or "runs/x" spelled "/home/me/runs/x", holds
# the same run); the data and the checkpoints are compared by what they are (`run_identity`), not by spelling.
# The device too: a run may go on elsewhere (bit-exact only on the device it started on); and how many
# images' prompts a decoder call takes, which changes memory, not the computation (bit-exact only unchanged).
RESUMABLE_CHANGES = {"resume", "overwrite", "cache_only", "num_workers", "log_every", "extra", "out", "cache_dir"}
RESUMABLE_CHANGES |= {"device", "decoder_images"}
# What a fresh run in a folder replaces (besides a log.jsonl that records training).
RUN_FILES = ("checkpoints/last.pt", "student.pt", "metrics.json", "config.json")


def check_writable(folder: Path, what: str, flag: str) -> None:
    """`student_models.io.writable_folder`, its one-line refusal raised as the DistillError of a bad input."""
    try:
        writable_folder(folder, what, flag)
    except OSError as exc:
        raise DistillError(str(exc)) from None


def prepare_run_folder(cfg: DistillConfig, rt: Runtime, log: JsonLog, say: Callable[[str], None]) -> None:
    """Make `cfg.out` ready for a run, or stop with one line: a writable folder, without the temporary files of a
    killed run, holding no earlier run that this one would replace silently (refused, or removed with
    --overwrite). Every rank checks (so all stop together); only rank 0 deletes."""
    out = Path(cfg.out)
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


def earlier_run(out: Path, log: JsonLog) -> list[str]:
    """What a fresh run in `out` would replace: its files, and a log that records more than a cache step."""
    found = [name for name in RUN_FILES if (out / name).is_file()]
    records = [r for r in log.records() if r.get("event") != "cache"]
    if records:
        found.append(f"log.jsonl with {len(records)} training record(s)")
    return found


def run_identity(cfg: DistillConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the same run: the config without RESUMABLE_CHANGES, paths replaced by what they hold.

    The data becomes its kind and resolved folder (or the generator's settings), the teacher checkpoint the
    file's sha256 (or the seed of random weights), the student checkpoint likewise; and the prompt sampler's
    version, since the same seed draws other prompts under another.
    """
    values = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    values.update(
        data=fields["data"],
        teacher_checkpoint=fields["weights"],
        student_checkpoint=checkpoint_identity(cfg.student_checkpoint, cfg.seed),
        prompt_sampler=SAMPLER_VERSION,  # absent (None) in checkpoints written before the version was recorded
    )
    return values


def read_state(path: Path) -> dict[str, Any]:
    """The saved training state, on the CPU: its RNG states must stay CPU ByteTensors (torch.set_rng_state
    refuses CUDA ones); model and optimiser states move to the model's device when loaded into it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, I/O error: torch raises many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistillError(
            f"cannot resume: {path} is unreadable ({reason}). Move it away and resume from scratch, "
            f"or start over with --overwrite."
        ) from None


def check_resumable(path: Path, state: dict[str, Any], cfg: DistillConfig, identity: dict[str, Any], rt: Runtime):
    saved = state.get("identity")
    now = identity
    if saved is None:  # written before identities were recorded: compare the config's fields as given
        saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
        raise DistillError(f"cannot resume from {path}: the config differs ({diffs}); use another --out")
    if state["world_size"] != rt.world_size:
        written = state["world_size"]
        raise DistillError(f"cannot resume {path}: it was written by {written} process(es), now {rt.world_size}")


class JsonLog:
    """Append-only JSON-lines log, written by rank 0 only; a line cut short by a kill is ignored when read."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def clear(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the records a killed run wrote after its last checkpoint, so the log reads as one run.

        The log is rewritten atomically: a kill during the rewrite leaves the old log, never half of it.
        """
        if self.enabled and self.path.is_file():
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
