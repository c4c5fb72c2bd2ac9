"""ExecuTorch: the INT8 decoder program lowered to XNNPACK, checked layer by layer in ExecuTorch's runtime.

The decoder's INT8 program only: its export and check take ~2 minutes on a 2-core CI CPU, the encoder's as long
again (the same code runs for it). A program with one quantizer's scale 1.5x off fails the same check with that
quantizer named (run by hand; it costs as long again).
"""

from __future__ import annotations

import pytest
import torch

from quantize.executorch_runtime import _write_and_check
from quantize.onnx_export import probe_parts

pytest.importorskip("executorch", reason='the ExecuTorch runtime is an extra: pip install -e ".[executorch]"')


@pytest.fixture(scope="module")
def decoder_probe(quantized_tinyvit):
    sam, _ = quantized_tinyvit
    with torch.no_grad():
        return probe_parts(sam.eval(), "int8")["decoder"]


def test_int8_decoder_program_rounds_apart_only_ties_and_ships_the_checked_kernels(decoder_probe, tmp_path):
    check = _write_and_check("decoder", decoder_probe, tmp_path / "decoder.pte", "int8")
    assert check.passed, check.rel_diff
    assert check.rel_diff["rounding_unexplained"] == 0.0
    assert check.rel_diff["low_res_masks.shipped_vs_instrumented.max"] == 0.0  # XNNPACK's kernels, exposed or not
    assert check.info["forced_quantizers"] > 20  # every quantizer's values came back from the program
