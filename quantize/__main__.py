"""CLI: quantize a SAM model, save it, export it to ONNX and summarise.

    python -m quantize --model tinyvit_5m --checkpoint student.pt --w-bits 8 --a-bits 8 \\
        --calib ../shared/data/coco_val2017_tiny --out runs/q8

Calibration, the scale search and the fidelity summary run on `--device` (a GPU when present);
the ONNX export and its ONNX Runtime check run on a CPU copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from quantize.calibration import box_prompt_loop, prepare_calibration
from quantize.checkpoint import save_quantized
from quantize.config import SEARCH_METHODS, PTQConfig
from quantize.executorch_runtime import export_executorch, require_executorch
from quantize.fidelity import fidelity, run_model
from quantize.onnx_export import ExportCheckError, export_onnx
from quantize.openvino_runtime import export_openvino, require_openvino
from quantize.ptq import quantize_
from student_models import CheckpointError, build_sam
from student_models.data import DatasetError, open_dataset
from student_models.device import add_device_argument
from student_models.extras import MissingExtraError
from student_models.families import family_of
from student_models.io import atomic_write_text, writable_folder
from student_models.preprocessing import ImageError
from student_models.registry import canonical_name

# What a user can get wrong: shown as one "error:" line, exit 1.
USER_ERRORS = (
    ValueError, KeyError, CheckpointError, DatasetError, ImageError, ExportCheckError, MissingExtraError, OSError,
)  # fmt: skip
RUNTIMES = ("ort", "openvino", "executorch")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantize", description="Post-training quantization of a SAM model."
    )
    parser.add_argument("--model", default="tinyvit_test", help="student_models name (default: tinyvit_test)")
    parser.add_argument("--checkpoint", default=None, help="float checkpoint (default: random weights)")
    parser.add_argument("--calib", default=None, help="calibration data for open_dataset (default: synthetic)")
    parser.add_argument("--out", default="runs/quantize", help="output folder")
    bits = "2..16 (default 8; 8 and 6 are the tested widths; the INT8 ONNX export needs <= 8)"
    parser.add_argument("--w-bits", type=int, default=None, help=f"weight bits: {bits}")
    parser.add_argument("--a-bits", type=int, default=None, help=f"activation bits: {bits}")
    parser.add_argument("--method", choices=SEARCH_METHODS, default=None)
    parser.add_argument("--alpha-candidates", type=int, default=None, help="candidates per scale search")
    parser.add_argument("--rounds", type=int, default=None, help="alternating weight/activation rounds")
    parser.add_argument("--keep-float", nargs="+", default=None, metavar="PATTERN", help="fnmatch layer patterns")
    parser.add_argument("--num-calib", type=int, default=None)
    parser.add_argument("--max-prompts", type=int, default=None, help="box prompts per calibration image")
    parser.add_argument("--num-eval", type=int, default=2, help="held-out images for the fidelity summary")
    parser.add_argument("--no-twin", action="store_true", help="plain uniform quantization everywhere")
    parser.add_argument(
        "--twin-convs", action="store_true", help="twin-uniform post-GELU inputs of convolutions too (slower in ORT)"
    )
    parser.add_argument(
        "--no-conv-outputs", action="store_true", help="leave convolution outputs unquantized (float Conv in ONNX)"
    )
    parser.add_argument(
        "--product-outputs", action="store_true",
        help="quantize the outputs of Linear layers too, so that XNNPACK (--runtime executorch) runs them on int8 "
        "kernels (one more rounding per layer)",
    )  # fmt: skip
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument(
        "--runtime", nargs="+", choices=RUNTIMES, default=["ort"],
        help="runtimes to export for and check in (default: ort; openvino also writes OpenVINO IR, the "
        "openvino extra; executorch .pte programs lowered to XNNPACK, the executorch extra)",
    )  # fmt: skip
    add_device_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PTQConfig:
    """A PTQConfig with the dataclass defaults, overridden only where the user set a flag."""
    given = {
        "w_bits": args.w_bits, "a_bits": args.a_bits, "method": args.method, "num_alphas": args.alpha_candidates,
        "rounds": args.rounds, "keep_float": args.keep_float, "num_calib": args.num_calib,
        "max_prompts": args.max_prompts,
    }  # fmt: skip
    overrides = {key: value for key, value in given.items() if value is not None}
    if args.no_twin:
        overrides.update(twin_softmax=False, twin_gelu=False)
    if args.twin_convs:
        overrides.update(twin_convs=True)
    if args.no_conv_outputs:
        overrides.update(conv_outputs=False)
    if args.product_outputs:
        overrides.update(product_outputs=True)
    return PTQConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted: {args.out} keeps only files that were complete (each is written whole, an export only"
            " once its checks pass); quantization does not resume: run the same command again",
            file=sys.stderr,
        )
        return 130  # the shell's code for a program stopped by SIGINT


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if "openvino" in args.runtime:
        if args.no_export:
            raise ValueError("--runtime openvino converts the exported ONNX files: drop --no-export")
        require_openvino()
    if "executorch" in args.runtime:
        if args.no_export:
            raise ValueError("--runtime executorch exports the quantized model: drop --no-export")
        require_executorch()
    out = writable_folder(Path(args.out))
    if args.checkpoint is None:
        print(f"WARNING: no --checkpoint: quantizing {args.model} with RANDOM weights (a pipeline demo only)")
    torch.manual_seed(0)
    sam = build_sam(args.model, args.checkpoint).to(args.device)
    family = family_of(sam)
    # A copy, not a second build: without a checkpoint a second build would draw other random weights.
    float_model = family.backend(copy.deepcopy(sam), args.device) if args.num_eval else None
    dataset = open_dataset(args.calib)
    samples = [s for s in (dataset[i] for i in range(min(len(dataset), config.num_calib + args.num_eval))) if s]
    if not samples:
        raise DatasetError(f"no readable calibration image in {args.calib or 'the synthetic set'}")
    start = time.time()
    calibration = prepare_calibration(
        samples[: config.num_calib], config.num_calib, config.max_prompts, config.seed, family.name
    )
    report = quantize_(sam, config, box_prompt_loop(calibration), model_name=args.model)
    summary = {
        "model": canonical_name(args.model),
        "checkpoint": args.checkpoint,
        "calibration": f"{dataset.kind}: {args.calib or 'synthetic'}",
        "device": str(args.device),
        "config": config.to_dict(),
        "quantize_seconds": round(time.time() - start, 1),
        "report": report.summary(),
    }
    checkpoint = save_quantized(sam, out / "quantized.pt", meta={"source_checkpoint": args.checkpoint})
    summary["quantized_checkpoint"] = {"path": str(checkpoint), "mb": round(checkpoint.stat().st_size / 2**20, 2)}
    held_out = samples[config.num_calib :]
    if float_model is not None and held_out:
        items = prepare_calibration(held_out, len(held_out), config.max_prompts, seed=1, family=family.name)
        summary["fidelity_vs_float"] = {
            "images": len(items),
            **fidelity(run_model(float_model, items), run_model(family.backend(sam, args.device), items)),
        }
    if not args.no_export:
        summary["export"] = {}
        for precision in ("float32", "int8") if max(config.w_bits, config.a_bits) <= 8 else ("float32",):
            result = export_onnx(sam, out / precision, precision)
            summary["export"][precision] = {
                "files": result.files,
                "sizes_mb": result.sizes_mb,
                "checks": [c.__dict__ for c in result.checks],
                "int8_layers": len(result.int8_layers),
                "simulated_layers": result.simulated_layers,
            }
            if "openvino" in args.runtime:
                refused = None
                try:
                    checks = export_openvino(sam, out / precision, precision)
                except ExportCheckError as exc:
                    refused, checks = exc, exc.checks
                summary["export"][precision]["openvino"] = {
                    "version": require_openvino(),
                    "files": [] if refused else [str(out / precision / check.file) for check in checks],
                    "checks": [check.__dict__ for check in checks],
                }
                if refused:  # what passed stays usable and recorded
                    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
                    raise ExportCheckError(
                        f"{refused} The ONNX Runtime files in {out / precision} passed their checks and are kept; "
                        f"every check's figures are in {out / 'summary.json'}. docs/quantize.md says what the "
                        "OpenVINO check compares."
                    ) from refused
            if "executorch" in args.runtime:
                checks = export_executorch(sam, out / precision, precision)
                summary["export"][precision]["executorch"] = {
                    "version": require_executorch(),
                    "files": [str(out / precision / check.file) for check in checks],
                    "checks": [check.__dict__ for check in checks],
                }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "export")}, indent=2))
    exported = ", ".join(str(out / precision) for precision in summary.get("export", {}))
    kinds = " and ".join(
        kind for runtime, kind in (("ort", "ONNX"), ("openvino", "OpenVINO IR"), ("executorch", "ExecuTorch"))
        if runtime == "ort" or runtime in args.runtime
    )  # fmt: skip
    onnx_files = f"{kinds} files under {exported}, " if exported else ""
    print(f"wrote {checkpoint}, {onnx_files}summary {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
