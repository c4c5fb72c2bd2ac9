"""Command line: ``python -m benchmarks coco|latency|everything|distill|runtimes|export-matrix|report|demo``.

See ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.coco_eval import CocoEvalConfig, DetectionsError
from benchmarks.distill_throughput import add_arguments as add_distill_arguments
from benchmarks.distill_throughput import run as run_distill_benchmark
from benchmarks.latency import LatencyConfig
from benchmarks.records import RecordError
from benchmarks.runs import PAIR_FILES, StageMissingError
from distill import CacheError, DistillError
from student_models import CheckpointError
from student_models.data import DatasetError
from student_models.device import add_device_argument
from student_models.extras import MissingExtraError
from student_models.io import atomic_write_text
from student_models.preprocessing import ImageError

# Errors that mean "the input is wrong" or "the output cannot be written" (OSError: an unwritable
# --out, a full disk): reported in one line, exit status 1, as the other commands do.
USER_ERRORS = (
    CacheError,
    DistillError,
    DatasetError,
    DetectionsError,
    ImageError,
    RecordError,
    StageMissingError,
    CheckpointError,
    MissingExtraError,
    OSError,
    ValueError,
)


def error_message(exc: Exception) -> str:
    """One line: an OSError names its file (its default text puts the errno first), others as raised."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _add_model_args(parser: argparse.ArgumentParser, onnx: bool) -> None:
    parser.add_argument("--model", required=True, help="registered model name (e.g. tinyvit_5m, vit_b, tinyvit_test)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="float checkpoint (path or known name); default: random init")
    source.add_argument("--quantized", help="simulated-quantized model file written by quantize.save_quantized")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    add_device_argument(
        parser,
        help="where PyTorch runs: auto (CUDA when PyTorch sees a GPU, else CPU), cpu, cuda or cuda:N; "
        "exported files run on the CPU",
    )
    if onnx:
        source.add_argument(
            "--onnx-encoder",
            help="exported encoder (with --onnx-decoder) instead: .onnx/.ort runs in ONNX Runtime, .xml in OpenVINO, "
            ".pte in ExecuTorch",
        )
        parser.add_argument("--onnx-decoder", help="decoder exported with the encoder (the same kind of file)")


RUNTIME_NAMES = {choice: runtime for runtime, (*_, choice) in PAIR_FILES.items()}  # --runtime -> the records' runtime


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    coco = sub.add_parser("coco", help="zero-shot instance segmentation AP on a COCO-format dataset")
    _add_model_args(coco, onnx=True)
    coco.add_argument("--coco-root", required=True, help="folder with annotations/instances_<split>.json and <split>/")
    coco.add_argument("--detections", help="COCO-format detections JSON (default: ground-truth boxes)")
    coco.add_argument("--max-images", type=int, help="evaluate only the first N images")
    coco.add_argument("--chunk-size", type=int, help="box prompts per decoder batch")
    coco.add_argument("--out", required=True, help="folder for the JSON record")

    latency = sub.add_parser("latency", help="encoder and decoder latency: PyTorch and ONNX Runtime")
    _add_model_args(latency, onnx=False)
    latency.add_argument("--onnx-dir", action="append", default=[], help="folder with encoder.onnx + decoder.onnx")
    latency.add_argument(
        "--runtime", nargs="+", choices=tuple(RUNTIME_NAMES), default=["ort"],
        help="runtimes for each --onnx-dir (openvino / executorch: the .xml IR / .pte programs python -m quantize "
        "--runtime openvino / executorch wrote)",
    )  # fmt: skip
    latency.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all cores)")
    latency.add_argument("--warmup", type=int)
    latency.add_argument("--repeats", type=int)
    latency.add_argument("--decoder-boxes", type=int, help="box prompts per decoder call")
    latency.add_argument("--image-batch", type=int, help="images per encoder call (PyTorch only; default 1)")
    latency.add_argument("--components", nargs="+", choices=("encoder", "decoder"))
    latency.add_argument(
        "--compile",
        action="store_true",
        help="also time PyTorch through torch.compile (CUDA graphs on a GPU), next to eager; compiling takes minutes",
    )
    latency.add_argument("--out", required=True, help="folder for the JSON records")

    everything = sub.add_parser(
        "everything", help="SAM vs dense vs hierarchical everything mode, per re-prompt rule (hierarchical stage)"
    )
    _add_model_args(everything, onnx=False)
    source = everything.add_mutually_exclusive_group()
    source.add_argument("--images", help="folder of images (default: one synthetic image)")
    source.add_argument("--coco-root", help="COCO folder: first --max-images images by lowest id, mIoU vs annotations")
    everything.add_argument("--max-images", type=int, help="use only the first N images")
    everything.add_argument("--points-per-side", type=int, help="dense grid (default 32, the paper's)")
    everything.add_argument("--sparse-points-per-side", type=int, help="first-round grid (default: a quarter)")
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "high_score_thresh"):
        everything.add_argument("--" + name.replace("_", "-"), type=float, help=f"GeneratorConfig.{name}")
    everything.add_argument(
        "--methods",
        nargs="+",
        help="subset of sam, dense, hierarchical-lattice, hierarchical-tinysam (default: all, in that order)",
    )
    everything.add_argument("--out", required=True, help="folder for the JSON records")

    report = sub.add_parser("report", help="records -> Markdown table + AP-vs-latency plot")
    report.add_argument("--records", required=True, help="folder of JSON records (searched recursively)")
    report.add_argument("--out", required=True, help="folder for report.md and ap_vs_latency.png")

    add_distill_arguments(sub.add_parser("distill", help="distillation throughput split by phase, peak memory"))

    runtimes = sub.add_parser(
        "runtimes", help="exported encoders in ONNX Runtime, OpenVINO and ExecuTorch: SQNR and latency"
    )
    runtimes.add_argument("folder", help="output folder of python -m quantize --runtime ort openvino [executorch]")
    runtimes.add_argument("--images", required=True, help="folder of images held out from calibration")
    runtimes.add_argument("--num-images", type=int, default=2)
    runtimes.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    runtimes.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per thread count")
    runtimes.add_argument(
        "--profile", action="store_true", help="then time every op type with each runtime's profiler (first --threads)"
    )
    runtimes.add_argument(
        "--also", nargs="+", default=[], metavar="OTHER_DIR",
        help="output folders of other exports of the same model (e.g. --no-twin): their INT8 encoders join the rounds",
    )  # fmt: skip
    runtimes.add_argument(
        "--reference-encoder", nargs="+", default=[], metavar="MODEL",
        help="registered models (e.g. vit_h, random weights) whose PyTorch float32 encoders are timed in the same run",
    )  # fmt: skip

    matrix = sub.add_parser("export-matrix", help="python -m quantize over models x calib sizes x methods x twin")
    matrix.add_argument("--calib", required=True, help="calibration images (the first --num-eval are held out last)")
    matrix.add_argument("--out", required=True, help="folder for one sub-folder per cell, matrix.json and matrix.md")
    matrix.add_argument("--models", nargs="+", default=["tinyvit_5m", "repvit_m0_9"])
    matrix.add_argument("--num-calib", type=int, nargs="+", default=[1, 8, 32])
    matrix.add_argument("--methods", nargs="+", default=["mse", "hessian"])
    matrix.add_argument("--alpha-candidates", type=int, default=20, help="passed to python -m quantize")
    matrix.add_argument("--rounds", type=int, default=1, help="passed to python -m quantize")
    matrix.add_argument(
        "--runtime", nargs="+", choices=tuple(RUNTIME_NAMES), default=["ort"], help="passed to python -m quantize"
    )
    add_device_argument(matrix, help="passed to python -m quantize: where calibration and the scale search run")

    demo = sub.add_parser("demo", help="offline demo: distill -> quantize -> ONNX -> everything -> AP -> latency")
    demo.add_argument("--coco-root", help="evaluate AP on this COCO folder instead of the generated synthetic set")
    demo.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    add_device_argument(demo)
    return parser


def _only_set(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


def _coco(args: argparse.Namespace) -> None:
    from benchmarks.runs import OnnxModel, load_torch_model, onnx_pair, run_coco

    if bool(args.onnx_encoder) != bool(args.onnx_decoder):
        raise SystemExit("error: --onnx-encoder and --onnx-decoder go together")
    config = CocoEvalConfig(
        **_only_set(max_images=args.max_images, chunk_size=args.chunk_size, detections=args.detections)
    )
    if args.onnx_encoder:
        target = OnnxModel(args.model, onnx_pair(args.onnx_encoder, args.onnx_decoder))
    else:
        target = load_torch_model(args.model, args.checkpoint, args.quantized, args.seed)
    result, path = run_coco(target, coco_root=args.coco_root, out_dir=args.out, config=config, device=args.device)
    metrics = ", ".join(f"{k}={v}" for k, v in result.metrics.items())
    print(f"COCO segm on {result.num_images} images, {result.num_prompts} box prompts: {metrics}")
    print(f"record: {path}")


def _latency(args: argparse.Namespace) -> None:
    from benchmarks.runs import load_torch_model, onnx_pair_in, run_latency

    config = LatencyConfig(
        **_only_set(
            threads=tuple(args.threads) if args.threads else None,
            warmup=args.warmup,
            repeats=args.repeats,
            decoder_boxes=args.decoder_boxes,
            image_batch=args.image_batch,
            components=tuple(args.components) if args.components else None,
        ),
        compile=args.compile,
    )
    records, path = run_latency(
        load_torch_model(args.model, args.checkpoint, args.quantized, args.seed),
        out_dir=args.out,
        config=config,
        onnx_pairs=[onnx_pair_in(d, RUNTIME_NAMES[r]) for d in args.onnx_dir for r in args.runtime],
        device=args.device,
    )
    for r in records:
        print(
            f"{r['component']:8s} {r['runtime']:15s} {r['precision']:9s} batch={r['batch']} threads={r['threads']}: "
            f"median {r['median_ms']:.1f} ms (IQR {r['iqr_ms']:.1f}, n={r['repeats']})"
        )
    print(f"records: {path}")


def _everything(args: argparse.Namespace) -> None:
    from benchmarks.everything import run_everything
    from benchmarks.runs import load_torch_model, stage_api

    settings = ("points_per_side", "sparse_points_per_side", "pred_iou_thresh", "stability_score_thresh")
    settings += ("box_nms_thresh", "high_score_thresh")
    records, path = run_everything(
        load_torch_model(args.model, args.checkpoint, args.quantized, args.seed),
        images=args.images,
        coco_root=args.coco_root,
        max_images=args.max_images,
        out_dir=args.out,
        generator_options=_only_set(**{name: getattr(args, name) for name in settings}),
        methods=tuple(args.methods) if args.methods else None,
        device=args.device,
    )
    for r in records:
        versus = {k: r[k] for k in ("agrees_with_sam", "miou_vs_dense", "recall90_vs_dense", "miou_vs_gt") if k in r}
        counts = f"{r['points_prompted']} points, {r['masks']} masks"
        print(f"{r['image']} {r['method']:20s}: {r['seconds']:.2f} s, {counts} {versus}")
    summarize, table = stage_api("hierarchical.compare", "summarize_comparison", "comparison_table")
    print(table(summarize(records)))
    print(f"records: {path}")


def _report(args: argparse.Namespace) -> None:
    from benchmarks.report import report_from_dir

    report_path, plot_path = report_from_dir(args.records, args.out)
    print(f"report: {report_path}\nplot: {plot_path}")


def _demo(args: argparse.Namespace) -> int:
    from benchmarks.demo import run_demo

    return 0 if run_demo(Path(args.out), coco_root=args.coco_root, device=args.device) else 1


def _runtimes(args: argparse.Namespace) -> None:
    from benchmarks.runtimes import compare_runtimes

    record, table = compare_runtimes(
        args.folder, args.images, args.num_images, tuple(args.threads), args.repeats, args.profile,
        tuple(args.reference_encoder), tuple(args.also),
    )  # fmt: skip
    path = atomic_write_text(Path(args.folder) / "runtimes.json", json.dumps(record, indent=2))
    versions = ", ".join(f"{runtime} {record[runtime]}" for runtime in RUNTIME_NAMES.values() if runtime in record)
    print(f"{record['cpu']}, {record['isa']}; {versions}")
    print(table)
    print(f"record: {path}")


def _export_matrix(args: argparse.Namespace) -> None:
    from benchmarks.export_matrix import run_matrix

    options = ["--alpha-candidates", str(args.alpha_candidates), "--rounds", str(args.rounds)]
    options += ["--runtime", *args.runtime, "--device", str(args.device)]
    matrix, table = run_matrix(args.calib, args.out, args.models, args.num_calib, args.methods, options)
    print(f"{matrix['cpu']}, {matrix['isa']}\n{table}\nrecord: {Path(args.out) / 'matrix.json'}")


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    handlers = {"coco": _coco, "latency": _latency, "everything": _everything, "report": _report, "demo": _demo}
    handlers.update(distill=run_distill_benchmark, runtimes=_runtimes, **{"export-matrix": _export_matrix})
    try:
        return handlers[args.command](args) or 0
    except USER_ERRORS as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
