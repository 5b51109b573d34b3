"""GPTQ: round a weight column by column, updating the columns not yet rounded to absorb the error.

With H = sum x xᵀ over calibration tokens of the weight's input (from the in-graph
HessianObserver), rounding input row k of W [K, N] to q_k leaves an output error that the
remaining rows can partly cancel: W[k+1:] -= (w_k - q_k) H⁻¹[k, k+1:] / H⁻¹[k, k] (optimal brain
surgeon, rows processed in order, through the upper Cholesky factor of H⁻¹). Options follow the
reference implementation: dampening (a fraction of mean diag H added to the diagonal), act-order
(rows by decreasing diag H), lazy batch updates (blocks of 128 rows). Block grids are fixed up
front from the unmodified weight ("static groups"), so act-order keeps MatMulNBits' layout.
INT8 grids work the same way (one grid per tensor or per output channel); on a pair-safe grid each
row's codes are clipped so that adjacent rows stay pair-safe.
Math runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from onnxquant.algorithms.registry import WeightAlgorithm, register
from onnxquant.algorithms.rtn import clip_search
from onnxquant.spec import (PAIR_LIMIT, QuantizedWeight, QuantSpec, column_chunks, concat_columns, nvfp4_tensor_scale,
                            padded_blocks, round_codes, round_to_nearest)


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    act_order: bool = True
    batch: int = 128
    columns_per_chunk: int = 4096  # output columns rounded at once (independent given H): bounds float64 memory
    clip_search: bool = True  # choose the fixed block grids with the H-weighted clip search


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)⁻¹ = Uᵀ U, raising the dampening until H is positive definite.

    With J the order-reversing permutation and J H J = L Lᵀ, H = (J L J)(J L J)ᵀ with J L J upper
    triangular, so U = (J L J)⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse (2n³/3 flops)
    instead of Cholesky, inverse and a second Cholesky (8n³/3; minutes for Qwen2.5-1.5B's 8960-wide
    down_proj input). Equal to the three-step route to 1e-15 relative.
    """
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    diagonal = np.arange(len(h))
    for attempt in range(6):
        damped = h[::-1, ::-1].copy()
        damped[diagonal, diagonal] += (damp * 10 ** attempt) * mean_diag
        try:
            # damped is symmetric, so its transpose is the same matrix in the Fortran order LAPACK
            # wants: no conversion copy.
            lower = scipy.linalg.cholesky(damped.T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1, overwrite_c=1)
        if info == 0:
            return np.ascontiguousarray(inverse[::-1, ::-1])
    raise np.linalg.LinAlgError("the Hessian is not positive definite even with strong dampening")


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input's Hessian, computed once for all the weights that read the input."""
    dead: np.ndarray  # channels that never fired (zero diagonal): their rows are rounded as zero
    importance: np.ndarray  # diag H, the clip search's row weights
    order: np.ndarray  # processing order of the rows
    hinv: np.ndarray  # upper Cholesky factor of the damped H⁻¹, in processing order


def factor_hessian(hessian: np.ndarray, settings: GPTQSettings = GPTQSettings()) -> HessianFactor:
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if settings.act_order else np.arange(len(h))
    importance = np.diag(h).copy()
    return HessianFactor(dead, importance, order, _inverse_cholesky(h[np.ix_(order, order)], settings.damp))


def gptq_round(weight: np.ndarray, hessian: np.ndarray | HessianFactor, spec: QuantSpec,
               settings: GPTQSettings = GPTQSettings()) -> QuantizedWeight:
    k, n = weight.shape
    spec = nvfp4_tensor_scale(weight, spec)  # one per-tensor scale for every column chunk
    factor = hessian if isinstance(hessian, HessianFactor) else factor_hessian(hessian, settings)
    # Each output column's updates involve only that column, so columns are rounded in chunks; a
    # per-tensor grid is fixed from the whole weight first and shared by every chunk.
    shared = round_to_nearest(weight, spec) if spec.granularity == "per_tensor" else None
    parts = [_gptq_columns(weight[:, cols], factor, spec, settings, shared)
             for cols in column_chunks(n, settings.columns_per_chunk)]
    if shared is not None:
        return QuantizedWeight(np.concatenate([part.codes for part in parts], axis=1), shared.scale, shared.zero_point, spec, k)
    return concat_columns(parts)


def _gptq_columns(weight: np.ndarray, factor: HessianFactor, spec: QuantSpec, settings: GPTQSettings,
                  shared: QuantizedWeight | None = None) -> QuantizedWeight:
    k, n = weight.shape
    dead, importance, order, hinv = factor.dead, factor.importance, factor.order, factor.hinv
    w = np.array(weight, dtype=np.float64)  # [K, N]: row k is input channel k
    w[dead] = 0.0
    if shared is not None:
        grid = shared
    elif settings.clip_search:
        grid = clip_search(w.astype(np.float32), spec, importance)
    else:
        grid = round_to_nearest(w.astype(np.float32), spec)
    if spec.granularity == "per_block":
        # Scale and zero point of each (processed) row's block: [blocks, N] indexed per row.
        block_scale = grid.scale.T.astype(np.float64) * grid.tensor_scale
        block_zero = grid.zero_point.T.astype(np.float64)
        row_block = (order // spec.block_size)
    else:
        block_scale = np.broadcast_to(np.asarray(grid.scale, np.float64), (n,))[None, :]
        block_zero = np.broadcast_to(np.asarray(grid.zero_point, np.float64), (n,))[None, :]
        row_block = np.zeros(k, dtype=np.int64)
    w = w[order]
    codes = np.zeros((k, n), dtype=np.float64)  # code values, in processing order
    # The processing position of each row's pair partner (rows 2j and 2j+1), when that partner came first.
    partner = order ^ 1
    partner_position = np.where(partner < k, np.argsort(order)[np.minimum(partner, k - 1)], k)
    clamped = spec.pair_safe & (partner_position < np.arange(k))
    for start in range(0, k, settings.batch):
        end = min(start + settings.batch, k)
        block = w[start:end]
        # Row i of the block only needs the errors of rows before it: one product when its turn comes
        # (inside[i, :i] @ errors[:i]) instead of updating every later row after each one.
        inside = np.ascontiguousarray(hinv[start:end, start:end].T)
        errors = np.zeros_like(block)
        for i in range(end - start):
            row = start + i
            scale, zero = block_scale[row_block[row]], block_zero[row_block[row]]
            current = block[i] - inside[i, :i] @ errors[:i] if i else block[i]
            q = round_codes(current / scale, zero, spec)
            if clamped[row]:
                # Keep |q_k| + |q_partner| <= PAIR_LIMIT, as the RTN grid does, whatever the updates did.
                limit = PAIR_LIMIT - np.abs(codes[partner_position[row]])
                np.clip(q, -limit, limit, out=q)
            codes[row] = q
            errors[i] = (current - (q - zero) * scale) / hinv[row, row]
        w[end:] -= hinv[start:end, end:].T @ errors
    codes = codes[np.argsort(order)].astype(spec.numpy_dtype)
    if spec.granularity != "per_block":
        return QuantizedWeight(codes, grid.scale, grid.zero_point, spec, k)
    # Back to MatMulNBits' [N, blocks, block] layout; padded rows hold the zero point (value 0).
    blocks = padded_blocks(codes.astype(np.float32), spec.block_size)
    if k % spec.block_size:
        blocks[:, -1, k % spec.block_size:] = grid.zero_point[:, -1:].astype(np.float32)
    return QuantizedWeight(blocks.astype(spec.numpy_dtype), grid.scale, grid.zero_point, spec, k, grid.tensor_scale)


GPTQ = register(WeightAlgorithm(
    "gptq", "Hessian-aware rounding row by row, later rows absorbing each row's error (calibration Hessians)",
    lambda weight, spec, factor, settings: gptq_round(weight, factor, spec, settings), prepare=factor_hessian))
