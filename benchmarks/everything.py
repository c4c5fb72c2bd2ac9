"""Everything mode: SAM's automatic mask generator vs the hierarchical stage's dense mode and its
hierarchical mode under each re-prompt rule, measured by `hierarchical.compare.compare_generators`
on the same images in one run and kept as records.

Each (image, method) becomes one "everything" record: seconds per image and their split
(encoder, decoder, post-processing), points prompted, masks kept, and the agreement figures
(dense identical to SAM; per rule, the mean best-match IoU of dense mode's masks and their recall
at IoU >= 0.9).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.records import git_commit, make_record, write_records
from benchmarks.runs import LoadedModel, stage_api
from student_models.preprocessing import list_image_files
from student_models.synthetic import synthetic_sample

SYNTHETIC_SIZE = (480, 640)  # the generated image when no folder is given


def everything_images(images: str | os.PathLike | None, max_images: int | None = None) -> list:
    """Image paths in a folder (sorted, first ``max_images``), or one generated HxWx3 image."""
    if images is None:
        return [synthetic_sample(7, SYNTHETIC_SIZE)[0]]
    files = list_image_files(images) if Path(images).is_dir() else []
    if not files:
        raise FileNotFoundError(f"{images}: no image files found (looked for .jpg, .png, ...)")
    return files[:max_images]


def run_everything(
    target: LoadedModel,
    *,
    out_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    max_images: int | None = None,
    generator_options: dict[str, Any] | None = None,
    methods: tuple[str, ...] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Path]:
    """Compare the everything-mode generators on ``images``; one record per image and method.

    ``generator_options`` are `hierarchical.GeneratorConfig` fields (default: the paper's 32x32
    grid with a sparse 8x8 first round); ``methods`` a subset of `hierarchical.compare.METHODS`
    ("sam", "dense", "hierarchical-lattice", "hierarchical-tinysam"; default all).
    """
    compare_generators, methods_all = stage_api("hierarchical.compare", "compare_generators", "METHODS")
    GeneratorConfig = stage_api("hierarchical", "GeneratorConfig")
    loaded = target
    git_commit()  # pinned before measuring
    config = GeneratorConfig.from_dict(generator_options or {})
    results = compare_generators(
        loaded.sam, everything_images(images, max_images), config, methods=methods or methods_all, progress=progress
    )
    records = []
    for result in results:
        figures = {k: v for k, v in result.items() if k != "config"}
        records.append(
            make_record(
                "everything",
                model=loaded.model,
                checkpoint=loaded.checkpoint,
                precision=loaded.precision,
                runtime="pytorch",
                threads=torch.get_num_threads(),
                config=result["config"],
                **figures,
            )
        )
    return records, write_records(records, out_dir, f"everything-{loaded.model}-{loaded.precision}")
