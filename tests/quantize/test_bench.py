"""quantize.bench's pieces: layer groups back in float for the per-type fidelity figures."""

from __future__ import annotations

import pytest
import torch

from quantize.bench import get_parser, layers_in_float
from tests.helpers import tiny_model


def test_layers_in_float_switches_quantizers_off_and_back(quantized_tinyvit):
    sam, _ = quantized_tinyvit
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized = sam.image_encoder(x)
        with layers_in_float(sam, ["image_encoder.*"]):
            in_float = sam.image_encoder(x)
        torch.testing.assert_close(sam.image_encoder(x), quantized, rtol=0, atol=0)
        reference = tiny_model("tinyvit_test").image_encoder(x)
    torch.testing.assert_close(in_float, reference, rtol=1e-4, atol=1e-4)  # BatchNorms folded: float rounding only
    assert not torch.allclose(quantized, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"--float-groups patterns \['nothing\.\*'\] match no quantized layer"):
        with layers_in_float(sam, ["nothing.*"]):
            pass
    groups = get_parser().parse_args(["--float-groups", "squeeze-excite=*.se.*", "dw=*a*,*b*"]).float_groups
    assert groups == [("squeeze-excite", ["*.se.*"]), ("dw", ["*a*", "*b*"])]
