"""Scale search: never worse than min/max on the layer's own metric; attention adapters are exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantize import PTQConfig
from quantize.adapters import install_adapters
from quantize.calibration import LayerCalibrator
from quantize.modules import quantized_copy
from quantize.search import LayerSearch, search_layer
from tests.helpers import tiny_model


@pytest.mark.parametrize("method", ["mse", "hessian"])
def test_search_never_worse_than_minmax(method):
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 16)
    layer = quantized_copy(linear, 6, 6, ["uniform"])
    calibrator = LayerCalibrator(layer)
    x = torch.randn(4, 50, 32, generator=gen)
    x[0, 0, 0] = 40.0  # one outlier: min/max wastes most levels on it
    out = layer.float_forward(x)
    out.requires_grad_(True)
    calibrator.collect((x,), out, tokens=64, gen=gen)
    out.backward(torch.randn(out.shape, generator=gen))
    config = PTQConfig(w_bits=6, a_bits=6, method=method, num_alphas=40, rounds=2)
    result = search_layer(calibrator, config)
    assert result.error < result.error_minmax  # strictly better here: the outlier makes clipping pay

    # The same metric recomputed from the scales the search wrote into the layer.
    search = LayerSearch(calibrator, use_grads=method == "hessian")
    quantized = [search.quantized_inputs(0, layer.input_quants[0].scale, layer.input_quants[0].split)]
    weight = layer.weight_quant.quantize(layer.weight.detach(), layer.weight_quant.scale)
    assert search.error(weight, quantized) == pytest.approx(result.error, rel=1e-5)


@pytest.mark.parametrize("name", ["sam_vit_test"])
def test_attention_adapters_are_exact(name):
    sam = tiny_model(name)
    x = torch.randn(1, 3, 1024, 1024)
    tokens, image = torch.randn(2, 7, 256), torch.randn(2, 4096, 256)
    attn = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    with torch.no_grad():
        before_enc, before_dec = sam.image_encoder(x), attn(tokens, image, image)
        replaced = install_adapters(sam)
        adapted = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
        after_enc, after_dec = sam.image_encoder(x), adapted(tokens, image, image)
    assert (
        "image_encoder.blocks.0.attn" in replaced and "mask_decoder.transformer.final_attn_token_to_image" in replaced
    )
    torch.testing.assert_close(after_enc, before_enc, rtol=0, atol=1e-5)
    torch.testing.assert_close(after_dec, before_dec, rtol=0, atol=1e-5)


def _post_softmax_linear(gen):
    """A Linear fed softmax probabilities (twin-softmax candidate input), with collected calibration samples."""
    layer = quantized_copy(nn.Linear(49, 16), 6, 6, ["twin_softmax"])
    calibrator = LayerCalibrator(layer)
    x = torch.softmax(torch.randn(4, 40, 49, generator=gen) * 4, dim=-1)
    with torch.no_grad():
        calibrator.collect((x,), layer.float_forward(x), tokens=64, gen=gen)
    return layer, calibrator


@pytest.mark.parametrize("margin", [0.0, 0.99])
def test_a_twin_candidate_is_kept_only_where_it_lowers_the_error_by_the_margin(margin):
    layer, calibrator = _post_softmax_linear(torch.Generator().manual_seed(2))
    result = search_layer(calibrator, PTQConfig(w_bits=6, a_bits=6, method="mse", num_alphas=20, twin_margin=margin))

    keeps_twin = result.error_twin < (1 - margin) * result.error_uniform
    assert layer.input_quants[0].kind == ("twin_softmax" if keeps_twin else "uniform")
    assert result.error == (result.error_twin if keeps_twin else result.error_uniform)
    assert result.seconds_twin > 0 and result.seconds_uniform > 0
    # Post-softmax inputs are what twin ranges are for (twin's error is 0.39x uniform's here), but not 100x.
    assert keeps_twin == (margin == 0.0)
    # The scales in the layer are those of the kept search: its error recomputed from them.
    search = LayerSearch(calibrator, use_grads=False)
    quantizer = layer.input_quants[0]
    weight = layer.weight_quant.quantize(layer.weight.detach(), layer.weight_quant.scale)
    recomputed = search.error(weight, [search.quantized_inputs(0, quantizer.scale, quantizer.split)])
    assert recomputed == pytest.approx(result.error, rel=1e-5)
