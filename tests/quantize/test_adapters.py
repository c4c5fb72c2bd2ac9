"""The structural rewrites before quantization compute what the original modules compute."""

from __future__ import annotations

import onnx
import torch
from timm.layers.squeeze_excite import SEModule
from timm.models.repvit import RepVggDw
from torch import nn

from quantize.adapters import SqueezeExciteAdapter, fuse_reparameterizable, install_adapters
from quantize.onnx_export import write_onnx


def test_repvit_token_mixer_fuses_into_one_depthwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(RepVggDw(16, 3)).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics to fold
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected = model(x)
        assert fuse_reparameterizable(model) == ["0"]
        assert isinstance(model[0], nn.Conv2d) and model[0].groups == 16 and model[0].kernel_size == (3, 3)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_squeeze_excite_pools_with_a_layout_fixed_op_and_computes_the_same(tmp_path):
    """GlobalAveragePool (NCHW by definition) instead of ReduceMean, whose layout ONNX Runtime may change."""
    torch.manual_seed(0)
    model = nn.Sequential(SEModule(16, rd_channels=4)).eval()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected = model(x)
        assert install_adapters(model) == ["0"]
        assert isinstance(model[0], SqueezeExciteAdapter)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    write_onnx(model, (x,), tmp_path / "se.onnx", ["x"], ["y"], None)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "se.onnx")).graph.node}
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops, ops
