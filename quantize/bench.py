"""Benchmark: fidelity and ORT CPU latency of our PTQ vs float and vs ORT's quantize_static.

    python -m quantize.bench --model tinyvit_5m --data ../shared/data/coco_val2017_tiny --out runs/quantize_bench

Calibrates on the first `--num-calib` images (GT boxes as prompts) on `--device`, measures
fidelity on the next `--num-eval` (PyTorch models on `--device`, ONNX files in ONNX Runtime on
the CPU), writes `bench.json` and `bench.md` (the tables of the quantization section of
docs/BENCHMARKS.md) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch

from quantize.calibration import box_prompt_loop, prepare_calibration
from quantize.config import PTQConfig
from quantize.fidelity import fidelity, median_latency_ms, run_model
from quantize.modules import ActQuantizer, WeightQuantizer
from quantize.onnx_export import ExportCheckError, export_onnx
from quantize.onnx_runtime import OnnxSam
from quantize.ort_baseline import ort_quantize_static
from quantize.ptq import quantize_, quantized_layers
from student_models import build_sam
from student_models.data import open_dataset
from student_models.device import add_device_argument, torch_threads
from student_models.families import embedding_levels, family_named
from student_models.prompts import box_prompts


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quantize.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinyvit_5m")
    parser.add_argument("--checkpoint", default=None, help="float checkpoint (default: random weights)")
    parser.add_argument("--data", default=None, help="dataset for open_dataset (default: synthetic)")
    parser.add_argument("--out", default="runs/quantize_bench")
    parser.add_argument("--num-calib", type=int, default=8)
    parser.add_argument("--num-eval", type=int, default=4)
    parser.add_argument("--max-prompts", type=int, default=4)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--methods", nargs="+", default=["hessian", "mse", "minmax"])
    parser.add_argument("--ort-methods", nargs="*", default=["minmax", "percentile"])
    parser.add_argument("--keep-float", nargs="+", default=[], metavar="PATTERN", help="fnmatch layer patterns")
    parser.add_argument("--num-alphas", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per latency figure (median)")
    parser.add_argument("--skip-latency", action="store_true", help="fidelity only")
    parser.add_argument("--decoder-prompts", type=int, default=4, help="box prompts per decoder call in timing")
    parser.add_argument(
        "--float-groups",
        nargs="+",
        default=[],
        type=_float_group,
        metavar="NAME=PATTERN[,PATTERN]",
        help="fidelity of the first method's 8-bit model with each group's layers (fnmatch) back in float",
    )
    parser.add_argument(
        "--twin-convs-too",
        action="store_true",
        help="also quantize and export the first method with twin-uniform convolution inputs (PTQConfig.twin_convs)",
    )
    parser.add_argument(
        "--uniform-too",
        action="store_true",
        help="also quantize and export minmax with every input uniform (no twin ranges): the fast graph that "
        "`python -m quantize --method minmax --no-twin` gives",
    )
    parser.add_argument(
        "--reference-encoder",
        default=None,
        metavar="MODEL",
        help="a registered model (e.g. vit_h; random weights) whose PyTorch float32 image encoder is timed once "
        "per thread count in the middle of the interleaved latency repeats: speed-ups measured in the same run",
    )
    add_device_argument(parser)
    return parser


def _float_group(text: str) -> tuple[str, list[str]]:
    name, _, patterns = text.partition("=")
    if not name or not patterns:
        raise argparse.ArgumentTypeError(f"expected NAME=PATTERN[,PATTERN], got {text!r}")
    return name, patterns.split(",")


@contextlib.contextmanager
def layers_in_float(sam: torch.nn.Module, patterns: list[str]) -> Iterator[None]:
    """Switch off every quantizer of the quantized layers matching `patterns`, then restore them."""
    layers = [layer for name, layer in quantized_layers(sam).items() if any(fnmatchcase(name, p) for p in patterns)]
    if not layers:
        raise ValueError(f"--float-groups patterns {patterns} match no quantized layer")
    quantizers = [q for layer in layers for q in layer.modules() if isinstance(q, ActQuantizer | WeightQuantizer)]
    saved = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in zip(quantizers, saved, strict=True):
            q.enabled = enabled


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _latency(
    files: dict[str, tuple[Path, Path]],
    threads: int | None,
    repeats: int,
    prompts: int,
    reference: torch.nn.Module | None = None,
) -> dict[str, dict[str, float]]:
    """Median encoder/decoder ms per model, the models interleaved within each repeat (on a shared
    machine, load changes then hit every model alike, so their ratios stay comparable). A `reference`
    image encoder (PyTorch, float32, on the CPU) runs once after half the repeats: "reference" ->
    {"encoder_ms"}."""
    runners = {key: OnnxSam(encoder, decoder, num_threads=threads) for key, (encoder, decoder) in files.items()}
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32))
    corners = np.sort(rng.uniform(0, 1024, size=(prompts, 2, 2)), axis=1).reshape(prompts, 4)
    coords, labels = (torch.from_numpy(a) for a in box_prompts(corners))
    embeddings = {key: runner.encode(image) for key, runner in runners.items()}  # warm-up, both parts
    for key, runner in runners.items():
        runner.decode(embeddings[key], coords, labels)
    times: dict[str, dict[str, list[float]]] = {key: {"encoder_ms": [], "decoder_ms": []} for key in runners}
    reference_ms = None
    for repeat in range(repeats):
        if reference is not None and repeat == repeats // 2:
            with torch.no_grad(), torch_threads(threads or os.cpu_count()):
                reference_ms = median_latency_ms(lambda: reference(image), 1, warmup=0)
        for key, runner in runners.items():
            times[key]["encoder_ms"].append(median_latency_ms(lambda r=runner: r.encode(image), 1, warmup=0))
            decode = lambda r=runner, e=embeddings[key]: r.decode(e, coords, labels)  # noqa: E731
            times[key]["decoder_ms"].append(median_latency_ms(decode, 1, warmup=0))
    medians = {key: {name: statistics.median(values) for name, values in parts.items()} for key, parts in times.items()}
    return medians | ({"reference": {"encoder_ms": reference_ms}} if reference is not None else {})


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    dataset = open_dataset(args.data)
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]
    if len(samples) < args.num_calib + args.num_eval:
        raise ValueError(f"need {args.num_calib + args.num_eval} images, the dataset has {len(samples)}")
    calib, evaluation = samples[: args.num_calib], samples[args.num_calib : args.num_calib + args.num_eval]
    family = family_named(args.model)
    eval_items = prepare_calibration(evaluation, args.num_eval, args.max_prompts, seed=1, family=family.name)
    calib_items = prepare_calibration(calib, args.num_calib, args.max_prompts, seed=0, family=family.name)

    def fresh():
        torch.manual_seed(0)
        return build_sam(args.model, args.checkpoint).to(args.device)

    float_sam = fresh()
    float_model = family.backend(float_sam, args.device)
    reference = run_model(float_model, eval_items)
    records: dict = {
        "model": args.model,
        "weights": args.checkpoint or "random (torch.manual_seed(0))",
        "data": str(args.data or "synthetic"),
        "num_calib": len(calib),
        "num_eval": len(evaluation),
        "prompts_per_image": args.max_prompts,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(args.device),
        "git_commit": _git_commit(),
        "fidelity": [],
        "latency": [],
        "sizes_mb": {},
    }
    export_onnx(float_sam, out, "float32", prefix="float_")
    files = {"float32": (out / "float_encoder.onnx", out / "float_decoder.onnx")}
    records["fidelity"].append(
        {"name": "float32 ONNX (ORT)", **fidelity(reference, run_model(OnnxSam(*files["float32"]), eval_items))}
    )

    # (label, method, PTQConfig changes): each method with the default config; with --twin-convs-too the
    # first method with twin-uniform convolution inputs as well (`PTQConfig.twin_convs`); with
    # --uniform-too minmax with no twin ranges (the fast graph).
    variants = [(method, method, {}) for method in args.methods]
    if args.twin_convs_too:
        variants.append((f"{args.methods[0]} twin-convs", args.methods[0], {"twin_convs": True}))
    if args.uniform_too:
        variants.append(("minmax all-uniform", "minmax", {"twin_softmax": False, "twin_gelu": False}))
    for bits in args.bits:
        for label, method, changes in variants:
            sam = fresh()
            config = PTQConfig(
                w_bits=bits, a_bits=bits, method=method, num_calib=args.num_calib, max_prompts=args.max_prompts,
                num_alphas=args.num_alphas, rounds=args.rounds, keep_float=tuple(args.keep_float), **changes,
            )  # fmt: skip
            start = time.time()
            quantize_(sam, config, box_prompt_loop(calib_items), model_name=args.model)
            seconds = time.time() - start
            row = {"name": f"ours W{bits}A{bits} {label} (PyTorch, simulated)", "quantize_s": round(seconds, 1)}
            records["fidelity"].append(
                {**row, **fidelity(reference, run_model(family.backend(sam, args.device), eval_items))}
            )
            if bits == 8 and label == args.methods[0]:  # which layer types cost the most fidelity
                for group, patterns in args.float_groups:
                    with layers_in_float(sam, patterns):
                        quantized = run_model(family.backend(sam, args.device), eval_items)
                    name = f"ours W8A8 {label}, {group} in float (PyTorch, simulated)"
                    records["fidelity"].append({"name": name, **fidelity(reference, quantized)})
            # Exported: the first method, the minmax baseline and the added variants.
            if bits == 8 and (method in (args.methods[0], "minmax") or changes):
                tag = label.replace(" ", "_")
                try:
                    result = export_onnx(sam, out, "int8", prefix=f"ours_{tag}_")
                except ExportCheckError as exc:  # recorded, and the other models still measured
                    records[f"export_{tag}"] = {"failed": str(exc)}
                    print(f"export of {label} failed its check; continuing without it: {exc}")
                    continue
                key = f"ours INT8 {label}"
                files[key] = (Path(result.files["encoder"]), Path(result.files["decoder"]))
                records[f"export_{tag}"] = {
                    "checks": [c.__dict__ for c in result.checks],
                    "int8_layers": len(result.int8_layers),
                    "simulated_layers": result.simulated_layers,
                    "ort_kernels": result.ort_kernels,
                }
                records["fidelity"].append(
                    {"name": f"{key} (ORT)", **fidelity(reference, run_model(OnnxSam(*files[key]), eval_items))}
                )

    calib_embeddings = [
        {name: level.cpu().numpy() for name, level in zip(family.embedding_names, levels, strict=True)}
        for levels in (embedding_levels(float_model.encode(item.image)) for item in calib_items)
    ]
    for method in args.ort_methods:
        start = time.time()
        paths = ort_quantize_static(*files["float32"], calib_items, calib_embeddings, out, method)
        key = f"ORT quantize_static {method}"
        files[key] = paths
        records["fidelity"].append({"name": f"{key} (ORT)", "quantize_s": round(time.time() - start, 1),
                                    **fidelity(reference, run_model(OnnxSam(*paths), eval_items))})  # fmt: skip

    reference_encoder = None
    if args.reference_encoder and not args.skip_latency:
        torch.manual_seed(0)
        reference_encoder, _ = family_named(args.reference_encoder).networks(build_sam(args.reference_encoder).eval())
        records["reference_encoder"] = f"{args.reference_encoder} (PyTorch float32, random weights, CPU)"
    for threads in () if args.skip_latency else (1, None):  # the same run, models interleaved per repeat
        timings = _latency(files, threads, args.repeats, args.decoder_prompts, reference_encoder)
        for key, timing in timings.items():
            records["latency"].append({"name": key, "threads": threads or os.cpu_count(), **timing})
    for key, (encoder, decoder) in files.items():
        records["sizes_mb"][key] = {"encoder": round(encoder.stat().st_size / 2**20, 2),
                                    "decoder": round(decoder.stat().st_size / 2**20, 2)}  # fmt: skip
    records["total_s"] = round(time.time() - started, 1)
    (out / "bench.json").write_text(json.dumps(records, indent=2))
    (out / "bench.md").write_text(to_markdown(records))
    return records


def to_markdown(records: dict) -> str:
    lines = [
        "| model | SQNR embedding (dB) | SQNR mask logits (dB) | mask IoU | quantize time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in records["fidelity"]:
        lines.append(f"| {r['name']} | {r['sqnr_embedding_db']:.1f} | {r['sqnr_mask_logits_db']:.1f} | "
                     f"{r['mask_iou']:.3f} | {r.get('quantize_s', '')} |")  # fmt: skip
    lines += [
        "",
        "| model | threads | encoder (ms) | decoder (ms) | encoder speed-up vs float32 |",
        "|---|---|---|---|---|",
    ]
    base = {r["threads"]: r["encoder_ms"] for r in records["latency"] if r["name"] == "float32"}  # same run
    students = [r for r in records["latency"] if r["name"] != "reference"]
    for r in students:
        lines.append(f"| {r['name']} | {r['threads']} | {r['encoder_ms']:.0f} | {r['decoder_ms']:.0f} | "
                     f"{base[r['threads']] / r['encoder_ms']:.2f}x |")  # fmt: skip
    reference = {r["threads"]: r["encoder_ms"] for r in records["latency"] if r["name"] == "reference"}
    if reference:
        lines += ["", f"| {records['reference_encoder']} vs | threads | reference encoder (ms) | speed-up |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in students:
            ms = reference[r["threads"]]
            lines.append(f"| {r['name']} | {r['threads']} | {ms:.0f} | {ms / r['encoder_ms']:.3g}x |")
    lines += ["", "| model | encoder.onnx (MB) | decoder.onnx (MB) |", "|---|---|---|"]
    for key, size in records["sizes_mb"].items():
        lines.append(f"| {key} | {size['encoder']} | {size['decoder']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    records = run(args)
    print(to_markdown(records))
    print(f"results in {args.out}/bench.json and bench.md ({records['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
