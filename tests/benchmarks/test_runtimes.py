"""The per-runtime table: speed-ups over ONNX Runtime float32 and over a reference encoder of the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from benchmarks.runtimes import _encoders, _table, compare_runtimes
from tests.student_models.test_sam2_models import requires_sam2


def test_the_table_gives_each_encoders_speed_up_over_ort_float32_and_the_reference_encoder():
    record = {
        "sqnr_db": {"ort int8": 25.0},
        "median_ms": {"1": {"ort float32": 300.0, "ort int8": 150.0}, "2": {"ort float32": 200.0, "ort int8": 125.0}},
        "references": [
            {"model": "vit_h", "runtime": "pytorch float32", "ms": {"1": 60000.0, "2": 30000.0}},
            {"model": "vit_b", "runtime": "pytorch float32", "ms": {"1": 15000.0, "2": 10000.0}},
        ],
    }
    lines = _table(record).splitlines()
    assert lines[0] == (
        "| encoder | SQNR vs ORT float32 (dB) | 1 thr: ms (ORT fp32 / it) | 2 thr: ms (ORT fp32 / it) | "
        "1 thr: vit_h / it | 2 thr: vit_h / it | 1 thr: vit_b / it | 2 thr: vit_b / it |"
    )
    assert lines[3] == "| ort int8 | 25.0 | 150.0 (2.00x) | 125.0 (1.60x) | 400.0x | 240.0x | 100.0x | 80.0x |"
    assert lines[-2:] == [
        "vit_h (PyTorch float32, random weights, one call per thread count): 60000 ms at 1 thread(s), "
        "30000 ms at 2 thread(s).",
        "vit_b (PyTorch float32, random weights, one call per thread count): 15000 ms at 1 thread(s), "
        "10000 ms at 2 thread(s).",
    ]
    del record["references"]
    assert _table(record).splitlines()[3] == "| ort int8 | 25.0 | 150.0 (2.00x) | 125.0 (1.60x) |"


def test_other_exports_add_their_int8_encoders_by_folder_name(tmp_path):
    main, other = tmp_path / "q", tmp_path / "q_no_twin"
    files = [(main, "float32", "onnx"), (main, "int8", "onnx"), (main, "int8", "xml"), (main, "int8", "pte")]
    files += [(other, "int8", "onnx"), (other, "int8", "xml"), (other, "float32", "onnx")]
    for folder, precision, suffix in files:
        (folder / precision).mkdir(parents=True, exist_ok=True)
        (folder / precision / f"encoder.{suffix}").touch()
    names = [name for name, _, _ in _encoders(main, [other])]
    assert names == [
        "ort float32", "ort int8", "openvino int8", "executorch int8", "ort int8 (q_no_twin)",
        "openvino int8 (q_no_twin)",
    ]  # fmt: skip


def _patch_encoder(path, int8: bool) -> None:
    """A stand-in encoder with the exported interface: image 1x3x1024x1024 -> 16x16-patch Conv -> 1x256x64x64."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 3, 16, 16)).astype(np.float32) * 0.05
    nodes, inits, conv_input, conv_weight = [], [], "image", "w"
    if int8:
        w_scale = np.abs(weight).reshape(256, -1).max(axis=1) / 127
        inits += [
            numpy_helper.from_array(np.round(weight / w_scale[:, None, None, None]).astype(np.int8), "w_q"),
            numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(256, np.int8), "w_zero"),
            numpy_helper.from_array(np.float32(2.5 / 127), "x_scale"),
            numpy_helper.from_array(np.uint8(128), "x_zero"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zero"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
        ]
        conv_input, conv_weight = "x_dq", "w_dq"
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
    conv_output = "y" if int8 else "image_embeddings"
    nodes.append(helper.make_node("Conv", [conv_input, conv_weight], [conv_output], strides=[16, 16]))
    if int8:  # a quantized output too: ONNX Runtime then fuses the Conv into QLinearConv
        inits.append(numpy_helper.from_array(np.float32(0.05), "y_scale"))
        nodes += [
            helper.make_node("QuantizeLinear", ["y", "y_scale", "x_zero"], ["y_q"]),
            helper.make_node("DequantizeLinear", ["y_q", "y_scale", "x_zero"], ["image_embeddings"]),
        ]
    graph = helper.make_graph(
        nodes, "patch_encoder", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 256, 64, 64])], inits,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


def test_every_encoder_is_scored_timed_and_profiled_in_one_run(tmp_path):
    openvino_runtime = pytest.importorskip("quantize.openvino_runtime")
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    folder, images = tmp_path / "q", tmp_path / "images"
    for precision in ("float32", "int8"):
        _patch_encoder(folder / precision / "encoder.onnx", int8=precision == "int8")
        openvino_runtime.write_openvino(folder / precision / "encoder.onnx")
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / "a.jpg")

    record, table = compare_runtimes(
        folder, images, num_images=1, threads=(1,), repeats=1, profile=True, reference_encoders=("tinyvit_test",)
    )
    names = ["ort float32", "ort int8", "openvino float32", "openvino float32 (default)", "openvino int8",
             "openvino int8 (default)"]  # fmt: skip
    assert sorted(record["median_ms"]["1"]) == sorted(names)
    assert record["sqnr_db"]["openvino float32"] > 60 and 10 < record["sqnr_db"]["ort int8"] < 60
    assert record["references"][0]["ms"]["1"] > 0 and "tinyvit_test / it" in table
    assert record["profile"]["ort int8"]["integer_products_ms"] > 0  # the Q/DQ Conv ran as an integer kernel
    assert set(record["profile"]) == {"ort float32", "ort int8", "openvino float32", "openvino int8"}


@requires_sam2
def test_a_sam2_export_is_compared_on_its_three_levels_against_sam2_teachers(sam2_exports, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    _, float_result, _ = sam2_exports
    folder, images = Path(float_result.files["encoder"]).parents[1], tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / "a.jpg")

    record, table = compare_runtimes(folder, images, num_images=1, threads=(1,), repeats=1,
                                     reference_encoders=("sam2_test", "sam2_test_student"))  # fmt: skip
    assert sorted(record["median_ms"]["1"]) == ["ort float32", "ort int8"]
    assert 10 < record["sqnr_db"]["ort int8"] < 60  # all three levels, against ORT float32's
    assert [reference["model"] for reference in record["references"]] == ["sam2_test", "sam2_test_student"]
    assert "1 thr: sam2_test / it" in table and "1 thr: sam2_test_student / it" in table
