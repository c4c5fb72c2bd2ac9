"""`python -m hierarchical`: outputs per image, bad files reported by name, clear argument errors."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hierarchical.__main__ import main
from tests.helpers import synthetic_image

FAST = ["--model", "tinyvit_test", "--points-per-side", "1", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def test_folder_run_writes_json_overlay_and_timings_and_names_bad_files(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rgb = synthetic_image(6, (48, 64))[0]
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(np.concatenate([rgb, np.full((48, 64, 1), 255, np.uint8)], axis=2)).save(folder / "rgba.png")
    (folder / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), *FAST]) == 1  # one file failed
    printed = capsys.readouterr().out
    assert "2 image(s) segmented, 1 failed" in printed
    assert "notes.jpg: not a readable image" in printed
    for stem in ("gray", "rgba"):
        payload = json.loads((out / f"{stem}.json").read_text())
        assert payload["config"]["hierarchical"] is True
        assert payload["config"]["reprompt_rule"] == "lattice"
        assert payload["timing"]["points_prompted"] == 1  # the 1x1 grid's point is the sparse round: never more
        for record in payload["annotations"]:
            assert mask_utils.decode(record["segmentation"]).shape == (48, 64)
        assert Image.open(out / f"{stem}.png").size == (64, 48)
    lines = (out / "timings.txt").read_text().splitlines()
    assert len(lines) == 2 and "points prompted 1" in lines[0] and "decoder" in lines[0]


def test_dense_mode_flag(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(7, (32, 40))[0]).save(path)
    assert main([str(path), "--out", str(tmp_path / "o"), "--mode", "dense", *FAST]) == 0
    payload = json.loads((tmp_path / "o" / "one.json").read_text())
    assert payload["config"]["hierarchical"] is False and payload["timing"]["sparse_points"] == 0


def test_random_weights_repeat_with_the_seed(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(9, (32, 40))[0]).save(path)
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main([str(path), "--out", str(tmp_path / name), "--mode", "dense", "--seed", seed, *FAST]) == 0
        runs[name] = [r["predicted_iou"] for r in json.loads((tmp_path / name / "one.json").read_text())["annotations"]]
    assert runs["a"] == runs["b"] != runs["c"]


def test_argument_errors_are_clear(tmp_path, capsys):
    assert main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "folder holds no image files" in capsys.readouterr().err
    (empty / "a.png").write_bytes(b"")
    assert main([str(empty), "--out", str(tmp_path / "o"), "--points-per-side", "0"]) == 2
    assert "points_per_side must be a positive integer" in capsys.readouterr().err
    assert main([str(empty), "--out", str(tmp_path / "o"), *FAST, "--reprompt-rule", "tinysam"]) == 2
    assert "reprompt_rule='tinysam' prompts a sparse grid of points_per_side // 4 = 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(empty), "--out", str(tmp_path / "o"), "--reprompt-rule", "sam"])
    assert "--reprompt-rule: invalid choice: 'sam' (choose from" in capsys.readouterr().err


def test_compare_writes_records_and_table(tmp_path, capsys):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(8, (32, 40))[0]).save(path)
    out = tmp_path / "cmp"
    assert main([str(path), "--out", str(out), "--compare", "--box-nms-thresh", "1", *FAST]) == 0
    result = json.loads((out / "compare.json").read_text())
    methods = [r["method"] for r in result["records"]]
    assert methods == ["sam", "dense", "hierarchical-lattice"]
    dense = result["records"][1]
    assert dense["identical_to_sam"] is True and dense["masks"] == 3
    assert 0.0 <= result["records"][2]["miou_vs_dense"] <= 1.0
    assert "speedup_dense_vs_sam" in result["summary"]
    assert "| dense |" in (out / "compare.md").read_text()
    assert "identical to SAM on 1/1 images" in capsys.readouterr().out
