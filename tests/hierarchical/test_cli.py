"""`python -m hierarchical`: outputs per image, bad files reported by name, clear argument errors."""

import json
import subprocess
import sys
from pathlib import Path

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
    failed = [line for line in printed.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "notes.jpg: not a readable image" in failed[0]
    assert failed[0].count(str(folder / "notes.jpg")) == 1  # the path once, not "path: path: ..."
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
    assert main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "folder holds no image files" in capsys.readouterr().err
    (empty / "a.png").write_bytes(b"")
    assert main([str(empty), "--out", str(tmp_path / "o"), "--points-per-side", "0"]) == 1
    assert "points_per_side must be a positive integer" in capsys.readouterr().err
    assert main([str(empty), "--out", str(tmp_path / "o"), *FAST, "--reprompt-rule", "tinysam"]) == 1
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
    assert dense["agrees_with_sam"] is True and dense["masks"] == 3
    assert dense["agreement_with_sam"]["records_equal"] + dense["agreement_with_sam"]["records_borderline"] == 3
    assert 0.0 <= result["records"][2]["miou_vs_dense"] <= 1.0
    assert "speedup_dense_vs_sam" in result["summary"]
    assert "| dense |" in (out / "compare.md").read_text()
    assert "SAM's records under the contract on 1/1 images: " in capsys.readouterr().out


def test_progress_through_the_decoder_rounds_goes_to_stderr(tmp_path, capsys):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(5, (32, 40))[0]).save(path)
    args = [str(path), "--out", str(tmp_path / "o"), *FAST, "--points-per-side", "4", "--points-per-batch", "3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    for bar in ("segment", "sparse round", "second round"):
        assert bar in captured.err, bar
    assert "second round" not in captured.out and "one.png: encoder" in captured.out  # bars on stderr only
    assert main([*args, "--mode", "dense"]) == 0
    assert "dense grid" in capsys.readouterr().err


def test_an_image_without_masks_is_named_and_its_overlay_says_so(tmp_path, capsys):
    path = tmp_path / "one.png"
    photo = synthetic_image(5, (96, 128))[0]
    Image.fromarray(photo).save(path)
    out = tmp_path / "o"
    assert main([str(path), "--out", str(out), *FAST, "--pred-iou-thresh", "1"]) == 0
    printed = capsys.readouterr().out
    assert "one.png: no masks found: none of the masks of 1 prompted points passed pred_iou_thresh=1.0" in printed
    assert "no masks found in 1 image(s): one.png" in printed
    assert json.loads((out / "one.json").read_text())["annotations"] == []
    overlay = np.asarray(Image.open(out / "one.png"))
    assert (overlay != photo).any(axis=-1).sum() > 100  # the words are on the picture, not an unchanged photo


def test_a_write_that_fails_midway_leaves_the_earlier_files_whole(tmp_path, capsys, monkeypatch):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(5, (32, 40))[0]).save(path)
    out = tmp_path / "o"
    assert main([str(path), "--out", str(out), *FAST]) == 0
    before = {name: (out / name).read_bytes() for name in ("one.png", "timings.txt")}
    capsys.readouterr()

    def full_disk(image, file, *args, **kwargs):
        file.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert main([str(path), "--out", str(out), *FAST]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == [f"error: cannot write the results to {out}: No space left on device"]
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


def test_an_unwritable_out_is_one_error_line_in_a_real_process(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(5, (32, 40))[0]).save(path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    command = [sys.executable, "-m", "hierarchical", str(path), "--out", str(blocker / "o"), *FAST]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: cannot write to the output folder {blocker / 'o'}: Not a directory; choose another --out"
    ]
    assert blocker.read_text() == "not a folder"


def test_device_option(tmp_path, capsys):
    path = tmp_path / "one.png"
    Image.fromarray(synthetic_image(5, (32, 40))[0]).save(path)
    assert main([str(path), "--out", str(tmp_path / "o"), *FAST, "--device", "cpu"]) == 0
    with pytest.raises(SystemExit):
        main([str(path), "--out", str(tmp_path / "o"), *FAST, "--device", "tpu"])
    assert "--device: device 'tpu'" in capsys.readouterr().err


def test_help_shows_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--device" in capsys.readouterr().out
