"""Quantization schemes as declared data: one frozen dataclass per name in SCHEMES.

Activation signedness: the default schemes quantize activations to uint8 with an asymmetric
grid (zero point from the observed minimum). Measured on SmolLM2-135M (64 x 512 calibration
tokens, moving-average MinMax, first 4 wikitext-2 test blocks, float 24.52): uint8 asymmetric
46.12 against int8 symmetric 57.26, and ORT's CPU kernels ran the uint8 model 3x faster on an
AVX2 machine, whose integer GEMM is built around u8 x s8 products (s8 x s8 falls back to a slow
path without VNNI). The activations are skewed enough (e.g. silu(gate) * up) that a symmetric
grid wastes levels. The *_SYMMETRIC_ACT schemes keep signed int8 with zero point 0 for targets
that want it. Weights are always signed int8, symmetric.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from onnxquant.errors import fail


@dataclass(frozen=True)
class TensorQuant:
    """How one kind of tensor is quantized."""

    signed: bool  # int8 if True, uint8 if False
    symmetric: bool  # zero point 0 (signed) / derived from the observed range (asymmetric)
    per_channel: bool = False  # weights only: one scale per output column
    # Weights only: choose the scale so that |q[k]| + |q[k+1]| <= 128 for every pair of adjacent
    # input rows. ORT's u8 x s8 GEMM on AVX2 without VNNI (vpmaddubsw) adds such pairs of
    # products in int16, which saturates above 32767 = 255 * 128.5; with the bound it cannot.
    pair_safe: bool = False

    @property
    def qmin(self) -> int:
        return -128 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 127 if self.signed else 255

    @property
    def numpy_dtype(self) -> type:
        return np.int8 if self.signed else np.uint8


@dataclass(frozen=True)
class Calibration:
    method: str = "minmax"  # "minmax" or "percentile"
    percentile: float = 99.999
    moving_average: bool = False
    averaging_constant: float = 0.01  # new = old + c * (sample - old), as in AMD Quark / PyTorch


@dataclass(frozen=True)
class QuantScheme:
    name: str
    description: str
    weights: TensorQuant
    activations: TensorQuant
    calibration: Calibration = Calibration()
    sq_alpha: float = 0.5  # SmoothQuant migration strength when --include_sq is given without --sq_alpha

    def with_calibration(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))


INT8_SYMMETRIC_ACT = TensorQuant(signed=True, symmetric=True)
UINT8_ASYMMETRIC_ACT = TensorQuant(signed=False, symmetric=False)
INT8_WEIGHT_PER_TENSOR = TensorQuant(signed=True, symmetric=True, per_channel=False)
INT8_WEIGHT_PER_CHANNEL = TensorQuant(signed=True, symmetric=True, per_channel=True)
# Per-channel weights fill [-127, 127] in every column, which makes the u8 x s8 saturation above
# likely where uint8 activations peak: SmolLM2 INT8_PER_CHANNEL went from 20.8 to 615754 perplexity
# through ORT's fused MatMulIntegerToFloat, while the same QDQ graph evaluated op by op was fine.
INT8_WEIGHT_PER_CHANNEL_PAIR_SAFE = TensorQuant(signed=True, symmetric=True, per_channel=True, pair_safe=True)

SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("INT8_TRANSFORMER_DEFAULT",
                    "int8 symmetric per-tensor weights, uint8 asymmetric per-tensor static activations",
                    INT8_WEIGHT_PER_TENSOR, UINT8_ASYMMETRIC_ACT),
        QuantScheme("INT8_PER_CHANNEL",
                    "int8 symmetric per-output-channel weights (pair-safe grid), uint8 asymmetric per-tensor static activations",
                    INT8_WEIGHT_PER_CHANNEL_PAIR_SAFE, UINT8_ASYMMETRIC_ACT),
        QuantScheme("INT8_SYMMETRIC_ACT",
                    "int8 symmetric per-tensor weights, int8 symmetric per-tensor static activations",
                    INT8_WEIGHT_PER_TENSOR, INT8_SYMMETRIC_ACT),
        QuantScheme("INT8_SYMMETRIC_ACT_PER_CHANNEL",
                    "int8 symmetric per-output-channel weights, int8 symmetric per-tensor static activations",
                    INT8_WEIGHT_PER_CHANNEL, INT8_SYMMETRIC_ACT),
    )
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        fail(f"unknown --config {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def quant_params(rmin: np.ndarray | float, rmax: np.ndarray | float, spec: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (spec dtype) covering [rmin, rmax], elementwise.

    Symmetric: scale = max(|rmin|, |rmax|) / 127, zero point 0. Asymmetric: the range is widened
    to include 0 (so zero is exact) and spread over all 256 levels.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    tiny = np.finfo(np.float32).tiny
    if spec.symmetric:
        scale = np.maximum(np.maximum(-rmin, rmax) / 127.0, tiny)
        zero_point = np.zeros_like(scale) if spec.signed else np.full_like(scale, 128.0)
    else:
        scale = np.maximum((rmax - rmin) / (spec.qmax - spec.qmin), tiny)
        zero_point = np.clip(np.round(spec.qmin - rmin / scale), spec.qmin, spec.qmax)
    return scale.astype(np.float32), zero_point.astype(spec.numpy_dtype)


def quantize_array(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: TensorQuant) -> np.ndarray:
    """Round-to-nearest-even and saturate, as ONNX QuantizeLinear does."""
    q = np.rint(x / scale) + np.asarray(zero_point, dtype=np.float32)  # integers below 2**24: exact
    return np.clip(q, spec.qmin, spec.qmax).astype(spec.numpy_dtype)
