"""The one-command offline demo: every stage on generated data and tiny models, then a report.

distill (a few steps, tiny teacher -> tiny student) -> quantize W8A8 and W6A6 (simulated) ->
ONNX export (float32 and INT8) -> hierarchical everything mode on a generated image -> COCO-style
AP of float / W8A8 / W6A6 / ONNX models on a generated COCO-format set (or on ``coco_root``) ->
latency -> report with the AP-vs-latency plot. Distillation, everything mode, PyTorch AP and
latency run on the given device; quantization calibrates on the CPU, and ONNX Runtime runs there.
Each step calls its stage's library API. A step whose stage API is missing is reported as skipped
with the reason; a step that raises is reported as failed, the steps that need its output are
skipped, the others still run, and the summary names what failed. The demo exits non-zero unless
every step ran.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.coco_eval import CocoEvalConfig
from benchmarks.latency import LatencyConfig, OnnxPair
from benchmarks.records import load_records
from benchmarks.report import render_report
from benchmarks.runs import (
    LoadedModel,
    OnnxModel,
    StageMissingError,
    onnx_pair_in,
    quantized_precision,
    run_coco,
    run_latency,
    stage_api,
)
from benchmarks.synthetic_coco import write_synthetic_coco
from student_models import build_sam
from student_models.io import atomic_write_text
from student_models.synthetic import synthetic_sample

TEACHER, STUDENT = "sam_vit_test", "tinyvit_test"


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults fit a few minutes on 2 CPU cores.

    Attributes:
        distill_steps: optimiser steps of the distillation (a smoke run, not a trained model).
        coco_images: generated images in the synthetic COCO set (or the first N of ``coco_root``).
        calib_images: generated calibration images for post-training quantization.
        search_method: the quantization scale-search ranking; "mse" (output MSE) is the cheap
            fallback, "hessian" the paper's metric (several times slower: it back-propagates).
        search_alphas: scale candidates per layer, searched in one round (the paper: 100, 3 rounds).
        latency_repeats: timed repeats per latency figure.
    """

    distill_steps: int = 3
    coco_images: int = 4
    calib_images: int = 1
    search_method: str = "mse"
    search_alphas: int = 10
    latency_repeats: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("distill_steps", "coco_images", "calib_images", "search_alphas", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DemoStep:
    name: str
    status: str = "pending"  # "done", "skipped" or "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""


class Demo:
    """Runs the steps in order, keeping each step's outputs; later steps use earlier outputs."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        coco_root: str | None = None,
        config: DemoConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.coco_root = coco_root
        self.config = config or DemoConfig()
        self.records = self.out / "records"
        self.steps: list[DemoStep] = []
        self.state: dict[str, Any] = {}
        self.quantized: dict[str, LoadedModel] = {}  # "w8a8" / "w6a6": simulated-quantized students
        self.onnx: list[OnnxPair] = []

    def step(self, name: str, fn: Callable[[], dict[str, str]], needs: tuple[str, ...] = ()) -> DemoStep:
        """Run `fn` as step `name`, unless a step it `needs` failed; a failure is recorded, not raised."""
        step = DemoStep(name)
        status = {s.name: s.status for s in self.steps}
        self.steps.append(step)
        print(f"\n== {name}", flush=True)
        failed = [need for need in needs if status[need] == "failed"]
        if failed:
            step.status, step.note = "skipped", f"needs {', '.join(failed)}, which failed"
            print(f"-- {name}: {step.status}: {step.note}", flush=True)
            return step
        start = time.perf_counter()
        try:
            step.outputs = fn()
            step.status = "done"
        except StageMissingError as exc:
            step.status, step.note = "skipped", str(exc)
        except Exception as exc:  # one stage failing must not hide what the others measure
            traceback.print_exc()
            step.status, step.note = "failed", f"{type(exc).__name__}: {exc}"
        step.seconds = time.perf_counter() - start
        print(f"-- {name}: {step.status} in {step.seconds:.1f} s {step.note}", flush=True)
        return step

    # -- the steps ----------------------------------------------------------------------------

    def data(self) -> dict[str, str]:
        if self.coco_root is not None:
            self.state["coco_root"] = Path(self.coco_root)
        else:
            root = self.out / "data" / "synthetic_coco"
            self.state["coco_root"] = write_synthetic_coco(root, self.config.coco_images, seed=1000 + self.config.seed)
        return {"COCO-format evaluation set": str(self.state["coco_root"])}

    def distill(self) -> dict[str, str]:
        DistillConfig, distill = stage_api("distill", "DistillConfig", "distill")
        # The distill stage's own demo settings (tiny teacher and student, generated shapes), made smaller.
        config = DistillConfig.demo(
            teacher=TEACHER,
            student=STUDENT,
            out=str(self.out / "distill"),
            steps=self.config.distill_steps,
            num_synthetic=3,
            val_images=1,
            batch_size=1,
            prompts_per_image=2,
            max_prompt_iters=1,
            val_prompts_per_image=2,
            seed=self.config.seed,
            device=str(self.device),
            overwrite=True,  # the demo's own folder: a rerun replaces its earlier distill run (refused otherwise)
        )
        result = distill(config)
        self.state["checkpoint"] = str(result.checkpoint)
        return {"student checkpoint": str(result.checkpoint), "training log": str(result.log_path)}

    def student(self) -> LoadedModel:
        """The distilled tiny student (random init when the distill step was skipped), float."""
        checkpoint = self.state.get("checkpoint")
        return LoadedModel(build_sam(STUDENT, checkpoint=checkpoint), STUDENT, checkpoint, "fp32")

    def quantize(self) -> dict[str, str]:
        PTQConfig, quantize_ = stage_api("quantize", "PTQConfig", "quantize_")
        save_quantized = getattr(importlib.import_module("quantize"), "save_quantized", None)
        calib = [synthetic_sample(2000 + i)[0] for i in range(self.config.calib_images)]
        outputs = {}
        for bits in (8, 6):
            student = self.student()
            config = PTQConfig(
                w_bits=bits,
                a_bits=bits,
                method=self.config.search_method,
                num_alphas=self.config.search_alphas,
                rounds=1,
                num_calib=len(calib),
                max_prompts=1,
            )
            report = quantize_(student.sam, config, calib)
            name = f"w{bits}a{bits}"
            self.quantized[name] = LoadedModel(
                student.sam, STUDENT, student.checkpoint, quantized_precision(student.sam)
            )
            folder = self.out / "quantize"
            folder.mkdir(parents=True, exist_ok=True)
            report_path = atomic_write_text(
                folder / f"{name}_report.json", json.dumps(dataclasses.asdict(report), indent=1, default=str)
            )
            outputs[f"W{bits}A{bits} quantization report"] = str(report_path)
            if save_quantized is not None:
                outputs[f"W{bits}A{bits} model (simulated)"] = str(save_quantized(student.sam, folder / f"{name}.pt"))
        return outputs

    def export(self) -> dict[str, str]:
        export_onnx = stage_api("quantize", "export_onnx")
        outputs = {}
        folder = self.out / "onnx" / "fp32"
        export_onnx(self.student().sam, folder, ort_format=False)
        self.onnx.append(onnx_pair_in(folder))
        outputs["ONNX float32 (encoder.onnx, decoder.onnx)"] = str(folder)
        if "w8a8" in self.quantized:
            folder = self.out / "onnx" / "int8"
            export_onnx(self.quantized["w8a8"].sam, folder, precision="int8", ort_format=False)
            self.onnx.append(onnx_pair_in(folder))
            outputs["ONNX INT8 QDQ (encoder.onnx, decoder.onnx)"] = str(folder)
        return outputs

    def everything(self) -> dict[str, str]:
        from benchmarks.everything import run_everything

        # A small grid and no score filters: the demo student is barely trained, so SAM's 0.88/0.95
        # filters would keep no mask at all and there would be nothing to compare. SAM's own generator
        # is left out to save time (the hierarchical stage's tests check dense mode is identical to it).
        options = dict(points_per_side=8, sparse_points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        _, path = run_everything(
            self.student(),
            out_dir=self.records,
            generator_options=options,
            methods=("dense", "hierarchical-lattice"),
            device=self.device,
        )
        return {"everything-mode records": str(path)}

    def coco(self) -> dict[str, str]:
        config = CocoEvalConfig(max_images=self.config.coco_images)
        targets = [self.student(), *self.quantized.values(), *(OnnxModel(STUDENT, pair) for pair in self.onnx)]
        outputs = {}
        for target in targets:
            result, path = run_coco(
                target, coco_root=self.state["coco_root"], out_dir=self.records, config=config, device=self.device
            )
            label = (
                f"{target.precision} (PyTorch)"
                if isinstance(target, LoadedModel)
                else f"{target.pair.precision} (ONNX Runtime)"
            )
            outputs[f"AP {result.metrics['ap']:.1f} {label}"] = str(path)
        return outputs

    def latency(self) -> dict[str, str]:
        """Float PyTorch and the ONNX pairs. Simulated-quantized PyTorch models are not timed: fake
        quantization runs in float and only adds work, so their speed says nothing; the INT8 ONNX
        model is what ships."""
        config = LatencyConfig(warmup=1, repeats=self.config.latency_repeats)
        _, path = run_latency(
            self.student(), out_dir=self.records, config=config, onnx_pairs=self.onnx, device=self.device
        )
        return {"latency records (PyTorch float + ONNX Runtime)": str(path)}

    def report(self) -> dict[str, str]:
        report, plot = render_report(load_records(self.records), self.out / "report")
        return {"report": str(report), "AP-vs-latency plot": str(plot)}

    def run(self) -> bool:
        """Run every step; print where everything went; True when no step was skipped."""
        start = time.perf_counter()
        # Later steps use what earlier ones left (quantized models, ONNX pairs, records) when it is there;
        # `needs` lists only the steps without which a step has nothing to run on.
        for name, fn, needs in [
            ("data", self.data, ()),
            ("distill", self.distill, ()),
            ("quantize W8A8 + W6A6", self.quantize, ("distill",)),
            ("ONNX export", self.export, ("distill",)),
            ("hierarchical everything mode", self.everything, ("distill",)),
            ("COCO-style AP", self.coco, ("data", "distill")),
            ("latency", self.latency, ("distill",)),
            ("report", self.report, ()),
        ]:
            self.step(name, fn, needs)
        print(f"\nDemo finished in {time.perf_counter() - start:.0f} s. Where everything went:")
        for step in self.steps:
            print(f"  [{step.status}] {step.name} ({step.seconds:.1f} s){': ' + step.note if step.note else ''}")
            for what, where in step.outputs.items():
                print(f"      {what}: {where}")
        print(
            "\nThe demo's models are tiny and trained for a few steps: an AP near 0 is expected. The demo shows the "
            "pipeline end to end; run `python -m benchmarks coco` with real checkpoints for meaningful AP."
        )
        failed = [step.name for step in self.steps if step.status == "failed"]
        if failed:
            print(f"\nFAILED: {', '.join(failed)} (errors above; the other steps ran where they could)")
        return all(step.status == "done" for step in self.steps)


def run_demo(
    out_dir: str | os.PathLike,
    coco_root: str | None = None,
    config: DemoConfig | None = None,
    device: str | torch.device = "cpu",
) -> bool:
    """Run the demo into ``out_dir`` (PyTorch stages on ``device``); True when every step ran."""
    return Demo(out_dir, coco_root, config, device).run()
