"""Devices: quantization runs where the model is, export runs on a CPU copy, and the core needs no ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantize import PTQConfig, export_onnx, quantize_
from quantize.__main__ import main
from quantize.bench import get_parser as bench_parser
from quantize.calibration import prepare_calibration
from quantize.fidelity import fidelity, run_model
from quantize.ptq import quantized_layers
from student_models.sam_runner import TorchSamBackend
from tests.helpers import requires_cuda, synthetic_image, tiny_model
from tests.quantize.conftest import FAST


def test_quantizing_imports_no_onnx_runtime():
    code = "import sys, quantize, quantize.ptq, quantize.checkpoint; print('onnxruntime' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_both_commands_take_a_checked_device(capsys):
    assert "--device" in bench_parser().format_help()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--device", "cuda:99"])
    assert "error: argument --device: device 'cuda:99'" in capsys.readouterr().err


@requires_cuda
def test_quantize_on_cuda_and_export_from_a_cpu_copy(tmp_path):
    image = synthetic_image(0)[0]
    float_sam = tiny_model("tinyvit_test").cuda()
    sam = tiny_model("tinyvit_test").cuda()
    report = quantize_(sam, PTQConfig(method="hessian", **FAST), [image], show_progress=False)
    assert report.layers and report.num_calib == 1
    for name, tensor in [*sam.named_parameters(), *sam.named_buffers()]:
        assert tensor.is_cuda, name  # the quantizers' scales too, next to the weights they scale
    assert all(layer.input_quants[0].enabled for layer in quantized_layers(sam).values() if layer.input_quants)
    items = prepare_calibration([synthetic_image(5)[0]], 1, 2, seed=3)
    scores = fidelity(
        run_model(TorchSamBackend(float_sam, "cuda"), items), run_model(TorchSamBackend(sam, "cuda"), items)
    )
    assert scores["sqnr_embedding_db"] > 12 and scores["mask_iou"] > 0.8, scores  # the CPU test's bounds

    result = export_onnx(sam, tmp_path, "int8", ort_format=False)
    assert all(check.passed for check in result.checks), result.checks
    assert all(p.is_cuda for p in sam.parameters())  # exported from a copy: the model stays on its GPU
