"""What a new user, a kill, a full disk or a bad file meets at the CLI: one `error:` line, nothing lost.

Every bad-input case checks exit code 1, exactly one `error:` line that starts its own line (not the
end of a progress bar), no traceback, and that nothing was computed, replaced or left half-written.
The runs share one tiny configuration (3 generated images, 2 steps of 1 image, 1 prompt) and one
teacher cache, so a clean run's weights are the reference for the interrupted and repaired ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.model as distill_model
from distill.__main__ import main
from student_models.checkpoints import read_checkpoint, save_checkpoint
from tests.helpers import synthetic_image, tiny_model

REPO = Path(__file__).resolve().parents[2]
TINY = ["--num-synthetic", "3", "--val-images", "0", "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1"]
TINY += ["--prompts-per-image", "1", "--max-prompt-iters", "0", "--warmup-steps", "1", "--num-workers", "0"]

SAM_FILE_BYTES = 2_097_280  # a SAM teacher's cache file: the 128-byte .npy header + 256x64x64 fp16


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, *fragments: str) -> str:
    """Exactly one `error:` line, at the start of its line (tqdm ends its updates with \\r, not \\n), no traceback."""
    lines = err.split("\n")
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:"), err[-2000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer leaves in its temporary file names)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def same_weights(a: Path, b: Path) -> bool:
    want, _ = read_checkpoint(a)
    got, _ = read_checkpoint(b)
    return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    """The reference: TINY run to the end in one go (and its printed output)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*TINY, "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    return out, printed.getvalue()


# ---- first hour: the mode, the header, the warnings ---------------------------------------------------------


def test_demo_mode_is_named_and_the_header_shows_the_schedule(tmp_path, cache_dir, capsys):
    """`--teacher sam_vit_test` stays in demo mode: same settings as no flag at all, and the header says which."""
    headers = []
    for named in ([], ["--teacher", "sam_vit_test"]):
        args = [*named, "--num-synthetic", "3", "--cache-only", "--cache-dir", cache_dir, "--out", tmp_path / "o"]
        code, out, _ = cli(capsys, *args)
        assert code == 0 and out.startswith("demo mode (no --data): generated shapes, small settings"), out
        headers.append([line for line in out.splitlines() if line.startswith("settings:")])
    assert headers[0] == headers[1] and len(headers[0]) == 1
    assert (
        "settings: 3 epochs, batch size 2 per process, 4 prompts per image + up to 2 corrective points"
        in (headers[0][0])
    )


@pytest.mark.slow
def test_training_header_gives_steps_and_an_empty_validation_is_said_plainly(clean_run):
    _, printed = clean_run
    assert "settings: 2 steps, batch size 1 per process, 1 prompts per image" in printed
    assert "schedule: 2 steps (--steps 2; 3 steps per epoch of 3 training images, batch size 1" in printed
    assert "metrics.json (no held-out images: --val-images 0, so no fidelity figures)" in printed
    assert "()" not in printed


def test_random_weight_teacher_on_real_data_is_warned_about(tmp_path, capsys):
    code, out, err = cli(capsys, "--data", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 1 and out.startswith("full recipe (--data given)")
    assert "WARNING: no --teacher-checkpoint: the teacher vit_h has RANDOM weights" in err
    assert_one_error(err, "missing: no such folder")
    # The tiny test teacher is random by design: no warning.
    code, _, err = cli(capsys, "--data", tmp_path / "missing", "--teacher", "sam_vit_test", "--out", tmp_path / "o")
    assert code == 1 and "WARNING" not in err


# ---- bad input: refused before the long cache step ----------------------------------------------------------


def test_unwritable_out_is_one_error_line_in_a_real_process(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    command = [sys.executable, "-m", "distill", "--out", str(blocker / "run")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: cannot write to the output folder {blocker / 'run'}: Not a directory; choose another --out"
    ], done.stderr
    assert blocker.read_text() == "not a folder"


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    code, _, err = cli(capsys, "--out", blocker)
    assert code == 1 and blocker.read_text() == "keep me"
    assert_one_error(err, f"cannot use {blocker} as the output folder: it is a file; --out must name a folder")


@pytest.mark.parametrize("case", ["student-checkpoint", "teacher-checkpoint", "data"])
def test_bad_inputs_fail_before_the_teacher_cache_is_filled(tmp_path, capsys, case):
    garbage = tmp_path / "student.pt"
    garbage.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    args = {
        "student-checkpoint": (["--student-checkpoint", garbage], str(garbage)),
        "teacher-checkpoint": (["--teacher-checkpoint", tmp_path / "nope.pt"], "nope.pt"),
        "data": (["--data", tmp_path / "nodata", "--teacher", "sam_vit_test"], "nodata: no such folder"),
    }[case]
    cache, out = tmp_path / "cache", tmp_path / "out"
    code, _, err = cli(capsys, *args[0], "--num-synthetic", "3", "--cache-dir", cache, "--out", out)
    assert code == 1
    assert_one_error(err, args[1])
    assert not list(cache.rglob("*.npy")) and not (out / "log.jsonl").exists()  # no teacher embedding computed


def test_unwritable_cache_folder_is_refused_before_anything_is_computed(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = cli(capsys, "--num-synthetic", "3", "--cache-dir", blocker / "cache", "--out", tmp_path / "out")
    assert code == 1 and blocker.read_text() == "not a folder"
    refusal = f"cannot write to the teacher-cache folder {blocker / 'cache'}: Not a directory"
    assert_one_error(err, f"{refusal}; choose another --cache-dir")
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_student_checkpoint_of_another_model_fails_before_the_cache(tmp_path, capsys):
    other = save_checkpoint(tiny_model("sam_vit_test"), "sam_vit_test", tmp_path / "teacher.pt")
    code, _, err = cli(capsys, "--student-checkpoint", other, "--num-synthetic", "3", "--out", tmp_path / "out")
    assert code == 1
    assert_one_error(err, "holds a 'sam_vit_test' model")
    assert not list((tmp_path / "out").rglob("*.npy"))


# ---- an earlier run is never replaced silently -------------------------------------------------------------


def fake_run(out: Path) -> Path:
    """A folder laid out like a finished run (what is refused or resumed is decided before any file is read)."""
    (out / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/last.pt", "student.pt", "metrics.json", "config.json"):
        (out / name).write_bytes(b"an earlier result: " + name.encode())
    records = [{"event": "cache", "embedded": 3}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_rerun_without_resume_is_refused_naming_what_would_be_lost(tmp_path, cache_dir, capsys):
    out = fake_run(tmp_path / "run")
    before = snapshot(out)
    code, _, err = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", out)
    assert code == 1 and snapshot(out) == before
    message = assert_one_error(err, f"{out} holds an earlier run", "--resume", "--overwrite")
    for name in ("checkpoints/last.pt", "student.pt", "metrics.json", "config.json", "log.jsonl with 2 training"):
        assert name in message
    # A cache-only step before training is not a run: the training that follows it is not refused.
    cached = tmp_path / "cached"
    assert cli(capsys, "--num-synthetic", "3", "--cache-only", "--cache-dir", cache_dir, "--out", cached)[0] == 0
    assert (cached / "log.jsonl").is_file() and not (cached / "student.pt").exists()


@pytest.mark.slow
def test_overwrite_starts_afresh(tmp_path, clean_run, cache_dir, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean_run[0], out)
    (out / "student.pt").write_bytes(b"an old result")
    code, printed, _ = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", out, "--overwrite")
    assert code == 0 and f"--overwrite: removed the earlier run in {out}" in printed
    assert steps_logged(out) == [1, 2] and same_weights(out / "student.pt", clean_run[0] / "student.pt")


def test_truncated_state_on_resume_is_named(tmp_path, cache_dir, capsys):
    out = fake_run(tmp_path / "run")
    state = out / "checkpoints" / "last.pt"
    code, _, err = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", out, "--resume")
    assert code == 1
    assert_one_error(err, f"cannot resume: {state} is unreadable", "--overwrite")


# ---- a kill, a moved folder, a full disk ---------------------------------------------------------------------


@pytest.mark.slow
def test_error_mid_run_then_resume_from_a_moved_folder_spelled_relative(tmp_path, clean_run, cache_dir, capsys):
    """A run stopped at step 2 (NaN) is moved, its log cut mid-line, a temp file left; the resumed run matches."""
    real, calls = distill_model.embedding_loss, []

    def poisoned(*args):
        calls.append(1)
        terms = real(*args)
        return {"embedding": terms["embedding"] * float("nan")} if len(calls) == 2 else terms

    first = tmp_path / "first"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_model, "embedding_loss", poisoned)
        code, _, err = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", first)
    assert code == 1
    assert_one_error(err, "non-finite loss or gradient at step 2")
    assert "distill:" in err  # the progress bar was on screen, and the error still starts its own line

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(first, moved)
    with open(moved / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a record cut short by a kill
    stale = moved / "checkpoints" / f".last.pt.tmp{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(moved.parent)
        code, printed, err = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", "run", "--resume")
    assert code == 0, err
    assert "resumed from run/checkpoints/last.pt at step 1/2" in printed
    assert steps_logged(moved) == [1, 2] and not stale.exists()
    assert same_weights(moved / "student.pt", clean_run[0] / "student.pt")
    assert json.loads((moved / "metrics.json").read_text())["step"] == 2


@pytest.mark.slow
def test_resume_with_a_changed_setting_is_still_refused(tmp_path, clean_run, cache_dir, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean_run[0], out)
    code, _, err = cli(capsys, *TINY, "--lr", "0.5", "--cache-dir", cache_dir, "--out", out, "--resume")
    assert code == 1
    assert_one_error(err, "the config differs (lr: checkpoint 0.002, now 0.5)")


@pytest.mark.slow
def test_a_checkpoint_of_the_old_prompt_sampler_is_not_resumed(tmp_path, clean_run, cache_dir, capsys):
    """Before the sampler's version was part of the identity, a run resumed from such a checkpoint silently
    drew other prompts from the same seed."""
    out = tmp_path / "run"
    shutil.copytree(clean_run[0], out)
    state_path = out / "checkpoints" / "last.pt"
    state = torch.load(state_path, weights_only=True)
    del state["identity"]["prompt_sampler"]  # as written before the version was recorded
    torch.save(state, state_path)
    code, _, err = cli(capsys, *TINY, "--cache-dir", cache_dir, "--out", out, "--resume")
    assert code == 1
    assert_one_error(err, "the config differs (prompt_sampler: checkpoint None, now 2)")


# ---- the teacher cache verifies what it reuses ------------------------------------------------------------


@pytest.mark.slow
def test_broken_cached_embeddings_are_recomputed_and_the_run_matches_a_clean_one(
    tmp_path, clean_run, cache_dir, capsys
):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    arrays = sorted(cache.rglob("*.npy"))
    assert len(arrays) == 3 and all(p.stat().st_size == SAM_FILE_BYTES for p in arrays)
    originals = {p: p.read_bytes() for p in arrays}
    truncated, altered = arrays[0], arrays[1]
    truncated.write_bytes(originals[truncated][: SAM_FILE_BYTES // 2])  # a copy that hit a full disk
    flipped = bytearray(originals[altered])
    flipped[-1] ^= 0xFF  # same size, one byte changed
    altered.write_bytes(bytes(flipped))
    stale = truncated.parent / f".{truncated.name}.tmp{dead_pid()}"
    stale.write_bytes(b"half an array")

    out = tmp_path / "run"
    with pytest.warns(UserWarning) as warned:
        code, printed, err = cli(capsys, *TINY, "--cache-dir", cache, "--out", out)
    assert code == 0, err
    messages = [str(w.message) for w in warned]
    assert any(f"{truncated} is broken ({SAM_FILE_BYTES // 2} bytes, the index records" in m for m in messages)
    assert any(f"{altered} is broken (its CRC-32 differs" in m for m in messages)
    assert all(p.read_bytes() == originals[p] for p in arrays) and not stale.exists()
    assert same_weights(out / "student.pt", clean_run[0] / "student.pt")
    event = next(r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") == "cache")
    assert (event["cached"], event["embedded"], event["repaired"]) == (1, 2, 2)

    # --cache-only repairs too, and says so.
    truncated.write_bytes(originals[truncated][:100])
    with pytest.warns(UserWarning, match="is broken"):
        code, printed, _ = cli(capsys, "--num-synthetic", "3", "--cache-only", "--cache-dir", cache, "--out", out)
    assert code == 0 and "(1 embedded, of which 1 replaced broken files; 2 already there and verified" in printed
    assert truncated.read_bytes() == originals[truncated]


def _tiny_coco(root: Path, count: int = 2) -> list[Path]:
    """A COCO root with `count` generated images (one box-shaped instance each); returns the image paths."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, annotations, paths = [], [], []
    for i in range(count):
        image, masks = synthetic_image(i, size=(48, 64))
        path = root / "val" / f"{i + 1:012d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
        ys, xs = np.nonzero(masks[0])
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        images.append({"id": i + 1, "file_name": path.name, "height": 48, "width": 64})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": (x1 - x0) * (y1 - y0),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return paths


@pytest.mark.slow
def test_missing_coco_image_is_named_then_used_again_once_restored(tmp_path, capsys):
    paths = _tiny_coco(tmp_path / "coco")
    aside = tmp_path / "aside.png"
    shutil.move(paths[1], aside)
    args = ["--data", tmp_path / "coco", "--teacher", "sam_vit_test", "--student", "tinyvit_test", *TINY[2:]]
    args += ["--steps", "1", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run"]
    with pytest.warns(UserWarning, match="000000000002.png: no such image file"):
        code, printed, err = cli(capsys, *args)
    assert code == 0, err
    assert f"skipped 1 unreadable image(s): 2 ({paths[1]}: no such image file)" in printed
    assert len(list((tmp_path / "cache").rglob("*.corrupt"))) == 1

    shutil.move(aside, paths[1])  # the file is back
    code, printed, _ = cli(capsys, *args, "--cache-only")
    assert code == 0 and "(1 embedded, of which 0 replaced broken files; 1 already there and verified" in printed
    assert not list((tmp_path / "cache").rglob("*.corrupt"))


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_is_one_line_saying_what_was_kept(tmp_path, monkeypatch, capsys, checkpointed):
    import distill.__main__ as cli

    out = tmp_path / "run"
    if checkpointed:
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "distill", interrupted)
    assert main(["--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: ")
    if checkpointed:
        assert str(out / "checkpoints" / "last.pt") in err[0] and "--resume" in err[0]
    else:
        assert "no checkpoint was written yet" in err[0]
