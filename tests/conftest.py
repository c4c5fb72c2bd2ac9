"""Fixtures shared by test modules (helpers that are not fixtures live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float32_cuda():
    """TF32 rounds products to 10 mantissa bits (1e-3), outside the float32 contracts: hold a GPU to float32
    (harmless on the CPU). Set and restored by hand: the flags are properties that monkeypatch cannot undo."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
