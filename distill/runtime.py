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


def all_reduce_mean(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Mean of each named float over ranks (a no-op on one process). Every rank must pass the same names."""
    if not runtime.distributed or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return {n: float(v) / runtime.world_size for n, v in zip(names, tensor.tolist(), strict=True)}


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
