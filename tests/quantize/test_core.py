"""The quantizer arithmetic against a 10-line reference, twin-uniform, and the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantize import PTQConfig
from quantize.core import quantize_symmetric, twin_gelu_quant, twin_softmax_quant
from quantize.modules import ActQuantizer, WeightQuantizer, quantized_copy


def reference_fake_quant(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Textbook symmetric quantize/dequantize, written independently of quantize.core."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = np.empty_like(x)
    for index, value in np.ndenumerate(x):
        s = scale[index[0]] if scale.ndim else float(scale)
        level = np.round(value / s)  # numpy rounds half to even, as ONNX QuantizeLinear does
        q[index] = min(max(level, lo), hi) * s
    return q


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantizer_matches_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 5, generator=gen) * 3
    w[0, 0] = 0.5 * 0.25  # a value exactly half way between two levels of scale 0.25
    scale = w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
    scale[0] = 0.25
    quantizer = WeightQuantizer(bits, 6, axis=0)
    quantizer.scale.copy_(scale)
    quantizer.enabled = True
    expected = reference_fake_quant(w.double().numpy(), scale.double().numpy(), bits)
    np.testing.assert_allclose(quantizer(w).numpy(), expected, rtol=0, atol=1e-6)
    x = torch.randn(4, 7, generator=gen) * 10  # per-tensor with clipping
    np.testing.assert_allclose(
        quantize_symmetric(x, 0.05, bits).numpy(),
        reference_fake_quant(x.double().numpy(), np.array(0.05), bits),
        atol=1e-6,
    )


def test_export_mode_emits_the_same_values():
    x = torch.randn(1000) * 4
    for bits in (8, 6):
        act = ActQuantizer(bits)
        act.scale.fill_(0.03)
        act.enabled = True
        simulated = act(x)
        act.export_int8 = True
        torch.testing.assert_close(act(x), simulated, rtol=0, atol=1e-6)


def test_twin_uniform_beats_uniform_on_softmax_and_gelu():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 196, generator=gen) * 3, dim=-1)
    uniform = quantize_symmetric(probs, probs.max() / 127, 8)
    best_twin = min(float((twin_softmax_quant(probs, 2.0**-k, 8) - probs).pow(2).mean()) for k in range(13))
    assert best_twin < 0.5 * float((uniform - probs).pow(2).mean())

    gelu = torch.nn.functional.gelu(torch.randn(20000, generator=gen) * 2)
    uniform = quantize_symmetric(gelu, gelu.abs().max() / 127, 8)
    twin = twin_gelu_quant(gelu, gelu.max() / 127, 8)
    negatives = gelu < 0
    assert float((twin - gelu)[negatives].pow(2).mean()) < 0.1 * float((uniform - gelu)[negatives].pow(2).mean())


def test_config_validates_and_round_trips():
    config = PTQConfig(w_bits=6, a_bits=6, method="mse", keep_float=["mask_decoder.iou_prediction_head.*"])
    assert PTQConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="w_bits must be an integer between 2 and 16, got 1"):
        PTQConfig(w_bits=1)
    with pytest.raises(ValueError, match="a_bits must be an integer between 2 and 16, got 17"):
        PTQConfig(a_bits=17)
    with pytest.raises(ValueError, match="method must be one of"):
        PTQConfig(method="kl")
    with pytest.raises(ValueError, match="unknown PTQConfig fields: \\['colour'\\]"):
        PTQConfig.from_dict({"colour": 1})


def test_a_module_without_a_quantized_layer_is_an_error_naming_its_type():
    with pytest.raises(TypeError, match="cannot quantize a ReLU"):
        quantized_copy(torch.nn.ReLU(), 8, 8, ["uniform"])
