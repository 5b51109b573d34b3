"""How much each MatMul's quantization disturbs its output, from the calibration Hessian alone.

For y = x W over the calibration tokens, with H = sum x xᵀ over those T tokens:
- the clean output energy is tr(Wᵀ H W);
- rounding the weight to W + dW adds tr(dWᵀ H dW) (round to nearest on the scheme's grid);
- an integer activation grid of step s adds noise of variance s²/12 to every input element,
  T s²/12 ||W||² at the output; a float grid's noise is relative to each element, about
  2^(-2m)/12 x² for m mantissa bits, sum_k H_kk 2^(-2m)/12 ||W_k||².
The sensitivity is the sum of the two errors over the clean energy (a relative output MSE). It ranks
MatMuls for mixed precision (`--exclude_most_sensitive N` keeps the N highest in float); it is a
model of the error, not a measurement of perplexity, so the README reports what excluding bought.
"""

from __future__ import annotations

import numpy as np

from onnxquant.spec import QuantSpec, quant_params, round_to_nearest

MANTISSA_BITS = {"float8e4m3fn": 3, "float4e2m1": 1}


def activation_noise_energy(weight: np.ndarray, hessian: np.ndarray, tokens: int, spec: QuantSpec | None,
                            value_range: tuple[float, float] | None) -> float:
    """Output energy of the activation grid's noise through `weight`; `hessian` is H or its diagonal."""
    if spec is None:
        return 0.0
    row_energy = np.einsum("kn,kn->k", weight, weight, dtype=np.float64)
    if spec.is_float:
        relative = 2.0 ** (-2 * MANTISSA_BITS[spec.dtype]) / 12.0
        diagonal = hessian if hessian.ndim == 1 else np.diag(hessian)
        return float(relative * np.dot(diagonal.astype(np.float64), row_energy))
    scale, _ = quant_params(*value_range, spec)
    return float(tokens * float(scale) ** 2 / 12.0 * row_energy.sum())


def matmul_sensitivity(weight: np.ndarray, hessian: np.ndarray, tokens: int, weight_spec: QuantSpec,
                       activation_spec: QuantSpec | None, value_range: tuple[float, float] | None) -> float:
    """Relative output error of one MatMul (weight [K, N]) under its weight and activation grids."""
    weight = np.asarray(weight, dtype=np.float32)
    hessian = np.asarray(hessian, dtype=np.float32)
    delta = round_to_nearest(weight, weight_spec).dequantize() - weight
    weight_error = float(np.einsum("kn,kn->", delta, hessian @ delta, dtype=np.float64))
    clean = float(np.einsum("kn,kn->", weight, hessian @ weight, dtype=np.float64))
    noise = activation_noise_energy(weight, hessian, tokens, activation_spec, value_range)
    return (weight_error + noise) / max(clean, np.finfo(np.float64).tiny)
