"""Process-level plumbing for training: torchrun/DDP setup, RNG state capture, the learning-rate schedule."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill.model import DistillError
from student_models.device import parse_device


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank and world size (1 without torchrun), its device, the process group's backend.

    `backend` is None without torchrun; under torchrun it is "nccl" (CUDA) or "gloo" (CPU), even for one
    process, so that one process on one GPU runs the same DDP/NCCL code as eight.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def choose_device(requested: str, local_rank: int = 0, local_processes: int = 1) -> torch.device:
    """This process's device for ``--device`` `requested` (auto, cpu, cuda, cuda:N).

    With several processes on this node (torchrun), auto and cuda give process r the GPU cuda:r, so there
    must be a GPU for each; a fixed cuda:N would put them all on one GPU, which NCCL refuses. Raises
    DistillError naming the counts and the fixes.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = parse_device(requested)  # the syntax, a CUDA GPU at all, the index in range
    except ValueError as exc:
        raise DistillError(str(exc)) from None
    if device.type == "cpu" or local_processes == 1:
        return device
    if requested != "cuda":
        raise DistillError(
            f"--device {requested} puts all {local_processes} processes of this node on one GPU; give --device cuda "
            f"(process r takes cuda:r) or --device cpu"
        )
    gpus = torch.cuda.device_count()
    if local_processes > gpus:
        raise DistillError(
            f"torchrun started {local_processes} processes on this node (--nproc_per_node {local_processes}) but "
            f"PyTorch sees {gpus} GPU(s): start at most {gpus} (--nproc_per_node {gpus}), or run all "
            f"{local_processes} on the CPU with --device cpu (gloo)"
        )
    return torch.device("cuda", local_rank)


def setup_runtime(requested_device: str = "auto") -> Runtime:
    """Read torchrun's environment, pick the device (`choose_device`), start the process group under torchrun.

    The backend is nccl on CUDA and gloo on the CPU.
    """
    env = os.environ
    world_size, rank, local_rank = (
        int(env.get("WORLD_SIZE", "1")),
        int(env.get("RANK", "0")),
        int(env.get("LOCAL_RANK", "0")),
    )
    local_processes = int(env.get("LOCAL_WORLD_SIZE", world_size))
    device = choose_device(requested_device, local_rank, local_processes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = None
    if "WORLD_SIZE" in env:  # started by torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, backend)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


class StepMonitor:
    """Each step's loss, gradient norm and loss terms, kept on the device and read on the host only when asked.

    `read` is the training loop's one host sync (an all-reduce and one copy to the host) and the loop calls it
    only at log, checkpoint and validation steps, so the steps in between queue their work without waiting
    for the device. The first non-finite loss or gradient norm is remembered on the device, with its step and
    values, and reported by the next `read`, which every rank reaches at the same step.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.names: list[str] = []
        self.values = self.first_bad = self.bad_values = None

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Record step `step` (counted from 1): no host sync."""
        self.names = ["loss", "grad_norm", *terms]
        values = torch.stack([v.detach().to(torch.float64) for v in (loss, grad_norm, *terms.values())])
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=values.device)
            self.bad_values = torch.zeros_like(values)
        first = (self.first_bad == 0) & ~torch.isfinite(values[:2]).all()
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_values = torch.where(first, values, self.bad_values)
        self.values = values

    def read(self) -> tuple[dict[str, float], tuple[int, dict[str, float]] | None]:
        """(the last step's values, each the mean over ranks; None, or where any rank went non-finite: (this rank's
        first non-finite step, 0 if it was another rank's, and its values on this rank))."""
        shared = torch.cat([self.values, (self.first_bad > 0).to(torch.float64)[None]])
        if self.runtime.distributed:
            dist.all_reduce(shared)
        host = torch.cat([shared, self.first_bad.to(torch.float64)[None], self.bad_values]).tolist()
        count = len(self.names)
        means = {name: value / self.runtime.world_size for name, value in zip(self.names, host[:count], strict=True)}
        if host[count] == 0:
            return means, None
        return means, (int(host[count + 1]), dict(zip(self.names, host[count + 2 :], strict=True)))


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (and CUDA when present), for exact resume."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]  # loadable with weights_only
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
