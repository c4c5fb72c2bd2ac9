"""Everything mode: SAM's automatic mask generator vs the hierarchical stage's dense mode and its
hierarchical mode under each re-prompt rule, measured by `hierarchical.compare.compare_generators`
on the same images in one run and kept as records.

Each (image, method) becomes one "everything" record: seconds per image and their split
(encoder, decoder, post-processing), points prompted, masks kept, the agreement with SAM (dense
identical to SAM, the exactness contract) and, per rule, the match with dense mode (the mean
best-match IoU of dense mode's masks and their recall at IoU >= 0.9). On a COCO folder
(`coco_everything_images`: the first N images by lowest image id, the paper's protocol) every record
also gets `miou_vs_gt`, the mean best IoU of the image's non-crowd annotated instances with any
returned mask (docs/BENCHMARKS.md says why).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.coco_eval import open_coco
from benchmarks.records import device_name, git_commit, make_out_dir, make_record, write_records
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


def coco_everything_images(coco_root: str | os.PathLike, max_images: int | None = None) -> tuple[list, list]:
    """(image paths, per image its non-crowd instances as {"segmentation": COCO RLE}) of the first
    ``max_images`` images by lowest image id."""
    dataset = open_coco(coco_root)
    coco = dataset.coco
    paths, ground_truth = [], []
    for image_id in dataset.coco_ids[:max_images]:
        paths.append(dataset.image_dir / coco.loadImgs(image_id)[0]["file_name"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        ground_truth.append([{"segmentation": coco.annToRLE(a)} for a in annotations])
    return paths, ground_truth


def run_everything(
    target: LoadedModel,
    *,
    out_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    coco_root: str | os.PathLike | None = None,
    max_images: int | None = None,
    generator_options: dict[str, Any] | None = None,
    methods: tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Path]:
    """Compare the everything-mode generators on ``images`` with the model on ``device``; one record
    per image and method.

    ``coco_root`` (instead of ``images``): a COCO folder, scored against its annotations.
    ``generator_options`` are `hierarchical.GeneratorConfig` fields (default: the paper's 32x32
    grid with a sparse 8x8 first round); ``methods`` a subset of `hierarchical.compare.METHODS`
    ("sam", "dense", "hierarchical-lattice", "hierarchical-tinysam"; default all).
    """
    compare_generators, methods_all = stage_api("hierarchical.compare", "compare_generators", "METHODS")
    GeneratorConfig = stage_api("hierarchical", "GeneratorConfig")
    loaded = target
    make_out_dir(out_dir)
    git_commit()  # pinned before measuring
    config = GeneratorConfig.from_dict(generator_options or {})
    if coco_root is not None:
        paths, ground_truth = coco_everything_images(coco_root, max_images)
    else:
        paths, ground_truth = everything_images(images, max_images), None
    # The generators run where the model is: SAM's on `sam.device`, ours batches its decoder there.
    sam = loaded.sam.eval().to(device)
    results = compare_generators(
        sam, paths, config, methods=methods or methods_all, progress=progress, ground_truth=ground_truth
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
                threads=torch.get_num_threads() if torch.device(device).type == "cpu" else None,
                device=device_name(device),
                config=result["config"],
                **figures,
            )
        )
    return records, write_records(records, out_dir, f"everything-{loaded.model}-{loaded.precision}")
