"""A quantization recipe as data: frozen dataclasses that load from and dump to YAML or JSON.

A recipe is an ordered list of stages (`stages:`), each one key naming the stage and its settings,
followed by the calibration data it reads and the checks its result must pass. The last stage,
`quantize`, keeps three things apart: the **format** (the grids of weights, activations and the
embedding: `onnxquant.spec.QuantSpec`), the **algorithm** that rounds the weights (rtn, clip_search,
gptq, awq) and the **lowering** (which ONNX ops carry the result: MatMulNBits' accuracy level, where
per-column int8 scales apply). Overrides by node-name pattern change any of them for some nodes.

Every file starts with `onnxquant_recipe: <version>`; a newer version than this onnxquant reads is
refused, as is an unknown key, a wrong type, an unknown stage or stages in an order the rules forbid:
`RecipeError` names the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from onnxquant.errors import UserError

RECIPE_VERSION = 1
# Keys a recipe file may carry beside the recipe itself: what made an output (written beside every
# quantized model) and a built-in recipe's measured figure. Read back, never part of what runs.
METADATA_KEYS = ("produced_by", "measured")
DEFAULT_SEGMENT_MB = 1024  # onnxquant.segments.DEFAULT_SEGMENT_MB, kept here so a recipe loads without ORT


class RecipeError(UserError):
    """A recipe that cannot be read: names the file and the key."""


class _Invalid(ValueError):
    """A value that fails validation; the loader adds the file and the key path."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


# --- format ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """One tensor's grid as a recipe writes it; `onnxquant.spec.QuantSpec` checks it."""

    dtype: str = "int8"
    granularity: str = "per_tensor"
    symmetric: bool = True
    block_size: int = 0
    scale_dtype: str = "float32"
    pair_safe: bool = False
    scale_rounding: str = "floor"

    def __post_init__(self) -> None:
        self.spec()  # raises ValueError with QuantSpec's reason

    def spec(self):
        from onnxquant.spec import QuantSpec

        return QuantSpec(self.dtype, self.granularity, self.symmetric, self.block_size, self.scale_dtype, self.pair_safe,
                         scale_rounding=self.scale_rounding)

    @classmethod
    def of(cls, spec) -> "Grid":
        return cls(spec.dtype, spec.granularity, spec.symmetric, spec.block_size, spec.scale_dtype, spec.pair_safe,
                   spec.scale_rounding)


@dataclass(frozen=True)
class Observer:
    """How activation ranges are taken from calibration (static activation grids only)."""

    method: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.999
    moving_average: bool = False
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise _Invalid(f"must be in (50, 100], got {self.percentile}", "percentile")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise _Invalid(f"must be in (0, 1], got {self.averaging_constant}", "averaging_constant")


# --- algorithm and lowering -----------------------------------------------------------------------

def _known_algorithm(name: str, key: str) -> None:
    from onnxquant.algorithms.registry import algorithms

    known = algorithms()
    if name not in known:
        raise _Invalid(f"unknown weight algorithm {name!r}; known: {', '.join(known)}", key)


@dataclass(frozen=True)
class Algorithm:
    """How weights are rounded onto their grid, by a name in onnxquant.algorithms.registry: `rtn` (nearest),
    `clip_search` (RTN with a per-block clip ratio minimizing the block's error), `mse` (RTN with the
    least-squared-error range per column), `gptq` (Hessian-aware, from calibration) or `awq` (activation-aware
    scales folded into the producer, then clip search weighted by the Hessian's diagonal)."""

    name: str = "rtn"
    hessian_token_stride: int = 1  # gptq, awq: the Hessian from every n-th calibration token
    damp: float = 0.01  # gptq: dampening, a fraction of mean(diag H)
    act_order: bool = True  # gptq: rows in order of decreasing Hessian diagonal
    # gptq: calibrate layer by layer, each Hessian from the outputs of the layers already rounded
    sequential: bool = False

    def __post_init__(self) -> None:
        _known_algorithm(self.name, "name")
        if self.sequential:
            from onnxquant.algorithms.registry import get_algorithm

            algorithm = get_algorithm(self.name)
            if not algorithm.needs_hessians or algorithm.folds_scales:
                raise _Invalid(f"applies to gptq (an algorithm that rounds from the Hessian and folds no scales), not "
                               f"{self.name}", "sequential")
        if self.hessian_token_stride < 1:
            raise _Invalid(f"must be at least 1, got {self.hessian_token_stride}", "hessian_token_stride")
        if not 0.0 < self.damp < 1.0:
            raise _Invalid(f"must be in (0, 1), got {self.damp}", "damp")



@dataclass(frozen=True)
class Lowering:
    """Which ONNX ops carry the quantized weights."""

    accuracy_level: Literal[0, 1, 2, 4] = 0  # MatMulNBits compute type (4: int8 activations per block at run time)
    column_scales: Literal["after_matmul", "in_kernel"] = "after_matmul"  # per-channel int8 weights' scales
    # A tied embedding (Gather over lm_head's transposed weight) at 4 bits: `shared` reads lm_head's
    # MatMulNBits table through GatherBlockQuantized, as the ORT-GenAI builder's shared_embeddings does (one
    # copy on disk, both rounded as lm_head is); `separate` writes its own table; `auto` shares when it can.
    tied_embedding: Literal["auto", "shared", "separate"] = "auto"


@dataclass(frozen=True)
class Override:
    """Nodes whose name matches `match` stay float (`keep_float`), or get other weights, another weight
    algorithm or another MatMulNBits accuracy level (each None: the stage's). `match` is a substring, a glob
    (with * ? [), or a regular expression after `re:` (searched in the name, as llm-compressor's targets)."""

    match: str
    weights: Grid | None = None
    keep_float: bool = False
    algorithm: str | None = None
    accuracy_level: Literal[0, 1, 2, 4] | None = None

    def __post_init__(self) -> None:
        if not self.match:
            raise _Invalid("is empty; give a node-name pattern", "match")
        if self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as exc:
                raise _Invalid(f"is not a regular expression ({exc})", "match") from None
        if self.keep_float and (self.weights, self.algorithm, self.accuracy_level) != (None, None, None):
            raise _Invalid("keep_float: true leaves nothing to set; drop weights, algorithm and accuracy_level", "keep_float")
        if not self.keep_float and (self.weights, self.algorithm, self.accuracy_level) == (None, None, None):
            raise _Invalid("sets nothing; give keep_float: true, weights, algorithm or accuracy_level", "weights")
        if self.algorithm is not None:
            _known_algorithm(self.algorithm, "algorithm")


# --- stages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseNorms:
    """A plain (optimum) decoder's spelled-out RMSNorms fused into the builder's norm ops (nothing on a
    builder graph), so that R1 and SmoothQuant can fold into norm weights."""

    name: ClassVar[str] = "fuse_norms"


@dataclass(frozen=True)
class Rotate:
    """QuaRot R1: the residual stream rotated by a (random) Hadamard matrix folded into every weight
    that writes or reads it, after the norms' weights are folded into their readers. Exact in float."""

    name: ClassVar[str] = "rotate"
    config: str | None = None  # a rotation config JSON; None: rotation_configs/<family>.json or the graph structure
    hidden_size: int | None = None  # must equal the model's (a check)
    random_hadamard: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Smooth:
    """SmoothQuant: per-channel scales s = max|x|^alpha / max|w|^(1-alpha) divided out of each quantized
    MatMul's input (folded into its producer) and multiplied into its weights. Exact in float."""

    name: ClassVar[str] = "smooth"
    alpha: Union[float, Literal["auto"]] = 0.5  # auto: each activation's alpha from 0.3..0.8 by modelled error
    samples: int | None = None  # the scales from the first n calibration samples (None: all)

    def __post_init__(self) -> None:
        if self.alpha != "auto" and not 0.0 < self.alpha < 1.0:
            raise _Invalid(f"must be between 0 and 1 (exclusive) or auto, got {self.alpha}", "alpha")
        if self.samples is not None and self.samples < 1:
            raise _Invalid(f"must be at least 1, got {self.samples}", "samples")


@dataclass(frozen=True)
class R4:
    """QuaRot R4: an online Hadamard (Kronecker-factored) on every down_proj input, its inverse folded
    into the weight. Exact in float."""

    name: ClassVar[str] = "r4"


HADAMARD_GROUP_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class HadamardGroups:
    """Block-diagonal Hadamard groups of `size` on each remaining quantized MatMul's input, folded into
    its weight (o_proj's folded into V). Exact in float."""

    name: ClassVar[str] = "hadamard_groups"
    size: int = 64

    def __post_init__(self) -> None:
        if self.size not in HADAMARD_GROUP_SIZES:
            raise _Invalid(f"{self.size} is not one of {', '.join(map(str, HADAMARD_GROUP_SIZES))}", "size")


@dataclass(frozen=True)
class Quantize:
    """The quantization stage: format (grids), algorithm and lowering, with per-node overrides."""

    name: ClassVar[str] = "quantize"
    scheme: str = "INT8_TRANSFORMER_DEFAULT"  # the named format the grids below start from (onnxquant.schemes)
    weights: Grid | None = None  # None: the scheme's
    activations: Grid | None = None  # None: the scheme's (weight_only: true keeps activations float)
    embedding: Grid | None = None  # None: the scheme's (keep_embedding_float: true leaves it float)
    weight_only: bool = False
    keep_embedding_float: bool = False
    observer: Observer = Observer()
    algorithm: Algorithm = Algorithm()
    lowering: Lowering = Lowering()
    overrides: tuple[Override, ...] = ()
    exclude_most_sensitive: int = 0  # keep the n MatMuls with the largest modelled output error in float
    # The formats a budget search (--max_delta, --max_size_mb) chooses from for each node; () = the
    # scheme's default set (onnxquant.mixed_precision.default_candidates).
    candidates: tuple[Union[Grid, Literal["float"]], ...] = ()

    def __post_init__(self) -> None:
        from onnxquant.schemes import SCHEMES

        if self.scheme not in SCHEMES:
            raise _Invalid(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}", "scheme")
        if self.weight_only and self.activations is not None:
            raise _Invalid("weight_only: true with an activations grid; drop one of them", "weight_only")
        if self.keep_embedding_float and self.embedding is not None:
            raise _Invalid("keep_embedding_float: true with an embedding grid; drop one of them", "keep_embedding_float")
        if self.exclude_most_sensitive < 0:
            raise _Invalid(f"must be a count of MatMuls, got {self.exclude_most_sensitive}", "exclude_most_sensitive")
        scheme = self.resolved_scheme()
        from onnxquant.algorithms.registry import get_algorithm

        if get_algorithm(self.algorithm.name).folds_scales and scheme.activations is not None:
            raise _Invalid("awq applies to weight-only formats (its scales fold like SmoothQuant's); use gptq, or a "
                           "smooth stage", "algorithm.name")

    def resolved_scheme(self):
        """The `onnxquant.schemes.QuantScheme` this stage means (overrides, algorithm and lowering included)."""
        from onnxquant.schemes import SCHEMES, NodeOverride, QuantScheme

        base = SCHEMES[self.scheme]
        activations = None if self.weight_only else (self.activations.spec() if self.activations else base.activations)
        embedding = None if self.keep_embedding_float else (self.embedding.spec() if self.embedding else base.embedding)
        weights = self.weights.spec() if self.weights else base.weights
        overrides = tuple(NodeOverride(o.match, o.weights.spec() if o.weights else None, o.keep_float, o.algorithm,
                                       o.accuracy_level) for o in self.overrides)
        try:
            return QuantScheme(base.name, base.description, weights, activations, embedding, overrides,
                               self.observer_calibration(), base.sq_alpha, self.algorithm.name,
                               self.lowering.accuracy_level, self.lowering.column_scales,
                               self.lowering.tied_embedding)
        except ValueError as exc:
            raise _Invalid(str(exc), "") from None

    def with_grids_of(self, scheme) -> "Quantize":
        """This stage with `scheme`'s grids written out (weight_only / keep_embedding_float where it has none)."""
        return dataclasses.replace(
            self, weights=Grid.of(scheme.weights),
            activations=None if scheme.activations is None else Grid.of(scheme.activations),
            weight_only=scheme.activations is None,
            embedding=None if scheme.embedding is None else Grid.of(scheme.embedding),
            keep_embedding_float=scheme.embedding is None)

    def observer_calibration(self):
        from onnxquant.schemes import Calibration

        o = self.observer
        return Calibration(o.method, o.percentile, o.moving_average, o.averaging_constant)


@dataclass(frozen=True)
class KVCache:
    """The KV cache quantized inside com.microsoft.GroupQueryAttention, as the ORT-GenAI builder's
    `kv_cache_quant_scheme` makes it: post-RoPE K and V each stored as `dtype` (int4 packed two to a byte)
    with symmetric float32 scales, one per layer (`per_tensor`) or one per KV channel (`per_channel`),
    scale = threshold / qmax (qmax 128 int8, 8 int4, 448 fp8). The thresholds come from the model's
    present.* outputs on the calibration samples: their absolute maximum (`minmax`), the `percentile` of
    |x| per channel, or the clip minimizing the round-trip error (`mse`). `rotary_envelope` calibrates K on
    each RoPE pair's norm, which bounds it at every position, not only those of the calibration window.
    fp8 is written for the provider genai_config.json names (CUDA); ORT's CPU provider has no kernel for it."""

    name: ClassVar[str] = "kv_cache"
    dtype: Literal["int8", "int4", "fp8"] = "int8"
    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    method: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99  # method percentile: the percentile of |x| per channel
    rotary_envelope: bool = True

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise _Invalid(f"must be in (50, 100], got {self.percentile}", "percentile")
        if self.method == "mse" and self.dtype == "fp8":
            raise _Invalid("mse models integer rounding, not fp8's; use minmax or percentile", "method")

    @property
    def scheme(self) -> str:
        """The builder's name of this cache (`kv_cache_quant_scheme`), e.g. int8_per_channel."""
        return f"{self.dtype}_{self.granularity}"


# Stages in the order they may appear, each at most once; the reason each pair is ordered so.
STAGE_TYPES = {cls.name: cls for cls in (FuseNorms, Rotate, Smooth, R4, HadamardGroups, Quantize, KVCache)}
ORDER_RULES = (
    ("fuse_norms", "rotate", "R1 folds the norms' weights, which a plain decoder has only once they are fused"),
    ("fuse_norms", "smooth", "SmoothQuant folds its scales into fused norm weights"),
    ("rotate", "smooth", "R1 mixes channels, so scales chosen before it would no longer match their channels"),
    ("smooth", "r4", "R4 mixes down_proj's input channels, after which per-channel scales cannot fold exactly"),
    ("smooth", "hadamard_groups", "Hadamard groups mix channels, after which per-channel scales cannot fold exactly"),
    ("rotate", "hadamard_groups", "the residual stream's groups go inside R1 itself"),
    ("r4", "hadamard_groups", "groups skip the inputs R4 already spread, which they know only after it"),
    ("fuse_norms", "quantize", "quantize is the last stage"), ("rotate", "quantize", "quantize is the last stage"),
    ("smooth", "quantize", "quantize is the last stage"), ("r4", "quantize", "quantize is the last stage"),
    ("hadamard_groups", "quantize", "quantize is the last stage"),
    # The cache holds K and V as the finished graph computes them: calibrated after every stage that changes
    # them (Hadamard groups fold o_proj's rotation into V) and rewritten last.
    *((stage, "kv_cache", "the KV cache is quantized last, on K and V as the stages before it leave them")
      for stage in ("fuse_norms", "rotate", "smooth", "r4", "hadamard_groups", "quantize")),
)
Stage = Union[FuseNorms, Rotate, Smooth, R4, HadamardGroups, Quantize, KVCache]


@dataclass(frozen=True)
class CalibrationData:
    """The calibration text and how it is cut: `samples` windows of `seq_len` tokens from its start."""

    samples: int = 64
    seq_len: int = 512
    text: str | None = None  # a local text file; None: the embedded WikiText-2 validation split
    dataset: Literal["wikitext2", "pileval"] | None = None  # from the hub with `datasets`, instead of text

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise _Invalid(f"must be at least 1, got {self.samples}", "samples")
        if self.seq_len < 2:
            raise _Invalid(f"must be at least 2, got {self.seq_len}", "seq_len")
        if self.text is not None and self.dataset is not None:
            raise _Invalid("give text or dataset, not both", "dataset")


@dataclass(frozen=True)
class Verify:
    """What the result is checked against: the float model on held-out windows of the calibration text."""

    collapse_ratio: float = 2.5  # refuse when the quick perplexity exceeds float's by this factor (0: off)
    exact_checks: bool = False  # also check that each float stage left the logits exact
    allow_degraded: bool = False  # keep a result the collapse guard refuses (never a non-finite one)
    windows: int = 4
    # A result with MatMulNBits at accuracy_level 4 against the same weights at level 0 (float activations):
    # refused below this top-1 agreement or above this mean KL divergence (nats) on the verification windows.
    # SmolLM2 w4a16 at level 4 against level 0 (16 test blocks): agreement 0.942, KL 0.0086; the tiny Llama with
    # a 30x outlier channel: 0.663, 0.064 (4 verification windows).
    int8_activation_agreement: float = 0.9
    int8_activation_kl: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.int8_activation_agreement <= 1.0:
            raise _Invalid(f"must be in [0, 1], got {self.int8_activation_agreement}", "int8_activation_agreement")
        if self.int8_activation_kl < 0:
            raise _Invalid(f"must be at least 0, got {self.int8_activation_kl}", "int8_activation_kl")
        if self.collapse_ratio < 0 or 0 < self.collapse_ratio <= 1:
            raise _Invalid(f"must be above 1 (or 0 to turn the check off), got {self.collapse_ratio}", "collapse_ratio")
        if self.windows < 1:
            raise _Invalid(f"must be at least 1, got {self.windows}", "windows")


@dataclass(frozen=True)
class Recipe:
    """What `onnxquant.quantize` does to a model, as data. `stages` run in order; without a quantize stage, or
    with `float_only`, the float passes alone are written."""

    name: str = "custom"
    description: str = ""
    stages: tuple[Stage, ...] = ()
    calibration: CalibrationData = CalibrationData()
    verify: Verify = Verify()
    segment_mb: float = DEFAULT_SEGMENT_MB  # calibration and probes run in pieces of about this much weight
    # Write the model as the float stages leave it: the quantize stage then only says which nodes they
    # prepare (smooth, add groups to) for it (--skip_quantization).
    float_only: bool = False

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise _Invalid(f"stage {name!r} appears twice; give each stage once", f"stages[{index}]")
        for first, second, reason in ORDER_RULES:
            if first in names and second in names and names.index(first) > names.index(second):
                raise _Invalid(f"{first} must come before {second}: {reason}", f"stages[{names.index(first)}]")
        if not 0 < self.segment_mb < float("inf"):
            raise _Invalid(f"must be a positive number of MB, got {self.segment_mb}", "segment_mb")
        smooth = self.stage(Smooth)
        if smooth is not None and smooth.samples is not None and smooth.samples > self.calibration.samples:
            raise _Invalid(f"must be at most calibration.samples ({self.calibration.samples}), got {smooth.samples}",
                           f"stages[{names.index('smooth')}].smooth.samples")
        quantize = self.stage(Quantize)
        if quantize is not None and quantize.algorithm.hessian_token_stride > self.calibration.seq_len:
            raise _Invalid(f"must be at most calibration.seq_len ({self.calibration.seq_len}), got "
                           f"{quantize.algorithm.hessian_token_stride}",
                           f"stages[{names.index('quantize')}].quantize.algorithm.hessian_token_stride")

    def stage(self, kind: type) -> Any:
        return next((stage for stage in self.stages if isinstance(stage, kind)), None)

    def with_stage(self, stage: Stage) -> "Recipe":
        """This recipe with `stage` replacing the stage of its kind, or added where the order rules put it."""
        kept = [s for s in self.stages if s.name != stage.name]
        order = list(STAGE_TYPES)
        kept.append(stage)
        kept.sort(key=lambda s: order.index(s.name))
        return dataclasses.replace(self, stages=tuple(kept))

    def without_stage(self, kind: type) -> "Recipe":
        return dataclasses.replace(self, stages=tuple(s for s in self.stages if not isinstance(s, kind)))

    def resolved(self) -> "Recipe":
        """The recipe as it runs, every setting explicit: a fuse_norms stage ahead of rotate and smooth (a
        no-op on builder graphs) and the quantize stage's grids written out instead of taken from its scheme."""
        recipe = self
        if (self.stage(Rotate) or self.stage(Smooth)) and not self.stage(FuseNorms):
            recipe = recipe.with_stage(FuseNorms())
        quantize = recipe.stage(Quantize)
        if quantize is not None:
            recipe = recipe.with_stage(quantize.with_grids_of(quantize.resolved_scheme()))
        return recipe

    # --- serialization ---

    def to_dict(self) -> dict:
        return {"onnxquant_recipe": RECIPE_VERSION, **_dump(self)}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {source}: is not a mapping of keys (onnxquant_recipe, name, stages, ...)")
        version = data.get("onnxquant_recipe")
        if version is None:
            raise RecipeError(f"recipe {source}: has no onnxquant_recipe key; start the file with "
                              f"`onnxquant_recipe: {RECIPE_VERSION}`")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RecipeError(f"recipe {source}: key onnxquant_recipe: must be a whole number, got {version!r}")
        if version > RECIPE_VERSION:
            raise RecipeError(f"recipe {source}: key onnxquant_recipe: version {version} is newer than this onnxquant "
                              f"reads ({RECIPE_VERSION}); upgrade onnxquant")
        body = {key: value for key, value in data.items() if key not in ("onnxquant_recipe", *METADATA_KEYS)}
        try:
            return _load(cls, body, "")
        except _Invalid as exc:
            where = f"key {exc.key}: " if exc.key else ""
            raise RecipeError(f"recipe {source}: {where}{exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist; pass a recipe file or a built-in name "
                              "(`onnxquant recipes` lists them)")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"recipe {path}: is not valid JSON ({exc})") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise RecipeError(f"recipe {path}: is not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data, str(path))


# --- a strict loader and dumper for the dataclasses above -----------------------------------------

def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        if type(value) in STAGE_TYPES.values():
            return {value.name: {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)
                                 if getattr(value, f.name) is not None}}
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, tuple):
        return [_dump(item) for item in value]
    return value


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(kind) if a is not type(None))
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(kind, str(kind))


def _convert(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value in typing.get_args(kind) and type(value) in {type(a) for a in typing.get_args(kind)}:
            return value
        raise _Invalid(f"must be {_type_name(kind)}, got {value!r}", key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            if dataclasses.is_dataclass(option):
                if isinstance(value, dict):  # a mapping is meant as this option: its own error is the error
                    return _load(option, value, key)
                continue
            try:
                return _convert(option, value, key)
            except _Invalid:
                continue
        raise _Invalid(f"must be {_type_name(kind)}, got {value!r}", key)
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise _Invalid(f"must be a list, got {value!r}", key)
        if item_kind is Stage or item_kind == Stage:
            return tuple(_load_stage(item, f"{key}[{i}]") for i, item in enumerate(value))
        return tuple(_convert(item_kind, item, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(kind):
        return _load(kind, value, key)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise _Invalid(f"must be {_type_name(kind)}, got {value!r}", key)


def _load(cls: type, data: Any, key: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Invalid(f"must be a mapping, got {data!r}", key)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise _Invalid(f"unknown key; {cls.__name__} takes {', '.join(sorted(fields)) or 'no keys'}",
                           f"{key}.{name}" if key else str(name))
    values = {name: _convert(hints[name], value, f"{key}.{name}" if key else name) for name, value in data.items()}
    try:
        return cls(**values)
    except _Invalid as exc:
        raise _Invalid(str(exc), f"{key}.{exc.key}" if key and exc.key else (exc.key or key)) from None
    except ValueError as exc:
        raise _Invalid(str(exc), key) from None


def _load_stage(item: Any, key: str) -> Stage:
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise _Invalid(f"must be one stage name with its settings, such as `- rotate: {{}}`, got {item!r}", key)
    (name, settings), = item.items()
    if name not in STAGE_TYPES:
        raise _Invalid(f"unknown stage {name!r}; stages are {', '.join(STAGE_TYPES)}", key)
    return _load(STAGE_TYPES[name], settings, f"{key}.{name}")

