"""Loading what to benchmark: ONNX precision detection, missing files and missing stage APIs."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import benchmarks.runs as runs
from benchmarks.coco_eval import CocoEvalConfig, evaluate_coco
from benchmarks.runs import (
    OnnxModel,
    StageMissingError,
    load_torch_model,
    onnx_pair,
    onnx_pair_in,
    run_coco,
    stage_api,
)
from student_models.sam2_pipeline import Sam2Runner
from tests.student_models.test_sam2_models import requires_sam2


def _write_graph(path, quantized: bool) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    if quantized:
        scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
        zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y], initializer=[scale, zero])
    else:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), path)


def test_onnx_precision_is_read_from_the_graph(tmp_path):
    _write_graph(tmp_path / "encoder.onnx", quantized=True)
    _write_graph(tmp_path / "decoder.onnx", quantized=False)
    assert onnx_pair_in(tmp_path).precision == "int8"
    assert onnx_pair(tmp_path / "decoder.onnx", tmp_path / "decoder.onnx").precision == "fp32"


def test_an_ir_pair_runs_in_openvino_and_its_precision_is_read_from_its_fake_quantize_nodes(tmp_path):
    (tmp_path / "encoder.xml").write_text('<net><layers><layer id="3" type="FakeQuantize"/></layers></net>')
    (tmp_path / "decoder.xml").write_text('<net><layers><layer id="1" type="Relu"/></layers></net>')
    pair = onnx_pair_in(tmp_path, "openvino")
    assert (pair.runtime, pair.precision) == ("openvino", "int8")
    assert onnx_pair(tmp_path / "decoder.xml", tmp_path / "decoder.xml").precision == "fp32"
    _write_graph(tmp_path / "decoder.onnx", quantized=False)
    with pytest.raises(ValueError, match="give two .onnx/.ort files \\(ONNX Runtime\\), two .xml files"):
        onnx_pair(tmp_path / "encoder.xml", tmp_path / "decoder.onnx")


def test_a_program_pair_runs_in_executorch_and_its_precision_is_the_one_it_was_written_with(tmp_path):
    pytest.importorskip("executorch", reason='the ExecuTorch runtime is an extra: pip install -e ".[executorch]"')
    from quantize.executorch_runtime import write_program

    for part, precision in (("encoder", "int8"), ("decoder", "float32")):
        write_program(torch.nn.Linear(4, 4), (torch.randn(1, 4),), tmp_path / f"{part}.pte", "encoder", precision)
    pair = onnx_pair_in(tmp_path, "executorch")
    assert (pair.runtime, pair.precision) == ("executorch", "int8")
    assert onnx_pair(tmp_path / "decoder.pte", tmp_path / "decoder.pte").precision == "fp32"


def test_missing_exported_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"encoder.onnx: no such file \(export one with python -m quantize"):
        onnx_pair_in(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"encoder.xml: no OpenVINO IR here \(export with python -m quantize"):
        onnx_pair_in(tmp_path, "openvino")
    with pytest.raises(FileNotFoundError, match=r"encoder.pte: no ExecuTorch programs here \(export with python -m"):
        onnx_pair_in(tmp_path, "executorch")


def test_missing_stage_api_is_a_clear_error():
    with pytest.raises(StageMissingError, match="needs quantize.no_such_function, not found"):
        stage_api("quantize", "no_such_function")
    with pytest.raises(StageMissingError, match="needs the `no_such_stage` package"):
        stage_api("no_such_stage", "anything")


def test_load_torch_model_names_the_float_model():
    loaded = load_torch_model("vit_t")
    assert (loaded.model, loaded.checkpoint, loaded.precision) == ("tinyvit_5m", None, "fp32")


def test_random_weights_are_drawn_from_the_seed():
    first, again, other = (load_torch_model("tinyvit_test", seed=seed).sam.state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["image_encoder.neck.0.weight"], other["image_encoder.neck.0.weight"])


@requires_sam2
def test_coco_runs_a_sam2_model_through_its_own_runner(synthetic_coco, tmp_path, monkeypatch):
    """A SAM 2 model is evaluated with SAM 2's geometry (`Sam2Runner`), and its record says so."""
    runners = []
    monkeypatch.setattr(runs, "evaluate_coco", lambda runner, *args: runners.append(runner) or real(runner, *args))
    real = evaluate_coco
    config = CocoEvalConfig(max_images=1)
    result, path = run_coco(load_torch_model("sam2_test"), coco_root=synthetic_coco, out_dir=tmp_path, config=config)
    assert [type(runner) for runner in runners] == [Sam2Runner]
    assert result.num_images == 1 and result.num_prompts > 0
    (record,) = json.loads(path.read_text())
    assert (record["model"], record["runtime"]) == ("sam2_test", "pytorch")


@requires_sam2
def test_coco_runs_an_exported_sam2_model_through_sam2s_runner(sam2_exports, synthetic_coco, tmp_path, monkeypatch):
    """An exported SAM 2 pair is evaluated with SAM 2's geometry too: the files' outputs say the family."""
    _, _, int8 = sam2_exports
    runners = []
    monkeypatch.setattr(runs, "evaluate_coco", lambda runner, *args: runners.append(runner) or real(runner, *args))
    real = evaluate_coco
    target = OnnxModel("sam2_test_student", onnx_pair(int8.files["encoder"], int8.files["decoder"]))
    result, path = run_coco(target, coco_root=synthetic_coco, out_dir=tmp_path, config=CocoEvalConfig(max_images=1))
    assert [type(runner) for runner in runners] == [Sam2Runner]
    assert result.num_images == 1 and result.num_prompts > 0
    (record,) = json.loads(path.read_text())
    assert (record["model"], record["precision"], record["runtime"]) == ("sam2_test_student", "int8", "onnxruntime")
