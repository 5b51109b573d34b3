"""How one tensor is quantized: element type, granularity, symmetry, scale type, saturation safety.

A `QuantSpec` is frozen data validated when it is made; qmin/qmax, bit width and storage types
follow from the element type, so no code elsewhere writes 127 or "INT8 if signed". The grid
functions (`quant_params`, `quantize_array`, `dequantize_array`) work for every element type,
integer (int8/uint8/int4/uint4) or float (FP8 E4M3, FP4 E2M1: symmetric, the grid is the format's
own values, rounded to nearest even and saturated by ml_dtypes), and every granularity: per tensor,
per channel (one scale per output column of a [K, N] weight) and per block (blocks of `block_size`
along K, one scale per block and column).

Block scales of the microscaling formats (`scale_dtype`): "e8m0" is OCP MX's shared power of two,
2^(floor(log2(max|block|)) - emax) with emax the element's largest exponent (8 for E4M3, 2 for E2M1),
so the block's largest value may saturate (as the OCP spec defines it; the FP-quantization harness
divides its MXFP4 scale by 0.75 instead, trading that for a coarser grid), or with
`scale_rounding="rceil"` the next power of two up where the OCP one would saturate; "e4m3" is NVFP4's FP8
block scale max|block| / 6 stored in E4M3, times one float32 scale per tensor
(max|W| / (448 * 6)) that keeps the FP8 scales in range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class ElementType:
    name: str
    bits: int
    qmin: float
    qmax: float
    ir_dtype: ir.DataType
    numpy_dtype: type  # storage dtype of the codes in numpy (4-bit codes live in int8 / uint8 until packed)
    is_float: bool = False  # a float format (grid = its representable values); symmetric only

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def max_exponent(self) -> int:
        """The exponent of the largest power of two below qmax (OCP MX's emax_elem)."""
        return int(np.floor(np.log2(self.qmax)))


ELEMENT_TYPES: dict[str, ElementType] = {t.name: t for t in (
    ElementType("int8", 8, -128, 127, ir.DataType.INT8, np.int8),
    ElementType("uint8", 8, 0, 255, ir.DataType.UINT8, np.uint8),
    ElementType("int4", 4, -8, 7, ir.DataType.INT4, np.int8),
    ElementType("uint4", 4, 0, 15, ir.DataType.UINT4, np.uint8),
    ElementType("float8e4m3fn", 8, -448.0, 448.0, ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, is_float=True),
    ElementType("float4e2m1", 4, -6.0, 6.0, ir.DataType.FLOAT4E2M1, ml_dtypes.float4_e2m1fn, is_float=True),
)}

GRANULARITIES = ("per_tensor", "per_channel", "per_block")
SCALE_DTYPES = ("float32", "e8m0", "e4m3")
# E8M0 exponent rules: "floor" is OCP MX's 2^(floor(log2 amax) - emax), which may saturate a block's
# largest values (amax / scale lands in [2^emax, 2^(emax+1)), above qmax for the top of that range);
# "rceil" is the smallest power of two with amax / scale <= qmax (NVIDIA's MXFP8 rule, torchao's RCEIL),
# which never saturates.
E8M0_ROUNDINGS = ("floor", "rceil")
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
    # "e4m3" block scales only: the float32 per-tensor scale (0: taken from the weight being rounded;
    # GPTQ fixes it from the whole weight before rounding column chunks).
    tensor_scale: float = 0.0
    scale_rounding: str = "floor"  # "e8m0" scales only: one of E8M0_ROUNDINGS

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
        if self.pair_safe and (self.element.bits != 8 or self.element.is_float):
            raise ValueError("pair_safe applies to 8-bit integer weights only")
        if self.element.is_float and not self.symmetric:
            raise ValueError(f"{self.dtype} grids are symmetric")
        if self.scale_dtype != "float32" and (self.granularity != "per_block" or not self.element.is_float):
            raise ValueError(f"{self.scale_dtype} scales are for blocked float (microscaling) formats")
        if self.scale_rounding not in E8M0_ROUNDINGS:
            raise ValueError(f"unknown E8M0 scale rounding {self.scale_rounding!r}; known: {', '.join(E8M0_ROUNDINGS)}")
        if self.scale_rounding != "floor" and self.scale_dtype != "e8m0":
            raise ValueError("scale rounding applies to E8M0 (MX) scales only")

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
    def is_float(self) -> bool:
        return self.element.is_float

    @property
    def symmetric_levels(self) -> float:
        """The largest code of a symmetric grid: 127 for 8 bits, 7 for 4 bits (zero stays exact),
        448 for E4M3, 6 for E2M1."""
        return self.qmax if self.is_float else (self.qmax - self.qmin) // 2

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


def round_codes(y: np.ndarray, zero_point: np.ndarray | float, spec: QuantSpec) -> np.ndarray:
    """x / scale -> the nearest code's value (float64): integers saturated to [qmin, qmax], or the
    float format's nearest value (ties to even, saturated to +-qmax) as QuantizeLinear does."""
    if spec.is_float:
        return np.clip(y, spec.qmin, spec.qmax).astype(spec.numpy_dtype).astype(np.float64)
    return np.clip(np.rint(y) + zero_point, spec.qmin, spec.qmax)


def quantize_array(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Round-to-nearest-even and saturate, as ONNX QuantizeLinear does."""
    if spec.is_float:
        return np.clip(np.asarray(x, np.float32) / scale, spec.qmin, spec.qmax).astype(spec.numpy_dtype)
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
    tensor_scale: float = 1.0  # NVFP4's per-tensor float32 scale, times every block scale

    def dequantize(self) -> np.ndarray:
        """The [K, N] float weight the graph computes with."""
        if self.spec.granularity == "per_block":
            w = dequantize_array(self.codes, self.scale[..., None], self.zero_point[..., None]) * np.float32(self.tensor_scale)
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
                           np.concatenate([p.zero_point for p in parts], axis=grid_axis), spec, first.k,
                           first.tensor_scale)


def column_chunks(n: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, n)) for start in range(0, n, width)]


def weight_bound(weight: np.ndarray, reduce_axes: tuple[int, ...] | None) -> np.ndarray:
    return np.abs(weight).max(axis=reduce_axes)


PAIR_SEARCH_STEPS = 8
COLUMNS_PER_CHUNK = 4096  # weight columns processed at once: bounds float temporaries (lm_head has 49152 columns)


def pair_safe_bound(weight: np.ndarray, spec: QuantSpec, reduce_axes: tuple[int, ...] | None) -> np.ndarray:
    """The symmetric bound (127 codes) of a pair-safe grid, between max |w| and the largest adjacent
    pair |w[k]| + |w[k+1]| (k even), chosen per grid to minimize the squared rounding error after
    `clamp_pairs`. At the pair maximum no pair needs clamping but every weight loses resolution
    (SmolLM2 per tensor: R1 + SmoothQuant quick perplexity 21.42 -> 23.73); at max |w| many pairs clamp.
    On Gaussian weights the optimum sits near 1.15 x max |w|."""
    magnitude = np.abs(weight)
    even = weight.shape[0] - weight.shape[0] % 2
    low = magnitude.max(axis=reduce_axes)
    high = np.maximum(low, (magnitude[0:even:2] + magnitude[1:even:2]).max(axis=reduce_axes)) if even else low
    del magnitude
    candidates = [low + (high - low) * t for t in np.linspace(0.0, 1.0, PAIR_SEARCH_STEPS)]
    errors = np.zeros((len(candidates), weight.shape[1]))
    for cols in column_chunks(weight.shape[1], COLUMNS_PER_CHUNK):
        part = np.asarray(weight[:, cols], np.float32)
        for i, bound in enumerate(candidates):
            bound_cols = bound if reduce_axes is None else bound[cols]
            scale, zero_point = quant_params(-bound_cols, bound_cols, spec)
            codes = quantize_array(part, scale, zero_point, spec)
            clamp_pairs(codes)
            errors[i, cols] = ((codes.astype(np.float32) * scale - part) ** 2).sum(axis=0)
    if reduce_axes is None:
        return candidates[int(np.argmin(errors.sum(axis=1)))]
    best = np.argmin(errors, axis=0)
    return np.stack(candidates)[best, np.arange(weight.shape[1])]


def block_grid(blocks: np.ndarray, spec: QuantSpec, clip: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block ([..., block_size] -> [...]), the range shrunk by `clip`.

    Symmetric 4-bit blocks use all 16 levels as ORT's MLAS does: the value of largest magnitude
    maps to -8 (scale = that value / -8, so the scale may be negative) instead of wasting -8.
    """
    clip = np.asarray(clip, dtype=np.float64)
    if spec.is_float:
        return float_block_scale(np.abs(blocks).max(axis=-1) * clip, spec), np.zeros(blocks.shape[:-1], spec.numpy_dtype)
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


def nvfp4_tensor_scale(weight: np.ndarray, spec: QuantSpec) -> QuantSpec:
    """`spec` with its per-tensor scale fixed from `weight` (e4m3 block scales; else unchanged)."""
    if spec.scale_dtype != "e4m3" or spec.tensor_scale:
        return spec
    peak = float(np.abs(weight).max())
    return dataclasses.replace(spec, tensor_scale=max(peak / (448.0 * spec.qmax), float(np.finfo(np.float32).tiny)))


def float_block_scale(bound: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Each block's scale for a float element format, from its (clipped) max |w|, as float32 (e4m3:
    the FP8 value, before the per-tensor scale)."""
    tiny = np.finfo(np.float32).tiny
    bound = np.maximum(np.asarray(bound, np.float64), tiny)
    if spec.scale_dtype == "e8m0":
        scale = np.exp2(np.floor(np.log2(bound)) - spec.element.max_exponent)
        if spec.scale_rounding == "rceil":
            scale = np.where(bound > scale * spec.qmax, 2 * scale, scale)
        return scale.astype(np.float32)
    if spec.scale_dtype == "e4m3":
        fp8 = np.clip(bound / spec.qmax / spec.tensor_scale, 2.0 ** -9, 448.0).astype(ml_dtypes.float8_e4m3fn)
        return fp8.astype(np.float32)
    return (bound / spec.qmax).astype(np.float32)


def round_to_nearest(weight: np.ndarray, spec: QuantSpec, clip: np.ndarray | float = 1.0) -> QuantizedWeight:
    """Plain round-to-nearest quantization of a [K, N] weight on `spec`'s grid."""
    from onnxquant.graph_utils import map_blocks

    k = weight.shape[0]
    if spec.granularity == "per_block":
        spec = nvfp4_tensor_scale(weight, spec)
        blocks = padded_blocks(np.asarray(weight, dtype=np.float32), spec.block_size)
        scale, zero_point = block_grid(blocks, spec, clip)
        tensor_scale = spec.tensor_scale or 1.0
        codes = quantize_array(blocks, scale[..., None] * np.float32(tensor_scale), zero_point[..., None], spec)
        return QuantizedWeight(codes, scale, zero_point, spec, k, tensor_scale)
    reduce_axes = (0,) if spec.granularity == "per_channel" else None
    # `clip` (per column, or one) shrinks the range; left out at 1, so the unclipped grid stays bit-exact.
    def clipped(bound: np.ndarray) -> np.ndarray:
        return bound if np.isscalar(clip) and clip == 1.0 else bound * np.asarray(clip, np.float32)

    if spec.symmetric:
        bound = pair_safe_bound(weight, spec, reduce_axes) if spec.pair_safe else weight_bound(weight, reduce_axes)
        scale, zero_point = quant_params(-clipped(bound), clipped(bound), spec)
    else:
        scale, zero_point = quant_params(clipped(weight.min(axis=reduce_axes)), clipped(weight.max(axis=reduce_axes)), spec)
    # Row blocks: a scale per column (or one scale) is the same for every row of a block.
    codes = map_blocks(weight, lambda rows, _: quantize_array(rows, scale, zero_point, spec), 0, spec.numpy_dtype)
    if spec.pair_safe:
        clamp_pairs(codes)
    return QuantizedWeight(codes, scale, zero_point, spec, k)


# u8 x s8 kernels that add adjacent products in int16 (AVX2) stay exact while 255 * (|q_k| + |q_k+1|)
# fits: pair-safe grids keep adjacent int8 weight codes within 128 in magnitude together.
PAIR_LIMIT = 128


def clamp_pairs(codes: np.ndarray) -> None:
    """In place: where |q[k]| + |q[k+1]| (k even) exceeds PAIR_LIMIT, the larger code gives up the excess.

    Only the few pairs over the limit are touched: the search in `pair_safe_bound` calls this on every
    candidate grid of every weight, so a whole-array rewrite cost most of INT8 rounding's time."""
    even = codes.shape[0] - codes.shape[0] % 2
    a, b = codes[0:even:2], codes[1:even:2]
    over = np.nonzero(np.abs(a, dtype=np.int16) + np.abs(b, dtype=np.int16) > PAIR_LIMIT)
    if not over[0].size:
        return
    wide_a, wide_b = a[over].astype(np.int32), b[over].astype(np.int32)
    excess = np.abs(wide_a) + np.abs(wide_b) - PAIR_LIMIT
    take_a = np.abs(wide_a) >= np.abs(wide_b)
    a[over] = np.where(take_a, wide_a - np.sign(wide_a) * excess, wide_a).astype(codes.dtype)
    b[over] = np.where(take_a, wide_b, wide_b - np.sign(wide_b) * excess).astype(codes.dtype)
