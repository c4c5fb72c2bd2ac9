"""The one place where the everything-mode settings and their defaults live.

Names follow `segment_anything.SamAutomaticMaskGenerator` where SAM has the setting; the hierarchy
settings are TinySAM's (SPEC section 4): `hierarchical`, `sparse_points_per_side` (default a quarter
of `points_per_side`, i.e. 8x8 = 1/16 of the points) and `high_score_thresh` (a mask *logit*, not an
IoU: pixels above it count as covered), and `reprompt_rule`, which points the second round prompts
(`hierarchical/reprompt.py`: "lattice", SAM's own grid, or "tinysam", TinySAM's published rule,
which fixes the sparse grid at a quarter per side). `decoder_micro_batch` is ours too: how many
prompts the mask decoder takes at a time inside each `points_per_batch` batch (see
`hierarchical/decoder.py`; it changes the speed and the float rounding, not the contract's result);
None picks per device: 4 on a CPU (16 or more on a CPU shared with other jobs), the whole batch on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from hierarchical.decoder import MIN_MICRO_BATCH
from hierarchical.grid import layer_points_per_side
from hierarchical.reprompt import REPROMPT_RULES, TINYSAM_SPARSE_RATIO

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class ConfigError(ValueError):
    """A generator setting out of range, or a name the generator does not know."""


@dataclass
class GeneratorConfig:
    """Settings of `HierarchicalMaskGenerator`; SAM's defaults (tuned for ViT-H) plus TinySAM's."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    output_mode: str = "binary_mask"
    hierarchical: bool = True
    sparse_points_per_side: int | None = None
    high_score_thresh: float = 8.5
    reprompt_rule: str = "lattice"
    decoder_micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.sparse_points_per_side is None:
            self.sparse_points_per_side = max(1, self.points_per_side // 4)
        positive = ("points_per_side", "points_per_batch", "sparse_points_per_side", "crop_n_points_downscale_factor")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        micro_batch = self.decoder_micro_batch
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)):
            raise ConfigError(f"decoder_micro_batch must be an integer or None, got {micro_batch!r}")
        if micro_batch is not None and micro_batch < MIN_MICRO_BATCH:
            raise ConfigError(f"decoder_micro_batch must be >= {MIN_MICRO_BATCH}, got {self.decoder_micro_batch}")
        for name in ("crop_n_layers", "min_mask_region_area"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")
        if not 0.0 <= float(self.crop_overlap_ratio) < 1.0:
            raise ConfigError(f"crop_overlap_ratio must lie in [0, 1), got {self.crop_overlap_ratio!r}")
        if float(self.stability_score_offset) < 0.0:
            raise ConfigError(f"stability_score_offset must be >= 0, got {self.stability_score_offset!r}")
        if self.output_mode not in OUTPUT_MODES:
            raise ConfigError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        if not isinstance(self.hierarchical, bool):
            raise ConfigError(f"hierarchical must be True or False, got {self.hierarchical!r}")
        if self.hierarchical and self.sparse_points_per_side > self.points_per_side:
            raise ConfigError(
                f"sparse_points_per_side ({self.sparse_points_per_side}) must not exceed points_per_side "
                f"({self.points_per_side}): the sparse round is meant to be the cheaper one"
            )
        for layer in range(self.crop_n_layers + 1):
            if self.points_per_side // self.crop_n_points_downscale_factor**layer < 1:
                raise ConfigError(
                    f"crop layer {layer} would get no points: points_per_side={self.points_per_side} divided by "
                    f"crop_n_points_downscale_factor**{layer}={self.crop_n_points_downscale_factor**layer} is below 1"
                )
        if self.reprompt_rule not in REPROMPT_RULES:
            raise ConfigError(f"reprompt_rule must be one of {REPROMPT_RULES}, got {self.reprompt_rule!r}")
        if self.hierarchical and self.reprompt_rule == "tinysam":
            self._check_tinysam_grids()

    def _check_tinysam_grids(self) -> None:
        """TinySAM's offsets cover 4x4 dense points per sparse point: its sparse grid is n // 4 in every layer."""
        if self.sparse_points_per_side != self.points_per_side // TINYSAM_SPARSE_RATIO:
            raise ConfigError(
                f"reprompt_rule='tinysam' prompts a sparse grid of points_per_side // 4 = "
                f"{self.points_per_side // TINYSAM_SPARSE_RATIO} points per side, got sparse_points_per_side="
                f"{self.sparse_points_per_side}"
            )
        sides = layer_points_per_side(self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor)
        for layer, side in enumerate(sides):
            if side < TINYSAM_SPARSE_RATIO:
                raise ConfigError(
                    f"reprompt_rule='tinysam' needs at least 4 points per side in every crop layer; "
                    f"layer {layer} gets {side}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown generator setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def sam_kwargs(self) -> dict[str, Any]:
        """The subset that `segment_anything.SamAutomaticMaskGenerator` accepts, for side-by-side runs."""
        ours = {"hierarchical", "sparse_points_per_side", "high_score_thresh", "reprompt_rule", "decoder_micro_batch"}
        return {k: v for k, v in self.to_dict().items() if k not in ours}
