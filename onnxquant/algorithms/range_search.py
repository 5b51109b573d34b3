"""Activation range search: the static range that minimizes the quantization error of a tensor.

The error of a range is measured on the tensor's histogram (all calibration values), by running
the exact quantize-dequantize of the activation's grid on each bin centre, so saturation and the
grid's own rounding (integer or FP8) are both counted. Min-max keeps the rare extremes exact at
the cost of a coarser step for everything else; the search trades the two.
"""

from __future__ import annotations

import numpy as np

from onnxquant.spec import QuantSpec, dequantize_array, quant_params, quantize_array

# Fractions of the observed extreme tried for each end of the range. The floor keeps a tensor whose
# bulk sits far inside its extremes from being clipped to a sliver when a handful of huge values
# (the "massive activations" of LLMs) carry most of what the next layer needs.
RANGE_RATIOS = tuple(np.round(np.arange(1.0, 0.295, -0.025), 3))
REFINE_ROUNDS = 2


def range_error(centres: np.ndarray, counts: np.ndarray, low: float, high: float, spec: QuantSpec) -> float:
    """Sum of squared quantize-dequantize errors of the histogram for the static range [low, high]."""
    scale, zero_point = quant_params(low, high, spec)
    restored = dequantize_array(quantize_array(centres, scale, zero_point, spec), scale, zero_point)
    return float(np.dot(counts, (centres - restored.astype(np.float64)) ** 2))


def mse_range(centres: np.ndarray, counts: np.ndarray, observed: tuple[float, float], spec: QuantSpec) -> tuple[float, float]:
    """The range [r_lo * min, r_hi * max] (ratios from RANGE_RATIOS) minimizing `range_error`:
    first one ratio for both ends, then each end in turn with the other fixed (a symmetric grid
    only ever uses the larger end, so it takes the first step alone)."""
    keep = counts > 0
    centres, counts = centres[keep].astype(np.float64), counts[keep].astype(np.float64)
    low, high = observed

    def error(r_low: float, r_high: float) -> float:
        return range_error(centres, counts, r_low * low, r_high * high, spec)

    best = min(RANGE_RATIOS, key=lambda r: error(r, r))
    r_low = r_high = best
    if not spec.symmetric:
        for _ in range(REFINE_ROUNDS):
            r_low = min(RANGE_RATIOS, key=lambda r: error(r, r_high))
            r_high = min(RANGE_RATIOS, key=lambda r: error(r_low, r))
    return r_low * low, r_high * high
