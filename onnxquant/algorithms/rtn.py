"""Round to nearest, with an optional per-block clipping search."""

from __future__ import annotations

import numpy as np

from onnxquant.algorithms.registry import WeightAlgorithm, register
from onnxquant.spec import (COLUMNS_PER_CHUNK, QuantizedWeight, QuantSpec, block_grid, column_chunks, concat_columns, nvfp4_tensor_scale, padded_blocks,
                            quantize_array, round_to_nearest)

CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))
# A power-of-two (E8M0) scale can only move by whole exponents; OCP's floor(log2 max) may saturate a
# block's largest values, so the search also tries the next exponent up (the MSE observer of MX).
E8M0_CLIP_RATIOS = (2.0, 1.0, 0.5)


def clip_search(weight: np.ndarray, spec: QuantSpec, importance: np.ndarray | None = None) -> QuantizedWeight:
    """Blocked RTN where each block's range is shrunk by the ratio in CLIP_RATIOS minimizing
    sum_k importance_k (w_k - q_k)^2 over the block (importance: e.g. diag of the Hessian, so the
    error is weighted by how large the inputs of row k are; None weighs rows equally)."""
    if spec.granularity != "per_block":
        return round_to_nearest(weight, spec)
    spec = nvfp4_tensor_scale(weight, spec)
    return concat_columns([_clip_search_columns(weight[:, cols], spec, importance)
                           for cols in column_chunks(weight.shape[1], COLUMNS_PER_CHUNK)])


def _clip_search_columns(weight: np.ndarray, spec: QuantSpec, importance: np.ndarray | None) -> QuantizedWeight:
    blocks = padded_blocks(np.asarray(weight, dtype=np.float32), spec.block_size)  # [N, B, bs]
    weights = 1.0 if importance is None else padded_blocks(np.asarray(importance, np.float32)[:, None],
                                                           spec.block_size)[0]  # [B, bs]
    best_err = np.full(blocks.shape[:2], np.inf)
    best_ratio = np.ones(blocks.shape[:2])
    tensor_scale = np.float32(spec.tensor_scale or 1.0)
    for ratio in E8M0_CLIP_RATIOS if spec.scale_dtype == "e8m0" else CLIP_RATIOS:
        scale, zero = block_grid(blocks, spec, ratio)
        scale = scale * tensor_scale
        codes = quantize_array(blocks, scale[..., None], zero[..., None], spec)
        err = (((codes.astype(np.float32) - zero[..., None].astype(np.float32)) * scale[..., None] - blocks) ** 2 * weights).sum(-1)
        better = err < best_err
        best_err[better], best_ratio[better] = err[better], ratio
    return round_to_nearest(weight, spec, best_ratio)


RTN = register(WeightAlgorithm("rtn", "round to nearest on the full range",
                               lambda weight, spec, prepared, settings: round_to_nearest(weight, spec)))
CLIP_SEARCH = register(WeightAlgorithm(
    "clip_search", "round to nearest with a per-block clip ratio minimizing the block's error (blocked grids)",
    lambda weight, spec, prepared, settings: clip_search(weight, spec)))
