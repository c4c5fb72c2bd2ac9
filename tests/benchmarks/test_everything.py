"""Everything-mode records from the hierarchical stage's comparison."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.everything import everything_images, run_everything
from benchmarks.report import render_report
from benchmarks.runs import load_torch_model
from tests.helpers import synthetic_image


def test_run_everything_records_each_rule_on_the_same_coco_image(tmp_path, synthetic_coco, synthetic_dataset):
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, high_score_thresh=1e9)
    records, path = run_everything(
        load_torch_model("tinyvit_test"),
        coco_root=synthetic_coco,
        max_images=1,
        out_dir=tmp_path / "records",
        generator_options=options,
        methods=("dense", "hierarchical-lattice", "hierarchical-tinysam"),
        progress=False,
    )

    assert [r["method"] for r in records] == ["dense", "hierarchical-lattice", "hierarchical-tinysam"]
    assert all(r["kind"] == "everything" and r["model"] == "tinyvit_test" for r in records)
    assert all(r["image"].endswith("000000000001.png") for r in records)  # the lowest image id
    instances = len(synthetic_dataset.coco.getAnnIds(imgIds=1, iscrowd=False))
    assert all(r["gt_instances"] == instances > 0 and 0.0 <= r["miou_vs_gt"] <= 1.0 for r in records)
    assert [r["config"]["reprompt_rule"] for r in records[1:]] == ["lattice", "tinysam"]
    # nothing covered: lattice prompts the dense grid; TinySAM's rule loses the 4x4 block's far
    # column and row because 4 divides 256 and 320 (see tests/hierarchical/test_reprompt.py)
    assert [r["points_prompted"] for r in records] == [16, 16, 9]
    for record in records[1:]:
        assert record["seconds"] > 0
        assert 0.0 <= record["recall90_vs_dense"] <= 1.0 and 0.0 <= record["miou_vs_dense"] <= 1.0
    assert records[1]["recall90_vs_dense"] == 1.0  # the same prompts find every dense mask
    assert json.loads(path.read_text()) == records
    report, _ = render_report(records, tmp_path / "report")
    assert "## Everything mode (hierarchical vs dense)" in report.read_text()


def test_everything_images_from_a_folder_or_generated(tmp_path):
    (image,) = everything_images(None)
    assert image.shape == (480, 640, 3)
    for name in ("b.png", "a.png", "c.png"):
        Image.fromarray(synthetic_image(seed=2, size=(16, 16))[0]).save(tmp_path / name)
    assert [p.name for p in everything_images(tmp_path, max_images=2)] == ["a.png", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files found"):
        everything_images(tmp_path / "empty")
