"""The per-runtime table: speed-ups over ONNX Runtime float32 and over a reference encoder of the same run."""

from __future__ import annotations

from benchmarks.runtimes import _encoders, _table


def test_the_table_gives_each_encoders_speed_up_over_ort_float32_and_the_reference_encoder():
    record = {
        "sqnr_db": {"ort int8": 25.0},
        "median_ms": {"1": {"ort float32": 300.0, "ort int8": 150.0}, "2": {"ort float32": 200.0, "ort int8": 125.0}},
        "reference": {"model": "vit_h", "runtime": "pytorch float32", "ms": {"1": 60000.0, "2": 30000.0}},
    }
    lines = _table(record).splitlines()
    assert lines[0] == (
        "| encoder | SQNR vs ORT float32 (dB) | 1 thr: ms (ORT fp32 / it) | 2 thr: ms (ORT fp32 / it) | "
        "1 thr: vit_h / it | 2 thr: vit_h / it |"
    )
    assert lines[3] == "| ort int8 | 25.0 | 150.0 (2.00x) | 125.0 (1.60x) | 400x | 240x |"
    assert lines[-1] == (
        "vit_h (PyTorch float32, random weights, one call per thread count): 60000 ms at 1 thread(s), "
        "30000 ms at 2 thread(s)."
    )
    del record["reference"]
    assert _table(record).splitlines()[3] == "| ort int8 | 25.0 | 150.0 (2.00x) | 125.0 (1.60x) |"


def test_other_exports_add_their_int8_encoders_by_folder_name(tmp_path):
    main, other = tmp_path / "q", tmp_path / "q_no_twin"
    files = [(main, "float32", "onnx"), (main, "int8", "onnx"), (main, "int8", "xml")]
    files += [(other, "int8", "onnx"), (other, "int8", "xml"), (other, "float32", "onnx")]
    for folder, precision, suffix in files:
        (folder / precision).mkdir(parents=True, exist_ok=True)
        (folder / precision / f"encoder.{suffix}").touch()
    names = [name for name, _, _ in _encoders(main, [other])]
    assert names == ["ort float32", "ort int8", "openvino int8", "ort int8 (q_no_twin)", "openvino int8 (q_no_twin)"]
