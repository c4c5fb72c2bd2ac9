"""Everything-mode records from the hierarchical stage's comparison."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.everything import everything_images, run_everything
from benchmarks.report import render_report
from benchmarks.runs import load_torch_model
from tests.helpers import synthetic_image


def test_run_everything_records_each_method(tmp_path):
    Image.fromarray(synthetic_image(seed=2, size=(96, 128))[0]).save(tmp_path / "shapes.png")
    options = dict(points_per_side=2, sparse_points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    records, path = run_everything(
        load_torch_model("tinyvit_test"),
        images=tmp_path,
        out_dir=tmp_path / "records",
        generator_options=options,
        methods=("dense", "hierarchical"),
        progress=False,
    )

    assert [r["method"] for r in records] == ["dense", "hierarchical"]
    assert all(r["kind"] == "everything" and r["model"] == "tinyvit_test" for r in records)
    assert records[0]["image"].endswith("shapes.png")
    assert records[0]["points_prompted"] == 4 and records[0]["config"]["points_per_side"] == 2
    assert records[1]["seconds"] > 0 and "miou_vs_dense" in records[1]
    assert json.loads(path.read_text()) == records
    report, _ = render_report(records, tmp_path / "report")
    assert "## Everything mode (hierarchical vs dense)" in report.read_text()


def test_everything_images_errors(tmp_path):
    (image,) = everything_images(None)
    assert image.shape == (480, 640, 3)
    with pytest.raises(FileNotFoundError, match="no image files found"):
        everything_images(tmp_path)
