"""The QDQ graph rewrites: the int8 weights they fold are the ones the simulated model computes with."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from quantize.qdq_graph import fold_weight_quantization


def test_folded_weights_round_a_tie_as_pytorch_does():
    """0.64575 / 0.0123 is a tie in float32: division rounds it to 52, PyTorch (times the reciprocal) to 53."""
    weight = np.array([[0.64575], [0.42435], [-0.3]], dtype=np.float32)  # two ties, one plain value
    scale = np.full(3, 0.0123, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["w", "scale", "zero"], ["wq"], axis=0),
            helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["y"], axis=0),
        ],
        "fold",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(np.zeros(3, dtype=np.int8), "zero"),
        ],
    )
    model = fold_weight_quantization(helper.make_model(graph))
    folded = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "wq")
    simulated = torch.fake_quantize_per_channel_affine(
        torch.from_numpy(weight), torch.from_numpy(scale), torch.zeros(3, dtype=torch.int32), 0, -128, 127
    )
    assert folded.dtype == np.int8
    np.testing.assert_array_equal(folded.astype(np.float32) * scale[:, None], simulated.numpy())
    assert folded[:, 0].tolist() == [53, 35, -24]
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    onnx.checker.check_model(model)
