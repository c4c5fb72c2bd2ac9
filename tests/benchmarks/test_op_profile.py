"""Per-op profiles: each runtime's profiler read back, int8 products told apart from the rest."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.op_profile import is_integer_product, ort_op_times, profile_table, summarize

ROWS, CHANNELS = 2048, 256  # big enough for every op to take more than the summary's 0.1 ms


def qdq_linear_gelu(path, channels: int = CHANNELS) -> None:
    """x -> Q/DQ (uint8) -> MatMul with a DQ'd per-channel int8 weight -> Gelu: both runtimes fuse an int8 product."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zero"),
        numpy_helper.from_array(rng.integers(-127, 128, (channels, channels), dtype=np.int8), "w_q"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"]),
        helper.make_node("Gelu", ["y"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq_linear_gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, channels])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [ROWS, channels])], initializers,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "model.onnx"
    qdq_linear_gelu(path)
    return path, [np.random.default_rng(k).standard_normal((ROWS, CHANNELS), dtype=np.float32) for k in range(2)]


def test_onnx_runtime_profile_finds_the_integer_product_and_the_float_rest(model_and_images):
    path, images = model_and_images
    times = ort_op_times(path, images, threads=1, rounds=2)
    assert any(is_integer_product(op) for op in times) and "Gelu" in times and not is_integer_product("Gelu")
    summary = summarize(times)
    assert summary["integer_products_ms"] > 0 and summary["other_ms"] > 0
    assert summary["total_ms"] == pytest.approx(summary["integer_products_ms"] + summary["other_ms"], abs=0.11)
    assert sum(share for _, _, share in summary["top"]) == pytest.approx(1.0, abs=1e-2)


def test_openvino_profile_names_the_kernel_and_its_precision(model_and_images):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from benchmarks.op_profile import openvino_op_times

    path, images = model_and_images
    times = openvino_op_times(path, images, threads=1, rounds=2)
    assert all(" " in op for op in times)  # "<node type> <kernel>"
    assert any(is_integer_product(op) for op in times), times


def test_executorch_profile_times_each_xnnpack_operator_and_the_rest(model_and_images, tmp_path):
    pytest.importorskip("executorch", reason='the ExecuTorch runtime is an extra: pip install -e ".[executorch]"')
    import torch

    from benchmarks.op_profile import EXECUTORCH_REST, executorch_op_times
    from quantize.executorch_runtime import write_program

    _, images = model_and_images
    linear_gelu = torch.nn.Sequential(torch.nn.Linear(CHANNELS, CHANNELS), torch.nn.GELU()).eval()
    path = write_program(linear_gelu, (torch.from_numpy(images[0]),), tmp_path / "model.pte", "encoder", "float32")
    times = executorch_op_times(path, images, threads=1, rounds=2)
    assert "Fully Connected (NC, F32) GEMM" in times and "GELU (NC)" in times and EXECUTORCH_REST in times, times
    assert not any(is_integer_product(op) for op in times)  # a float32 program
    assert times["Fully Connected (NC, F32) GEMM"] > 0.1


def test_only_int8_kernels_of_products_count_as_integer_products():
    assert is_integer_product("QGemm") and is_integer_product("Convolution brgconv_avx512_I8")
    assert is_integer_product("FullyConnectedQuantizedLegacy brgemm_avx512_i8")
    assert not is_integer_product("FullyConnected brgemm_avx512_f32") and not is_integer_product("Subgraph jit_I8")
    assert is_integer_product("Fully Connected (NC, QS8) GEMM") and is_integer_product("Convolution (NHWC, QC8) IGEMM")
    assert is_integer_product("Fully Connected (NC, QD8, F32, QC8W) GEMM")
    assert not is_integer_product("Batch Matrix Multiply (NC, F32) GEMM") and not is_integer_product("Convert (NC)")
    table = profile_table({"ort int8": summarize(Counter({"QGemm": 3.0, "Gelu": 1.0}))})
    assert table.splitlines()[-1] == "| ort int8 | 4.0 | 3.0 | 1.0 | QGemm 75%, Gelu 25% |"
