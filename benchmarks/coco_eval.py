"""Zero-shot instance segmentation on a COCO-format dataset (SPEC section 5).

Each box (a ground-truth box, or a detection from a COCO-format results JSON such as the
ViTDet-H boxes the paper uses) is a box prompt; the model's three multimask outputs are
scored by its own IoU head and the best one becomes the instance mask, scored by the box's
detection score (1.0 for ground-truth boxes). The prompts run through
`student_models.sam_runner.SamRunner.predict_boxes` over any back-end (PyTorch on a device,
ONNX Runtime), a chunk of boxes per decoder call. pycocotools' ``COCOeval(..., "segm")`` gives
AP, AP50, AP75 and AP for small/medium/large objects, reported here in percent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from student_models.data import CocoDataset, DatasetError
from student_models.masks import encode_rle
from student_models.preprocessing import load_image
from student_models.sam_runner import SamRunner

METRIC_NAMES = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")  # COCOeval.stats[0:6], in percent


class DetectionsError(ValueError):
    """A detections file that does not fit the dataset it is evaluated on."""


@dataclass
class CocoEvalConfig:
    """How the COCO benchmark runs.

    Attributes:
        max_images: evaluate only the first N images (sorted by id); None = all.
        chunk_size: box prompts decoded together.
        detections: a COCO-format detections JSON (list of {image_id, category_id, bbox XYWH,
            score}); None = ground-truth boxes of the non-crowd annotations.
        min_score: detections scored below this are dropped (0 keeps all, as the paper does).
    """

    max_images: int | None = None
    chunk_size: int = 16
    detections: str | None = None
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.detections is not None:
            self.detections = str(self.detections)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CocoEvalConfig:
        return cls(**data)


@dataclass
class BoxPrompts:
    """The prompts of one image: boxes Nx4 XYXY pixels, category ids N, scores N."""

    boxes: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray

    @classmethod
    def from_xywh(cls, items: list[tuple[list[float], int, float]]) -> BoxPrompts:
        boxes = np.array([b for b, _, _ in items], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return cls(boxes, np.array([c for _, c, _ in items], dtype=np.int64), np.array([s for *_, s in items]))


@dataclass
class CocoEvalResult:
    """Metrics in percent (None where the dataset has no object of that size), and run facts."""

    metrics: dict[str, float | None]
    num_images: int
    num_prompts: int
    seconds: float
    image_ids: list[int] = field(repr=False, default_factory=list)


def open_coco(coco_root: str | os.PathLike) -> CocoDataset:
    """The COCO dataset at ``coco_root`` (``annotations/instances_*.json`` + image folder), checked."""
    root = Path(coco_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such COCO folder (expected annotations/instances_<split>.json and <split>/)")
    dataset = CocoDataset(root)
    if not dataset.image_dir.is_dir():
        raise DatasetError(f"{dataset.image_dir}: image folder missing (named after {dataset.annotation_file.name})")
    return dataset


def gt_box_prompts(dataset: CocoDataset, image_ids: list[int]) -> dict[int, BoxPrompts]:
    """Ground-truth boxes of the non-crowd annotations as prompts, score 1.0."""
    coco = dataset.coco
    prompts = {}
    for image_id in image_ids:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        prompts[image_id] = BoxPrompts.from_xywh([(a["bbox"], a["category_id"], 1.0) for a in annotations])
    return prompts


def load_detections(
    path: str | os.PathLike, dataset: CocoDataset, image_ids: list[int], min_score: float = 0.0
) -> dict[int, BoxPrompts]:
    """Detections from a COCO results JSON, used as given (box, category, score), for ``image_ids``.

    Raises `DetectionsError` for a malformed file, or one naming images or categories that the
    dataset does not have (the detections were made for another split).
    """
    path = Path(path)
    if not path.is_file():
        raise DetectionsError(f"{path}: no such detections file")
    try:
        detections = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DetectionsError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(detections, list):
        raise DetectionsError(f"{path}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    required = ("image_id", "category_id", "bbox", "score")
    for index, det in enumerate(detections):
        if not isinstance(det, dict) or any(k not in det for k in required) or len(det["bbox"]) != 4:
            raise DetectionsError(f"{path}: detection #{index} needs {', '.join(required)} (bbox as XYWH): {det}")
    known_images = set(dataset.coco.getImgIds())
    unknown = sorted({det["image_id"] for det in detections} - known_images)
    if unknown:
        raise DetectionsError(
            f"{path}: detections for {len(unknown)} image id(s) not in {dataset.annotation_file} "
            f"(e.g. {unknown[:5]}); the detections must come from the same dataset split"
        )
    unknown_categories = sorted({det["category_id"] for det in detections} - set(dataset.coco.getCatIds()))
    if unknown_categories:
        raise DetectionsError(f"{path}: unknown category id(s) {unknown_categories[:5]} for {dataset.annotation_file}")
    per_image: dict[int, list] = {image_id: [] for image_id in image_ids}
    for det in detections:
        if det["image_id"] in per_image and det["score"] >= min_score:
            per_image[det["image_id"]].append((det["bbox"], det["category_id"], float(det["score"])))
    return {image_id: BoxPrompts.from_xywh(items) for image_id, items in per_image.items()}


def predict_instances(
    predictor: SamRunner, dataset: CocoDataset, prompts: dict[int, BoxPrompts], progress: bool = True
) -> list[dict[str, Any]]:
    """Run every image's box prompts through ``predictor`` (a `SamRunner`, or anything with its
    ``set_image`` / ``predict_boxes``); return COCO results (RLE segmentation, category, score)."""
    results = []
    for image_id in tqdm(prompts, desc="coco images", unit="img", disable=not progress):
        image_prompts = prompts[image_id]
        if not len(image_prompts.boxes):
            continue
        info = dataset.coco.loadImgs(image_id)[0]
        predictor.set_image(load_image(dataset.image_dir / info["file_name"]))
        masks, _ = predictor.predict_boxes(image_prompts.boxes)
        rles = encode_rle(masks)
        for rle, category_id, score in zip(rles, image_prompts.category_ids, image_prompts.scores, strict=True):
            results.append(
                {"image_id": image_id, "category_id": int(category_id), "segmentation": rle, "score": float(score)}
            )
    return results


def segm_metrics(dataset: CocoDataset, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float | None]:
    """pycocotools ``segm`` AP of ``results`` on ``image_ids``, in percent (None: no such objects)."""
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(results), "segm")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(METRIC_NAMES)]
    return {name: None if v < 0 else round(float(v) * 100, 3) for name, v in zip(METRIC_NAMES, stats, strict=True)}


def evaluate_coco(
    predictor: SamRunner, coco_root: str | os.PathLike, config: CocoEvalConfig | None = None, progress: bool = True
) -> CocoEvalResult:
    """Zero-shot instance segmentation AP of ``predictor`` (e.g. ``SamRunner(TorchSamBackend(sam, device))``)
    on the COCO dataset at ``coco_root``; its ``chunk_size`` is set to ``config.chunk_size``."""
    config = config or CocoEvalConfig()
    dataset = open_coco(coco_root)
    image_ids = dataset.coco_ids[: config.max_images]
    if config.detections is None:
        prompts = gt_box_prompts(dataset, image_ids)
    else:
        prompts = load_detections(config.detections, dataset, image_ids, config.min_score)
    predictor.chunk_size = config.chunk_size
    start = time.perf_counter()
    results = predict_instances(predictor, dataset, prompts, progress)
    seconds = time.perf_counter() - start
    metrics = segm_metrics(dataset, results, image_ids)
    return CocoEvalResult(metrics, len(image_ids), sum(len(p.boxes) for p in prompts.values()), seconds, image_ids)
