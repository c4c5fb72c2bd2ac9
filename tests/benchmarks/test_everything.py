"""Everything-mode records from the hierarchical stage's comparison."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.everything import everything_images, run_everything
from benchmarks.report import render_report
from benchmarks.runs import load_torch_model
from tests.helpers import synthetic_image


def test_run_everything_records_each_rule_on_the_same_image(tmp_path):
    Image.fromarray(synthetic_image(seed=2, size=(96, 128))[0]).save(tmp_path / "shapes.png")
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, high_score_thresh=1e9)
    records, path = run_everything(
        load_torch_model("tinyvit_test"),
        images=tmp_path,
        out_dir=tmp_path / "records",
        generator_options=options,
        methods=("dense", "hierarchical-lattice", "hierarchical-tinysam"),
        progress=False,
    )

    assert [r["method"] for r in records] == ["dense", "hierarchical-lattice", "hierarchical-tinysam"]
    assert all(r["kind"] == "everything" and r["model"] == "tinyvit_test" for r in records)
    assert all(r["image"].endswith("shapes.png") for r in records)
    assert [r["config"]["reprompt_rule"] for r in records[1:]] == ["lattice", "tinysam"]
    # nothing covered: lattice prompts the dense grid; TinySAM's rule loses the 4x4 block's far
    # column and row because 4 divides 96 and 128 (see tests/hierarchical/test_reprompt.py)
    assert [r["points_prompted"] for r in records] == [16, 16, 9]
    for record in records[1:]:
        assert record["seconds"] > 0
        assert 0.0 <= record["recall90_vs_dense"] <= 1.0 and 0.0 <= record["miou_vs_dense"] <= 1.0
    assert records[1]["recall90_vs_dense"] == 1.0  # the same prompts find every dense mask
    assert json.loads(path.read_text()) == records
    report, _ = render_report(records, tmp_path / "report")
    assert "## Everything mode (hierarchical vs dense)" in report.read_text()


def test_everything_images_errors(tmp_path):
    (image,) = everything_images(None)
    assert image.shape == (480, 640, 3)
    with pytest.raises(FileNotFoundError, match="no image files found"):
        everything_images(tmp_path)
