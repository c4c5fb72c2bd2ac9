"""`PhaseTimer`: where a training step's time goes (data, prompt sampling, teacher decoder, student, optimiser).

The training loop and `DistillStep` mark their phases with ``with timer.phase(name):``; a disabled timer (the
default in training) does nothing. Time is exclusive: a phase entered inside another pauses the outer one,
so the phases of a step add up to its wall time. On CUDA each boundary synchronises the device, so a
kernel's time lands in the phase that launched it (this costs some overlap: a profile, not a training run).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

PHASES = ("data", "prompt_sampling", "teacher_decoder", "student_forward", "backward", "optimizer")
T = TypeVar("T")


class PhaseTimer:
    """Per-step exclusive seconds of each phase in PHASES; `steps` holds one dict per finished step."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.steps: list[dict[str, float]] = []
        self._current = dict.fromkeys(PHASES, 0.0)
        self._stack: list[str] = []
        self._mark = 0.0
        self._step_start: float | None = None  # the step's first phase entry

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_initialized():  # the current device: the one this process trains on
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if name not in self._current:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        now = self._now()
        if self._step_start is None:
            self._step_start = now
        if self._stack:
            self._current[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = now
        try:
            yield
        finally:
            now = self._now()
            self._current[self._stack.pop()] += now - self._mark
            self._mark = now

    def timed(self, iterable: Iterable[T], name: str) -> Iterator[T]:
        """`iterable`, with the time each item takes to arrive counted in phase `name` (a DataLoader's `data`)."""
        iterator = iter(iterable)
        while True:
            with self.phase(name):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def end_step(self) -> None:
        """Close the current step's record (call after the optimiser step).

        The record also holds `total`, the wall time from the step's first phase to now, and `other`, the part
        of it in no phase (host syncs between phases, such as the loop's NaN/inf guard).
        """
        if self.enabled and self._step_start is not None:
            total = self._now() - self._step_start
            self.steps.append({**self._current, "other": total - sum(self._current.values()), "total": total})
            self._current = dict.fromkeys(PHASES, 0.0)
            self._step_start = None


_END = object()
