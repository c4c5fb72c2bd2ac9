"""The INT8 export check, layer by layer: ORT's graph must compute what the simulated layers compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import quantize.onnx_runtime
from quantize.export_check import TIE_RELATIVE, tie_range, twin_steps, unexplained_roundings
from quantize.modules import ActQuantizer, QuantLayer, WeightQuantizer, quantized_copy
from quantize.onnx_export import check_int8, describe_failure, export_mode, write_onnx
from quantize.onnx_runtime import count_kernels
from quantize.ptq import share_requantized_scales
from student_models.tiny_vit import MatMul


class ConvBlock(nn.Module):
    """3x3 conv (uniform input, quantized output: QLinearConv) -> GELU -> depthwise 3x3 conv (the same)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = quantized_copy(nn.Conv2d(8, 16, 3, stride=2, padding=1), 8, 8, ["uniform"], conv_outputs=True)
        self.act = nn.GELU()
        self.conv2 = quantized_copy(nn.Conv2d(16, 16, 3, padding=1, groups=16), 8, 8, ["uniform"], conv_outputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Block(nn.Module):
    """fc1 (uniform int8 input) -> GELU -> fc2 (twin-uniform input: two int8 products) -> fc3 (uniform int8 input)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = quantized_copy(nn.Linear(32, 128), 8, 8, ["uniform"])
        self.act = nn.GELU()
        self.fc2 = quantized_copy(nn.Linear(128, 32), 8, 8, ["twin_gelu"])
        self.fc3 = quantized_copy(nn.Linear(32, 16), 8, 8, ["uniform"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.act(self.fc1(x))))


@torch.no_grad()
def calibrated_block(x: torch.Tensor, block: nn.Module | None = None) -> nn.Module:
    """Min/max scales from one float pass over `x`, quantizers on."""
    block = (block or Block()).eval()
    seen: dict[ActQuantizer, float] = {}
    hooks = [
        q.register_forward_hook(lambda q, i, o: seen.__setitem__(q, float(i[0].abs().max())))
        for q in block.modules()
        if isinstance(q, ActQuantizer)
    ]
    block(x)
    for hook in hooks:
        hook.remove()
    for quantizer, amax in seen.items():
        quantizer.scale.fill_(amax / 127)
        quantizer.enabled = True
    for layer in (m for m in block.modules() if isinstance(m, QuantLayer) and m.weight_axis is not None):
        layer.weight_quant.scale.copy_(layer.weight.flatten(1).abs().amax(dim=1) / 127)
        layer.weight_quant.enabled = True
    assert all(q.enabled for q in block.modules() if isinstance(q, (ActQuantizer, WeightQuantizer)))
    return block


def export_block(block: nn.Module, x: torch.Tensor, path):
    """(the block, the int8 graph's path, x, {"y": simulated output}, {"y": float output})."""
    with torch.no_grad():
        with export_mode(block, "float32"):
            float_out = block(x)
        with export_mode(block, "int8"):
            out = block(x)
            write_onnx(block, (x,), path, ["x"], ["y"], None)
    return block, path, x, {"y": out}, {"y": float_out}


@pytest.fixture()
def exported_block(tmp_path):
    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1))
    return export_block(calibrated_block(x), x, tmp_path / "block.onnx")


def test_int8_layers_agree_with_simulation(exported_block):
    block, path, x, expected, float_out = exported_block
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    assert check.info["forced_quantizers"] == 3
    assert check.rel_diff["y.rms"] < 1e-5 and check.rel_diff["rounding_max_steps"] <= 1.001
    kernels = count_kernels(path)
    # fc1, fc3, and fc2 once per range of its twin-uniform input: all integer, no float product left;
    # the bias inside the integer kernel (QGemm), for fc2 in its high range's product
    assert kernels.get("QGemm", 0) == 3 and kernels.get("MatMulIntegerToFloat", 0) == 1, kernels
    assert not {"MatMul", "Gemm"} & kernels.keys(), kernels
    assert kernels.get("Add", 0) == 1, kernels  # fc2's two ranges summed; no float bias Add left


def test_integer_products_add_their_bias_on_the_int32_grid(exported_block):
    """The simulated layer rounds its bias to input scale x weight scale, the int32 bias ORT's QGemm adds."""
    block, path, x, expected, float_out = exported_block
    graph = onnx.load(str(path)).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(block, name)
        assert layer.integer_bias
        quantizer = layer.input_quants[0]
        scale = quantizer.scale if quantizer.kind == "uniform" else quantizer.range_scales()[1]
        step = scale * layer.weight_quant.scale
        levels = layer.quantized_bias().detach() / step
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert (layer.quantized_bias() - layer.bias).detach().abs().le(step / 2 * 1.001).all()
        gemm = next(n for n in graph.node if n.op_type == "Gemm" and n.name.startswith(f"/{name}/"))
        bias_dq = next(n for n in graph.node if n.output[0] == gemm.input[2])
        assert inits[bias_dq.input[0]].dtype == np.int32
        np.testing.assert_array_equal(inits[bias_dq.input[0]], levels.round().numpy().astype(np.int32))


def test_check_catches_a_wrong_integer_bias(exported_block):
    block, path, x, expected, float_out = exported_block
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.startswith("/fc3/") and i.name.endswith("_bias_int32"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 500, init.name))  # 500 steps off
    onnx.save(model, str(path))
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert not check.passed
    assert check.rel_diff["y.rms"] > 1e-4, check.rel_diff


class PointwiseBlock(nn.Module):
    """1x1 conv (uniform input) -> GELU -> 1x1 conv (twin-uniform input): NHWC rows into QGemm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = quantized_copy(nn.Conv2d(8, 32, 1), 8, 8, ["uniform"], conv_outputs=True)
        self.act = nn.GELU()
        self.conv2 = quantized_copy(nn.Conv2d(32, 8, 1), 8, 8, ["twin_gelu"], conv_outputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def test_pointwise_convolutions_run_as_qgemm_with_their_bias(tmp_path):
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(4))
    block = calibrated_block(x, PointwiseBlock())
    assert block.conv1.output_quant is None and block.conv1.integer_bias and block.conv2.integer_bias
    with torch.no_grad():
        simulated = block(x)  # fake-quantized, not export mode: the same bias grid as the graph
    block, path, x, expected, float_out = export_block(block, x, tmp_path / "pointwise.onnx")
    torch.testing.assert_close(expected["y"], simulated, rtol=0, atol=1e-5)
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    kernels = count_kernels(path)
    assert kernels.get("QGemm", 0) == 2 and not {"Conv", "Gemm", "MatMul"} & kernels.keys(), kernels


def test_check_catches_matmulnbits_requantizing_a_float_input(tmp_path, monkeypatch):
    """With fc2's input left in float, ORT's default MatMulNBits accuracy level quantizes it again."""
    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1))
    block = calibrated_block(x)
    block.fc2.input_quants[0].enabled = False  # a float input times int8 weights: DQ -> MatMul -> MatMulNBits
    block, path, x, expected, float_out = export_block(block, x, tmp_path / "float_input.onnx")
    monkeypatch.setattr(quantize.onnx_runtime, "MATMULNBITS_FP32", "4")
    if count_kernels(path).get("MatMulNBits", 0) == 0:
        pytest.skip("this ONNX Runtime does not rewrite DQ -> MatMul into MatMulNBits")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert not check.passed
    assert check.info["worst_rounding_quantizer"] == "fc3.input_quants.0"
    assert check.rel_diff["rounding_unexplained"] > 1e-2


def test_check_catches_a_wrong_activation_scale(exported_block):
    block, path, x, expected, float_out = exported_block
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "fc3.input_quants.0.scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(model, str(path))
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert not check.passed
    assert check.rel_diff["y.rms"] > 1e-3


def test_convolutions_with_output_quantizer_run_as_qlinearconv(tmp_path):
    x = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(2))
    block = calibrated_block(x, ConvBlock())
    # Output quantizers are calibrated like inputs here: min/max of the float conv outputs.
    assert block.conv1.output_quant is not None and block.conv1.output_quant.enabled
    block, path, x, expected, float_out = export_block(block, x, tmp_path / "conv.onnx")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    assert check.info["forced_quantizers"] == 4  # two inputs, two outputs
    assert count_kernels(path).get("QLinearConv", 0) == 2


class ProductOutputsBlock(nn.Module):
    """fc1 (uniform input, quantized output) -> GELU -> fc2 (the same) -> GELU -> fc3 (twin-uniform input: no
    output quantizer) -> 1x1 conv (none either), as ``product_outputs`` makes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = quantized_copy(nn.Linear(8, 32), 8, 8, ["uniform"], product_outputs=True)
        self.act = nn.GELU()
        self.fc2 = quantized_copy(nn.Linear(32, 16), 8, 8, ["uniform"], product_outputs=True)
        self.fc3 = quantized_copy(nn.Linear(16, 8), 8, 8, ["twin_gelu"], product_outputs=True)
        self.conv = quantized_copy(nn.Conv2d(8, 8, 1), 8, 8, ["uniform"], product_outputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.fc3(self.act(self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1))))))
        return self.conv(rows.permute(0, 3, 1, 2))


def test_products_with_output_quantizers_pass_the_check_with_their_outputs_forced(tmp_path):
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    block = calibrated_block(x, ProductOutputsBlock())
    assert block.fc1.output_quant.enabled and block.fc2.output_quant.enabled
    assert block.fc3.output_quant is None and block.conv.output_quant is None
    assert block.fc1.integer_bias and block.fc2.integer_bias  # the bias on the int32 grid, as XNNPACK adds it
    block, path, x, expected, float_out = export_block(block, x, tmp_path / "products.onnx")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    assert check.info["forced_quantizers"] == 6  # four inputs, two outputs


class ConvChain(nn.Module):
    """3x3 conv (quantized output) straight into a depthwise 3x3 conv (quantized input and output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = quantized_copy(nn.Conv2d(8, 16, 3, padding=1), 8, 8, ["uniform"], conv_outputs=True)
        self.conv2 = quantized_copy(nn.Conv2d(16, 16, 3, padding=1, groups=16), 8, 8, ["uniform"], conv_outputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def test_a_quantizer_straight_after_another_shares_its_grid(tmp_path):
    """ORT merges DequantizeLinear(s1) -> QuantizeLinear(s2) into one rounding: the check sees it, one grid fixes it."""
    x = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(3))
    block = calibrated_block(x, ConvChain())
    block.conv2.input_quants[0].scale.mul_(1.3)  # a second grid, as a separate scale search may choose
    _, path, _, expected, float_out = export_block(block, x, tmp_path / "two_grids.onnx")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert not check.passed and check.rel_diff["y.shipped_vs_instrumented.max"] > 1e-2, check

    assert share_requantized_scales(block, lambda model: iter([model(x)])) == {
        "conv2.input_quants.0": "conv1.output_quant"
    }
    assert block.conv2.input_quants[0].scale == block.conv1.output_quant.scale
    _, path, _, expected, float_out = export_block(block, x, tmp_path / "one_grid.onnx")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check


class ReluMlp(nn.Module):
    """fc1 (quantized output) -> ReLU -> fc2: an MLP's hidden layer with ``product_outputs``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = quantized_copy(nn.Linear(16, 64), 8, 8, ["uniform"], product_outputs=True)
        self.fc2 = quantized_copy(nn.Linear(64, 16), 8, 8, ["uniform"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_quantizer_after_another_through_a_relu_shares_its_grid():
    """XNNPACK requantizes across the ReLU in int8: on one grid the second rounding is exact, as simulated."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    block = calibrated_block(x, ReluMlp())
    assert share_requantized_scales(block, lambda model: iter([model(x)])) == {"fc2.input_quants.0": "fc1.output_quant"}
    assert block.fc2.input_quants[0].scale == block.fc1.output_quant.scale


def test_twin_steps_counts_a_boundary_tie_as_one_step_and_keeps_errors_within_a_range():
    split = 2.0**-6
    scales = (torch.tensor(split / 128), torch.tensor(1 / 127))  # a twin-softmax input's two ranges
    zero = torch.zeros(1)
    # ORT put a value at the split in the low range's top level, PyTorch in the high range (2 levels up).
    ort = [torch.tensor([127 * split / 128]), zero]
    own = (zero, torch.tensor([2 / 127]))
    assert twin_steps(ort, own, scales) < 1.0
    assert twin_steps([torch.tensor([10 * split / 128]), zero], (torch.tensor([12 * split / 128]), zero), scales) == (
        pytest.approx(2.0)
    )


class AttentionBlock(nn.Module):
    """q @ k^T (uniform inputs) -> softmax -> attn @ v (twin-softmax attn: two integer products)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = quantized_copy(MatMul(), 8, 8, ["uniform", "uniform"])
        self.av = quantized_copy(MatMul(), 8, 8, ["twin_softmax", "uniform"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.av(self.qk(x, x.transpose(-1, -2)).softmax(dim=-1), x)


def test_twin_softmax_ranges_split_by_one_threshold(tmp_path):
    """The high range is ThresholdedRelu just below the split (x >= split), the low range the rest."""
    x = torch.randn(2, 48, 16, generator=torch.Generator().manual_seed(5)) * 2
    block = calibrated_block(x, AttentionBlock())
    quantizer = block.av.input_quants[0]
    quantizer.split.fill_(2.0**-4)
    attn = torch.tensor([0.0, 2.0**-4, float(torch.nextafter(torch.tensor(2.0**-4), torch.tensor(0.0))), 0.5])
    low, high = quantizer.twin_ranges_int8(attn)
    assert low.tolist()[1:3] == [0.0, pytest.approx(2.0**-4, abs=2.0**-10)] and high[1] > 0 and high[2] == 0
    block, path, x, expected, float_out = export_block(block, x, tmp_path / "attention.onnx")
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    kernels = count_kernels(path)
    assert kernels.get("ThresholdedRelu", 0) == 1 and not {"Less", "Cast", "Where"} & kernels.keys(), kernels


def test_a_tie_is_a_value_within_float_error_of_a_rounding_boundary():
    quantizer = ActQuantizer(8)
    quantizer.scale.fill_(2.0**-4)
    quantizer.enabled = quantizer.export_int8 = True
    step = 2.0**-4
    x = torch.tensor([10.5, 11.5, 10.3, -3.5]) * step  # two ties, one value clear of a boundary, a negative tie
    low, high = tie_range(quantizer, x)
    torch.testing.assert_close(low, torch.tensor([10.0, 11.0, 10.0, -4.0]) * step, rtol=0, atol=0)
    torch.testing.assert_close(high, torch.tensor([11.0, 12.0, 10.0, -3.0]) * step, rtol=0, atol=0)
    # Either side of a tie is explained; the other way for a value 0.2 steps from the boundary is not.
    assert unexplained_roundings(quantizer, x, torch.tensor([11.0, 11.0, 10.0, -4.0]) * step) == 0
    assert unexplained_roundings(quantizer, x, torch.tensor([10.0, 12.0, 11.0, -3.0]) * step) == 1
    # The allowance is relative: a value 2 TIE_RELATIVE of the range short of a boundary is no tie.
    near = torch.tensor([(10.5 - 2 * TIE_RELATIVE * 128)]) * step
    assert unexplained_roundings(quantizer, near, torch.tensor([11.0]) * step) == 1


def scale_graph_input(path, factor: float) -> None:
    """Multiply the graph input "x" by `factor` before its QuantizeLinear: a kernel that computes slightly else."""
    model = onnx.load(str(path))
    quantize_x = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=np.float32), "x_factor"))
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["x", "x_factor"], ["x_scaled"]))
    quantize_x.input[0] = "x_scaled"
    onnx.save(model, str(path))


def test_check_accepts_ties_rounded_the_other_way_and_refuses_a_kernel_off_by_a_fraction_of_a_step(tmp_path):
    """Inputs on rounding boundaries, moved by a few float32 ulps: ORT rounds half of them the other way.

    Those are ties and the export passes; the same graph moved by 0.8% rounds values that lie nowhere
    near a boundary differently, and the check names the quantizer.
    """
    gen = torch.Generator().manual_seed(6)
    step = 2.0**-4
    on_boundaries = (torch.randint(-100, 100, (4, 64, 32), generator=gen) + 0.5) * step
    block = calibrated_block(on_boundaries)
    block.fc1.input_quants[0].scale.fill_(step)
    block, path, x, expected, float_out = export_block(block, on_boundaries, tmp_path / "ties.onnx")
    scale_graph_input(path, 1 + 2.0**-20)
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert check.passed, check
    assert check.info["rounding_mismatch"] > 0.2  # far beyond any fixed fraction: every one of them a tie

    random = torch.randn(4, 64, 32, generator=gen) * 3
    block, path, x, expected, float_out = export_block(block, random, tmp_path / "wrong.onnx")
    scale_graph_input(path, 1 + 2.0**-7)
    check = check_int8(block, path, (x,), ["x"], expected, float_out)
    assert not check.passed
    assert check.rel_diff["rounding_unexplained"] > 1e-2
    assert "rounding_unexplained" in describe_failure(check) and "fc1.input_quants.0" in describe_failure(check)
