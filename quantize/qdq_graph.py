"""Small ONNX graph rewrites that turn the exporter's QDQ graph into what ONNX Runtime runs fast.

- `fold_weight_quantization`: QuantizeLinear on a constant float weight -> an int8 initializer
  (the file then stores int8 weights, and ORT sees the DQ(int8 constant) pattern it fuses).
- `prune`: drop nodes whose outputs nobody reads and initializers no node reads.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.producers = {out: node for node in self.graph.node for out in node.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Identity":  # the exporter's de-duplicated constants
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def add_init(self, array: np.ndarray, name: str) -> str:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name


def fold_weight_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each QuantizeLinear of a constant by its int8 result, stored as an initializer."""
    g = _Graph(model)
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        weight = g.const(node.input[0])
        if weight is None:
            continue
        scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        q = np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape)
        g.add_init(np.clip(q, -128, 127).astype(np.int8), node.output[0])
        g.graph.node.remove(node)
    return model


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove dead nodes (repeatedly) and initializers that no node reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    return model
