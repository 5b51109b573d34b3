"""Quantization schemes as declared data: one frozen dataclass per name in SCHEMES.

A scheme names the grid of the MatMul weights, of their input activations (None: weight-only,
activations stay float), of the token embedding, and per-node overrides by name pattern (an
lm_head at 8 bits, a node kept in float). `--exclude TEXT` is such an override.

Activation signedness: the INT8 schemes quantize activations to uint8 with an asymmetric grid
(zero point from the observed minimum). Measured on SmolLM2-135M (64 x 512 calibration tokens,
moving-average MinMax, first 4 wikitext-2 test blocks, float 24.52): uint8 asymmetric 46.12
against int8 symmetric 57.26, and ORT's CPU kernels ran the uint8 model 3x faster on an AVX2
machine, whose integer GEMM is built around u8 x s8 products. The *_SYMMETRIC_ACT schemes keep
signed int8 with zero point 0.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

from onnxquant.errors import fail
from onnxquant.spec import QuantSpec


@dataclass(frozen=True)
class NodeOverride:
    """Nodes whose name contains `pattern` (matches it as a glob when it has * ? [, or as a regular
    expression searched in the name after `re:`) are kept in float (`keep_float`), or get `weights`,
    `algo` or `accuracy_level` instead of the scheme's (None: the scheme's)."""

    pattern: str
    weights: QuantSpec | None = None
    keep_float: bool = False
    algo: str | None = None
    accuracy_level: int | None = None

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(name, self.pattern)
        return self.pattern in name


CALIBRATION_METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class Calibration:
    method: str = "minmax"  # "minmax", "percentile" or "mse" (algorithms.range_search)
    percentile: float = 99.999
    moving_average: bool = False
    averaging_constant: float = 0.01  # new = old + c * (sample - old), as in AMD Quark / PyTorch

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError("averaging_constant must be in (0, 1]")


@dataclass(frozen=True)
class NodeFormat:
    """What one node gets: its weight grid (None: float), the algorithm that rounds it, its MatMulNBits level."""

    weights: QuantSpec | None
    algo: str
    accuracy_level: int


# A symmetric per-column int8 weight's scales: multiplied into the MatMul's float output by a Mul
# ("after_matmul": the integer kernel takes one scalar scale, its fast path at one token) or handed
# to the fused kernel as a vector ("in_kernel": no extra pass over the output, which long prompts favour).
COLUMN_SCALE_PLACEMENTS = ("after_matmul", "in_kernel")
TIED_EMBEDDING_CHOICES = ("auto", "shared", "separate")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    description: str
    weights: QuantSpec
    activations: QuantSpec | None  # None: weight-only (activations stay float)
    embedding: QuantSpec | None = QuantSpec("int8", "per_channel")  # one scale per vocabulary row
    overrides: tuple[NodeOverride, ...] = ()
    calibration: Calibration = Calibration()
    sq_alpha: float = 0.5  # SmoothQuant migration strength when --include_sq is given without --sq_alpha
    algo: str = "rtn"  # how weights are rounded: a name in onnxquant.algorithms.registry
    accuracy_level: int = 0  # MatMulNBits compute type (4: int8 activations per block at run time)
    column_scales: str = "after_matmul"  # where per-column int8 weight scales apply (COLUMN_SCALE_PLACEMENTS)
    tied_embedding: str = "auto"  # a tied embedding's table: "auto", "shared" with lm_head, or "separate"

    def __post_init__(self) -> None:
        from onnxquant.algorithms.registry import get_algorithm

        for algo in (self.algo, *(o.algo for o in self.overrides if o.algo is not None)):
            get_algorithm(algo)  # raises ValueError naming the known ones
        if any(o.algo is not None and get_algorithm(o.algo).folds_scales for o in self.overrides):
            raise ValueError("an override cannot fold scales (awq works per input group); set it for the whole scheme")
        if self.column_scales not in COLUMN_SCALE_PLACEMENTS:
            raise ValueError(f"unknown column scale placement {self.column_scales!r}")
        if self.tied_embedding not in TIED_EMBEDDING_CHOICES:
            raise ValueError(f"unknown tied_embedding {self.tied_embedding!r}; choose one of {', '.join(TIED_EMBEDDING_CHOICES)}")
        if (self.activations is not None and self.weights.granularity == "per_block"
                and not (self.weights.is_float and self.activations.granularity == "per_block")):
            raise ValueError("integer blocked weights are weight-only here (MatMulNBits); drop the activation spec")

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    @property
    def static_activations(self) -> bool:
        """Activations quantized with ranges fixed by calibration (microscaling ones are dynamic)."""
        return self.activations is not None and self.activations.granularity != "per_block"

    def with_block_size(self, block_size: int) -> "QuantScheme":
        """The same blocked scheme with another block size for the weights, the embedding and
        microscaling activations."""
        embedding, activations = self.embedding, self.activations
        if embedding is not None and embedding.granularity == "per_block":
            embedding = dataclasses.replace(embedding, block_size=block_size)
        if activations is not None and activations.granularity == "per_block":
            activations = dataclasses.replace(activations, block_size=block_size)
        return dataclasses.replace(self, weights=dataclasses.replace(self.weights, block_size=block_size), embedding=embedding,
                                   activations=activations)

    def with_scale_rounding(self, rounding: str) -> "QuantScheme":
        """The same scheme with E8M0 (MX) block scales chosen by `rounding` (spec.E8M0_ROUNDINGS),
        for weights, embedding and activations alike."""
        def rounded(spec: QuantSpec | None) -> QuantSpec | None:
            if spec is None or spec.scale_dtype != "e8m0":
                return spec
            return dataclasses.replace(spec, scale_rounding=rounding)

        return dataclasses.replace(self, weights=rounded(self.weights), activations=rounded(self.activations),
                                   embedding=rounded(self.embedding))

    def with_calibration(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))

    def weights_for(self, node_name: str) -> QuantSpec | None:
        """The weight grid of one node after overrides."""
        return self.node_format(node_name).weights

    def node_format(self, node_name: str) -> NodeFormat:
        """What one node gets after overrides: each setting from the last matching override that sets it."""
        spec, algo, level = self.weights, self.algo, self.accuracy_level
        for override in self.overrides:
            if override.matches(node_name):
                if override.keep_float:
                    spec = None
                elif override.weights is not None:
                    spec = override.weights
                algo = override.algo or algo
                level = override.accuracy_level if override.accuracy_level is not None else level
        return NodeFormat(spec, algo, level)

    @property
    def algos(self) -> set[str]:
        """Every weight algorithm this scheme may use (its own and its overrides')."""
        return {self.algo, *(o.algo for o in self.overrides if o.algo is not None)}


INT8_SYMMETRIC_ACT = QuantSpec("int8", "per_tensor", symmetric=True)
UINT8_ASYMMETRIC_ACT = QuantSpec("uint8", "per_tensor", symmetric=False)
INT8_WEIGHT_PER_TENSOR = QuantSpec("int8", "per_tensor")
INT8_WEIGHT_PER_CHANNEL = QuantSpec("int8", "per_channel")
# Per-channel weights fill [-127, 127] in every column, which makes the u8 x s8 saturation above
# likely where uint8 activations peak: SmolLM2 INT8_PER_CHANNEL went from 20.8 to 615754 perplexity
# through ORT's fused MatMulIntegerToFloat, while the same QDQ graph evaluated op by op was fine.
INT8_WEIGHT_PER_CHANNEL_PAIR_SAFE = QuantSpec("int8", "per_channel", pair_safe=True)
# R1 makes per-tensor weights fill the grid too: the same model gave 34.30 on an AVX2 machine and
# 31.85 with AVX-512 VNNI until per-tensor weights read by uint8 activations became pair-safe.
INT8_WEIGHT_PER_TENSOR_PAIR_SAFE = QuantSpec("int8", "per_tensor", pair_safe=True)
DEFAULT_BLOCK_SIZE = 128


def uint4_blocks(block_size: int = DEFAULT_BLOCK_SIZE) -> QuantSpec:
    return QuantSpec("uint4", "per_block", symmetric=False, block_size=block_size)


def int4_blocks(block_size: int = DEFAULT_BLOCK_SIZE) -> QuantSpec:
    return QuantSpec("int4", "per_block", symmetric=True, block_size=block_size)


FP8_E4M3 = QuantSpec("float8e4m3fn", "per_tensor")
FP8_E4M3_PER_CHANNEL = QuantSpec("float8e4m3fn", "per_channel")


def mxfp8_blocks(block_size: int = 32) -> QuantSpec:
    return QuantSpec("float8e4m3fn", "per_block", block_size=block_size, scale_dtype="e8m0")


def mxfp4_blocks(block_size: int = 32) -> QuantSpec:
    return QuantSpec("float4e2m1", "per_block", block_size=block_size, scale_dtype="e8m0")


def nvfp4_blocks(block_size: int = 16) -> QuantSpec:
    return QuantSpec("float4e2m1", "per_block", block_size=block_size, scale_dtype="e4m3")


# 8-bit MatMulNBits for the mixed-precision overrides of the 4-bit schemes (lm_head, ...).
def uint8_blocks(block_size: int = DEFAULT_BLOCK_SIZE) -> QuantSpec:
    return QuantSpec("uint8", "per_block", symmetric=False, block_size=block_size)


SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("INT8_TRANSFORMER_DEFAULT",
                    "int8 symmetric per-tensor weights (pair-safe grid), uint8 asymmetric per-tensor static activations",
                    INT8_WEIGHT_PER_TENSOR_PAIR_SAFE, UINT8_ASYMMETRIC_ACT),
        QuantScheme("INT8_PER_CHANNEL",
                    "int8 symmetric per-output-channel weights (pair-safe grid), uint8 asymmetric per-tensor static activations",
                    INT8_WEIGHT_PER_CHANNEL_PAIR_SAFE, UINT8_ASYMMETRIC_ACT),
        QuantScheme("INT8_SYMMETRIC_ACT",
                    "int8 symmetric per-tensor weights, int8 symmetric per-tensor static activations",
                    INT8_WEIGHT_PER_TENSOR, INT8_SYMMETRIC_ACT),
        QuantScheme("INT8_SYMMETRIC_ACT_PER_CHANNEL",
                    "int8 symmetric per-output-channel weights, int8 symmetric per-tensor static activations",
                    INT8_WEIGHT_PER_CHANNEL, INT8_SYMMETRIC_ACT),
        QuantScheme("UINT4_PER_GROUP_ASYM",
                    "uint4 asymmetric weights per block of K (MatMulNBits), float activations",
                    uint4_blocks(), None, embedding=uint4_blocks()),
        QuantScheme("INT4_PER_GROUP_SYM",
                    "int4 symmetric weights per block of K (MatMulNBits), float activations",
                    int4_blocks(), None, embedding=int4_blocks()),
        QuantScheme("FP8_E4M3",
                    "float8 E4M3 per-tensor weights, float8 E4M3 per-tensor static activations (max|x| / 448), QDQ",
                    FP8_E4M3, FP8_E4M3),
        QuantScheme("FP8_E4M3_PER_CHANNEL",
                    "float8 E4M3 per-output-channel weights, float8 E4M3 per-tensor static activations, QDQ",
                    FP8_E4M3_PER_CHANNEL, FP8_E4M3),
        QuantScheme("MXFP8_A16", "MXFP8 weights (E4M3, blocks of 32, E8M0 scales), float activations",
                    mxfp8_blocks(), None),
        QuantScheme("MXFP4_A16", "MXFP4 weights (E2M1, blocks of 32, E8M0 scales), float activations",
                    mxfp4_blocks(), None),
        QuantScheme("MXFP8", "MXFP8 weights and activations (activations per block of 32 at run time, in the graph)",
                    mxfp8_blocks(), mxfp8_blocks()),
        QuantScheme("MXFP4", "MXFP4 weights and activations (activations per block of 32 at run time, in the graph)",
                    mxfp4_blocks(), mxfp4_blocks()),
        QuantScheme("NVFP4", "NVFP4 weights and activations (activations per block of 16 at run time, with a run-time tensor scale)",
                    nvfp4_blocks(), nvfp4_blocks()),
        QuantScheme("NVFP4_A16", "NVFP4 weights (E2M1, blocks of 16, E4M3 scales x a float32 tensor scale), float activations",
                    nvfp4_blocks(), None),
    )
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        fail(f"unknown --config {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
