"""The COCO AP pipeline: oracle predictions, a known corruption, detections files, errors."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

from benchmarks.coco_eval import CocoEvalConfig, DetectionsError, evaluate_coco, open_coco
from student_models.data import DatasetError
from student_models.preprocessing import load_image


class OraclePredictor:
    """Returns the ground-truth mask whose box is the prompt, optionally eroded by `erode_px` pixels."""

    runtime = "oracle"

    def __init__(self, dataset, erode_px: int = 0) -> None:
        self.chunk_size = 16
        self.erode_px = erode_px
        self.by_image = {}
        self.seen_boxes = []
        coco = dataset.coco
        for image_id in dataset.coco_ids:
            info = coco.loadImgs(image_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            image = load_image(dataset.image_dir / info["file_name"])
            masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
            self.by_image[hashlib.sha1(image.tobytes()).hexdigest()] = (boxes, masks)
        self.current = None

    def set_image(self, image: np.ndarray) -> None:
        self.current = self.by_image[hashlib.sha1(image.tobytes()).hexdigest()]

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.seen_boxes.append(np.asarray(boxes).copy())
        gt_boxes, gt_masks = self.current
        masks = []
        for box in boxes:
            match = np.flatnonzero(np.abs(gt_boxes - box).max(axis=1) < 1e-3)
            masks.append(erode(gt_masks[match[0]], self.erode_px) if len(match) else np.zeros_like(gt_masks[0]))
        return np.stack(masks), np.ones(len(boxes), dtype=np.float32)


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels == 0:
        return mask
    return cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=pixels).astype(bool)


def gt_detections(dataset, scores: dict[int, float] | None = None) -> list[dict]:
    """Every non-crowd GT annotation as a detection (score from `scores` by annotation id, else 1)."""
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(iscrowd=False))
    scores = scores or {}
    keys = ("image_id", "category_id", "bbox")
    return [{**{k: a[k] for k in keys}, "score": scores.get(a["id"], 1.0)} for a in anns]


def test_oracle_predictions_give_ap_100(synthetic_coco, synthetic_dataset):
    result = evaluate_coco(OraclePredictor(synthetic_dataset), synthetic_coco, progress=False)
    assert result.metrics["ap"] == pytest.approx(100.0)
    assert result.metrics["ap50"] == pytest.approx(100.0)
    assert result.metrics["ap75"] == pytest.approx(100.0)
    assert result.num_prompts == len(synthetic_dataset.coco.getAnnIds(iscrowd=False))


def test_eroded_masks_give_the_expected_lower_ap(synthetic_coco, synthetic_dataset, tmp_path):
    """Scoring each eroded mask by its true IoU puts all true positives first, so at each IoU threshold t
    the interpolated precision is 1 up to the recall r_t = share of masks with IoU >= t, then 0:
    AP_t = #(COCO's 101 recall points <= r_t) / 101 (0 when r_t = 0)."""
    erode_px = 6
    coco = synthetic_dataset.coco
    anns = coco.loadAnns(coco.getAnnIds(iscrowd=False))
    ious = {}
    for a in anns:
        gt = coco.annToMask(a).astype(bool)
        ious[a["id"]] = float(erode(gt, erode_px).sum() / gt.sum())
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps(gt_detections(synthetic_dataset, ious)))
    config = CocoEvalConfig(detections=str(detections))

    first = evaluate_coco(OraclePredictor(synthetic_dataset, erode_px), synthetic_coco, config, progress=False)
    second = evaluate_coco(OraclePredictor(synthetic_dataset, erode_px), synthetic_coco, config, progress=False)

    recall_points = np.linspace(0, 1, 101)
    values = np.array(list(ious.values()))
    thresholds = np.linspace(0.5, 0.95, 10)
    recalls = [(values >= t).mean() for t in thresholds]
    expected = np.mean([(recall_points <= r + 1e-9).sum() / 101 if r > 0 else 0.0 for r in recalls]) * 100
    assert 0 < first.metrics["ap"] < 100
    assert first.metrics["ap"] == pytest.approx(expected, abs=1e-3)
    assert first.metrics == second.metrics
    milder = evaluate_coco(OraclePredictor(synthetic_dataset, 2), synthetic_coco, config, progress=False)
    assert first.metrics["ap"] < milder.metrics["ap"]


def test_detection_boxes_and_scores_are_used_as_given(synthetic_coco, synthetic_dataset, tmp_path):
    image_id = synthetic_dataset.coco_ids[0]
    detections = [
        {"image_id": image_id, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9},
        {"image_id": image_id, "category_id": 1, "bbox": [5.5, 6.5, 7.0, 8.0], "score": 0.2},
        {"image_id": image_id, "category_id": 1, "bbox": [1.0, 1.0, 2.0, 2.0], "score": 0.01},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(detections))
    predictor = OraclePredictor(synthetic_dataset)
    config = CocoEvalConfig(detections=str(path), max_images=1, min_score=0.1)

    result = evaluate_coco(predictor, synthetic_coco, config, progress=False)

    np.testing.assert_allclose(np.concatenate(predictor.seen_boxes), [[10, 20, 40, 60], [5.5, 6.5, 12.5, 14.5]])
    assert result.num_prompts == 2  # the 0.01 detection is under min_score
    assert result.metrics["ap"] == 0.0  # boxes match no GT instance: the oracle returns empty masks


def test_detections_for_images_not_in_the_dataset_are_an_error(synthetic_coco, synthetic_dataset, tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([{"image_id": 987654, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]))
    with pytest.raises(DetectionsError, match=r"1 image id\(s\) not in .*instances_val2017.json \(e.g. \[987654\]\)"):
        evaluate_coco(OraclePredictor(synthetic_dataset), synthetic_coco, CocoEvalConfig(detections=str(path)))


def test_malformed_detections_are_an_error(synthetic_coco, synthetic_dataset, tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([{"image_id": synthetic_dataset.coco_ids[0], "bbox": [0, 0, 5, 5]}]))
    with pytest.raises(DetectionsError, match="detection #0 needs image_id, category_id, bbox, score"):
        evaluate_coco(OraclePredictor(synthetic_dataset), synthetic_coco, CocoEvalConfig(detections=str(path)))


def test_missing_coco_files_are_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no such COCO folder"):
        open_coco(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"no annotations/instances_\*.json found"):
        open_coco(tmp_path)
    (tmp_path / "annotations").mkdir()
    images = [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}]
    annotations = {"images": images, "annotations": [], "categories": []}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    with pytest.raises(DatasetError, match="val2017: image folder missing"):
        open_coco(tmp_path)


def test_config_round_trips_and_validates():
    config = CocoEvalConfig(max_images=3, chunk_size=8, detections="d.json", min_score=0.05)
    assert CocoEvalConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        CocoEvalConfig(max_images=0)
    with pytest.raises(ValueError, match="min_score must be in"):
        CocoEvalConfig(min_score=2)
