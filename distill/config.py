"""`DistillConfig`: every knob of a distillation run, checked on creation and saved in every checkpoint.

Defaults follow TinySAM's full-stage recipe (SPEC section 2) where the paper gives a number and are
marked "our choice" where it does not:

- loss weights a/b/c (embedding / decoder tokens / mask outputs) = 1.0 / 1.0 / 0.1 (our choice).
  The paper gives none. The embedding and token L1 terms are of order 0.1-1 on SAM features, while
  mask logits range over +-20, so their L1 is roughly ten times larger; 0.1 brings the three to a
  similar size at the start of training.
- SAM 2: the embedding term is the mean of the L1s of the decoder's three image inputs (the 32x256x256 and
  64x128x128 maps after the teacher's conv_s0/conv_s1 and the 256x64x64 embedding), weighted equally (our
  choice): each L1 is a mean over its own elements, so the three are of one order and none dominates by its
  size, and with weights summing to one the term keeps SAM's scale, so `embedding_weight` means the same for
  both families. The 64x64 level drives the transformer (tokens, IoU), the others only the upscaling; the
  token and output terms already weigh each level by its effect on the masks.
- ground-truth terms off by default (pure distillation, as in TinySAM); when on, focal:dice = 20:1
  (SAM) and an MSE on the predicted IoU.
- hard prompt sampling on, up to 9 extra points (paper), 64 prompts per image (paper), the first
  prompt a noisy GT box with probability 0.5 (SAM's training recipe; our choice for TinySAM).
- mode "gt" (paper: error region of a prediction against the ground truth, the student's by
  default) or "disagreement" (EdgeSAM: student mask vs teacher mask).
- the student's decoder starts from the teacher's and is trained at 0.1x the encoder's lr (our choice:
  at the full lr the first steps pull it away from the teacher it should match).
- AdamW, lr 1e-3 with 250 warm-up steps and cosine decay to 1% (our choice), weight decay 0.01,
  gradient clipping at norm 1.0, 8 epochs (paper), bf16 autocast on CUDA.

Two sets of settings, one rule: without `data` the run uses the generated dataset and, unless models
were named, the tiny test models (``sam_vit_test`` -> ``tinyvit_test``). The CLI then starts from
`DEMO_SETTINGS` (the offline demo: a dozen small steps), with `data` from these defaults (TinySAM's
recipe); in both, a flag the user gives wins. `DistillConfig.demo()` is the demo in the library.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from student_models.families import family_named
from student_models.registry import canonical_name, list_models

PROMPT_MODES = ("gt", "disagreement")
PROMPT_SOURCES = ("student", "teacher")
AMP_DTYPES = ("bf16", "none")

DEMO_TEACHER = "sam_vit_test"
DEMO_STUDENT = "tinyvit_test"
# `python -m distill` without --data (whatever the models): 12 steps of 2 images; measured at 2 min 51 s
# to 5 min 14 s on a shared 2-core CPU (README, "Set up").
DEMO_SETTINGS: dict[str, Any] = dict(
    out="runs/distill_demo",
    num_synthetic=10,
    val_images=2,
    epochs=3,
    batch_size=2,
    prompts_per_image=4,
    max_prompt_iters=2,
    warmup_steps=2,
    lr=2e-3,
    checkpoint_every=4,
    num_workers=0,
    val_prompts_per_image=4,
)


@dataclass
class DistillConfig:
    """A distillation run. Paths are strings so the config round-trips through JSON."""

    # models and data
    teacher: str | None = None  # None: "vit_h", or the tiny test teacher on generated data
    teacher_checkpoint: str | None = None  # path or known name; None = random weights (tests, benchmarks)
    student: str | None = None  # None: "tinyvit_5m", or the tiny test student on generated data
    student_checkpoint: str | None = None  # optional init (e.g. "mobile_sam"); its own decoder is then kept
    data: str | None = None  # COCO root, SA-1B folder or image folder; None = generated shapes
    num_synthetic: int = 16  # images in the generated dataset (data=None)
    max_images: int | None = None  # use only the first N images of the dataset (quick runs, subsets)
    out: str = "runs/distill"
    cache_dir: str | None = None  # teacher-embedding cache; None = <out>/teacher_cache

    # schedule
    epochs: int = 8
    steps: int | None = None  # total optimiser steps; overrides epochs when set
    batch_size: int = 8  # images per step and per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01
    warmup_steps: int = 250
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N; under torchrun cuda/auto = cuda:LOCAL_RANK
    amp: str = "bf16"  # autocast dtype on CUDA; CPU runs always use float32
    deterministic: bool = True  # deterministic kernels: bit-exact resume on CPU (on CUDA: best effort, slower)

    # losses: L = a*emb + b*token + c*sum_i H_i*out_i (+ ground-truth terms)
    embedding_weight: float = 1.0
    # SAM 2 teachers: the embedding term's weight of each level (high_res_feats_0, high_res_feats_1, image_embed);
    # None = equal. Normalised to sum 1.
    level_weights: list[float] | None = None
    token_weight: float = 1.0
    output_weight: float = 0.1
    token_loss: bool = True
    output_loss: bool = True
    hmw: bool = True
    hmw_eps: float = 1e-6
    gt_mask_weight: float = 0.0  # weight of (focal_weight*focal + dice_weight*dice) on the student's mask
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    gt_iou_weight: float = 0.0  # MSE between the student's predicted IoU and its actual IoU with the GT
    train_decoder: bool = True  # the student's mask decoder is trained; its prompt encoder stays frozen
    decoder_lr_scale: float = 0.1  # the decoder starts at the teacher's weights: a smaller lr keeps it there
    freeze_bn: bool = False  # BatchNorm in eval mode; SyncBatchNorm is used instead under DDP on CUDA
    # Images whose prompts go through a decoder in one call (None: the whole batch at once, fastest). With a
    # number, the student decoder's activations are recomputed in backward one call at a time: memory for
    # N x P prompts instead of B x P (about 115 MB per prompt in float32), one more decoder forward per step.
    decoder_images: int | None = None

    # prompts
    hard_prompts: bool = True
    prompt_mode: str = "gt"
    prompt_source: str = "student"  # whose prediction drives mode "gt"
    prompts_per_image: int = 64
    max_prompt_iters: int = 9  # extra points drawn per prompt: k ~ U{0..max_prompt_iters}
    box_prob: float = 0.5  # probability that a prompt starts from a noisy GT box instead of a point
    negative_points: bool = True  # draw negatives from prediction-minus-GT as well
    box_noise_frac: float = 0.1
    box_noise_max: float = 20.0  # pixels in the 1024 frame

    # checkpoints and validation
    checkpoint_every: int = 500
    val_fraction: float = 0.1
    val_images: int | None = None  # held-out images; overrides val_fraction
    val_prompts_per_image: int = 8
    log_every: int = 1  # steps between log records; the loop reads loss and NaN/inf flags from the device only then
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the run already in `out` (otherwise that is refused)
    cache_only: bool = False  # fill the teacher-embedding cache and stop (the separate cache step)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, recorded as given

    def __post_init__(self) -> None:
        demo = self.data is None
        if self.teacher is None:
            self.teacher = DEMO_TEACHER if demo and self.student is None else "vit_h"
        if self.student is None:
            self.student = DEMO_STUDENT if demo and self.teacher == DEMO_TEACHER else "tinyvit_5m"
        for role in ("teacher", "student"):
            try:
                setattr(self, role, canonical_name(getattr(self, role)))
            except KeyError as exc:
                raise ValueError(f"unknown {role} {getattr(self, role)!r}: {exc.args[0].split('; ', 1)[1]}") from None
        teacher_family, student_family = family_named(self.teacher), family_named(self.student)
        if teacher_family != student_family:
            raise ValueError(
                f"teacher {self.teacher} is a {teacher_family.name} model and student {self.student} a "
                f"{student_family.name} one: distil a student of the teacher's family "
                f"({', '.join(list_models(role='student', family=teacher_family.name))})"
            )
        if self.level_weights is not None:
            levels = teacher_family.embedding_names
            if len(self.level_weights) != len(levels) or min(self.level_weights) < 0 or sum(self.level_weights) <= 0:
                raise ValueError(
                    f"level_weights must be {len(levels)} weights >= 0, not all 0, one per embedding level of "
                    f"{self.teacher} ({', '.join(levels)}); got {self.level_weights}"
                )
        self._check_choice("prompt_mode", PROMPT_MODES)
        self._check_choice("prompt_source", PROMPT_SOURCES)
        self._check_choice("amp", AMP_DTYPES)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        positive_ints = ["epochs", "batch_size", "prompts_per_image", "checkpoint_every", "num_synthetic", "log_every"]
        positive_ints += ["val_prompts_per_image"]
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "decoder_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        for name in ("num_workers", "warmup_steps", "max_prompt_iters", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        weights = ["embedding_weight", "token_weight", "output_weight", "gt_mask_weight", "gt_iou_weight"]
        weights += ["focal_weight", "dice_weight", "weight_decay", "box_noise_frac", "box_noise_max"]
        weights += ["decoder_lr_scale"]
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0 <= self.box_prob <= 1:
            raise ValueError(f"box_prob must be in [0, 1], got {self.box_prob}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.val_images is not None and self.val_images < 0:
            raise ValueError(f"val_images must be >= 0, got {self.val_images}")
        if self.hmw_eps <= 0:
            raise ValueError(f"hmw_eps must be > 0, got {self.hmw_eps}")
        if self.embedding_weight == 0 and not self.uses_prompts:
            raise ValueError("every loss is off: set embedding_weight > 0 or enable the token/output/GT losses")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    @property
    def uses_prompts(self) -> bool:
        """True when some loss term needs prompts (and so masks in the data)."""
        return (
            (self.token_loss and self.token_weight > 0)
            or (self.output_loss and self.output_weight > 0)
            or self.gt_mask_weight > 0
            or self.gt_iou_weight > 0
        )

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term in the total (`distill.losses.weighted_total`); other terms are logged only."""
        return {
            "embedding": self.embedding_weight,
            "token": self.token_weight,
            "output": self.output_weight,
            "gt_mask": self.gt_mask_weight,
            "gt_iou": self.gt_iou_weight,
        }

    @property
    def cache_path(self) -> str:
        return self.cache_dir if self.cache_dir is not None else f"{self.out}/teacher_cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def demo(cls, **overrides: Any) -> DistillConfig:
        """The offline demo: generated shapes, tiny models, a few dozen small steps (any field can be overridden)."""
        return cls(**{**DEMO_SETTINGS, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DistillConfig fields: {', '.join(unknown)}")
        return cls(**values)
