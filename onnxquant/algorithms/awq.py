"""AWQ: per-input-channel scales s = mean|x|^alpha that protect the weights of salient inputs.

For each activation group (readers sharing one input X with Hessian H = sum x xᵀ), alpha is
searched over ALPHAS; the loss is the exact output error of the quantized, scaled readers on
the calibration tokens: with W' = diag(s) W and E = W' - Q(W'), the error of X diag(1/s) W' is
tr(Eᵀ diag(1/s) H diag(1/s) E), computed from H without storing any activation. The chosen s is
folded into X's producer by the shared scale-folding machinery (FoldChannelScalesPass).
"""

from __future__ import annotations

import numpy as np

from onnxquant.algorithms.registry import WeightAlgorithm, register
from onnxquant.algorithms.rtn import clip_search
from onnxquant.scale_folding import FoldTarget
from onnxquant.spec import QuantSpec, round_to_nearest

ALPHAS = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))


def output_error(weight: np.ndarray, hessian: np.ndarray, spec: QuantSpec, scales: np.ndarray) -> float:
    # float32 products (half the time of float64, which dominated the search) summed in float64:
    # the loss only ranks alphas, and float32 changes it by about 1e-6 relative.
    scaled = (weight.astype(np.float64) * scales[:, None]).astype(np.float32)
    error = ((round_to_nearest(scaled, spec).dequantize() - scaled) / scales[:, None].astype(np.float32))
    return float(np.sum((hessian @ error) * error, dtype=np.float64))


def awq_scales(target: FoldTarget, weights: list[np.ndarray], specs: list[QuantSpec], hessian: np.ndarray,
               mean_abs: np.ndarray) -> tuple[np.ndarray, float]:
    """The scales of one group and the alpha that gave them (alpha 0: all ones, no change)."""
    h = np.asarray(hessian, dtype=np.float32)
    stat = target.shared(np.maximum(np.asarray(mean_abs, np.float64), 1e-8), np.mean)
    best = (np.inf, np.ones_like(stat), 0.0)
    for alpha in ALPHAS:
        scales = stat ** alpha
        scales = np.clip(scales / np.sqrt(scales.max() * scales.min()), 1e-4, 1e4)
        loss = sum(output_error(w, h, spec, scales) for w, spec in zip(weights, specs))
        if loss < best[0]:
            best = (loss, scales, float(alpha))
    return best[1], best[2]


AWQ = register(WeightAlgorithm(
    "awq", "activation-aware scales folded into each input's producer, then clip search weighted by diag H",
    lambda weight, spec, importance, settings: clip_search(weight, spec, importance),
    prepare=lambda hessian, settings: np.diag(hessian).copy(), folds_scales=True))
