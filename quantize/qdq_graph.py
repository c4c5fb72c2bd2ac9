"""Small ONNX graph rewrites that turn the exporter's QDQ graph into what ONNX Runtime runs fast.

- `fold_weight_quantization`: QuantizeLinear on a constant float weight -> an int8 initializer
  (the file then stores int8 weights, and ORT sees the DQ(int8 constant) pattern it fuses).
- `quantize_bias`: the float bias of a DQ -> Conv -> Q convolution or of a DQ -> Gemm product ->
  DequantizeLinear of an int32 initializer on the input scale x weight scale grid, the form ORT fuses
  into QLinearConv and QGemm, which add it to the int32 accumulator (the simulated layer already
  rounds its bias to that grid, `QuantLayer.quantized_bias`).
- `fold_weight_transpose`: DQ(int8 weight) -> Transpose (the exporter's ``weight.t()``) becomes DQ of
  the transposed int8 weight (ORT folds a lone Transpose itself, but not one with two readers).
- `unshare_weight_dequantize`: a DQ(int8 weight) read by several nodes (the two products of a
  twin-uniform input, `quantize.modules.summed_over_ranges`) gets one copy per reader, each with its
  own weight, scale and zero point: where ORT converts int8 weights to uint8 (session entry
  `session.x64quantprecision`), a shared one makes ORT 1.32 stop at session creation ("Attempt to
  replace the existing tensor"). The copy costs file size, not time.
- `prune`: drop nodes whose outputs nobody reads and initializers no node reads.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Elementwise ops on constants `_Graph.const` evaluates, with ONNX's semantics (Round: half to even; the
# arithmetic in the inputs' dtype, float32 here, as ONNX Runtime and PyTorch compute it).
_CONSTANT_OPS = {"Round": np.round, "Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}

# Ops that only move values: a DQ -> Reshape/Transpose -> product is still a QDQ product for ORT.
_LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.producers = {out: node for node in self.graph.node for out in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Identity":  # the exporter's de-duplicated constants
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type in _CONSTANT_OPS:  # what the exporter leaves unfolded (Round)
            args = [self.const(name) for name in node.input]
            if all(arg is not None for arg in args):
                return _CONSTANT_OPS[node.op_type](*args)
        return None

    def insert_before(self, before: dict[int, list[onnx.NodeProto]]) -> None:
        """Put the nodes of ``before[id(node)]`` just ahead of `node`, which keeps the graph sorted."""
        nodes = []
        for node in self.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            nodes += [*before.get(id(node), []), copy]
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def add_init(self, array: np.ndarray, name: str) -> str:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name


def fold_weight_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each QuantizeLinear of a constant by its int8 result, stored as an initializer.

    The integers are those PyTorch's fake quantization gives the simulated model: the weight times the
    float32 reciprocal of its scale, rounded half to even. Dividing by the scale instead, as QuantizeLinear
    is specified, rounds a weight at a tie the other way now and then (15 of tinyvit_5m's 5.7M weights),
    and ORT would then compute with a weight the simulation does not have.
    """
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
        reciprocal = (np.float32(1) / scale.astype(np.float32)).reshape(shape)
        q = np.rint(weight.astype(np.float32) * reciprocal) + zero_point.reshape(shape)
        g.add_init(np.clip(q, -128, 127).astype(np.int8), node.output[0])
        g.graph.node.remove(node)
    return model


def quantize_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn the float bias of each integer product into DQ(int32 bias): DQ(activation) -> Conv <- DQ(int8
    weight) with Conv -> Q only (QLinearConv), and DQ(activation) -> Gemm <- DQ(int8 weight) (QGemm)."""
    g = _Graph(model)
    inserted: dict[int, list[onnx.NodeProto]] = {}  # by the product's id
    for node in g.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        x_dq, w_dq = g.producers.get(node.input[0]), g.producers.get(node.input[1])
        while x_dq is not None and x_dq.op_type in _LAYOUT_OPS:  # ORT moves a DQ forward through these
            x_dq = g.producers.get(x_dq.input[0])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Conv":
            after = g.readers.get(node.output[0], [])
            if len(after) != 1 or after[0].op_type != "QuantizeLinear":
                continue
        else:
            attrs = {a.name: a for a in node.attribute}
            if (
                attrs.get("transA")
                and attrs["transA"].i
                or any(name in attrs and attrs[name].f != 1.0 for name in ("alpha", "beta"))
            ):
                continue
        bias, x_scale, w_scale = g.const(node.input[2]), g.const(x_dq.input[1]), g.const(w_dq.input[1])
        if bias is None or x_scale is None or w_scale is None or x_scale.size != 1 or w_dq.input[0] not in g.inits:
            continue
        bias = bias.reshape(-1)
        step = (x_scale.astype(np.float32) * w_scale.astype(np.float32)).reshape(-1) * np.ones_like(bias)
        name = f"{node.output[0]}_bias_int32"
        g.add_init(np.rint(bias / step).astype(np.int32), name)
        g.add_init(step.astype(np.float32), f"{name}_scale")
        g.add_init(np.zeros(bias.shape, np.int32), f"{name}_zero_point")
        dq = onnx.helper.make_node(
            "DequantizeLinear", [name, f"{name}_scale", f"{name}_zero_point"], [f"{name}_dq"], name=f"{name}_DQ", axis=0
        )
        inserted[id(node)] = [dq]
        node.input[2] = f"{name}_dq"
    g.insert_before(inserted)
    return model


def fold_weight_transpose(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace DQ(int8 constant) -> Transpose by DQ(transposed int8 constant), the DQ's axis moved with it."""
    g = _Graph(model)
    for dq in list(g.graph.node):
        after = g.readers.get(dq.output[0], [])
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits or len(after) != 1:
            continue
        transpose = after[0]
        if transpose.op_type != "Transpose":
            continue
        weight = g.const(dq.input[0])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), list(range(weight.ndim))[::-1])
        dq.input[0] = g.add_init(np.ascontiguousarray(weight.transpose(perm)), f"{dq.input[0]}_transposed")
        axis = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis is not None:
            axis.i = perm.index(axis.i if axis.i >= 0 else axis.i + weight.ndim)
        dq.output[0] = transpose.output[0]
        g.graph.node.remove(transpose)
    return model


def unshare_weight_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give each reader of a DQ(int8 constant) after the first its own DQ node and initializers."""
    g = _Graph(model)
    copies: dict[int, list[onnx.NodeProto]] = {}  # DQ copies to insert before the reader with this id
    for dq in list(g.graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
            continue
        for k, reader in enumerate(g.readers.get(dq.output[0], [])[1:], start=1):
            copy = onnx.NodeProto()
            copy.CopyFrom(dq)
            copy.name = f"{dq.name}_copy{k}"
            for i, name in enumerate(dq.input):  # weight, scale and zero point: ORT rewrites them in place
                copy.input[i] = g.add_init(g.const(name), f"{name}_copy{k}")
            copy.output[0] = f"{dq.output[0]}_copy{k}"
            reader.input[:] = [copy.output[0] if name == dq.output[0] else name for name in reader.input]
            copies.setdefault(id(reader), []).append(copy)
    g.insert_before(copies)
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
