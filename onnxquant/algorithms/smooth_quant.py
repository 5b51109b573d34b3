"""SmoothQuant's per-channel migration scales."""

from __future__ import annotations

import numpy as np

from onnxquant.scale_folding import FoldTarget


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
