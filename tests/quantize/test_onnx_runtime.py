"""The ONNX Runtime session we prescribe runs int8 products exactly, at the values that overflow int16 pairs.

ORT's u8 x s8 kernels on x86 CPUs without VNNI (AVX2, early AVX-512) add pairs of products in int16 with
saturation (VPMADDUBSW). A uint8 activation of 255 times an int8 weight of 127, twice, is 64770 > 32767.
Under QEMU's Haswell model (AVX2, no VNNI) these graphs gave 1.632 instead of 206.45 (MatMul) and 0 instead of
800-1800 (QLinearConv) with ORT 1.30.0, 1.31.1 and 1.32.0 and default session options; with
`quantize.onnx_runtime.session_options` (which asks for ORT's exact kernels where the CPU lacks VNNI) they are
exact. On a CPU with VNNI both pass either way, so this test guards the machines where the hazard is real,
which are the ones CI and users may have.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize.onnx_runtime import count_kernels, open_session

X_SCALE, W_SCALE = 0.01, 0.02
X_VALUE = 127 * X_SCALE  # uint8 255 with zero point 128: the largest activation


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _input_qdq() -> list[onnx.NodeProto]:
    return [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
    ]


def _shared_inits(channels: int) -> dict[str, np.ndarray]:
    return {
        "x_scale": np.float32(X_SCALE),
        "x_zero": np.uint8(128),
        "w_scale": np.full(channels, W_SCALE, np.float32),
        "w_zero": np.zeros(channels, np.int8),
    }


def test_int8_matmul_does_not_saturate(tmp_path):
    k, n = 64, 8
    nodes = _input_qdq() + [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["y"]),
    ]
    inits = _shared_inits(n) | {"w": np.full((k, n), 127, np.int8), "bias": np.zeros(n, np.float32)}
    path = tmp_path / "matmul.onnx"
    onnx.save(_model(nodes, inits, [1, 4, k], [1, 4, n]), path)
    assert count_kernels(path).get("MatMulIntegerToFloat") == 1  # the integer kernel, not a float fallback
    y = open_session(path).run(None, {"x": np.full((1, 4, k), X_VALUE, np.float32)})[0]
    np.testing.assert_allclose(y, k * X_VALUE * 127 * W_SCALE, rtol=1e-6)


def test_qlinearconv_does_not_saturate(tmp_path):
    c, o = 64, 8
    nodes = _input_qdq() + [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "x_zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "x_zero"], ["y"]),
    ]
    inits = _shared_inits(o) | {"w": np.full((o, c, 3, 3), 127, np.int8), "y_scale": np.float32(200.0)}
    path = tmp_path / "conv.onnx"
    onnx.save(_model(nodes, inits, [1, c, 8, 8], [1, o, 8, 8]), path)
    assert count_kernels(path).get("QLinearConv") == 1
    y = open_session(path).run(None, {"x": np.full((1, c, 8, 8), X_VALUE, np.float32)})[0]
    # 3x3 zero-padded: 4, 6 or 9 taps per output (corners, edges, inside), each c * 1.27 * 2.54, then on the
    # output grid of 200.
    taps = np.full((8, 8), 9.0)
    taps[[0, -1], :] = 6.0
    taps[:, [0, -1]] = 6.0
    taps[[0, 0, -1, -1], [0, -1, 0, -1]] = 4.0
    expected = np.clip(np.rint(taps * c * X_VALUE * 127 * W_SCALE / 200.0), -128, 127) * 200.0
    np.testing.assert_array_equal(y[0], np.broadcast_to(expected, (o, 8, 8)))


def test_saturation_guard_follows_the_cpu(monkeypatch):
    """The exact (slower) kernels are asked for exactly where the CPU lacks VNNI."""
    import quantize.onnx_runtime as onnx_runtime

    monkeypatch.setattr(onnx_runtime, "u8s8_products_may_saturate", lambda: True)
    assert onnx_runtime.session_options().get_session_config_entry("session.x64quantprecision") == "1"
    monkeypatch.setattr(onnx_runtime, "u8s8_products_may_saturate", lambda: False)
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        onnx_runtime.session_options().get_session_config_entry("session.x64quantprecision")
    assert onnx_runtime.session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
