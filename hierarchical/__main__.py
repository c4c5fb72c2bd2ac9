"""CLI: ``python -m hierarchical IMAGE_OR_FOLDER [...] --model NAME --checkpoint PATH --out DIR [--mode dense]``.

Writes per image <stem>.json (COCO-RLE masks, config, timing), <stem>.png (overlay) and a line in
timings.txt. With --compare it instead runs SAM's generator, our dense mode and our hierarchical
mode (with --reprompt-rule's rule) on the images and writes compare.json (flat records) and
compare.md (the table); `python -m benchmarks everything` compares both rules. Only the settings
given are passed on; defaults live in `GeneratorConfig`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hierarchical.compare import compare_generators, comparison_table, summarize_comparison
from hierarchical.config import ConfigError, GeneratorConfig
from hierarchical.generator import HierarchicalMaskGenerator
from hierarchical.reprompt import REPROMPT_RULES
from hierarchical.runner import collect_images, segment_files
from student_models import CheckpointError, build_sam
from student_models.device import add_device_argument
from student_models.io import atomic_write_text, writable_folder
from student_models.preprocessing import ImageError

_SETTINGS = {
    "points_per_side": int,
    "points_per_batch": int,
    "pred_iou_thresh": float,
    "stability_score_thresh": float,
    "stability_score_offset": float,
    "box_nms_thresh": float,
    "crop_n_layers": int,
    "crop_nms_thresh": float,
    "crop_overlap_ratio": float,
    "crop_n_points_downscale_factor": int,
    "min_mask_region_area": int,
    "sparse_points_per_side": int,
    "high_score_thresh": float,
    "reprompt_rule": str,
    "decoder_micro_batch": int,
}
_CHOICES = {"reprompt_rule": REPROMPT_RULES}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hierarchical",
        description="Segment everything with a SAM-family model (TinySAM hierarchical or SAM-identical dense mode).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--model", default="tinyvit_5m", help="registered model name (default tinyvit_5m)")
    parser.add_argument("--checkpoint", default=None, help="weights file or known checkpoint name (default: random)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=("hierarchical", "dense"), default="hierarchical")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when no --checkpoint is given")
    parser.add_argument("--compare", action="store_true", default=False, help="benchmark SAM vs dense vs hierarchical")
    for name, kind in _SETTINGS.items():
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=kind, choices=_CHOICES.get(name), help=f"GeneratorConfig.{name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(get_parser().parse_args(argv))
    settings = {name: args[name] for name in _SETTINGS if name in args}
    try:
        config = GeneratorConfig(**settings, hierarchical=args["mode"] == "hierarchical", output_mode="coco_rle")
        paths = collect_images(args["inputs"])
        if args["limit"] is not None:
            paths = paths[: args["limit"]]
        out_dir = writable_folder(args["out"])  # before the model is built: a bad --out fails at once
        if args["threads"] is not None:
            torch.set_num_threads(args["threads"])
        if args["checkpoint"] is None:
            print(f"note: no --checkpoint, {args['model']} has random weights (seed {args['seed']})", file=sys.stderr)
        torch.manual_seed(args["seed"])  # random weights, and so coverage and timings, repeat from run to run
        model = build_sam(args["model"], checkpoint=args["checkpoint"]).to(args["device"])
    except (ConfigError, ImageError, CheckpointError, KeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(args, model, config, paths, out_dir)
    except OSError as exc:  # e.g. the disk filled up: the files written so far are whole (atomic writes)
        print(f"error: cannot write the results to {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _run(args: dict, model: torch.nn.Module, config: GeneratorConfig, paths: list[Path], out_dir: Path) -> int:
    if args["compare"]:
        try:
            records = compare_generators(
                model, paths, config, methods=("sam", "dense", f"hierarchical-{config.reprompt_rule}")
            )
        except ConfigError as exc:  # the hierarchical method's settings, when --mode dense skipped their check
            print(f"error: {exc}", file=sys.stderr)
            return 1
        summary = summarize_comparison(records)
        atomic_write_text(out_dir / "compare.json", json.dumps({"summary": summary, "records": records}, indent=1))
        table = comparison_table(summary)
        atomic_write_text(out_dir / "compare.md", table + "\n")
        print(table)
        print({k: round(v, 3) for k, v in summary.items() if k.startswith("speedup")})
        print(f"records in {out_dir / 'compare.json'}, table in {out_dir / 'compare.md'}")
        return 0
    summary = segment_files(HierarchicalMaskGenerator(model, config, progress=True), paths, out_dir)
    print(summary.text())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
