"""The latency runner, MAC counting and the latency records."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import benchmarks.latency as latency
from benchmarks.latency import LatencyConfig, LatencyRunner, benchmark_latency, count_macs, example_inputs
from benchmarks.records import cpu_name, device_name
from student_models.sam2_pipeline import TorchSam2Backend
from student_models.sam_runner import TorchSamBackend
from tests.helpers import requires_cuda, tiny_model
from tests.student_models.test_sam2_models import requires_sam2
from tests.student_models.test_sam_runner import skip_without_inductor


def test_runner_warms_up_then_reports_median_and_quartiles(monkeypatch):
    clock = {"now": 0.0}
    durations_ms = iter([100.0, 100.0, 5.0, 1.0, 2.0, 3.0, 4.0])  # two warm-up calls, then five timed
    calls = []

    def fn():
        calls.append(1)
        clock["now"] += next(durations_ms) / 1000

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["now"])
    timing = LatencyRunner(warmup=2, repeats=5).measure(fn)

    assert len(calls) == 7
    assert timing.median_ms == pytest.approx(3.0)
    assert (timing.p25_ms, timing.p75_ms, timing.min_ms) == pytest.approx((2.0, 4.0, 1.0))
    assert timing.iqr_ms == pytest.approx(2.0)
    assert timing.repeats == 5


def test_meta_device_macs_match_a_real_forward():
    """Counted on the meta device through the back-end calls that are timed, equal to a real run's."""
    sam = tiny_model()
    inputs = example_inputs(decoder_boxes=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sam.image_encoder(inputs["image"])
    backend = TorchSamBackend(sam)
    with FlopCounterMode(display=False) as decoder_counter:
        logits, iou = backend.decode(inputs["embedding"], inputs["coords"], inputs["labels"])
    assert logits.shape == (2, 4, 256, 256) and iou.shape == (2, 4)  # all four mask tokens, as SamRunner gets
    macs = count_macs("tinyvit_test", decoder_boxes=2)
    assert macs["encoder"] == counter.get_total_flops() // 2
    assert macs["decoder"] == decoder_counter.get_total_flops() // 2
    one_box = count_macs("tinyvit_test", decoder_boxes=1)["decoder"]
    assert one_box < macs["decoder"] <= 2 * one_box
    assert count_macs("tinyvit_test", image_batch=3)["encoder"] == 3 * macs["encoder"]


@requires_sam2
@torch.no_grad()
def test_a_sam2_model_is_timed_through_its_own_backend_with_its_macs_and_parameters():
    """SAM 2: the encoder gives the decoder-ready levels, the decoder takes them; MACs counted on the meta
    device equal a real forward's, parameters are the image encoder's and the two heads'."""
    sam = tiny_model("sam2_test").requires_grad_(False)  # FlopCounterMode's hooks reject grad leaves' views
    inputs = example_inputs(decoder_boxes=2, family="sam2")
    backend = TorchSam2Backend(sam)
    # sam2 attends through scaled_dot_product_attention, whose CPU kernel the flop counter does not count;
    # its math form (two batched products) is what the meta device counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        features = backend.encode(inputs["image"])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as decoder_counter:
        logits, iou = backend.decode(inputs["embedding"], inputs["coords"], inputs["labels"])
    assert [level.shape for level in features.levels] == [level.shape for level in inputs["embedding"].levels]
    assert logits.shape == (2, 4, 256, 256) and iou.shape == (2, 4)
    macs = count_macs("sam2_test", decoder_boxes=2)
    assert macs == {"encoder": counter.get_total_flops() // 2, "decoder": decoder_counter.get_total_flops() // 2}
    config = LatencyConfig(warmup=0, repeats=1, threads=(1,))
    records = benchmark_latency(sam, "sam2_test", config, device="cpu", progress=False)
    assert [r["component"] for r in records] == ["encoder", "decoder"]
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    heads = count(sam.sam_prompt_encoder, sam.sam_mask_decoder)
    assert [r["params"] for r in records] == [count(sam.image_encoder), heads]
    assert [r["macs"] for r in records] == [count_macs("sam2_test")["encoder"], count_macs("sam2_test")["decoder"]]


def test_cpu_records_hold_one_timing_per_thread_count_on_any_machine():
    sam = tiny_model()
    config = LatencyConfig(warmup=0, repeats=2, threads=(1,), components=("decoder",))
    records = benchmark_latency(sam, "tinyvit_test", config, device="cpu", progress=False)

    assert len(records) == 1
    record = records[0]
    assert (record["kind"], record["component"], record["runtime"], record["threads"], record["batch"]) == (
        "latency",
        "decoder",
        "pytorch",
        1,
        1,
    )
    assert record["device"] == device_name("cpu") and record["device"].startswith(cpu_name())
    assert record["repeats"] == 2 and record["median_ms"] > 0
    assert record["params"] == sum(p.numel() for m in (sam.prompt_encoder, sam.mask_decoder) for p in m.parameters())
    assert record["macs"] == count_macs("tinyvit_test")["decoder"]
    assert record["config"] == config.to_dict()
    assert record["compile_mode"] is None and record["config"]["compile"] is False


@requires_cuda
def test_cuda_records_time_fp32_and_bf16_on_the_gpu_then_give_the_model_back():
    sam = tiny_model()
    config = LatencyConfig(warmup=1, repeats=2, threads=(1,), image_batch=2)
    records = benchmark_latency(sam, "tinyvit_test", config, device="cuda", progress=False)

    got = {(r["precision"], r["component"]): r for r in records}
    assert sorted(got) == [("bf16", "decoder"), ("bf16", "encoder"), ("fp32", "decoder"), ("fp32", "encoder")]
    assert all(r["runtime"] == "pytorch" and r["threads"] is None and r["median_ms"] > 0 for r in records)
    assert {r["device"] for r in records} == {torch.cuda.get_device_name(torch.cuda.current_device())}
    assert got["fp32", "encoder"]["batch"] == 2
    assert got["fp32", "encoder"]["macs"] == count_macs("tinyvit_test", image_batch=2)["encoder"]
    assert next(sam.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_compile_times_the_compiled_decoder_next_to_eager_in_one_run():
    """A fresh compiled back-end per thread count (CPU kernels keep the count they were compiled under)."""
    skip_without_inductor()
    config = LatencyConfig(warmup=0, repeats=2, threads=(1,), components=("decoder",), compile=True)
    records = benchmark_latency(tiny_model(), "tinyvit_test", config, device="cpu", progress=False)

    got = {r["runtime"]: r for r in records}
    assert sorted(got) == ["pytorch", "pytorch-compile"]
    assert (got["pytorch"]["compile_mode"], got["pytorch-compile"]["compile_mode"]) == (None, "default")
    assert all(r["config"]["compile"] and r["threads"] == 1 and r["median_ms"] > 0 for r in records)
    assert got["pytorch-compile"]["macs"] == got["pytorch"]["macs"]


@requires_cuda
def test_cuda_compile_times_cuda_graphs_in_fp32_and_bf16():
    config = LatencyConfig(warmup=1, repeats=3, threads=(1,), compile=True)
    records = benchmark_latency(tiny_model(), "tinyvit_test", config, device="cuda", progress=False)

    got = {(r["runtime"], r["precision"], r["component"]): r for r in records}
    assert len(got) == 8 and all(r["median_ms"] > 0 for r in records)
    for precision in ("fp32", "bf16"):
        for component in ("encoder", "decoder"):
            assert got["pytorch-compile", precision, component]["compile_mode"] == "reduce-overhead"
            assert got["pytorch", precision, component]["compile_mode"] is None


def test_onnx_pairs_need_a_runner_for_their_runtime_and_one_image_per_call(tmp_path):
    pair = latency.OnnxPair(tmp_path / "encoder.xml", tmp_path / "decoder.xml", "int8", "openvino")
    with pytest.raises(ValueError, match=r"no runner class for the runtime\(s\) \['openvino'\]"):
        benchmark_latency(tiny_model(), "tinyvit_test", onnx_pairs=[pair], runner_classes={"onnxruntime": object})
    with pytest.raises(ValueError, match="ONNX encoders take one image per call; image_batch 2 needs PyTorch alone"):
        benchmark_latency(
            tiny_model(), "tinyvit_test", LatencyConfig(image_batch=2), onnx_pairs=[pair],
            runner_classes={"openvino": object},
        )  # fmt: skip


def test_config_round_trips_and_validates():
    config = LatencyConfig(warmup=1, repeats=3, threads=(1, 2), decoder_boxes=4, components=("encoder",))
    assert LatencyConfig.from_dict(config.to_dict()) == config
    assert LatencyConfig().threads[0] == 1
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        LatencyConfig(repeats=0)
    with pytest.raises(ValueError, match="threads must be positive"):
        LatencyConfig(threads=(0,))
    with pytest.raises(ValueError, match="decoder_boxes and image_batch must be >= 1"):
        LatencyConfig(image_batch=0)
    with pytest.raises(ValueError, match="components must be among"):
        LatencyConfig(components=("neck",))


def test_exported_pairs_records_name_the_runtime_and_the_file_they_timed(tmp_path):
    encoder, decoder = tmp_path / "encoder.onnx", tmp_path / "decoder.onnx"
    encoder.write_bytes(b"e" * 10)
    decoder.write_bytes(b"d" * 20)
    ir = tmp_path / "encoder.xml", tmp_path / "decoder.xml"
    for path in ir:
        path.write_bytes(b"x" * 5)

    class FakeRunner:  # stands in for quantize.OnnxSam: only the timing plumbing is under test
        device = torch.device("cpu")

        def __init__(self, encoder_path, decoder_path, num_threads=None):
            pass

        def encode(self, image):
            return image

        def decode(self, embedding, coords, labels):
            return coords, labels

    config = LatencyConfig(warmup=0, repeats=1, threads=(1,), components=("encoder", "decoder"))
    pairs = [latency.OnnxPair(encoder, decoder, "int8"), latency.OnnxPair(*ir, "int8", "openvino")]
    runners = {"onnxruntime": FakeRunner, "openvino": FakeRunner}
    records = benchmark_latency(
        tiny_model(), "tinyvit_test", config, onnx_pairs=pairs, runner_classes=runners, progress=False
    )
    onnx = {r["component"]: r for r in records if r["runtime"] == "onnxruntime"}
    assert (onnx["encoder"]["onnx_file"], onnx["encoder"]["onnx_bytes"]) == (str(encoder), 10)
    assert (onnx["decoder"]["onnx_file"], onnx["decoder"]["onnx_bytes"]) == (str(decoder), 20)
    openvino = {r["component"]: r for r in records if r["runtime"] == "openvino"}
    assert openvino["encoder"]["onnx_file"] == str(ir[0]) and openvino["encoder"]["precision"] == "int8"
    assert all(r["onnx_file"] is None for r in records if r["runtime"] == "pytorch")
