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
from student_models.preprocessing import ImageError, list_image_files, load_image


@dataclass
class RunSummary:
    """What a run over files produced: written files per image, failures (path -> message), timings."""

    out_dir: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"{len(self.outputs)} image(s) segmented, {len(self.failures)} failed; results in {self.out_dir}"]
        if self.timings:
            mean_total = np.mean([t["total_s"] for t in self.timings.values()])
            mean_points = np.mean([t["points_prompted"] for t in self.timings.values()])
            lines.append(f"mean {mean_total:.3f} s per image, {mean_points:.0f} points prompted per image")
        lines += [f"failed: {path}: {message}" for path, message in self.failures.items()]
        return "\n".join(lines)


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
    recorded as failures and skipped. The generator must have output_mode="coco_rle"."""
    if generator.config.output_mode != "coco_rle":
        raise ValueError("segment_files writes COCO RLE: build the generator with output_mode='coco_rle'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out_dir)
    used: set[str] = set()
    with open(out_dir / "timings.txt", "w") as timing_file:
        for path in tqdm(paths, desc="segment", disable=not progress):
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
            json_path.write_text(json.dumps(payload))
            masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
            Image.fromarray(render_overlay(image, masks)).save(png_path)
            timing_file.write(f"{path.name}: {timing.line()}\n")
            if progress:
                tqdm.write(f"{path.name}: {timing.line()}")
            summary.outputs[str(path)] = {"json": str(json_path), "overlay": str(png_path)}
            summary.timings[str(path)] = timing.to_dict()
    return summary
