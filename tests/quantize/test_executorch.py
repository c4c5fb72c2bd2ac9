"""ExecuTorch: INT8 programs lowered to XNNPACK, checked layer by layer in ExecuTorch's runtime; the runner.

The check runs here on a small block with every kind of layer the programs hold (an int8 convolution, int8 Linear
layers, a ReLU requantized in int8, a twin-uniform product in float32): the SAM graphs' programs take minutes to
lower and check on a 2-core CPU (``python -m quantize --runtime executorch`` runs the same check on them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantize import executorch_runtime
from quantize.executorch_runtime import (
    MAX_POINTS,
    ExecuTorchSam,
    _write_and_check,
    program_precision,
    runs_on_xnnpack_int8,
    write_program,
)
from quantize.modules import quantized_copy
from quantize.onnx_export import export_mode
from quantize.ptq import share_requantized_scales
from tests.quantize.test_export_check import calibrated_block

pytest.importorskip("executorch", reason='the ExecuTorch runtime is an extra: pip install -e ".[executorch]"')


class XnnpackBlock(nn.Module):
    """3x3 conv (quantized output) -> GELU -> fc1 (quantized output) -> ReLU -> fc2 (quantized output) -> GELU -> fc3
    (twin-uniform input)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = quantized_copy(nn.Conv2d(3, 16, 3, stride=2, padding=1), 8, 8, ["uniform"], conv_outputs=True)
        self.fc1 = quantized_copy(nn.Linear(16, 64), 8, 8, ["uniform"], product_outputs=True)
        self.fc2 = quantized_copy(nn.Linear(64, 32), 8, 8, ["uniform"], product_outputs=True)
        self.fc3 = quantized_copy(nn.Linear(32, 16), 8, 8, ["twin_gelu"], product_outputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.gelu(self.conv(x)).permute(0, 2, 3, 1)
        return self.fc3(nn.functional.gelu(self.fc2(torch.relu(self.fc1(rows)))))


def _probe(block: nn.Module, x: torch.Tensor) -> tuple:
    """`probe_parts`'s tuple for `block` as an encoder: (module, args, input names, int8 outputs, float outputs)."""
    with torch.no_grad():
        with export_mode(block, "float32"):
            float_out = block(x)
        with export_mode(block, "int8"):
            out = block(x)
    return block, (x,), ["x"], {"y": out}, {"y": float_out}


@pytest.fixture(scope="module")
def block_probe():
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    block = calibrated_block(x, XnnpackBlock())
    assert share_requantized_scales(block, lambda model: iter([model(x)])) == {"fc2.input_quants.0": "fc1.output_quant"}
    return _probe(block, x)


def test_int8_program_rounds_apart_only_ties_and_ships_the_checked_kernels(block_probe, tmp_path):
    block = block_probe[0]
    assert [runs_on_xnnpack_int8(layer) for layer in (block.conv, block.fc1, block.fc2, block.fc3)] == [
        True, True, True, False,
    ]  # fmt: skip
    check = _write_and_check("encoder", block_probe, tmp_path / "block.pte", "int8")
    assert check.passed, check.rel_diff
    assert check.rel_diff["rounding_unexplained"] == 0.0
    assert check.rel_diff["y.shipped_vs_instrumented.max"] == 0.0  # XNNPACK's kernels, exposed or not
    assert check.info["forced_quantizers"] == 7  # four inputs, three outputs: every value came back


def test_a_program_with_a_wrong_scale_fails_the_check_with_its_layer_named(block_probe, tmp_path, monkeypatch):
    """A runtime that computes with another scale than the model's (here: fc2's input grid 1.5x) is refused."""
    write_as = executorch_runtime.program_module

    def skewed(module, record=None):
        program = write_as(module, record)
        program.fc2.inputs[0].scales = (program.fc2.inputs[0].scales[0] * 1.5,)
        return program

    monkeypatch.setattr(executorch_runtime, "program_module", skewed)
    check = _write_and_check("encoder", block_probe, tmp_path / "skewed.pte", "int8")
    assert not check.passed
    assert check.rel_diff["rounding_unexplained"] > 0.0
    assert check.info["worst_rounding_quantizer"].startswith("fc2."), check.info


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
