"""How one tensor is quantized: element type, granularity, symmetry, scale type, saturation safety.

A `QuantSpec` is frozen data validated when it is made; qmin/qmax, bit width and storage types
follow from the element type, so no code elsewhere writes 127 or "INT8 if signed". The grid
functions (`quant_params`, `quantize_array`, `dequantize_array`) work for every integer element
type and every granularity: per tensor, per channel (one scale per output column of a [K, N]
weight) and per block (blocks of `block_size` along K, one scale per block and column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class ElementType:
    name: str
    bits: int
    qmin: int
    qmax: int
    ir_dtype: ir.DataType
    numpy_dtype: type  # storage dtype of the codes in numpy (4-bit codes live in int8 / uint8 until packed)

    @property
    def signed(self) -> bool:
        return self.qmin < 0


ELEMENT_TYPES: dict[str, ElementType] = {t.name: t for t in (
    ElementType("int8", 8, -128, 127, ir.DataType.INT8, np.int8),
    ElementType("uint8", 8, 0, 255, ir.DataType.UINT8, np.uint8),
    ElementType("int4", 4, -8, 7, ir.DataType.INT4, np.int8),
    ElementType("uint4", 4, 0, 15, ir.DataType.UINT4, np.uint8),
)}

GRANULARITIES = ("per_tensor", "per_channel", "per_block")
SCALE_DTYPES = ("float32",)
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSpec:
    """One tensor's grid. Weights are [K, N] (MatMul input 1): channels are the N output columns,
    blocks run along K."""

    dtype: str = "int8"
    granularity: str = "per_tensor"
    symmetric: bool = True
    block_size: int = 0  # per_block only
    scale_dtype: str = "float32"
    # Weights only: choose the scale so that |q[k]| + |q[k+1]| <= 128 for every pair of adjacent
    # input rows. ORT's u8 x s8 GEMM on AVX2 without VNNI (vpmaddubsw) adds such pairs of
    # products in int16, which saturates above 32767 = 255 * 128.5; with the bound it cannot.
    pair_safe: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ELEMENT_TYPES:
            raise ValueError(f"unknown element type {self.dtype!r}; known: {', '.join(ELEMENT_TYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale dtype {self.scale_dtype!r}; known: {', '.join(SCALE_DTYPES)}")
        if (self.granularity == "per_block") != (self.block_size > 0):
            raise ValueError("block_size is set exactly when the granularity is per_block")
        if self.granularity == "per_block" and self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size} is not a power of two in 16..256")
        if self.pair_safe and self.element.bits != 8:
            raise ValueError("pair_safe applies to 8-bit weights only")

    @property
    def element(self) -> ElementType:
        return ELEMENT_TYPES[self.dtype]

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def qmin(self) -> int:
        return self.element.qmin

    @property
    def qmax(self) -> int:
        return self.element.qmax

    @property
    def signed(self) -> bool:
        return self.element.signed

    @property
    def numpy_dtype(self) -> type:
        return self.element.numpy_dtype

    @property
    def symmetric_levels(self) -> int:
        """Positive levels of a symmetric grid: 127 for 8 bits, 7 for 4 bits (zero stays exact)."""
        return (self.qmax - self.qmin) // 2

    @property
    def symmetric_zero_point(self) -> int:
        return 0 if self.signed else (self.qmax + 1) // 2


def quant_params(rmin: np.ndarray | float, rmax: np.ndarray | float, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (spec's storage dtype) covering [rmin, rmax], elementwise.

    Symmetric: scale = max(|rmin|, |rmax|) / levels, zero point at the grid's middle (0 signed).
    Asymmetric: the range is widened to include 0 (so zero is exact) and spread over all levels.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    tiny = np.finfo(np.float32).tiny
    if spec.symmetric:
        scale = np.maximum(np.maximum(-rmin, rmax) / spec.symmetric_levels, tiny)
        zero_point = np.full_like(scale, float(spec.symmetric_zero_point))
    else:
        scale = np.maximum((rmax - rmin) / (spec.qmax - spec.qmin), tiny)
        zero_point = np.clip(np.round(spec.qmin - rmin / scale), spec.qmin, spec.qmax)
    return scale.astype(np.float32), zero_point.astype(spec.numpy_dtype)


def quantize_array(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Round-to-nearest-even and saturate, as ONNX QuantizeLinear does."""
    q = np.rint(x / scale) + np.asarray(zero_point, dtype=np.float32)  # integers below 2**24: exact
    return np.clip(q, spec.qmin, spec.qmax).astype(spec.numpy_dtype)


def dequantize_array(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) - np.asarray(zero_point, dtype=np.float32)) * scale


def padded_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, blocks, block_size], K zero-padded to whole blocks (zeros quantize exactly)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=weight.dtype)
    padded[:k] = weight
    return padded.T.reshape(n, blocks, block_size)


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes and grid of a [K, N] weight. Per block: codes [N, blocks, block_size] (K padded),
    scale/zero_point [N, blocks]; per channel: codes [K, N], scale/zero_point [N];
    per tensor: codes [K, N], scalar scale/zero_point."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec
    k: int

    def dequantize(self) -> np.ndarray:
        """The [K, N] float weight the graph computes with."""
        if self.spec.granularity == "per_block":
            w = dequantize_array(self.codes, self.scale[..., None], self.zero_point[..., None])
            n = w.shape[0]
            return w.reshape(n, -1)[:, : self.k].T
        return dequantize_array(self.codes, self.scale, self.zero_point)


def concat_columns(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One QuantizedWeight from the quantized column slices [K, N_i] of a weight, in order."""
    first = parts[0]
    if len(parts) == 1:
        return first
    spec = first.spec
    if spec.granularity == "per_tensor":
        raise ValueError("a per-tensor grid is shared by every column; quantize the weight whole")
    code_axis = 0 if spec.granularity == "per_block" else 1
    grid_axis = 0
    return QuantizedWeight(np.concatenate([p.codes for p in parts], axis=code_axis),
                           np.concatenate([p.scale for p in parts], axis=grid_axis),
                           np.concatenate([p.zero_point for p in parts], axis=grid_axis), spec, first.k)


def column_chunks(n: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, n)) for start in range(0, n, width)]


def weight_bound(weight: np.ndarray, reduce_axes: tuple[int, ...] | None, pair_safe: bool) -> np.ndarray:
    """max |w| over `reduce_axes`; pair-safe: at least the largest |w[k]| + |w[k+1]| of adjacent
    input rows (k even), so that scale = bound / 127 keeps every pair of int8 values within 128."""
    magnitude = np.abs(weight)
    bound = magnitude.max(axis=reduce_axes)
    if pair_safe and weight.ndim == 2 and weight.shape[0] >= 2:
        even = weight.shape[0] - weight.shape[0] % 2
        pairs = magnitude[0:even:2] + magnitude[1:even:2]
        bound = np.maximum(bound, pairs.max(axis=reduce_axes))
    return bound


def block_grid(blocks: np.ndarray, spec: QuantSpec, clip: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block ([..., block_size] -> [...]), the range shrunk by `clip`.

    Symmetric 4-bit blocks use all 16 levels as ORT's MLAS does: the value of largest magnitude
    maps to -8 (scale = that value / -8, so the scale may be negative) instead of wasting -8.
    """
    clip = np.asarray(clip, dtype=np.float64)
    if spec.symmetric and spec.bits == 4:
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0].astype(np.float64) * clip
        tiny = np.finfo(np.float32).tiny
        scale = np.where(np.abs(extreme) < tiny, tiny, extreme / spec.qmin)
        return scale.astype(np.float32), np.zeros(scale.shape, dtype=spec.numpy_dtype)
    if spec.symmetric:
        bound = np.abs(blocks).max(axis=-1) * clip
        return quant_params(-bound, bound, spec)
    return quant_params(blocks.min(axis=-1) * clip, blocks.max(axis=-1) * clip, spec)


def round_to_nearest(weight: np.ndarray, spec: QuantSpec, clip: np.ndarray | float = 1.0) -> QuantizedWeight:
    """Plain round-to-nearest quantization of a [K, N] weight on `spec`'s grid."""
    from onnxquant.graph_utils import map_blocks

    k = weight.shape[0]
    if spec.granularity == "per_block":
        blocks = padded_blocks(np.asarray(weight, dtype=np.float32), spec.block_size)
        scale, zero_point = block_grid(blocks, spec, clip)
        codes = quantize_array(blocks, scale[..., None], zero_point[..., None], spec)
        return QuantizedWeight(codes, scale, zero_point, spec, k)
    reduce_axes = (0,) if spec.granularity == "per_channel" else None
    if spec.symmetric:
        bound = weight_bound(weight, reduce_axes, spec.pair_safe)
        scale, zero_point = quant_params(-bound, bound, spec)
    else:
        scale, zero_point = quant_params(weight.min(axis=reduce_axes), weight.max(axis=reduce_axes), spec)
    # Row blocks: a scale per column (or one scale) is the same for every row of a block.
    codes = map_blocks(weight, lambda rows, _: quantize_array(rows, scale, zero_point, spec), 0, spec.numpy_dtype)
    return QuantizedWeight(codes, scale, zero_point, spec, k)
