"""MSE scale search: round to nearest with the clipping range, per output column (or per tensor), that
minimizes the weight's squared rounding error, chosen from MSE_RATIOS of the full range.

For per-block grids this is the unweighted per-block clip search (onnxquant.algorithms.rtn); pair-safe
int8 grids already choose their bound by the same criterion (onnxquant.spec.pair_safe_bound), so they are
rounded as they are. The search needs no calibration.
"""

from __future__ import annotations

import numpy as np

from onnxquant.algorithms.registry import WeightAlgorithm, register
from onnxquant.algorithms.rtn import clip_search
from onnxquant.spec import (COLUMNS_PER_CHUNK, QuantizedWeight, QuantSpec, column_chunks, concat_columns,
                            round_to_nearest)

MSE_RATIOS = tuple(np.round(np.arange(1.0, 0.595, -0.02), 2))


def mse_round(weight: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    if spec.granularity == "per_block":
        return clip_search(weight, spec)
    if spec.pair_safe:
        return round_to_nearest(weight, spec)
    if spec.granularity == "per_tensor":
        return round_to_nearest(weight, spec, _best_ratio(weight, spec))
    return concat_columns([round_to_nearest(weight[:, cols], spec, _best_ratio(weight[:, cols], spec))
                           for cols in column_chunks(weight.shape[1], COLUMNS_PER_CHUNK)])


def _best_ratio(weight: np.ndarray, spec: QuantSpec) -> np.ndarray | float:
    """The ratio in MSE_RATIOS with the least squared error: one per column for per-channel grids, else one."""
    weight = np.asarray(weight, np.float32)
    per_channel = spec.granularity == "per_channel"
    errors = np.empty((len(MSE_RATIOS), weight.shape[1] if per_channel else 1))
    for i, ratio in enumerate(MSE_RATIOS):
        squared = (round_to_nearest(weight, spec, ratio).dequantize() - weight) ** 2
        errors[i] = squared.sum(axis=0) if per_channel else squared.sum()
    best = np.asarray(MSE_RATIOS, np.float32)[np.argmin(errors, axis=0)]
    return best if per_channel else float(best[0])


MSE = register(WeightAlgorithm(
    "mse", "round to nearest with the clipping range (per column or tensor) of least squared error",
    lambda weight, spec, prepared, settings: mse_round(weight, spec)))
