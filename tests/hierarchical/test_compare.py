"""Agreement and summary helpers of the benchmark, on hand-made masks and records."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hierarchical.compare import compare_generators, matched_mask_iou, same_records, summarize_comparison


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode()
    return {"segmentation": encoded}


def box(y0, y1, x0, x1, size=(10, 10)):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_matched_iou_takes_each_reference_masks_best_match():
    reference = [rle(box(0, 4, 0, 4)), rle(box(5, 10, 5, 10))]
    candidate = [rle(box(0, 4, 0, 2)), rle(box(5, 10, 5, 10))]  # IoU 0.5 and 1.0
    assert matched_mask_iou(reference, candidate) == {"miou": pytest.approx(0.75), "recall50": 1.0}
    assert matched_mask_iou(reference, []) == {"miou": 0.0, "recall50": 0.0}
    assert matched_mask_iou([], candidate) == {"miou": None, "recall50": None}


def test_same_records_notices_any_difference():
    record = {
        "segmentation": np.eye(3, dtype=bool),
        "area": 3,
        "bbox": [0, 0, 2, 2],
        "predicted_iou": 0.9,
        "point_coords": [[1.0, 1.0]],
        "stability_score": 0.95,
        "crop_box": [0, 0, 3, 3],
    }
    assert same_records([record], [dict(record, predicted_iou=0.9 + 1e-7)])
    assert not same_records([record], [dict(record, predicted_iou=0.91)])
    assert not same_records([record], [dict(record, segmentation=~np.eye(3, dtype=bool))])
    assert not same_records([record], [])


def test_summary_means_and_speedups():
    rows = []
    for image in ("a", "b"):
        for method, seconds, points in (("sam", 4.0, 1024), ("dense", 2.0, 1024), ("hierarchical", 1.0, 300)):
            rows.append(
                {
                    "image": image,
                    "method": method,
                    "seconds": seconds,
                    "encoder_s": 0.5,
                    "decoder_s": 0.5,
                    "postprocess_s": seconds - 1,
                    "points_prompted": points,
                    "masks": 3,
                }
            )
    rows[1]["identical_to_sam"] = rows[4]["identical_to_sam"] = True
    rows[2]["miou_vs_dense"], rows[5]["miou_vs_dense"] = 0.8, 0.6
    summary = summarize_comparison(rows)
    assert summary["images"] == 2
    assert summary["speedup_dense_vs_sam"] == pytest.approx(2.0)
    assert summary["speedup_hierarchical_vs_dense"] == pytest.approx(2.0)
    assert summary["methods"]["dense"]["identical_to_sam"] == "2/2"
    assert summary["methods"]["hierarchical"]["miou_vs_dense"] == pytest.approx(0.7)
    assert summary["methods"]["hierarchical"]["points_prompted"] == 300


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['fast'\]"):
        compare_generators(None, [], methods=["dense", "fast"])
