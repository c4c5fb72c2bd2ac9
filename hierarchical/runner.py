"""Segment-everything over image files: per image a COCO-RLE JSON, an overlay PNG and a timing line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from hierarchical.generator import HierarchicalMaskGenerator
from hierarchical.overlay import render_overlay
from student_models.io import atomic_write, atomic_write_text, writable_folder
from student_models.preprocessing import ImageError, list_image_files, load_image


@dataclass
class RunSummary:
    """What a run over files produced: written files per image, failures (path -> message, which
    names the path), images where no mask was found, timings."""

    out_dir: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    without_masks: list[str] = field(default_factory=list)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"{len(self.outputs)} image(s) segmented, {len(self.failures)} failed; results in {self.out_dir}"]
        if self.timings:
            mean_total = np.mean([t["total_s"] for t in self.timings.values()])
            mean_points = np.mean([t["points_prompted"] for t in self.timings.values()])
            lines.append(f"mean {mean_total:.3f} s per image, {mean_points:.0f} points prompted per image")
        if self.without_masks:
            names = ", ".join(Path(path).name for path in self.without_masks)
            lines.append(f"no masks found in {len(self.without_masks)} image(s): {names}")
        lines += [f"failed: {message}" for message in self.failures.values()]
        return "\n".join(lines)


def no_masks_line(name: str, generator: HierarchicalMaskGenerator) -> str:
    """Why an image came out empty, and what to try."""
    cfg, points = generator.config, generator.last_timing.points_prompted
    return (
        f"{name}: no masks found: none of the masks of {points} prompted points passed pred_iou_thresh="
        f"{cfg.pred_iou_thresh} and stability_score_thresh={cfg.stability_score_thresh} (a trained --checkpoint, "
        "or lower thresholds, finds more)"
    )


def collect_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Image paths from files and folders (a folder contributes its image files, sorted by name)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = list_image_files(item)
            if not found:
                raise ImageError(f"{item}: folder holds no image files")
            paths.extend(found)
        elif item.exists():
            paths.append(item)
        else:
            raise ImageError(f"{item}: no such file or folder")
    if not paths:
        raise ImageError("no input images given")
    return paths


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def segment_files(
    generator: HierarchicalMaskGenerator, paths: list[Path], out_dir: str | os.PathLike, progress: bool = True
) -> RunSummary:
    """Run `generator` on each image file; write <stem>.json (records with COCO-RLE masks and the
    timing), <stem>.png (overlay) and one line per image in timings.txt. Unreadable images are
    recorded as failures and skipped. The generator must have output_mode="coco_rle".

    Every file is written atomically (a kill or a full disk leaves the earlier file or none, never
    half of one); timings.txt is rewritten whole after each image, so it always lists the images done.
    """
    if generator.config.output_mode != "coco_rle":
        raise ValueError("segment_files writes COCO RLE: build the generator with output_mode='coco_rle'")
    out_dir = writable_folder(out_dir)
    summary = RunSummary(out_dir)
    used: set[str] = set()
    timing_lines: list[str] = []
    for path in tqdm(paths, desc="segment", unit="image", disable=not progress):
        try:
            image = load_image(path)
        except ImageError as exc:
            summary.failures[str(path)] = str(exc)
            continue
        records = generator.generate(image)
        timing = generator.last_timing
        stem = _unique_stem(path, used)
        json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
        payload = {
            "image": str(path),
            "height": image.shape[0],
            "width": image.shape[1],
            "config": generator.config.to_dict(),
            "timing": timing.to_dict(),
            "annotations": records,
        }
        atomic_write_text(json_path, json.dumps(payload))
        masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
        with atomic_write(png_path, "wb") as png_file:
            Image.fromarray(render_overlay(image, masks)).save(png_file, format="PNG")
        timing_lines.append(f"{path.name}: {timing.line()}\n")
        atomic_write_text(out_dir / "timings.txt", "".join(timing_lines))
        tqdm.write(f"{path.name}: {timing.line()}")
        if not records:
            summary.without_masks.append(str(path))
            tqdm.write(no_masks_line(path.name, generator))
        summary.outputs[str(path)] = {"json": str(json_path), "overlay": str(png_path)}
        summary.timings[str(path)] = timing.to_dict()
    return summary
