"""SmoothQuant's per-channel migration scales, and the per-activation choice of their strength alpha."""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxquant.algorithms.sensitivity import activation_noise_energy
from onnxquant.scale_folding import FoldTarget
from onnxquant.spec import COLUMNS_PER_CHUNK, QuantSpec, column_chunks, round_to_nearest


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); channels with no signal keep s = 1."""
    act = np.maximum(act_absmax.astype(np.float64), 0.0)
    wgt = np.maximum(weight_absmax.astype(np.float64), 0.0)
    scales = np.ones_like(act)
    ok = (act > 0) & (wgt > 0)
    scales[ok] = act[ok] ** alpha / wgt[ok] ** (1.0 - alpha)
    return np.clip(scales, 1e-5, 1e5)


def target_scales(target: FoldTarget, act_absmax: np.ndarray, weight_row_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """Scales of one target: statistics shared within kv groups first, so every head of a group
    gets the same s (their max statistics)."""
    return smoothing_scales(target.shared(act_absmax), target.shared(weight_row_absmax), alpha)


# Candidates of the per-activation search (`--sq_alpha auto`): the range SmoothQuant's paper and the
# global sweeps in the README found useful.
SEARCH_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smoothed_error(scales: np.ndarray, weight: np.ndarray, hessian: np.ndarray, tokens: int,
                   weight_spec: QuantSpec, activation_spec: QuantSpec | None, value_range: tuple[float, float]) -> float:
    """Modelled output error of X·W for one reader's weight W after smoothing by `scales` (X <- X / s,
    W <- s W): the weight grid's rounding error tr(dWᵀ H' dW) plus the activation grid's noise through W
    (algorithms.sensitivity), with H' = H / (s sᵀ) the smoothed input's Hessian and `value_range` the
    smoothed input's calibrated range. The clean output does not depend on s; readers of one input add.
    `hessian` may be H's diagonal alone (sum of x_k² per channel): tr(dWᵀ H' dW) is then taken as
    sum_k H'_kk ||dW_k||², which ignores how rounding errors of correlated channels add up."""
    s = scales.astype(np.float64)
    h = (hessian / (s * s if hessian.ndim == 1 else np.outer(s, s))).astype(np.float32)
    # The model ranks alphas; the pair-safe search would only slow it (it moves every alpha alike).
    weight_spec = dataclasses.replace(weight_spec, pair_safe=False)
    error = 0.0
    # Column chunks bound the temporaries (lm_head has 49152 columns); a per-tensor grid needs them all.
    width = weight.shape[1] if weight_spec.granularity == "per_tensor" else COLUMNS_PER_CHUNK
    for cols in column_chunks(weight.shape[1], width):
        smoothed = (weight[:, cols].astype(np.float64) * s[:, None]).astype(np.float32)
        delta = round_to_nearest(smoothed, weight_spec).dequantize() - smoothed
        spread = h[:, None] * delta if h.ndim == 1 else h @ delta
        error += float(np.einsum("kn,kn->", delta, spread, dtype=np.float64))
        error += activation_noise_energy(smoothed, h, tokens, activation_spec, value_range)
    return error


def choose_alpha(errors: dict[float, float]) -> float:
    """The candidate with the smallest modelled error (ties: the one nearest 0.5, SmoothQuant's default)."""
    return min(errors, key=lambda alpha: (errors[alpha], abs(alpha - 0.5)))
