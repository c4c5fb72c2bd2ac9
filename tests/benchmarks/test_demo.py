"""The demo's step runner: a failed stage is reported, the stages that need it are skipped, the rest run."""

from __future__ import annotations

from benchmarks.demo import Demo


def test_failed_stage_is_reported_and_independent_stages_still_run(tmp_path, monkeypatch, capsys):
    demo = Demo(tmp_path)
    ran = []

    def fake(name):
        def run():
            ran.append(name)
            return {name: str(tmp_path / name)}

        return run

    def broken():
        raise RuntimeError("ONNX Runtime disagrees with PyTorch")

    for name in ("data", "quantize", "everything", "coco", "latency", "report"):
        monkeypatch.setattr(demo, name, fake(name))
    monkeypatch.setattr(demo, "distill", broken)

    assert demo.run() is False
    status = {step.name: (step.status, step.note) for step in demo.steps}
    assert status["distill"] == ("failed", "RuntimeError: ONNX Runtime disagrees with PyTorch")
    for name in ("quantize W8A8 + W6A6", "ONNX export", "hierarchical everything mode", "COCO-style AP", "latency"):
        assert status[name] == ("skipped", "needs distill, which failed")
    assert ran == ["data", "report"]
    out = capsys.readouterr()
    assert "FAILED: distill" in out.out
    assert "RuntimeError: ONNX Runtime disagrees with PyTorch" in out.err  # the traceback, for debugging


def test_a_failed_export_does_not_stop_ap_latency_and_report(tmp_path, monkeypatch):
    demo = Demo(tmp_path)
    for name in ("data", "distill", "quantize", "everything", "coco", "latency", "report"):
        monkeypatch.setattr(demo, name, lambda: {})

    def broken():
        raise RuntimeError("export check failed")

    monkeypatch.setattr(demo, "export", broken)
    assert demo.run() is False
    assert [step.status for step in demo.steps] == ["done", "done", "done", "failed", "done", "done", "done", "done"]
