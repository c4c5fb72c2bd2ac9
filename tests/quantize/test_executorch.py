"""ExecuTorch: the INT8 decoder program lowered to XNNPACK, checked layer by layer in ExecuTorch's runtime.

The decoder's INT8 program only (of a model quantized with ``product_outputs``, so that both XNNPACK's int8
products and the float32 paths are checked): its export and check take ~2 minutes on a 2-core CI CPU, the encoder's
as long again (the same code runs for it). A program with one quantizer's scale 1.5x off fails the same check with
that quantizer named (run by hand; it costs as long again).
"""

from __future__ import annotations

import pytest
import torch

from quantize import PTQConfig, quantize_
from quantize.executorch_runtime import (
    MAX_POINTS,
    ExecuTorchSam,
    _write_and_check,
    program_precision,
    runs_on_xnnpack_int8,
    write_program,
)
from quantize.modules import QuantLayer
from quantize.onnx_export import probe_parts
from tests.helpers import synthetic_image, tiny_model
from tests.quantize.conftest import FAST

pytest.importorskip("executorch", reason='the ExecuTorch runtime is an extra: pip install -e ".[executorch]"')


@pytest.fixture(scope="module")
def decoder_probe():
    """tinyvit_test quantized with ``product_outputs`` (its Linear layers on XNNPACK's int8 kernels, ReLUs between
    them requantized in int8), and its decoder's probe."""
    sam = tiny_model("tinyvit_test")
    config = PTQConfig(method="mse", product_outputs=True, **FAST)
    quantize_(sam, config, [synthetic_image(0)[0]], show_progress=False)
    with torch.no_grad():
        return probe_parts(sam.eval(), "int8")["decoder"]


def test_int8_decoder_program_rounds_apart_only_ties_and_ships_the_checked_kernels(decoder_probe, tmp_path):
    module = decoder_probe[0]
    int8_layers = [layer for layer in module.modules() if isinstance(layer, QuantLayer) and runs_on_xnnpack_int8(layer)]
    assert len(int8_layers) > 20
    check = _write_and_check("decoder", decoder_probe, tmp_path / "decoder.pte", "int8")
    assert check.passed, check.rel_diff
    assert check.rel_diff["rounding_unexplained"] == 0.0
    assert check.rel_diff["low_res_masks.shipped_vs_instrumented.max"] == 0.0  # XNNPACK's kernels, exposed or not
    assert check.info["forced_quantizers"] > 100  # every quantizer's values came back from the program


@pytest.fixture(scope="module")
def tiny_program(tmp_path_factory):
    """A one-output program (a SAM encoder's count) written as INT8 would be, in a second."""
    path = tmp_path_factory.mktemp("program") / "tiny.pte"
    return write_program(torch.nn.Linear(4, 4), (torch.randn(1, 4),), path, "encoder", "int8")


def test_a_program_says_its_precision(tiny_program):
    assert program_precision(tiny_program) == "int8"


def test_a_prompt_over_the_decoder_programs_point_limit_is_refused_by_name(tiny_program):
    sam = ExecuTorchSam(tiny_program, tiny_program, num_threads=1)
    points = MAX_POINTS + 1
    with pytest.raises(ValueError, match=f"prompts of {points} points: the ExecuTorch decoder program takes up to 16"):
        sam.decode(torch.zeros(1, 256, 64, 64), torch.zeros(2, points, 2), torch.ones(2, points))


def test_programs_loaded_before_another_thread_count_are_not_run(tiny_program):
    """XNNPACK keeps the thread pool it loaded with, which a new count replaces: running then would use a freed pool."""
    first = ExecuTorchSam(tiny_program, tiny_program, num_threads=1)
    ExecuTorchSam(tiny_program, tiny_program, num_threads=2)
    with pytest.raises(RuntimeError, match="thread pool now has 2 threads, not the 1 these programs were loaded with"):
        first.encode(torch.zeros(1, 3, 1024, 1024))
