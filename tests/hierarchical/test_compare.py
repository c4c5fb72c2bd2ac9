"""Mask matching and summary helpers of the benchmark, on hand-made masks and records."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hierarchical.compare import (
    AGREEMENT_COUNTS,
    compare_generators,
    comparison_table,
    matched_mask_iou,
    summarize_comparison,
)


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode()
    return {"segmentation": encoded}


def box(y0, y1, x0, x1, size=(10, 10)):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_matched_iou_takes_each_reference_masks_best_match():
    reference = [rle(box(0, 4, 0, 4)), rle(box(5, 10, 5, 10)), rle(box(0, 10, 0, 10))]
    candidate = [rle(box(0, 4, 0, 2)), rle(box(5, 10, 5, 10)), rle(box(0, 10, 0, 9))]  # IoU 0.5, 1.0, 0.9
    assert matched_mask_iou(reference, candidate) == {"miou": pytest.approx(0.8), "recall90": pytest.approx(2 / 3)}
    assert matched_mask_iou(reference, []) == {"miou": 0.0, "recall90": 0.0}
    assert matched_mask_iou([], candidate) == {"miou": None, "recall90": None}


def test_summary_means_and_speedups():
    rows = []
    for image in ("a", "b"):
        for method, seconds, points in (
            ("sam", 4.0, 1024),
            ("dense", 2.0, 1024),
            ("hierarchical-lattice", 1.0, 300),
            ("hierarchical-tinysam", 0.5, 200),
        ):
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
    for row, holds, differing in ((rows[1], True, 2), (rows[5], False, 5)):
        counts = dict.fromkeys(AGREEMENT_COUNTS, 1)
        row["agrees_with_sam"], row["agreement_with_sam"] = holds, dict(counts, pixels_differing=differing)
        row["agreement_with_sam"]["violations"] = [] if holds else ["point (1.0, 2.0): a mask of area 3 in SAM only"]
    for row, miou, recall in zip(rows[2::4] + rows[3::4], (0.8, 0.6, 0.9, 0.7), (0.5, 0.3, 1.0, 0.0), strict=True):
        row["miou_vs_dense"], row["recall90_vs_dense"] = miou, recall
    for row, instances, miou in zip(rows[1::4], (3, 1), (0.5, 0.9), strict=True):  # dense, images a and b
        row["gt_instances"], row["miou_vs_gt"] = instances, miou
    summary = summarize_comparison(rows)
    assert summary["images"] == 2
    assert summary["speedup_dense_vs_sam"] == pytest.approx(2.0)
    assert summary["speedup_hierarchical-lattice_vs_dense"] == pytest.approx(2.0)
    assert summary["speedup_hierarchical-tinysam_vs_sam"] == pytest.approx(8.0)
    assert summary["methods"]["dense"]["agrees_with_sam"] == "1/2"
    assert summary["methods"]["dense"]["agreement_with_sam"] == dict(
        dict.fromkeys(AGREEMENT_COUNTS, 2), pixels_differing=7, violations=1
    )
    assert summary["methods"]["dense"]["miou_vs_gt"] == pytest.approx((3 * 0.5 + 0.9) / 4)  # pooled over instances
    lattice, tinysam = summary["methods"]["hierarchical-lattice"], summary["methods"]["hierarchical-tinysam"]
    assert lattice["miou_vs_dense"] == pytest.approx(0.7) and lattice["recall90_vs_dense"] == pytest.approx(0.4)
    assert tinysam["miou_vs_dense"] == pytest.approx(0.8) and tinysam["recall90_vs_dense"] == pytest.approx(0.5)
    assert (lattice["points_prompted"], tinysam["points_prompted"]) == (300, 200)
    table = comparison_table(summary)
    assert "| masks | agreement with SAM / match with dense | mIoU vs GT |" in table.splitlines()[0]
    assert "vs dense: mIoU 0.800, recall@0.9 0.500 (2 images)" in table
    assert "contract on 1/2 images: 2 equal, 2 borderline, 2 unpaired at a threshold, 1 violations; 7 of 2" in table


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['fast'\]"):
        compare_generators(None, [], methods=["dense", "fast"])
