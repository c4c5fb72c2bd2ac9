"""The CLI: flags reach the config, and a 6-bit run writes a loadable checkpoint and a summary."""

from __future__ import annotations

import json

import pytest

from quantize import load_quantized
from quantize.__main__ import config_from_args, get_parser, main
from quantize.ptq import quantized_layers


def test_cli_passes_only_given_flags():
    args = get_parser().parse_args(["--w-bits", "6", "--keep-float", "mask_decoder.*", "--no-twin"])
    config = config_from_args(args)
    assert (config.w_bits, config.a_bits, config.keep_float) == (6, 8, ("mask_decoder.*",))
    assert not config.twin_softmax and config.num_alphas == 100  # untouched fields keep the dataclass defaults
    assert config.conv_outputs and not config_from_args(get_parser().parse_args(["--no-conv-outputs"])).conv_outputs
    assert not config.product_outputs
    assert config_from_args(get_parser().parse_args(["--product-outputs"])).product_outputs
    with pytest.raises(ValueError, match="a_bits must be an integer between 2 and 16, got 1"):
        config_from_args(get_parser().parse_args(["--a-bits", "1"]))


def test_cli_w6a6_run(tmp_path, capsys):
    argv = ["--model", "sam_vit_test", "--w-bits", "6", "--a-bits", "6", "--method", "minmax", "--num-calib", "1",
            "--max-prompts", "1", "--num-eval", "0", "--no-export", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "ONNX" not in out  # --no-export: no ONNX folder is announced
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["w_bits"] == 6 and summary["report"]["quantized_layers"] > 0
    layers = quantized_layers(load_quantized(tmp_path / "quantized.pt"))
    assert len(layers) == summary["report"]["quantized_layers"]
    assert all(layer.input_quants[0].bits == 6 for layer in layers.values())


def test_without_checkpoint_the_float_reference_has_the_same_random_weights(tmp_path):
    """16-bit quantization of the same weights is near-lossless; against other weights it is noise."""
    argv = ["--model", "sam_vit_test", "--w-bits", "16", "--a-bits", "16", "--method", "minmax", "--num-calib", "1",
            "--max-prompts", "1", "--num-eval", "1", "--no-export", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    fidelity = json.loads((tmp_path / "summary.json").read_text())["fidelity_vs_float"]
    assert fidelity["sqnr_embedding_db"] > 40, fidelity  # measured 54 dB; two random draws give about 0 dB


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--w-bits", "1"], "error: w_bits must be an integer between 2 and 16, got 1"),
        (["--checkpoint", "/nonexistent/student.pt"], "error: "),
        (["--out", "{file}/sub"], "error: cannot write to the output folder"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("not a folder")
    argv = [arg.replace("{file}", str(tmp_path / "file")) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["--model", "sam_vit_test", "--num-eval", "0", "--no-export", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_ctrl_c_is_one_line_saying_what_was_kept(tmp_path, monkeypatch, capsys):
    import quantize.__main__ as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(["--out", str(tmp_path / "q")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"interrupted: {tmp_path / 'q'} keeps only files that were complete")


def test_openvino_needs_the_export_and_its_extra(tmp_path, monkeypatch, capsys):
    import quantize.openvino_runtime as openvino_runtime

    assert main(["--out", str(tmp_path / "q"), "--runtime", "openvino", "--no-export"]) == 1
    assert "--runtime openvino converts the exported ONNX files: drop --no-export" in capsys.readouterr().err

    def missing():
        raise openvino_runtime.MissingExtraError(
            'the OpenVINO runtime needs the openvino extra: pip install -e ".[openvino]"'
        )

    monkeypatch.setattr(openvino_runtime, "_openvino", missing)
    assert main(["--out", str(tmp_path / "q"), "--runtime", "ort", "openvino"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: the OpenVINO runtime needs the openvino extra: pip install -e ".[openvino]"']
    assert not (tmp_path / "q").exists()  # refused before anything was written


def test_an_openvino_refusal_keeps_the_checked_onnx_files_and_the_summary(tmp_path, monkeypatch, capsys):
    import quantize.__main__ as cli
    from quantize.onnx_export import ExportCheck, ExportCheckError

    check = ExportCheck("encoder.xml", "float32", {"embedding.max": 1.0}, {"embedding.max": 1e-3}, False, {})

    def refused(sam, onnx_dir, precision):
        raise ExportCheckError("OpenVINO disagrees with PyTorch: encoder.xml: embedding.max 1 > 0.001.", [check])

    monkeypatch.setattr(cli, "require_openvino", lambda: "2026.4.1")
    monkeypatch.setattr(cli, "export_openvino", refused)
    argv = ["--model", "tinyvit_test", "--method", "minmax", "--num-calib", "1", "--max-prompts", "1",
            "--num-eval", "0", "--runtime", "ort", "openvino", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line
    assert err.startswith("error: OpenVINO disagrees with PyTorch: encoder.xml: embedding.max 1 > 0.001.")
    assert f"The ONNX Runtime files in {tmp_path / 'float32'} passed their checks and are kept" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    openvino = summary["export"]["float32"]["openvino"]
    assert openvino["files"] == [] and [c["passed"] for c in openvino["checks"]] == [False]
    assert all(c["passed"] for c in summary["export"]["float32"]["checks"])
    assert (tmp_path / "float32" / "encoder.onnx").is_file()
