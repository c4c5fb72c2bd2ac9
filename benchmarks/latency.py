"""Latency of the image encoder and the mask decoder, measured separately.

`LatencyRunner` is the timing loop (warm-up, synchronised repeats, median and inter-quartile
range). `benchmark_latency` times the two calls of a `student_models.sam_runner.SamBackend`, the
ones `SamRunner` makes: ``encode`` (image encoder) and ``decode`` (prompt encoder + mask decoder on
box prompts as one point list, all four mask tokens). It times a model in PyTorch on one device
(`TorchSamBackend`: the CPU at every requested thread count; a GPU in fp32 and under bf16
autocast), eager and, with ``compile``, through `torch.compile` as well, in the same run; and any
exported encoder/decoder pairs it is given (float32, INT8; ONNX Runtime or OpenVINO, on the CPU at
every thread count).
It returns flat records with parameters, MACs (PyTorch's flop counter, MACs = FLOPs / 2) and
ONNX file sizes next to the timings.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.records import device_name, make_record
from student_models import build_sam
from student_models.device import torch_threads
from student_models.families import family_named, family_of
from student_models.prompts import box_prompts
from student_models.registry import EMBED_DIM, EMBED_SIDE, IMAGE_SIZE, get_spec
from student_models.sam2_pipeline import Sam2Features
from student_models.sam_runner import SamBackend, TorchSamBackend, compile_mode

COMPONENTS = ("encoder", "decoder")
# A compiled back-end's first calls compile, then (CUDA graphs) warm up and record: never timed.
COMPILE_WARMUP = 3


@dataclass
class LatencyConfig:
    """How latency is measured.

    Attributes:
        warmup: untimed calls before timing (allocator, ORT graph optimisation, caches).
        repeats: timed calls; the record holds their median and inter-quartile range.
        threads: intra-op thread counts of the CPU runs; None = (1, all cores): 1 thread is the
            edge-device proxy.
        decoder_boxes: box prompts per decoder call (1 = one interactive click).
        image_batch: images per encoder call (1 = one photo; more shows a GPU's throughput).
        components: "encoder" and/or "decoder".
        compile: also time PyTorch through `torch.compile` (runtime "pytorch-compile", mode
            `student_models.sam_runner.compile_mode`: CUDA graphs on a GPU), next to eager; those
            runs warm up at least `COMPILE_WARMUP` calls, compilation included.
    """

    warmup: int = 2
    repeats: int = 10
    threads: tuple[int, ...] | None = None
    decoder_boxes: int = 1
    image_batch: int = 1
    components: tuple[str, ...] = COMPONENTS
    compile: bool = False

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")
        if self.threads is None:
            self.threads = tuple(sorted({1, os.cpu_count() or 1}))
        self.threads = tuple(int(t) for t in self.threads)
        if not self.threads or min(self.threads) < 1:
            raise ValueError(f"threads must be positive counts, got {self.threads}")
        if self.decoder_boxes < 1 or self.image_batch < 1:
            raise ValueError(
                f"decoder_boxes and image_batch must be >= 1, got {self.decoder_boxes}, {self.image_batch}"
            )
        self.components = tuple(self.components)
        unknown = set(self.components) - set(COMPONENTS)
        if unknown or not self.components:
            raise ValueError(f"components must be among {COMPONENTS}, got {self.components}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threads": list(self.threads), "components": list(self.components)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyConfig:
        data = dict(data)
        data["threads"] = None if data.get("threads") is None else tuple(data["threads"])
        data["components"] = tuple(data.get("components", COMPONENTS))
        return cls(**data)


@dataclass(frozen=True)
class Timing:
    """Milliseconds over the timed repeats."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    repeats: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    def to_figures(self) -> dict[str, float]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


@dataclass
class LatencyRunner:
    """Warm up, then time ``repeats`` calls of a function; ``sync`` runs after each call (CUDA)."""

    warmup: int = 2
    repeats: int = 10
    sync: Callable[[], None] = field(default=lambda: None)

    def measure(self, fn: Callable[[], Any]) -> Timing:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1000)
        quartiles = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
        return Timing(statistics.median(times), float(quartiles[0]), float(quartiles[1]), min(times), len(times))


def example_inputs(decoder_boxes: int = 1, seed: int = 0, image_batch: int = 1, family: str = "sam") -> dict:
    """Fixed random inputs: images Nx3x1024x1024, one image's embedding (SAM: 1x256x64x64; SAM 2: its
    `Sam2Features`), and ``decoder_boxes`` box prompts in the 1024 frame as the decoder's point list
    (coords Bx2x2, labels Bx2)."""
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(decoder_boxes, 2, 2, generator=gen) * IMAGE_SIZE
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    coords, labels = box_prompts(boxes.numpy())
    images = torch.randn(image_batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    if family == "sam2":
        embedding = Sam2Features.random(1, gen)
    else:
        embedding = torch.randn(1, EMBED_DIM, EMBED_SIDE, EMBED_SIDE, generator=gen)
    coords, labels = torch.from_numpy(coords), torch.from_numpy(labels)
    return {"image": images, "embedding": embedding, "coords": coords, "labels": labels}


def component_params(sam: nn.Module) -> dict[str, int]:
    """Parameter counts: encoder, and decoder = prompt encoder + mask decoder (SAM 2's includes the two
    1x1 convolutions that ``forward_image`` applies to the high-resolution levels, 25k parameters)."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    heads = family_of(sam).heads(sam)
    return {"encoder": count(sam.image_encoder), "decoder": sum(count(head) for head in heads)}


@torch.no_grad()
def count_macs(model_name: str, decoder_boxes: int = 1, image_batch: int = 1) -> dict[str, int]:
    """MACs of the float model's encoder (``image_batch`` 1024x1024 images) and decoder (``decoder_boxes`` boxes).

    Counted on the meta device (no weights allocated, nothing computed), so even ViT-H is instant.
    """
    family = get_spec(model_name).family
    inputs = {k: v.to("meta") for k, v in example_inputs(decoder_boxes, image_batch=image_batch, family=family).items()}
    with torch.device("meta"):
        # No parameter needs grad: FlopCounterMode's module hooks reject no-grad views of grad leaves.
        backend = family_named(model_name).backend(build_sam(model_name).requires_grad_(False), "meta")
    macs = {}
    for component, call in _backend_targets(backend, inputs).items():
        with FlopCounterMode(display=False) as counter:
            call()
        macs[component] = counter.get_total_flops() // 2
    return macs


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX model with its external-data files (``<name>.data`` etc. beside it)."""
    path = Path(path)
    extra = [p for p in path.parent.glob(f"{path.name}.*") if p.is_file()] if path.parent.is_dir() else []
    return path.stat().st_size + sum(p.stat().st_size for p in extra)


@dataclass(frozen=True)
class OnnxPair:
    """An exported encoder/decoder pair, the precision it runs in ("fp32", "int8") and the runtime that runs
    it: "onnxruntime" (.onnx/.ort files) or "openvino" (the IR that ``python -m quantize --runtime openvino``
    converts from them)."""

    encoder: Path
    decoder: Path
    precision: str
    runtime: str = "onnxruntime"


@dataclass
class _Job:
    """One runtime/precision/thread setting to time; ``make_backend()`` is called under its thread count."""

    runtime: str
    precision: str
    threads: int | None
    device: torch.device
    make_backend: Callable[[], SamBackend]
    files: dict[str, Path] = field(default_factory=dict)  # ONNX file per component, for the record
    compile_mode: str | None = None


def _backend_targets(backend: SamBackend, inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """{component: the back-end call on ``inputs``}, inputs moved to the back-end's device once."""
    inputs = {k: v.to(backend.device) for k, v in inputs.items()}
    return {
        "encoder": lambda: backend.encode(inputs["image"]),
        "decoder": lambda: backend.decode(inputs["embedding"], inputs["coords"], inputs["labels"]),
    }


def _torch_jobs(
    sam: nn.Module,
    backend: type[TorchSamBackend],
    device: torch.device,
    precisions: list[tuple[str, torch.dtype]],
    threads: int | None,
    compile: bool,
) -> list[_Job]:
    """Eager, and compiled where asked, PyTorch jobs on ``device`` for each (precision label, dtype)."""
    jobs = []
    for name, dtype in precisions:
        for compiled in (False, True) if compile else (False,):
            make = partial(backend, sam, device, dtype, compiled)
            mode = compile_mode(device) if compiled else None
            runtime = "pytorch-compile" if compiled else "pytorch"
            jobs.append(_Job(runtime, name, threads, device, make, compile_mode=mode))
    return jobs


@torch.no_grad()
def benchmark_latency(
    sam: nn.Module,
    model_name: str,
    config: LatencyConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    checkpoint: str | None = None,
    precision: str = "fp32",
    onnx_pairs: list[OnnxPair] = (),
    runner_classes: dict[str, Callable[..., SamBackend]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Time ``sam`` (PyTorch, on ``device``) and the ``onnx_pairs`` (on the CPU, each in its runtime through
    ``runner_classes[pair.runtime]``, a `SamBackend` class such as `quantize.OnnxSam`).

    On the CPU PyTorch runs in ``precision`` at each of ``config.threads``; on a GPU in fp32 and
    under bf16 autocast (``threads`` None); with ``config.compile`` each also through `torch.compile`.
    ``sam`` is moved to ``device`` and back. Returns one "latency" record per component x runtime x
    precision x threads.
    """
    config = config or LatencyConfig()
    unknown = sorted({pair.runtime for pair in onnx_pairs} - set(runner_classes or {}))
    if unknown:
        raise ValueError(f"no runner class for the runtime(s) {unknown} of onnx_pairs (give e.g. quantize.OnnxSam)")
    if onnx_pairs and config.image_batch != 1:
        raise ValueError(f"ONNX encoders take one image per call; image_batch {config.image_batch} needs PyTorch alone")
    device = torch.device(device)
    inputs = example_inputs(config.decoder_boxes, image_batch=config.image_batch, family=get_spec(model_name).family)
    torch_backend = family_named(model_name).backend
    params = component_params(sam)
    macs = count_macs(model_name, config.decoder_boxes, config.image_batch)
    batch = {"encoder": config.image_batch, "decoder": config.decoder_boxes}
    home = next(sam.parameters()).device
    sam.to(device)
    jobs = []
    cpu = torch.device("cpu")
    if device.type == "cuda":
        precisions = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
        jobs += _torch_jobs(sam, torch_backend, device, precisions, None, config.compile)
    for threads in config.threads:
        if device.type == "cpu":  # a fresh back-end per thread count: compiled CPU kernels keep theirs
            jobs += _torch_jobs(sam, torch_backend, cpu, [(precision, torch.float32)], threads, config.compile)
        for pair in onnx_pairs:
            make = partial(runner_classes[pair.runtime], pair.encoder, pair.decoder, num_threads=threads)
            files = {"encoder": Path(pair.encoder), "decoder": Path(pair.decoder)}
            jobs.append(_Job(pair.runtime, pair.precision, threads, cpu, make, files))
    records = []
    bar = tqdm(total=len(jobs) * len(config.components), desc="latency", unit="run", disable=not progress)
    for job in jobs:
        sync = partial(torch.cuda.synchronize, job.device) if job.device.type == "cuda" else (lambda: None)
        warmup = max(config.warmup, COMPILE_WARMUP) if job.compile_mode else config.warmup
        runner = LatencyRunner(warmup, config.repeats, sync)
        with torch_threads(job.threads or torch.get_num_threads()):
            targets = _backend_targets(job.make_backend(), inputs)
            for component in config.components:
                bar.set_postfix_str(f"{job.runtime} {job.precision} {component} x{job.threads or job.device.type}")
                timing = runner.measure(targets[component])
                records.append(
                    make_record(
                        "latency",
                        model=model_name,
                        checkpoint=checkpoint,
                        precision=job.precision,
                        runtime=job.runtime,
                        threads=job.threads,
                        device=device_name(job.device),
                        config=config.to_dict(),
                        component=component,
                        batch=batch[component],
                        params=params[component],
                        macs=macs[component],
                        onnx_file=str(job.files[component]) if component in job.files else None,
                        onnx_bytes=onnx_file_bytes(job.files[component]) if component in job.files else None,
                        compile_mode=job.compile_mode,
                        **timing.to_figures(),
                    )
                )
                bar.update()
    bar.close()
    sam.to(home)
    return records
