"""quantize.bench's pieces: layer groups back in float for the per-type fidelity figures."""

from __future__ import annotations

import os

import pytest
import torch

from quantize.bench import get_parser, layers_in_float, run
from tests.helpers import tiny_model
from tests.student_models.test_sam2_models import requires_sam2


def test_layers_in_float_switches_quantizers_off_and_back(quantized_tinyvit):
    sam, _ = quantized_tinyvit
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized = sam.image_encoder(x)
        with layers_in_float(sam, ["image_encoder.*"]):
            in_float = sam.image_encoder(x)
        torch.testing.assert_close(sam.image_encoder(x), quantized, rtol=0, atol=0)
        reference = tiny_model("tinyvit_test").image_encoder(x)
    torch.testing.assert_close(in_float, reference, rtol=1e-4, atol=1e-4)  # BatchNorms folded: float rounding only
    assert not torch.allclose(quantized, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"--float-groups patterns \['nothing\.\*'\] match no quantized layer"):
        with layers_in_float(sam, ["nothing.*"]):
            pass
    groups = get_parser().parse_args(["--float-groups", "squeeze-excite=*.se.*", "dw=*a*,*b*"]).float_groups
    assert groups == [("squeeze-excite", ["*.se.*"]), ("dw", ["*a*", "*b*"])]


def test_the_fast_graph_and_a_reference_encoder_in_the_same_run(tmp_path):
    """--uniform-too exports minmax without twin ranges; --reference-encoder times a PyTorch encoder once per
    thread count within the interleaved repeats, and bench.md gives every graph's speed-up against it."""
    out = tmp_path / "bench"
    args = ["--model", "tinyvit_test", "--out", str(out), "--num-calib", "1", "--num-eval", "1", "--max-prompts", "2",
            "--bits", "8", "--methods", "minmax", "--ort-methods", "--num-alphas", "2", "--rounds", "1",
            "--repeats", "1", "--uniform-too", "--reference-encoder", "sam_vit_test", "--device", "cpu"]  # fmt: skip
    records = run(get_parser().parse_args(args))

    uniform = records["export_minmax_all-uniform"]
    assert all(check["passed"] for check in uniform["checks"])
    assert not {"ThresholdedRelu", "Clip"} & uniform["ort_kernels"]["encoder"].keys()  # no twin range split
    names = {r["name"] for r in records["fidelity"]}
    assert {"ours W8A8 minmax all-uniform (PyTorch, simulated)", "ours INT8 minmax all-uniform (ORT)"} <= names
    latency = records["latency"]
    assert {r["threads"] for r in latency if r["name"] == "reference"} == {1, os.cpu_count()}
    assert all(r["encoder_ms"] > 0 for r in latency)
    markdown = (out / "bench.md").read_text()
    assert "| sam_vit_test (PyTorch float32, random weights, CPU) vs |" in markdown
    assert markdown.count("| ours INT8 minmax all-uniform | 1 |") == 2  # against float32 and against the reference


@requires_sam2
def test_a_sam2_model_is_benchmarked_against_onnx_runtimes_own_quantizer(tmp_path):
    """SAM 2's calibration frame, its three-level graphs and ORT's quantize_static fed all three levels."""
    args = ["--model", "sam2_test_student", "--out", str(tmp_path), "--num-calib", "1", "--num-eval", "1",
            "--max-prompts", "2", "--bits", "8", "--methods", "mse", "--ort-methods", "minmax", "--num-alphas", "2",
            "--rounds", "1", "--skip-latency", "--device", "cpu"]  # fmt: skip
    records = run(get_parser().parse_args(args))
    fidelity = {r["name"]: r for r in records["fidelity"]}
    assert {"ours INT8 mse (ORT)", "ORT quantize_static minmax (ORT)"} <= fidelity.keys()
    assert all(check["passed"] for check in records["export_mse"]["checks"])
    assert 10 < fidelity["ORT quantize_static minmax (ORT)"]["sqnr_embedding_db"] < 60
