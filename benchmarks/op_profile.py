"""Where an exported encoder's time goes, per op type, in ONNX Runtime, OpenVINO and ExecuTorch.

Each runtime's own profiler times every kernel it runs: ONNX Runtime's (``enable_profiling``, one
``*_kernel_time`` event per node), OpenVINO's (``PERF_COUNT``, one entry per executed node with
the kernel it chose, e.g. ``brgemm_avx512_I8``) and ExecuTorch's event tracer (ETDump: one event per
XNNPACK operator, named with its datatype, e.g. ``Fully Connected (NC, QS8) GEMM``). Times are summed
per op type over the profiled runs (the first run, a warm-up, left out) and given per image. Ops are
split into integer products (the matrix products and convolutions that ran on int8 kernels) and
everything else; the time of everything else is a bound: no faster integer kernel brings an image
under it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from quantize.onnx_runtime import open_session, session_options
from quantize.openvino_runtime import PRECISION, compile_model

# ONNX Runtime's kernels that multiply int8 operands (the QDQ fusions of quantize.onnx_export).
ORT_INTEGER_PRODUCTS = {
    "QGemm", "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul",
}  # fmt: skip
# OpenVINO's node types of products (prefixes: int8 fully connected layers run as "FullyConnectedQuantizedLegacy").
OPENVINO_PRODUCTS = ("FullyConnected", "Convolution", "MatMul", "GroupConvolution", "Deconvolution")
# XNNPACK's operators of products; the datatype in brackets says int8 ("QS8", "QU8", "QD8-F32-QC8W") or not ("F32").
XNNPACK_PRODUCTS = ("Fully Connected", "Convolution", "Deconvolution", "Batch Matrix Multiply")
XNNPACK_INTEGER = re.compile(r"\(\w+, Q")
# The part of an ExecuTorch run outside XNNPACK's operators: the delegate calls, copies and any portable kernel.
EXECUTORCH_REST = "ExecuTorch outside XNNPACK operators"


def ort_op_times(path: str | os.PathLike, images: list[np.ndarray], threads: int, rounds: int = 3) -> Counter:
    """ms per image per ONNX Runtime op type, over `rounds` passes of `images` after one warm-up image."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = open_session(path, options=options)
        name = session.get_inputs()[0].name
        session.run(None, {name: images[0]})
        for _ in range(rounds):
            for x in images:
                session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm = runs[0]["ts"] + runs[0]["dur"]
    times: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm:
            times[event["args"]["op_name"]] += event["dur"] / 1e3
    return Counter({op: ms / (rounds * len(images)) for op, ms in times.items()})


def openvino_op_times(path: str | os.PathLike, images: list[np.ndarray], threads: int, rounds: int = 3) -> Counter:
    """ms per image per OpenVINO "node type kernel" (the kernel names the precision it ran in), as `ort_op_times`."""
    compiled = compile_model(path, threads, {**PRECISION, "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    request.infer({0: images[0]})
    times: Counter = Counter()
    for _ in range(rounds):
        for x in images:
            request.infer({0: x})
            for node in request.get_profiling_info():
                times[f"{node.node_type} {node.exec_type}"] += node.real_time.total_seconds() * 1e3
    return Counter({op: ms / (rounds * len(images)) for op, ms in times.items()})


def executorch_op_times(path: str | os.PathLike, images: list[np.ndarray], threads: int, rounds: int = 3) -> Counter:
    """ms per image per XNNPACK operator type of an ExecuTorch program ("Fully Connected (NC, QS8) GEMM", its
    instance number dropped) and `EXECUTORCH_REST`, the rest of each run, from ETDump, as `ort_op_times`."""
    import torch
    from executorch.devtools import Inspector

    from quantize.executorch_runtime import load_traced_program

    program = load_traced_program(path, threads)
    method = program.load_method("forward")
    for x in [images[0]] + images * rounds:
        method.execute([torch.from_numpy(x)])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = str(Path(tmp) / "run.etdp")
        program.write_etdump_result_to_file(etdump, str(Path(tmp) / "debug.bin"))
        with warnings.catch_warnings():  # no debug buffer: times only, no tensor values (the Inspector warns)
            warnings.simplefilter("ignore", UserWarning)
            events = [event for block in Inspector(etdump_path=etdump).event_blocks for event in block.events]
    times: Counter = Counter()
    run_ms = 0.0
    for event in events:  # one time per run; the first run, the warm-up, left out
        if event.is_delegated_op:
            times[re.sub(r" #\d+$", "", event.name)] += sum(event.perf_data.raw[1:])
        elif event.name == "Method::execute":
            run_ms = sum(event.perf_data.raw[1:])
    times[EXECUTORCH_REST] = max(run_ms - sum(times.values()), 0.0)
    return Counter({op: ms / (rounds * len(images)) for op, ms in times.items()})


def is_integer_product(op: str) -> bool:
    """An ORT op type in ORT_INTEGER_PRODUCTS, an OpenVINO product whose kernel ran in int8 ("..._I8", "..._i8"),
    or an XNNPACK product of an int8 datatype ("Fully Connected (NC, QS8) GEMM")."""
    node_type, _, kernel = op.partition(" ")
    return (
        node_type in ORT_INTEGER_PRODUCTS
        or (node_type.startswith(OPENVINO_PRODUCTS) and kernel.lower().endswith("_i8"))
        or (op.startswith(XNNPACK_PRODUCTS) and XNNPACK_INTEGER.search(op) is not None)
    )


def summarize(times: Counter, top: int = 8) -> dict:
    """Total, integer-product and other ms per image, and the `top` op types with their share."""
    total = sum(times.values())
    products = sum(ms for op, ms in times.items() if is_integer_product(op))
    return {
        "total_ms": round(total, 1),
        "integer_products_ms": round(products, 1),
        "other_ms": round(total - products, 1),
        "top": [[op, round(ms, 1), round(ms / total, 3)] for op, ms in times.most_common(top)],
    }


def profile_table(profiles: dict[str, dict]) -> str:
    """Markdown: per encoder, its profiled time, the share of integer products, the bound and its top op types."""
    lines = [
        "| encoder | profiled ms / image | integer products ms | other ms (the bound) | top op types (share) |",
        "|---|---|---|---|---|",
    ]
    for name, p in profiles.items():
        top = ", ".join(f"{op} {share:.0%}" for op, _, share in p["top"])
        lines.append(f"| {name} | {p['total_ms']} | {p['integer_products_ms']} | {p['other_ms']} | {top} |")
    return "\n".join(lines)
