"""Shared fixtures: one small quantized tinyvit_test model for the save/load and export tests."""

from __future__ import annotations

import pytest

from quantize import PTQConfig, quantize_
from tests.helpers import synthetic_image, tiny_model

# Small search settings keep the suite within its CPU budget; the algorithm is the same.
FAST = dict(num_calib=1, max_prompts=1, num_alphas=6, rounds=1, max_split_exponent=6, search_tokens=16)


@pytest.fixture(scope="session")
def quantized_tinyvit():
    """(quantized tinyvit_test W8A8 with twin-uniform inputs, its QuantReport)."""
    sam = tiny_model("tinyvit_test")
    report = quantize_(sam, PTQConfig(method="mse", **FAST), [synthetic_image(0)[0]], show_progress=False)
    return sam, report
