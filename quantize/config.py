"""`PTQConfig`: everything that decides how a SAM model is quantized, checked on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SEARCH_METHODS = ("hessian", "mse", "minmax")
PARTS = ("encoder", "decoder")


@dataclass
class PTQConfig:
    """Post-training quantization settings (SPEC section 3; defaults are the paper's where it gives them).

    Attributes:
        w_bits, a_bits: weight / activation widths (2..16; 8 and 6 are the tested ones).
        w_granularity: "per_channel" (per output channel; the only weight granularity offered).
        a_granularity: "per_tensor" (the only activation granularity offered).
        method: scale search ranking: "hessian" (PTQ4ViT's (dL/dO * (O - O_q))^2 with the KL task
            loss), "mse" (output MSE) or "minmax" (no search: s = max|x| / (2^(b-1) - 1)).
        alpha_min, alpha_max, num_alphas: the candidate grid s = alpha * max|x| / (2^(b-1) - 1).
        rounds: alternating weight/activation search rounds.
        twin_softmax, twin_gelu: two-range quantization of post-softmax / post-GELU inputs.
        twin_convs: twin-uniform ranges for convolution inputs too. Off by default: in ONNX Runtime
            a twin input of a convolution costs a transpose per range (1x1) or a float convolution
            (depthwise, transposed), at the largest activations of a CNN stage, while the products of
            the transformer blocks (Linear after GELU, attention after softmax) take their two ranges
            as two integer products (docs/BENCHMARKS.md, "Twin-uniform or uniform ranges").
        twin_margin: a twin-uniform candidate is kept only where it lowers its layer's search error (MSE
            or Hessian-weighted) by more than this fraction against the same search with uniform
            ranges; elsewhere the input is uniform (one integer product instead of two). 0 keeps twin
            wherever it is better at all.
        conv_outputs: also quantize the output of each non-pointwise convolution whose input is
            uniformly quantized (one more rounding per such layer; scale by output MSE over the
            alpha grid, min/max for "minmax"), so that ONNX Runtime runs it as an integer
            QLinearConv; without it these convolutions compute in float on int8-stored weights.
        product_outputs: also quantize the output of each Linear layer whose input is uniformly
            quantized (calibrated as `conv_outputs`'), so that XNNPACK (the ExecuTorch programs) runs
            it on its static int8 kernels, which quantize their outputs; without it they compute in
            float32 there. ONNX Runtime and OpenVINO run these products on integer kernels either way.
            Off by default: one more rounding per such layer. 1x1 convolutions are left out: a
            quantized one feeding a residual Add next to another quantized tensor lets ONNX Runtime
            fuse the Add into QLinearAdd, which its instrumented graph cannot expose (tinyvit_5m's
            downsampling layers).
        max_split_exponent: twin-softmax splits searched over 2^-k, k = 0..max_split_exponent.
        keep_float: fnmatch patterns of layer names (e.g. "mask_decoder.iou_prediction_head.*")
            left in float; a pattern that matches no quantizable layer is an error.
        num_calib: calibration images used (the first ones given).
        parts: which parts are quantized: "encoder" (image encoder), "decoder" (mask decoder).
        max_prompts: prompts (boxes) per calibration image.
        search_tokens: output positions per image and layer kept for the scale search (rows of a
            Linear, crop positions of a convolution, query rows of an attention product).
        seed: seeds prompt sampling, sample selection and the Hessian metric's label sampling.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_granularity: str = "per_channel"
    a_granularity: str = "per_tensor"
    method: str = "hessian"
    alpha_min: float = 0.01
    alpha_max: float = 1.2
    num_alphas: int = 100
    rounds: int = 3
    twin_softmax: bool = True
    twin_gelu: bool = True
    twin_convs: bool = False
    twin_margin: float = 0.1
    conv_outputs: bool = True
    product_outputs: bool = False
    max_split_exponent: int = 12
    keep_float: tuple[str, ...] = ()
    num_calib: int = 8
    parts: tuple[str, ...] = PARTS
    max_prompts: int = 8
    search_tokens: int = 64
    seed: int = 0
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.keep_float = tuple(self.keep_float)
        self.parts = tuple(self.parts)
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(f"{name} must be an integer between 2 and 16, got {bits!r}")
        if self.w_granularity != "per_channel":
            raise ValueError(f"w_granularity must be 'per_channel', got {self.w_granularity!r}")
        if self.a_granularity != "per_tensor":
            raise ValueError(f"a_granularity must be 'per_tensor', got {self.a_granularity!r}")
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, got {self.method!r}")
        if not 0 < self.alpha_min < self.alpha_max:
            raise ValueError(f"need 0 < alpha_min < alpha_max, got {self.alpha_min} and {self.alpha_max}")
        for name in ("num_alphas", "rounds", "num_calib", "max_prompts", "search_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.twin_margin < 1:
            raise ValueError(f"twin_margin must be in [0, 1), got {self.twin_margin}")
        if self.max_split_exponent < 0:
            raise ValueError(f"max_split_exponent must be >= 0, got {self.max_split_exponent}")
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {self.parts}")
        if self._extra:
            raise ValueError(f"unknown PTQConfig fields: {sorted(self._extra)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_extra")
        data["keep_float"] = list(self.keep_float)
        data["parts"] = list(self.parts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTQConfig:
        names = {f.name for f in fields(cls)} - {"_extra"}
        known = {key: value for key, value in data.items() if key in names}
        extra = {key: value for key, value in data.items() if key not in names}
        return cls(**known, _extra=extra)
