"""quantize_ end to end on a tiny model: structure, fidelity, save/load, and bad input."""

from __future__ import annotations

import pytest
import torch

from quantize import PTQConfig, load_quantized, quantize_, save_quantized
from quantize.calibration import box_prompt_loop, prepare_calibration
from quantize.fidelity import fidelity, run_model
from quantize.ptq import quantized_layers
from student_models import CheckpointError
from student_models.checkpoints import save_checkpoint
from student_models.sam_runner import PointPromptDecoder, TorchSamBackend
from tests.helpers import synthetic_image, tiny_model
from tests.quantize.conftest import FAST


def test_quantized_model_layers_and_fidelity(quantized_tinyvit):
    sam, report = quantized_tinyvit
    layers = quantized_layers(sam)
    assert "image_encoder.layers.1.blocks.0.attn.qk_matmul" in layers
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.av_matmul" in layers
    assert "mask_decoder.output_upscaling.0" in layers  # ConvTranspose2d
    kinds = report.summary()["input_quantizers"]
    assert kinds["twin_softmax"] > 0 and kinds["twin_gelu"] > 0
    assert layers["image_encoder.layers.1.blocks.0.attn.av_matmul"].input_quants[0].kind == "twin_softmax"
    assert report.unused == ["image_encoder.head"]  # TinyViT's classification head is never called
    items = prepare_calibration([synthetic_image(5)[0]], 1, 2, seed=3)
    scores = fidelity(
        run_model(TorchSamBackend(tiny_model("tinyvit_test")), items), run_model(TorchSamBackend(sam), items)
    )
    assert scores["sqnr_embedding_db"] > 12 and scores["mask_iou"] > 0.8, scores


def test_hessian_method_on_sam_vit_decoder_keep_float():
    sam = tiny_model("sam_vit_test")
    config = PTQConfig(method="hessian", parts=("decoder",), keep_float=("mask_decoder.iou_prediction_head.*",), **FAST)
    report = quantize_(sam, config, [synthetic_image(1)[0]], show_progress=False)
    names = list(quantized_layers(sam))
    assert names and all(n.startswith("mask_decoder.") for n in names)
    assert not any(n.startswith("mask_decoder.iou_prediction_head") for n in names)
    assert len(report.kept_float) == 3
    searched = [info for info in report.layers.values() if info["error_minmax"] > 0]
    assert searched and all(info["error"] <= info["error_minmax"] for info in searched)


def test_save_load_round_trip(quantized_tinyvit, tmp_path):
    sam, _ = quantized_tinyvit
    path = save_quantized(sam, tmp_path / "q.pt")
    payload = torch.load(path, weights_only=True)  # plain tensors and dicts only
    assert payload["model_name"] == "tinyvit_test"
    loaded = load_quantized(path)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(x), sam.image_encoder(x), rtol=0, atol=0)
    for name, layer in quantized_layers(sam).items():
        other = quantized_layers(loaded)[name]
        assert [q.kind for q in other.input_quants] == [q.kind for q in layer.input_quants]


def test_bad_input_messages(quantized_tinyvit, tmp_path):
    with pytest.raises(ValueError, match="needs at least one calibration image"):
        quantize_(tiny_model(), PTQConfig(**FAST), [])
    with pytest.raises(ValueError, match="keep_float pattern 'encoder.nothing.\\*' matches no quantizable layer"):
        quantize_(tiny_model(), PTQConfig(keep_float=("encoder.nothing.*",), **FAST), [synthetic_image(0)[0]])
    sam, _ = quantized_tinyvit
    path = save_quantized(sam, tmp_path / "q.pt")
    with pytest.raises(CheckpointError, match="holds a quantized 'tinyvit_test' model, not 'sam_vit_test'"):
        load_quantized(path, model_name="sam_vit_test")
    float_path = tmp_path / "float.pt"
    save_checkpoint(tiny_model(), "tinyvit_test", float_path)
    with pytest.raises(CheckpointError, match="is not a quantized checkpoint"):
        load_quantized(float_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"garbage\.pt is not a PyTorch checkpoint") as error:
        load_quantized(garbage)
    assert "pickled" not in str(error.value)
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        load_quantized(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(sam, PTQConfig(**FAST), [synthetic_image(0)[0]])


def test_images_calibrate_through_the_box_prompt_loop(quantized_tinyvit):
    """Images are shorthand for `box_prompt_loop`: the same loop, the same scales, bit for bit."""
    sam, _ = quantized_tinyvit
    items = prepare_calibration([synthetic_image(0)[0]], FAST["num_calib"], FAST["max_prompts"], seed=0)
    looped = tiny_model("tinyvit_test")
    quantize_(looped, PTQConfig(method="mse", **FAST), box_prompt_loop(items), show_progress=False)
    expected = sam.state_dict()
    for key, value in looped.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_callers_forward_loop_drives_calibration():
    """A ModelOpt-style loop with point prompts: called once per pass, the probe stops after one batch."""
    image = torch.from_numpy(prepare_calibration([synthetic_image(2)[0]], 1, 1, seed=0)[0].image.numpy())
    points = [torch.tensor([[[100.0, 200.0], [0.0, 0.0]]]), torch.tensor([[[700.0, 300.0], [0.0, 0.0]]])]
    labels = torch.tensor([[1.0, -1.0]])  # one foreground point and SAM's padding point
    batches_run = []

    def loop(sam):
        decoder = PointPromptDecoder(sam)
        for coords in points:
            batches_run.append(len(batches_run))
            yield decoder(sam.image_encoder(image), coords, labels)

    sam = tiny_model("sam_vit_test")
    report = quantize_(sam, PTQConfig(method="minmax", parts=("decoder",), **FAST), loop, show_progress=False)
    assert report.num_calib == 2 and report.layers
    # probes of the first batch only (layers the outputs depend on, input kinds, shared grids), the statistics
    # and output-quantizer passes
    assert len(batches_run) == 1 + 1 + 2 + 2 + 1
    with pytest.raises(ValueError, match="needs at least one calibration batch; the forward loop ran none"):
        quantize_(tiny_model("sam_vit_test"), PTQConfig(**FAST), lambda sam: iter(()))
