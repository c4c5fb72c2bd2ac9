"""CLI: ``python -m distill [--teacher vit_h --teacher-checkpoint sam_vit_h_4b8939 --data DIR ...]``.

One rule picks the settings, and the first line printed says which: without --data it is the
offline demo (generated shapes, the demo's small settings `DEMO_SETTINGS`, the tiny test models
unless others are named); with --data it is TinySAM's recipe (`DistillConfig`'s defaults). Flags
the user gives override either; only those are passed on. Multi-GPU:
``torchrun --nproc_per_node 8 -m distill ...`` (at most one process per GPU; ``--device cpu`` for gloo on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.config import DEMO_SETTINGS, PROMPT_MODES, PROMPT_SOURCES, DistillConfig
from distill.model import DistillError
from distill.train import distill
from student_models import get_spec

MODES = """settings: without --data, the offline demo: generated shapes, sam_vit_test -> tinyvit_test unless
models are named, and small settings ({demo}). With --data, TinySAM's recipe: vit_h -> tinyvit_5m,
8 epochs, batch size 8, 64 prompts per image, 250 warm-up steps. Any flag given overrides either."""


def _demo_settings() -> str:
    shown = ("num_synthetic", "epochs", "batch_size", "prompts_per_image", "warmup_steps", "out")
    return ", ".join(f"--{name.replace('_', '-')} {DEMO_SETTINGS[name]}" for name in shown)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill",
        description="TinySAM full-stage distillation of a SAM student image encoder from a frozen SAM teacher.",
        epilog=MODES.format(demo=_demo_settings()),
    )
    add_settings(parser)
    return parser


def add_settings(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """Add a flag for every DistillConfig setting but those named in `leave_out` (field names).

    A flag not given is absent from the parsed namespace (`config_from_args` passes only what the user set).
    """

    def add(flag: str, **kwargs) -> None:
        if flag.removeprefix("--").replace("-", "_") not in leave_out:
            parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)

    switch = argparse.BooleanOptionalAction
    add("--teacher", help="teacher model name (default vit_h; sam_vit_test for the demo)")
    add("--teacher-checkpoint", help="teacher weights: a path or a known name such as sam_vit_h_4b8939")
    add("--student", help="student model name (default tinyvit_5m)")
    add("--student-checkpoint", help="student init, e.g. mobile_sam (its own decoder is then kept)")
    add("--data", help="COCO root, SA-1B folder or plain image folder (default: generated shapes)")
    add("--num-synthetic", type=int, help="images in the generated dataset when --data is not given")
    add("--max-images", type=int, help="use only the first N images of the dataset")
    add("--out", help="output folder (checkpoints, log.jsonl, student.pt)")
    add("--cache-dir", help="teacher-embedding cache folder (default <out>/teacher_cache)")
    add("--epochs", type=int)
    add("--steps", type=int, help="total optimiser steps (overrides --epochs)")
    add("--batch-size", type=int, help="images per step and per process")
    add("--lr", type=float)
    add("--weight-decay", type=float)
    add("--warmup-steps", type=int)
    add("--grad-clip", type=float)
    add("--seed", type=int)
    add("--num-workers", type=int)
    # Not student_models.device's --device: that resolves "cuda" to one GPU when parsing, while under torchrun
    # each process takes its own (cuda:LOCAL_RANK), decided in distill.runtime.choose_device.
    add(
        "--device",
        help="auto (CUDA when PyTorch sees a GPU, else CPU), cpu, cuda or cuda:N (default auto); under torchrun, "
        "auto and cuda give process r cuda:r, and cpu runs every process on the CPU (gloo)",
    )
    add("--amp", choices=("bf16", "none"), help="autocast dtype on CUDA")
    add("--deterministic", action=switch, help="deterministic kernels (bit-exact resume on CPU; default on)")
    add("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    add("--overwrite", action="store_true", help="start afresh in an --out that holds a run, discarding that run")
    add("--cache-only", action="store_true", help="only fill the teacher-embedding cache (resumable), then stop")
    add("--checkpoint-every", type=int, help="steps between checkpoints")
    add("--embedding-weight", type=float, help="a: weight of the embedding L1")
    add(
        "--level-weights",
        type=float,
        nargs="+",
        metavar="W",
        help="SAM 2 teachers: the embedding L1's weight of each level (high_res_feats_0 high_res_feats_1 "
        "image_embed; default equal)",
    )
    add("--token-weight", type=float, help="b: weight of the decoder-token L1")
    add("--output-weight", type=float, help="c: weight of the mask-output L1")
    add("--gt-mask-weight", type=float, help="weight of the GT focal+dice (20:1) term (default 0: off)")
    add("--gt-iou-weight", type=float, help="weight of the GT IoU-prediction MSE (default 0: off)")
    add("--token-loss", action=switch, help="decoder-token loss")
    add("--output-loss", action=switch, help="mask-output loss")
    add("--hmw", action=switch, help="hard mask weighting on the output loss")
    add("--hard-prompts", action=switch, help="iterative hard prompt sampling (off: one box or point)")
    add("--train-decoder", action=switch, help="train the student's mask decoder")
    add("--decoder-lr-scale", type=float, help="decoder lr = this x --lr (default 0.1)")
    add("--prompt-mode", choices=PROMPT_MODES, help="gt: error vs ground truth (TinySAM); disagreement: EdgeSAM")
    add("--prompt-source", choices=PROMPT_SOURCES, help="whose prediction drives --prompt-mode gt")
    add("--prompts-per-image", type=int)
    add("--max-prompt-iters", type=int, help="k ~ U{0..this} corrective points (paper: 9)")
    add("--val-images", type=int, help="held-out images for the student's fidelity to the teacher")
    add("--val-fraction", type=float)
    add("--val-prompts-per-image", type=int)
    add("--freeze-bn", action=switch, help="keep the student's BatchNorm statistics fixed (small per-GPU batches)")
    add(
        "--decoder-images",
        type=int,
        help="images whose prompts go through a decoder in one call (default: the whole batch); with N, the "
        "student decoder is recomputed in backward: memory for N x P prompts, ~115 MB each in float32",
    )
    add(
        "--log-every",
        type=int,
        help="steps between log records (default 1); the host waits for the GPU only at these, checkpoint and "
        "validation steps, where a NaN/inf loss is also caught",
    )


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The one rule: without --data the demo's settings, with it the recipe's; the flags given override either."""
    values = {key.replace("-", "_"): value for key, value in vars(args).items()}
    return DistillConfig.demo(**values) if "data" not in values else DistillConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    config = None
    try:
        config = config_from_args(args)
        if config.data is None:
            print(f"demo mode (no --data): generated shapes, small settings ({_demo_settings()}); flags override them")
        else:
            print("full recipe (--data given): TinySAM's settings; flags override them")
        if config.teacher_checkpoint is None and get_spec(config.teacher).role != "test":
            print(
                f"WARNING: no --teacher-checkpoint: the teacher {config.teacher} has RANDOM weights, so the student "
                f"learns to copy noise (a pipeline check only). Pass e.g. --teacher-checkpoint sam_vit_h_4b8939.",
                file=sys.stderr,
            )
        distill(config)
    except (DistillError, ValueError, RuntimeError, OSError) as exc:  # OSError: a full disk, a folder gone
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = _what_was_kept(Path(config.out)) if config else "nothing was started"
        print(f"interrupted: {kept}", file=sys.stderr)
        return 130  # the shell's code for a program stopped by SIGINT
    return 0


def _what_was_kept(out: Path) -> str:
    """One line on what an interrupted run leaves in `out` and how to go on (checkpoints are written whole)."""
    last = out / "checkpoints" / "last.pt"
    if last.is_file():
        return f"the last checkpoint is kept in {last}; run the same command with --resume to continue from it"
    return f"no checkpoint was written yet to {out}; run the same command again to start over"


if __name__ == "__main__":
    sys.exit(main())
