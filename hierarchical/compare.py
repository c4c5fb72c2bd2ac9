"""Side-by-side benchmark: SAM's automatic mask generator vs our dense mode vs our hierarchical mode
under each re-prompt rule ("hierarchical-lattice", "hierarchical-tinysam").

`compare_generators(model, images, config)` runs them on each image with the same model and
settings and returns flat records (one per image and method) for `benchmarks` to render; the
`summarize_comparison` of those records gives the per-method means and the ratios of one run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from tqdm import tqdm

from hierarchical.agreement import Agreement, agreement_with_sam
from hierarchical.config import GeneratorConfig
from hierarchical.decoder import SharedImageDecoder
from hierarchical.generator import HierarchicalMaskGenerator, clock
from hierarchical.reprompt import REPROMPT_RULES
from student_models.preprocessing import load_image, to_rgb

HIERARCHICAL_METHODS = tuple(f"hierarchical-{rule}" for rule in REPROMPT_RULES)
METHODS = ("sam", "dense", *HIERARCHICAL_METHODS)
# A dense mask counts as found when the hierarchical mode returns a mask this close to it.
RECALL_IOU = 0.9
# The counts of `Agreement` that add up over images.
AGREEMENT_COUNTS = tuple(f.name for f in fields(Agreement) if f.type == "int")


class _ModuleTimer:
    """Adds up the seconds spent in one module's forward, via hooks (SAM's generator has no timers)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self._device = device
        self._handles = [
            module.register_forward_pre_hook(lambda *_: self._begin()),
            module.register_forward_hook(lambda *_: self._end()),
        ]

    def _begin(self) -> None:
        self._start = clock(self._device)

    def _end(self) -> None:
        self.seconds += clock(self._device) - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _run_sam(model: Sam, config: GeneratorConfig, image: np.ndarray) -> tuple[list[dict], dict[str, Any]]:
    generator = SamAutomaticMaskGenerator(model, **config.sam_kwargs())
    encoder, decoder = _ModuleTimer(model.image_encoder, model.device), _ModuleTimer(model.mask_decoder, model.device)
    try:
        start = clock(model.device)
        records = generator.generate(image)
        total = clock(model.device) - start
    finally:
        encoder.remove()
        decoder.remove()
    points = sum(len(grid) for grid in generator.point_grids) if config.crop_n_layers == 0 else None
    timing = {
        "seconds": total,
        "encoder_s": encoder.seconds,
        "decoder_s": decoder.seconds,
        "postprocess_s": total - encoder.seconds - decoder.seconds,
        "points_prompted": points,
    }
    return records, timing


def _run_ours(model: Sam, config: GeneratorConfig, image: np.ndarray) -> tuple[list[dict], dict[str, Any]]:
    generator = HierarchicalMaskGenerator(model, config)
    start = clock(model.device)
    records = generator.generate(image)
    total = clock(model.device) - start
    timing = generator.last_timing
    return records, {
        "seconds": total,
        "encoder_s": timing.encoder_s,
        "decoder_s": timing.decoder_s,
        "postprocess_s": total - timing.encoder_s - timing.decoder_s,
        "points_prompted": timing.points_prompted,
    }


def matched_mask_iou(reference: list[dict], candidate: list[dict]) -> dict[str, float | None]:
    """How well `candidate` masks match `reference` masks (both with COCO-RLE segmentations).

    Each reference mask is matched to the candidate mask of highest IoU (a candidate may serve
    several). Returns the mean of those IoUs (`miou`, None without reference masks; 0 where the
    candidate has none) and the fraction of reference masks matched at IoU >= 0.9 (`recall90`).
    """
    if not reference:
        return {"miou": None, "recall90": None}
    if not candidate:
        return {"miou": 0.0, "recall90": 0.0}
    ref_rles = [r["segmentation"] for r in reference]
    cand_rles = [c["segmentation"] for c in candidate]
    ious = np.asarray(mask_utils.iou(ref_rles, cand_rles, [0] * len(cand_rles))).reshape(len(ref_rles), -1)
    best = ious.max(axis=1)
    return {"miou": float(best.mean()), "recall90": float((best >= RECALL_IOU).mean())}


@torch.no_grad()
def warm_up(model: Sam) -> None:
    """One untimed encoder pass and one call of SAM's decoder and of ours, so no method pays first-call
    set-up costs."""
    size, device = model.image_encoder.img_size, model.device
    embedding = model.image_encoder(torch.zeros(1, 3, size, size, device=device))
    points = (torch.zeros(2, 1, 2, device=device), torch.ones(2, 1, device=device))
    sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
    image_pe = model.prompt_encoder.get_dense_pe()
    model.mask_decoder(
        image_embeddings=embedding,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    SharedImageDecoder(model.mask_decoder, embedding, image_pe, dense[:1]).decode(sparse, 0.0)


def compare_generators(
    model: Sam,
    images: Iterable[np.ndarray | str | os.PathLike],
    config: GeneratorConfig | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
    ground_truth: Sequence[list[dict]] | None = None,
) -> list[dict[str, Any]]:
    """Run SAM's generator, our dense mode and our hierarchical mode on each image.

    Args:
        model: any SAM-family model (eval mode).
        images: HxWx3 uint8 arrays or image paths.
        config: shared settings; `hierarchical` and `reprompt_rule` are set per method and
            `output_mode` forced to "coco_rle" (so masks compare cheaply). Default:
            `GeneratorConfig()` (the paper's).
        methods: a subset of `METHODS`, run in that order per image.
        ground_truth: per image, its annotated instance masks as records with a COCO-RLE
            "segmentation" (e.g. COCO's non-crowd annotations); then every record also gets
            `gt_instances` and `miou_vs_gt`, the mean over those instances of the best IoU with
            any returned mask (class-agnostic).

    Returns:
        One flat record per image and method: image, method, seconds, encoder_s, decoder_s,
        postprocess_s, points_prompted, masks, the config as a dict; "dense" records carry
        `agrees_with_sam` and `agreement_with_sam` (`hierarchical.agreement`'s contract and its
        counts of records and pixels, when SAM ran), hierarchical records `miou_vs_dense` and
        `recall90_vs_dense` (when dense ran).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    base = replace(config or GeneratorConfig(), output_mode="coco_rle")
    # Every method's settings are checked before any image is run.
    configs = {"sam": replace(base, hierarchical=False), "dense": replace(base, hierarchical=False)}
    for method in HIERARCHICAL_METHODS:
        if method in methods:
            configs[method] = replace(base, hierarchical=True, reprompt_rule=method.removeprefix("hierarchical-"))
    images = list(images)
    if ground_truth is not None and len(ground_truth) != len(images):
        raise ValueError(f"ground_truth has {len(ground_truth)} entries for {len(images)} images")
    warm_up(model)
    records: list[dict[str, Any]] = []
    for index, item in enumerate(tqdm(images, desc="compare", disable=not progress)):
        name = str(item) if isinstance(item, str | os.PathLike) else f"image_{index}"
        image = load_image(item) if isinstance(item, str | os.PathLike) else to_rgb(item)
        outputs: dict[str, list[dict]] = {}
        for method in (m for m in METHODS if m in methods):
            cfg = configs[method]
            masks, timing = (_run_sam if method == "sam" else _run_ours)(model, cfg, image)
            outputs[method] = masks
            record = {"image": name, "method": method, **timing, "masks": len(masks), "config": cfg.to_dict()}
            if method == "dense" and "sam" in outputs:
                agreement = agreement_with_sam(model, image, outputs["sam"], masks, cfg)
                record["agrees_with_sam"] = agreement.holds
                record["agreement_with_sam"] = agreement.to_dict()
            if method in HIERARCHICAL_METHODS and "dense" in outputs:
                match = matched_mask_iou(outputs["dense"], masks)
                record["miou_vs_dense"] = match["miou"]
                record["recall90_vs_dense"] = match["recall90"]
            if ground_truth is not None:
                record["gt_instances"] = len(ground_truth[index])
                record["miou_vs_gt"] = matched_mask_iou(ground_truth[index], masks)["miou"]
            records.append(record)
    return records


def summarize_comparison(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method means over images (seconds, time split, points, masks) and the speed-ups of one run."""
    summary: dict[str, Any] = {"images": len({r["image"] for r in records}), "methods": {}}
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        entry = {
            key: float(np.mean([r[key] for r in rows]))
            for key in ("seconds", "encoder_s", "decoder_s", "postprocess_s", "masks")
        }
        points = [r["points_prompted"] for r in rows if r["points_prompted"] is not None]
        entry["points_prompted"] = float(np.mean(points)) if points else None
        if method == "dense" and "agrees_with_sam" in rows[0]:
            entry["agrees_with_sam"] = f"{sum(r['agrees_with_sam'] for r in rows)}/{len(rows)}"
            counts = [r["agreement_with_sam"] for r in rows]
            entry["agreement_with_sam"] = {key: sum(c[key] for c in counts) for key in AGREEMENT_COUNTS}
            entry["agreement_with_sam"]["violations"] = sum(len(c["violations"]) for c in counts)
        if method in HIERARCHICAL_METHODS and "miou_vs_dense" in rows[0]:
            scored = [r for r in rows if r["miou_vs_dense"] is not None]
            for key in ("miou_vs_dense", "recall90_vs_dense"):
                entry[key] = float(np.mean([r[key] for r in scored])) if scored else None
            entry["images_with_dense_masks"] = len(scored)
        if "miou_vs_gt" in rows[0]:
            # pooled over instances, so that every annotated object weighs the same
            scored = [r for r in rows if r["gt_instances"]]
            instances = sum(r["gt_instances"] for r in scored)
            entry["miou_vs_gt"] = (
                sum(r["miou_vs_gt"] * r["gt_instances"] for r in scored) / instances if scored else None
            )
        summary["methods"][method] = entry
    methods = summary["methods"]
    pairs = [("sam", "dense")] + [(slow, fast) for fast in HIERARCHICAL_METHODS for slow in ("dense", "sam")]
    for slow, fast in pairs:
        if slow in methods and fast in methods:
            summary[f"speedup_{fast}_vs_{slow}"] = methods[slow]["seconds"] / methods[fast]["seconds"]
    return summary


def comparison_table(summary: dict[str, Any]) -> str:
    """Markdown table of `summarize_comparison`'s per-method means."""
    lines = [
        "| method | s / image | encoder s | decoder s | post-proc. s | points prompted | masks "
        "| agreement with SAM / match with dense | mIoU vs GT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in summary["methods"].items():
        if "agrees_with_sam" in entry:
            counts = entry["agreement_with_sam"]
            versus = (
                f"SAM's records under the contract on {entry['agrees_with_sam']} images: "
                f"{counts['records_equal']} equal, {counts['records_borderline']} borderline, "
                f"{counts['unpaired_borderline']} unpaired at a threshold, {counts['violations']} violations; "
                f"{counts['pixels_differing']} of {counts['pixels_compared']} pixels differ"
            )
        elif entry.get("miou_vs_dense") is not None:
            versus = (
                f"vs dense: mIoU {entry['miou_vs_dense']:.3f}, recall@{RECALL_IOU} {entry['recall90_vs_dense']:.3f} "
                f"({entry['images_with_dense_masks']} images)"
            )
        else:
            versus = ""
        points = "" if entry["points_prompted"] is None else f"{entry['points_prompted']:.1f}"
        gt = "" if entry.get("miou_vs_gt") is None else f"{entry['miou_vs_gt']:.3f}"
        lines.append(
            f"| {method} | {entry['seconds']:.2f} | {entry['encoder_s']:.2f} | {entry['decoder_s']:.2f} | "
            f"{entry['postprocess_s']:.2f} | {points} | {entry['masks']:.1f} | {versus} | {gt} |"
        )
    return "\n".join(lines)
