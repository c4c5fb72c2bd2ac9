"""End-to-end runs: the CLI on real images, exact resume after SIGKILL, torchrun/gloo vs one process, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.model as distill_model
from distill import DistillConfig, DistillError, distill
from distill.__main__ import main
from student_models import ModelSpec, build_sam, registry
from student_models.checkpoints import read_checkpoint, save_checkpoint
from student_models.families import family_of
from student_models.preprocessing import load_image
from tests.helpers import COCO_ROOT, requires_coco, requires_cuda, synthetic_image
from tests.student_models.test_sam2_models import requires_sam2

REPO = Path(__file__).resolve().parents[2]
# Small and fast: 1024 inputs are unavoidable, so few images, prompts and steps.
SMALL = ["--prompts-per-image", "2", "--max-prompt-iters", "1", "--warmup-steps", "1", "--num-workers", "0"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[dict]:
    return [r for r in _log(out) if "loss" in r]


def learnable_test_teacher(path: Path, name: str = "sam_vit_test") -> Path:
    """Write the test teacher `name` (`sam_vit_test` or `sam2_test`) with seeded random weights but for two
    changes, so that the student's fidelity can rise.

    With all weights random, a few dozen CPU steps cannot teach a student the teacher's masks, and the masks
    barely depend on the image anyway (measured on held-out COCO images: the image-blind student, which
    sees only the image's mean teacher embedding, has a mask IoU of 0.63 with the teacher, and a 60-step student 0.58):
    - the 16x16 random patch filters respond to pixel-level texture that a student with another stem
      cannot reproduce quickly; they become the 32 lowest-frequency 2-D DCT waves over R, G and B, smooth
      filters like a trained ViT's;
    - the decoder's random 2x2 transposed-conv kernels give each sub-pixel position its own kernel, which
      paints a fixed checkerboard that sets most mask signs whatever the image; each kernel is pulled
      halfway towards the top-left one (nearest-neighbour upsampling), which lets the image show through.
    """
    torch.manual_seed(0)
    teacher = build_sam(name)
    upscaling = family_of(teacher).heads(teacher)[1].output_upscaling
    with torch.no_grad():
        proj = getattr(teacher.image_encoder, "trunk", teacher.image_encoder).patch_embed.proj  # SAM 2: Hiera's
        side = proj.kernel_size[0]
        rows = torch.arange(side) + 0.5
        waves = sorted(((u, v) for u in range(side) for v in range(side)), key=lambda f: (f[0] + f[1], f[0]))
        filters = torch.zeros_like(proj.weight)
        for index in range(len(filters)):
            u, v = waves[index // 3]
            filters[index, index % 3] = torch.outer(
                torch.cos(torch.pi * rows * u / side), torch.cos(torch.pi * rows * v / side)
            )
        filters /= filters.flatten(1).norm(dim=1)[:, None, None, None]
        proj.weight.copy_(filters * proj.weight.flatten(1).norm(dim=1).mean())
        for conv in upscaling[0], upscaling[3]:
            conv.weight.copy_((conv.weight + conv.weight[:, :, :1, :1]) / 2)
    return save_checkpoint(teacher, name, path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One teacher cache (tiny teacher, generated images) shared by the runs below."""
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.mark.slow
def test_cli_end_to_end_student_fidelity_rises(tmp_path):
    """`python -m distill` on real COCO images (generated ones without ../shared): the student learns the masks.

    On 4 held-out images the student-teacher mask IoU must rise well above the untrained student's, and on
    COCO also above the image-blind floor (the teacher's decoder fed the image's mean teacher embedding), so
    the student has learnt the images' layout, not just their average. Measured with this teacher
    (`learnable_test_teacher`), as final (initial) / floor: these settings 0.597 (0.214) / 0.461; the same
    with the decoder frozen 0.630, and frozen with warm-up 2 for seeds 0, 1, 2: 0.661 (0.214) / 0.461,
    0.645 (0.450) / 0.447, 0.638 (0.426) / 0.479. The floor margin (0.05) leaves room for the +-0.05 that
    small changes of the run move the final figure by. Generated shapes are mostly flat colour, so their
    average says much: the floor there is 0.691 and the student reaches 0.631 (0.446), so only the rise is
    checked, and the embedding L1 ends at 0.65x (the COCO bound's reason does not carry over).

    The encoder's lr is 10x the default so that 40 steps suffice; the decoder keeps the default's lr (1e-4, a
    0.01 scale): at 1e-3 it drifts from the teacher's and the final mask IoU falls to 0.565.
    """
    on_coco = (COCO_ROOT / "annotations").is_dir()
    data = ["--data", str(COCO_ROOT), "--max-images", "24"] if on_coco else ["--num-synthetic", "24"]
    teacher = learnable_test_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "run"
    args = [*data, "--teacher", "sam_vit_test", "--teacher-checkpoint", str(teacher), "--student", "tinyvit_test"]
    args += [*SMALL, "--out", str(out), "--steps", "40", "--batch-size", "2", "--lr", "1e-2"]
    args += ["--decoder-lr-scale", "0.01", "--val-images", "4", "--val-prompts-per-image", "8"]
    done = subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"student checkpoint: {out / 'student.pt'}" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    if on_coco:
        assert metrics["val_mask_iou"] > metrics["val_mask_iou_initial"] + 0.2, metrics
        assert metrics["val_mask_iou"] > metrics["val_mask_iou_blind"] + 0.05, metrics
        # An all-zero embedding scores 0.69x (the teacher's is layer-normalised per pixel), so 0.65x means learning.
        assert metrics["val_embedding_l1"] < 0.65 * metrics["val_embedding_l1_initial"], metrics
    else:
        assert metrics["val_mask_iou"] > metrics["val_mask_iou_initial"] + 0.1, metrics
        assert metrics["val_embedding_l1"] < 0.8 * metrics["val_embedding_l1_initial"], metrics
    assert metrics["val_logit_l1"] < 0.9 * metrics["val_logit_l1_initial"], metrics
    terms = _steps(out)[-1]
    assert {"embedding", "token", "output", "hmw_mean", "lr", "images_per_second"} <= set(terms)
    sam = build_sam("tinyvit_test", checkpoint=out / "student.pt")  # the result loads by name
    _, header = read_checkpoint(out / "student.pt")
    assert header["meta"]["distill_config"]["output_weight"] == 0.1
    assert sam.mask_decoder.iou_token.weight.shape == (1, 256)


@pytest.mark.slow
@requires_sam2
@requires_coco
def test_sam2_student_fidelity_rises_above_the_image_blind_floor_and_runs_in_sam2s_predictors(tmp_path):
    """`python -m distill` from a SAM 2 teacher on real COCO images: the student learns the three levels and the
    masks, and the result is a SAM 2 model that `SAM2ImagePredictor` and `SAM2AutomaticMaskGenerator` run.

    The teacher is `learnable_test_teacher("sam2_test")` (Hiera's patch filters smooth, the decoder's transposed
    convolutions half nearest-neighbour); settings as the SAM test's but 16 images and 24 steps. Measured, mask IoU
    final (initial) / floor and embedding L1 final (initial): seed 0 0.819 (0.380) / 0.581, 0.225 (0.484); seed 1
    0.789 (0.182) / 0.356, 0.244 (0.509); with 24 images and 40 steps 0.883 / 0.639 and 0.802 / 0.529. The
    margins (0.1 over the floor, 0.2 over the start, 0.6x the initial L1) leave room for the +-0.05 that small
    changes of the run move the final figure by.
    """
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    teacher = learnable_test_teacher(tmp_path / "teacher.pt", "sam2_test")
    out = tmp_path / "run"
    args = ["--data", str(COCO_ROOT), "--max-images", "16", "--teacher", "sam2_test"]
    args += ["--teacher-checkpoint", str(teacher), "--student", "sam2_test_student", *SMALL, "--out", str(out)]
    args += ["--steps", "24", "--batch-size", "2", "--lr", "1e-2", "--decoder-lr-scale", "0.01", "--val-images", "4"]
    args += ["--val-prompts-per-image", "8"]
    done = subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_mask_iou"] > metrics["val_mask_iou_initial"] + 0.2, metrics
    assert metrics["val_mask_iou"] > metrics["val_mask_iou_blind"] + 0.1, metrics
    assert metrics["val_embedding_l1"] < 0.6 * metrics["val_embedding_l1_initial"], metrics
    assert {"embedding_high_res_feats_0", "embedding_high_res_feats_1", "embedding_image_embed"} <= set(_steps(out)[-1])

    student = build_sam("sam2_test_student", checkpoint=out / "student.pt")  # loads by name, a SAM2Base
    image = load_image(sorted((COCO_ROOT / "val2017").glob("*.jpg"))[0])
    predictor = SAM2ImagePredictor(student)
    predictor.set_image(image)
    height, width = image.shape[:2]
    masks, scores, _ = predictor.predict(box=np.array([0, 0, width // 2, height // 2]), multimask_output=False)
    assert masks.shape == (1, height, width) and np.isfinite(scores).all()
    generator = SAM2AutomaticMaskGenerator(student, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    records = generator.generate(image)  # filters off: a test model's masks need not be confident
    assert records and all(r["segmentation"].shape == (height, width) for r in records)


def _kill_after_first_checkpoint_then_resume(tmp_path: Path, args: list[str]) -> tuple[Path, Path, dict]:
    """Run `args` to the end (reference), and again killed by SIGKILL right after its step-2 checkpoint landed,
    then resumed. Returns (reference folder, killed-and-resumed folder, the student state at the kill)."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*args, "--out", str(reference)]) == 0
    run = subprocess.Popen(
        [sys.executable, "-m", "distill", *args, "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not state.is_file() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL and not (killed / "student.pt").exists()
    at_kill = torch.load(state, weights_only=True)
    assert at_kill["step"] == 2
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert [r["step"] for r in _steps(killed)] == [1, 2, 3, 4]  # the log reads as one run
    return reference, killed, at_kill["student"]


RESUME_ARGS = [*SMALL, "--num-synthetic", "3", "--val-images", "0", "--steps", "4", "--batch-size", "1"]
RESUME_ARGS += ["--checkpoint-every", "2"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path, cache_dir):
    args = [*RESUME_ARGS, "--device", "cpu", "--cache-dir", str(cache_dir)]
    reference, killed, _ = _kill_after_first_checkpoint_then_resume(tmp_path, args)
    want, _ = read_checkpoint(reference / "student.pt")
    got, _ = read_checkpoint(killed / "student.pt")
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from the uninterrupted run"


@requires_cuda
@pytest.mark.slow
def test_sigkill_then_resume_on_cuda_ends_where_the_uninterrupted_run_does(tmp_path):
    """On CUDA (bf16 autocast; some kernels have no deterministic version) resume is equal up to kernel noise:
    the resumed weights lie within 5% of the distance that steps 3-4 moved them from the step-2 state (a resume
    that lost the optimiser or the weights would land about 100% away)."""
    args = [*RESUME_ARGS, "--device", "cuda", "--cache-dir", str(tmp_path / "cache")]
    reference, killed, at_kill = _kill_after_first_checkpoint_then_resume(tmp_path, args)
    want, _ = read_checkpoint(reference / "student.pt")
    got, _ = read_checkpoint(killed / "student.pt")
    floats = [k for k in want if want[k].is_floating_point()]
    moved = torch.cat([(want[k].float() - at_kill[k].float().cpu()).flatten() for k in floats]).norm()
    apart = torch.cat([(want[k].float() - got[k].float()).flatten() for k in floats]).norm()
    assert moved > 0 and apart <= 0.05 * moved, (float(apart), float(moved))


def _torchrun(nproc: int, port: int, args: list[str], env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(port), "-m", "distill", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one_process(tmp_path, cache_dir, free_port):
    """2 ranks x 1 image per step == 1 rank x 2 images (BatchNorm frozen: gloo has no SyncBatchNorm).

    --device cpu: gloo on the CPU, also on a machine with fewer GPUs than processes."""
    args = [*SMALL, "--num-synthetic", "5", "--val-images", "1", "--steps", "2", "--freeze-bn", "--device", "cpu"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*args, "--batch-size", "2", "--out", str(single), "--cache-dir", str(cache_dir)]) == 0
    ddp_args = [*args, "--batch-size", "1", "--out", str(ddp), "--cache-dir", str(tmp_path / "cache")]
    done = _torchrun(2, free_port, ddp_args, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu (DDP over gloo)" in done.stdout
    for one, two in zip(_steps(single), _steps(ddp), strict=True):
        for name in ("loss", "embedding", "token", "output"):
            assert two[name] == pytest.approx(one[name], rel=2e-3, abs=1e-5), (name, one["step"])
    val = [[r["val_mask_iou"] for r in _log(out) if r.get("event") == "val"] for out in (single, ddp)]
    assert val[1] == pytest.approx(val[0], abs=1e-3)
    # The two ranks shared the cache step: every image was embedded exactly once, as in one process.
    cache_events = [r for r in _log(ddp) if r.get("event") == "cache"]
    assert cache_events[0]["embedded"] == 5
    # Same fingerprint (teacher, data, cpu/float32), so the same folder name under both cache folders.
    arrays = sorted((tmp_path / "cache").glob("*/embeddings/*/*.npy"))
    assert len(arrays) == 5
    assert all(np.array_equal(np.load(p), np.load(cache_dir / p.relative_to(tmp_path / "cache"))) for p in arrays)


@requires_cuda
@pytest.mark.slow
def test_torchrun_one_process_on_one_gpu_runs_nccl_ddp_with_syncbatchnorm(tmp_path, free_port):
    """torchrun --nproc_per_node 1: the NCCL process group, DDP and SyncBatchNorm (the 8-GPU code path) give the
    losses of a plain one-process run, to bf16 kernel noise."""
    args = [*SMALL, "--num-synthetic", "4", "--val-images", "1", "--steps", "2", "--batch-size", "2"]
    args += ["--device", "cuda", "--cache-dir", str(tmp_path / "cache")]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*args, "--out", str(single)]) == 0
    done = _torchrun(1, free_port, [*args, "--out", str(ddp)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process(es) on cuda:0 (DDP over nccl)" in done.stdout, done.stdout
    assert "(SyncBatchNorm)" in done.stdout
    for one, two in zip(_steps(single), _steps(ddp), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-2), one["step"]


@requires_cuda
def test_torchrun_with_more_processes_than_gpus_stops_with_the_fix(tmp_path, free_port):
    gpus = torch.cuda.device_count()
    done = _torchrun(gpus + 1, free_port, ["--num-synthetic", "2", "--out", str(tmp_path / "o")])
    assert done.returncode != 0
    expected = f"error: torchrun started {gpus + 1} processes on this node (--nproc_per_node {gpus + 1}) but PyTorch"
    assert expected in done.stderr and "--device cpu (gloo)" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "o" / "teacher_cache").exists()  # stopped before any work


# ---- bad input ---------------------------------------------------------------------------------------------


def test_unknown_teacher_and_empty_dataset(tmp_path, capsys):
    assert main(["--teacher", "vit_q", "--out", str(tmp_path)]) == 1
    assert "unknown teacher 'vit_q': registered models:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--teacher", "sam_vit_test", "--student", "tinyvit_test"]) == 1
    assert "the folder holds no images" in capsys.readouterr().err


def test_corrupt_image_is_skipped_and_plain_folder_uses_embedding_loss_only(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_image(i, size=(48, 64))[0]).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = DistillConfig(
        data=str(folder),
        teacher="sam_vit_test",
        student="tinyvit_test",
        out=str(tmp_path / "o"),
        steps=1,
        batch_size=1,
        val_images=0,
        num_workers=0,
    )
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = distill(config)
    printed = capsys.readouterr().out
    assert "plain image folder without masks: only the embedding loss is used" in printed
    assert "skipped 1 unreadable image(s)" in printed and result.metrics["corrupt_images"] == 1
    assert set(_steps(result.out_dir)[0]) >= {"embedding"} and "token" not in _steps(result.out_dir)[0]


def _poison_second_embedding_loss(monkeypatch) -> list[int]:
    """Make the embedding loss NaN on its second call; returns the list that counts the calls."""
    real = distill_model.embedding_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        terms = real(*args)
        return {"embedding": terms["embedding"] * float("nan")} if len(calls) == 2 else terms

    monkeypatch.setattr(distill_model, "embedding_loss", poisoned)
    return calls


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    config = DistillConfig.demo(
        out=str(tmp_path),
        cache_dir=str(cache_dir),
        num_synthetic=3,
        val_images=0,
        steps=3,
        batch_size=1,
        checkpoint_every=1,
        prompts_per_image=1,
        max_prompt_iters=0,
    )
    _poison_second_embedding_loss(monkeypatch)
    with pytest.raises(DistillError, match=r"non-finite loss or gradient at step 2 .*the last good checkpoint is"):
        distill(config)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1 and not (tmp_path / "student.pt").exists()
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_a_nan_between_log_steps_is_caught_at_the_next_one_before_any_checkpoint(tmp_path, cache_dir, monkeypatch):
    """With --log-every 3 the host reads the device only at step 3: the NaN of step 2 is reported there, named by
    its step and values, and no checkpoint or student is written after it."""
    config = DistillConfig.demo(
        out=str(tmp_path),
        cache_dir=str(cache_dir),
        num_synthetic=4,
        val_images=0,
        steps=4,
        batch_size=1,
        log_every=3,
        checkpoint_every=3,
        prompts_per_image=1,
        max_prompt_iters=0,
    )
    calls = _poison_second_embedding_loss(monkeypatch)
    message = r"non-finite loss or gradient at step 2 \(loss=nan, .*\); stopped at step 3, before any later checkpoint"
    with pytest.raises(DistillError, match=message):
        distill(config)
    assert len(calls) == 3 and not (tmp_path / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "student.pt").exists() and _steps(tmp_path) == []


def test_embedding_shape_mismatch_is_named(tmp_path, cache_dir, monkeypatch):
    """A student whose encoder gives 128x64x64 against a 256x64x64 teacher stops at the first step, named."""
    name = "distill_bad_neck_test"
    spec = ModelSpec(name, lambda: torch.nn.Conv2d(3, 128, 16, 16), role="test", description="wrong embedding width")
    monkeypatch.setitem(registry._REGISTRY, name, spec)  # registered for this test only
    config = DistillConfig.demo(
        teacher="sam_vit_test",
        student=name,
        out=str(tmp_path),
        cache_dir=str(cache_dir),
        num_synthetic=3,
        val_images=0,
        steps=1,
        batch_size=1,
    )
    message = f"student {name} gives 128x64x64, teacher sam_vit_test gives 256x64x64"
    with pytest.raises(DistillError, match=message):
        distill(config)
