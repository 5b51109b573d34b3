"""The quantization pipeline: the stages a recipe names, in order, each a set of graph passes plus what it
needs from calibration, run on an ORT-GenAI folder.

STAGES = FUSE_NORMS (a plain decoder's RMSNorms into the builder's norm ops) -> ROTATE (untie, fold
norms, QuaRot R1) -> SMOOTH (SmoothQuant) -> R4 (online Hadamard on
down_proj inputs) -> HADAMARD_GROUPS (block-diagonal Hadamard on each remaining quantized MatMul's
input) -> QUANTIZE (AWQ scales, then the emitters with RTN / GPTQ rounding). Without R4 and groups,
SmoothQuant's calibration pass also serves the quantizer: each smoothed input's per-tensor ranges
follow exactly from each sample's per-channel extrema, and its Hessian from H / (s sᵀ)
(`_carry_statistics`), so the model is calibrated once.
A stage's `prepare` makes changes that leave every activation as it is (untying the embedding) and
returns the observers it needs; if any, one ORT calibration pass over the model as it is on disk
feeds them; `build` turns the statistics into passes, which run through onnx_ir's `Sequential`
(their `requires` checks preconditions). A stage that changes weights is checkpointed before the
next calibration pass reads the model (or right away for --verify's probe): the model is written to
a scratch folder with its pending transforms and loaded back, and the previous scratch copy is
deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from onnxquant.algorithms.awq import awq_scales
from onnxquant.algorithms.gptq import GPTQSettings
from onnxquant.algorithms.registry import get_algorithm
from onnxquant.algorithms.sensitivity import matmul_sensitivity
from onnxquant.algorithms.smooth_quant import SEARCH_ALPHAS, choose_alpha, smoothed_error, target_scales
from onnxquant.calibration import (ChannelAbsMaxObserver, ChannelExtremaRecorder, ChannelMeanAbsObserver, ChannelSquareSumObserver,
                                   HessianObserver, Observation, SpillingStore, make_range_observer, run_calibration,
                                   token_sample_reader)
from onnxquant.emitters import nearest_rounder
from onnxquant.errors import UserError, fail
from onnxquant.genai_folder import GenAIFolder, standard_model_name
from onnxquant.graph_utils import read_initializer, release_tensor
from onnxquant.hadamard import rotation_matrix
from onnxquant.kv_cache import SAMPLE_ROWS, KVCacheObserver, cache_scale, present_names, rope_frequencies, rotary_layout
from onnxquant.passes import (EmulateMicroscalingPass, FoldChannelScalesPass, FoldNormIntoReadersPass, HadamardGroupsPass,
                              QuantizeGraphPass, RetieEmbeddingsPass, RotateR1Pass, UntieEmbeddingsPass)
from onnxquant.passes.fold_channel_scales import scaled_activation_name
from onnxquant.passes.fuse_norm_ops import FUSED_NORMS_METADATA_KEY, FuseNormOpsPass
from onnxquant.passes.online_hadamard import OnlineHadamardPass, r4_activations
from onnxquant.passes.quantize_kv_cache import QuantizeKVCachePass
from onnxquant.patterns import (GROUPS_IN_R1_KEY, QUANT_METADATA_KEY, R4_METADATA_KEY, ROTATION_METADATA_KEY, consumers,
                                constant_weight, find_tied_embedding, is_const_matmul, nodes_by_name)
from onnxquant.plan import QuantPlan, plan_quantization, tie_refusal, unmatched_patterns
from onnxquant import recipes
from onnxquant.rotation_config import load_rotation_config, plain_decoder_pairs, refuse_sandwich_norms, resolve_pairs
from onnxquant.runtime import usable_cores
from onnxquant.scale_folding import fold_targets
from onnxquant.schemes import QuantScheme
from onnxquant.rounded_weights import CachedRounder
from onnxquant.segments import DEFAULT_SEGMENT_MB
from onnxquant.sequential import SequentialRounding, layer_segment_bytes
from onnxquant.spec import QuantSpec
from onnxquant.timing import PhaseTimes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationSettings:
    config_path: Path | None = None
    hidden_size: int | None = None
    random_hadamard: bool = False
    seed: int = 0


@dataclass(frozen=True)
class QuantizeSettings:
    scheme: QuantScheme
    rotation: RotationSettings | None = None
    sq_alpha: float | None = None  # None: no SmoothQuant
    skip_quantization: bool = False
    gptq: GPTQSettings = GPTQSettings()
    hadamard_group_size: int | None = None  # None: no Hadamard groups
    r4: bool = False  # QuaRot's online Hadamard on down_proj inputs
    exclude_most_sensitive: int = 0  # MatMuls kept in float, the highest by algorithms.sensitivity
    sq_alpha_search: bool = False  # each activation's alpha from SEARCH_ALPHAS by modelled output error
    hessian_token_stride: int = 1  # Hessians (GPTQ, AWQ, sensitivity) from every n-th calibration token
    sq_num_calib_data: int | None = None  # SmoothQuant's statistics from the first n samples (None: all)
    segment_bytes: int = DEFAULT_SEGMENT_MB << 20  # calibration runs in pieces of at most about this much weight
    fuse_norms: bool = False  # fuse a plain decoder's RMSNorms (always ahead of R1 and SmoothQuant)
    searches_plan: bool = False  # a mixed-precision search (onnxquant.mixed_precision) models errors from Hessians
    kv_cache: recipes.KVCache | None = None  # None: the KV cache stays float
    sequential: bool = False  # gptq: each Hessian from the outputs of the weights already rounded (onnxquant.sequential)

    @property
    def needs_calibration(self) -> bool:
        return self.sq_alpha is not None or self.kv_cache is not None or (not self.skip_quantization and (
            self.scheme.static_activations or self.needs_hessians))

    @property
    def rounds_with_hessians(self) -> bool:
        """Some weight is rounded by an algorithm that reads its input's Hessian (GPTQ, AWQ)."""
        return any(get_algorithm(a).needs_hessians for a in self.scheme.algos)

    @property
    def needs_hessians(self) -> bool:
        return self.rounds_with_hessians or self.exclude_most_sensitive > 0 or self.searches_plan

    @property
    def folds_scales(self) -> bool:
        """AWQ: scales folded into each input's producer before rounding."""
        return any(get_algorithm(a).folds_scales for a in self.scheme.algos)


def settings_for(recipe: recipes.Recipe) -> QuantizeSettings:
    """The settings the stages below run by, from a recipe (onnxquant.recipes)."""
    recipe = recipe.resolved()
    quantize, rotate, smooth = recipe.stage(recipes.Quantize), recipe.stage(recipes.Rotate), recipe.stage(recipes.Smooth)
    groups = recipe.stage(recipes.HadamardGroups)
    # Without a quantize stage the float stages still plan by a scheme: the default one.
    scheme = (quantize or recipes.Quantize()).resolved_scheme()
    algorithm = quantize.algorithm if quantize is not None else recipes.Algorithm()
    rotation = None if rotate is None else RotationSettings(
        Path(rotate.config) if rotate.config else None, rotate.hidden_size, rotate.random_hadamard, rotate.seed)
    sq_alpha = None
    if smooth is not None:
        sq_alpha = scheme.sq_alpha if smooth.alpha == "auto" else smooth.alpha
    return QuantizeSettings(
        scheme, rotation, sq_alpha, skip_quantization=quantize is None or recipe.float_only,
        gptq=GPTQSettings(damp=algorithm.damp, act_order=algorithm.act_order),
        hadamard_group_size=None if groups is None else groups.size, r4=recipe.stage(recipes.R4) is not None,
        exclude_most_sensitive=quantize.exclude_most_sensitive if quantize is not None else 0,
        sq_alpha_search=smooth is not None and smooth.alpha == "auto",
        hessian_token_stride=algorithm.hessian_token_stride, sq_num_calib_data=None if smooth is None else smooth.samples,
        segment_bytes=int(recipe.segment_mb * (1 << 20)), fuse_norms=recipe.stage(recipes.FuseNorms) is not None,
        kv_cache=recipe.stage(recipes.KVCache), sequential=algorithm.sequential)


@dataclass
class QuantizeReport:
    quantized_nodes: int = 0
    smoothed: int = 0
    inserted_muls: list[tuple[str, str]] = field(default_factory=list)
    awq_alphas: list[float] = field(default_factory=list)
    sq_alphas: list[float] = field(default_factory=list)  # --sq_alpha auto: the chosen alpha of each activation
    kept_float: list[str] = field(default_factory=list)  # --exclude_most_sensitive, most sensitive first
    calibration_seconds: float = 0.0
    calibration_passes: int = 0
    calibration_segments: int = 1
    seconds: float = 0.0

    def summary(self, settings: QuantizeSettings, peak_rss_mb: float, size_mb: float) -> str:
        """The one-line summary the CLI prints last."""
        scheme = settings.scheme
        config = "none(float)" if settings.skip_quantization else scheme.name
        if scheme.weights.granularity == "per_block" and not settings.skip_quantization:
            config += f" algo={scheme.algo}"
        extras = " rotation=R1" if settings.rotation is not None else ""
        if settings.r4:
            extras += " r4=down_proj"
        if settings.hadamard_group_size is not None:
            extras += f" hadamard_groups={settings.hadamard_group_size}"
        if settings.sq_alpha is not None:
            alpha = settings.sq_alpha
            if self.sq_alphas:
                alpha = f"auto(min={min(self.sq_alphas)},mean={np.mean(self.sq_alphas):.2f},max={max(self.sq_alphas)})"
            extras += f" smoothed={self.smoothed} sq_alpha={alpha} sq_inserted_muls={len(self.inserted_muls)}"
        if self.kept_float:
            extras += f" kept_float={len(self.kept_float)}"
        if settings.needs_hessians and settings.hessian_token_stride > 1:
            extras += f" hessian_token_stride={settings.hessian_token_stride}"
        if self.calibration_passes and (settings.sq_alpha is not None or settings.needs_hessians):
            extras += f" calibration_passes={self.calibration_passes}"
        if self.calibration_segments > 1:
            extras += f" calibration_segments={self.calibration_segments}"
        if settings.kv_cache is not None:
            extras += f" kv_cache={settings.kv_cache.scheme} kv_method={settings.kv_cache.method}"
        return (f"quantized={self.quantized_nodes} nodes config={config} seconds={self.seconds:.1f} "
                f"peak_rss_mb={peak_rss_mb:.0f} size_mb={size_mb:.1f}{extras}")


@dataclass
class StageContext:
    model: ir.Model
    model_path: Path
    folder: GenAIFolder
    settings: QuantizeSettings
    samples: np.ndarray | None
    report: QuantizeReport
    scratch: Path
    # Statistics of the quantized inputs derived ahead, in the smoothing pass (one-pass SmoothQuant):
    ranges: dict[str, tuple[float, float]] | None = None
    hessians: SpillingStore | None = None
    hessian_tokens: dict[str, int] | None = None
    # (embedding Gather, lm_head MatMul) when the embedding read Transpose(lm_head's weight) as the stage started
    tied: tuple[str, str] | None = None
    state: dict = field(default_factory=dict)  # what a stage's prepare hands to its build


@dataclass(frozen=True)
class Stage:
    name: str
    applies: Callable[[QuantizeSettings], bool]
    prepare: Callable[[StageContext], list[Observation]]
    build: Callable[[StageContext], list[ir.passes.PassBase]]
    checkpoint: bool
    # The stage whose calibration pass this stage's observers join when it runs right before this one (its
    # passes change nothing this stage observes enough to matter), so that the model is calibrated once.
    joins: str | None = None


# --- ROTATE -------------------------------------------------------------------------------------

def _prepare_rotation(ctx: StageContext) -> list[Observation]:
    settings, folder = ctx.settings.rotation, ctx.folder
    if ROTATION_METADATA_KEY in ctx.model.metadata_props:
        fail(f"{folder.model_file} is already rotated ({ctx.model.metadata_props[ROTATION_METADATA_KEY]}); "
             "quantize the unrotated export or drop --include_rotation")
    hidden = folder.hidden_size
    if settings.hidden_size is not None and settings.hidden_size != hidden:
        fail(f"--hidden_size {settings.hidden_size} differs from the model's hidden size {hidden}; drop it or pass {hidden}")
    group = ctx.settings.hadamard_group_size
    if group is not None and hidden % group:
        fail(f"--hadamard_group_size {group} does not divide the hidden size {hidden} that R1 rotates; "
             f"choose a group size that divides it or drop --include_rotation")
    refuse_sandwich_norms(ctx.model.graph)
    ctx.tied = tied_embedding(ctx.model.graph)
    UntieEmbeddingsPass()(ctx.model)
    return []


def _build_rotation(ctx: StageContext) -> list[ir.passes.PassBase]:
    settings, folder = ctx.settings.rotation, ctx.folder
    if FUSED_NORMS_METADATA_KEY in ctx.model.metadata_props and settings.config_path is None:
        # A plain decoder's node names follow no family config: its pairs come from the graph itself.
        pairs, source = plain_decoder_pairs(ctx.model.graph), "graph structure"
    else:
        config = load_rotation_config(settings.config_path, folder.model_type, folder.num_layers)
        pairs, source = resolve_pairs(config, ctx.model.graph), config.source
    rotation = rotation_matrix(folder.hidden_size, settings.random_hadamard, settings.seed)
    description = {"R1": folder.hidden_size, "matrix": rotation.kind, "seed": settings.seed, "config": source}
    # Hadamard groups on the residual stream's readers go into R1 itself: no online MatMul for them
    # (they then come before SmoothQuant's scales rather than after: SmolLM2 INT8_PER_CHANNEL + R1 + SQ
    # + R4 + GPTQ, groups of 64, 16 blocks: 21.2116 online, 21.1370 in R1).
    passes = [FoldNormIntoReadersPass(pairs), RotateR1Pass(pairs, rotation.matrix, description, ctx.settings.hadamard_group_size)]
    if _quantize_shares_after_rotation(ctx):
        # A tied embedding stays tied through R1 (one hidden x hidden MatMul before lm_head), so the 4-bit
        # quantize stage stores one table for both.
        passes.append(RetieEmbeddingsPass(*ctx.tied))
    return passes


def _quantize_shares_after_rotation(ctx: StageContext) -> bool:
    """Whether the model was tied and the quantize stage would share its table: no later float stage unties it
    again (smoothing, R4 and Hadamard groups change lm_head's input side alone) and both get one 4-bit grid."""
    settings = ctx.settings
    if (ctx.tied is None or settings.skip_quantization or settings.searches_plan or settings.sq_alpha is not None or settings.r4
            or settings.hadamard_group_size is not None):
        return False
    plan = plan_quantization(ctx.model.graph, settings.scheme, tied_lm_head=ctx.tied[1])
    return plan.embedding is not None and plan.nodes[plan.embedding].shares is not None


# --- FUSE NORMS ---------------------------------------------------------------------------------

def _build_norm_fusion(ctx: StageContext) -> list[ir.passes.PassBase]:
    return [FuseNormOpsPass()] if FuseNormOpsPass.needed(ctx.model.graph) else []


# --- SMOOTH -------------------------------------------------------------------------------------

# Per-sample channel extrema for one-pass SmoothQuant + QDQ calibration cost 8 bytes per channel
# per sample; above this budget the quantizer calibrates the smoothed model a second time instead.
ONE_PASS_BUDGET_BYTES = 512 * 1024 * 1024


def _plan(ctx: StageContext) -> QuantPlan:
    return plan_quantization(ctx.model.graph, ctx.settings.scheme, tied_lm_head=ctx.tied[1] if ctx.tied else None)


def _records_extrema(ctx: StageContext, plan: QuantPlan) -> bool:
    """Whether the smoothing pass keeps each sample's per-channel extrema, from which the smoothed
    inputs' min-max ranges (plain or moving average) replay exactly, for the alpha search and the
    quantizer, instead of the channel maxima alone."""
    settings, by_name = ctx.settings, nodes_by_name(ctx.model.graph)
    channels = sum(constant_weight(by_name[readers[0]]).shape[0] for readers in plan.activations.values())
    return (not settings.skip_quantization and settings.scheme.static_activations
            and settings.scheme.calibration.method == "minmax" and 8 * channels * len(ctx.samples) <= ONE_PASS_BUDGET_BYTES)


def _carries_statistics(settings: QuantizeSettings) -> bool:
    """Whether the quantizer can take its ranges and Hessians from the smoothing pass. R4 and Hadamard
    groups come after smoothing and mix channels: no per-channel statistic follows x / s through them.
    (Rotating first instead, so that one pass would always do, costs accuracy: the main job's
    down_proj input is then not smoothed, quick-probe ratio 1.115 against 1.008, and smoothing
    o_proj's input after R2 gives 21.0567 against 21.0232 on 16 blocks.)"""
    return not settings.r4 and settings.hadamard_group_size is None and not settings.folds_scales


def _prepare_smoothing(ctx: StageContext) -> list[Observation]:
    # Untying changes no activation, so the statistics can come from the model file as it is.
    UntieEmbeddingsPass()(ctx.model)
    plan = _plan(ctx)
    targets = fold_targets(ctx.model.graph, plan.activations)
    if not targets:
        fail(f"--include_sq: {ctx.folder.model_file} has no MatMul with a constant weight left to smooth "
             "(check --exclude); drop --include_sq")
    settings = ctx.settings
    extrema = _records_extrema(ctx, plan)
    carry = extrema and _carries_statistics(settings)
    if carry:
        observers = {x: ChannelExtremaRecorder() for x in plan.activations}
    else:
        observers = {t.activation: ChannelExtremaRecorder() if extrema else ChannelAbsMaxObserver() for t in targets}
    observations: list[Observation] = list(observers.items())
    square_sums = {}
    if carry and settings.needs_hessians:
        observations += _observe_hessians(ctx, plan)
    elif settings.sq_alpha_search:
        # The diagonal only: full K x K Hessians of every smoothed input at once would not fit at 1.5B.
        square_sums = {target.activation: ChannelSquareSumObserver() for target in targets}
        observations += list(square_sums.items())
    ctx.state.update(targets=targets, observers=observers, extrema=extrema, carry=carry, square_sums=square_sums)
    if not carry and settings.sq_num_calib_data is not None:
        # The quantizer calibrates the smoothed model again on every sample, so this pass need only
        # see the samples that choose the scales (a carried pass sees all, for the quantizer's sake).
        ctx.state["sample_count"] = settings.sq_num_calib_data
    return observations


def _weight_row_absmax(graph: ir.Graph, readers: tuple[str, ...]) -> np.ndarray:
    by_name = nodes_by_name(graph)
    return np.max([read_initializer(constant_weight(by_name[name]), lambda a: np.abs(a).max(axis=1)) for name in readers],
                  axis=0)


def _square_sums(ctx: StageContext, activation: str) -> tuple[np.ndarray, int]:
    """sum over tokens of x_k² per channel of `activation` and the token count, from the diagonal
    observer or, when the pass gathered full Hessians, from H's diagonal."""
    if activation in ctx.state["square_sums"]:
        observer = ctx.state["square_sums"].pop(activation)
        return observer.sum, observer.tokens
    return np.diag(ctx.state["hessian_store"][activation]).copy(), ctx.state["hessian_observers"][activation].tokens


def _scale_absmax(ctx: StageContext, activation: str) -> np.ndarray:
    """max |x| per channel over the samples that choose the smoothing scales (--sq_num_calib_data)."""
    observer = ctx.state["observers"][activation]
    if isinstance(observer, ChannelExtremaRecorder):
        return observer.absmax_over(ctx.settings.sq_num_calib_data)
    return observer.absmax


def _searched_scales(ctx: StageContext, target, weight_absmax: np.ndarray) -> tuple[np.ndarray, float]:
    """The smoothing scales of the SEARCH_ALPHAS candidate with the least modelled output error, and its alpha."""
    scheme, by_name = ctx.settings.scheme, nodes_by_name(ctx.model.graph)
    observer = ctx.state["observers"][target.activation]
    absmax = _scale_absmax(ctx, target.activation)
    square_sums, tokens = _square_sums(ctx, target.activation)
    candidates, ranges = {}, {}
    for alpha in SEARCH_ALPHAS:
        candidates[alpha] = target_scales(target, absmax, weight_absmax, alpha)
        if ctx.state["extrema"]:
            ranges[alpha] = observer.replay(make_range_observer(scheme.calibration, scheme.activations), candidates[alpha]).range()
        else:
            bound = float((absmax / candidates[alpha]).max())
            ranges[alpha] = (-bound, bound)
    errors = dict.fromkeys(SEARCH_ALPHAS, 0.0)
    for name in target.readers:  # one weight mapped at a time (read_initializer unmaps it after)
        per_alpha = read_initializer(constant_weight(by_name[name]), lambda w: [
            smoothed_error(candidates[a], w, square_sums, tokens, scheme.weights_for(target.readers[0]),
                           scheme.activations, ranges[a]) for a in SEARCH_ALPHAS])
        for alpha, error in zip(SEARCH_ALPHAS, per_alpha):
            errors[alpha] += error
    alpha = choose_alpha(errors)
    return candidates[alpha], alpha


def _build_smoothing(ctx: StageContext) -> list[ir.passes.PassBase]:
    targets = ctx.state["targets"]
    alpha, search = ctx.settings.sq_alpha, ctx.settings.sq_alpha_search

    def scales_and_alpha(t) -> tuple[np.ndarray, float]:
        weight_absmax = _weight_row_absmax(ctx.model.graph, t.readers)
        if search:
            return _searched_scales(ctx, t, weight_absmax)
        return target_scales(t, _scale_absmax(ctx, t.activation), weight_absmax, alpha), alpha

    # Activations are searched on one thread per core (each reads only its own readers' weights);
    # numpy's large operations release the GIL, and BLAS threads on top would only contend.
    with ThreadPoolExecutor(usable_cores() if search else 1) as pool, threadpool_limits(1, user_api="blas"):
        results = list(tqdm(pool.map(scales_and_alpha, targets), total=len(targets), desc="SmoothQuant alpha search",
                            unit="activation", disable=not search))
    scales = {t.activation: result[0] for t, result in zip(targets, results)}
    if search:
        ctx.report.sq_alphas.extend(result[1] for result in results)
    ctx.report.smoothed = len(targets)
    if ctx.state["carry"]:
        _carry_statistics(ctx, targets, scales)
    fold = FoldChannelScalesPass(targets, scales)
    ctx.state["fold"] = fold
    return [fold]


def _divide_hessian(store: SpillingStore, name: str, s: np.ndarray) -> None:
    """H <- H / (s sᵀ): the Hessian of x / s, after scales s are folded into x's producer."""
    store.replace(name, (store[name] / np.outer(s, s)).astype(np.float32))


def _carry_statistics(ctx: StageContext, targets: list, scales: dict[str, np.ndarray]) -> None:
    """The quantizer's statistics of every planned input after smoothing, from this pass's: per-tensor
    ranges replayed from each sample's extrema divided by s, Hessians H / (s sᵀ); keyed by the name
    the quantizer will see (an inserted Mul's output for "mul" targets)."""
    calibration, spec = ctx.settings.scheme.calibration, ctx.settings.scheme.activations
    renamed = {t.activation: scaled_activation_name(t.activation) for t in targets if t.kind == "mul"}
    ctx.ranges = {renamed.get(name, name): recorder.replay(make_range_observer(calibration, spec), scales.get(name)).range()
                  for name, recorder in ctx.state["observers"].items()}
    if "hessian_store" not in ctx.state:
        return
    store = ctx.state["hessian_store"]
    for name, s in scales.items():
        _divide_hessian(store, name, s)
    for old, new in renamed.items():
        store.rename(old, new)
    ctx.hessians = store
    ctx.hessian_tokens = {renamed.get(name, name): observer.tokens for name, observer in ctx.state["hessian_observers"].items()}


# --- R4 -----------------------------------------------------------------------------------------

def _prepare_r4(ctx: StageContext) -> list[Observation]:
    UntieEmbeddingsPass()(ctx.model)
    ctx.state["r4"] = r4_activations(_plan(ctx).activations)
    return []


def _build_r4(ctx: StageContext) -> list[ir.passes.PassBase]:
    return [OnlineHadamardPass(ctx.state["r4"])]


# --- HADAMARD GROUPS ----------------------------------------------------------------------------

def _prepare_hadamard_groups(ctx: StageContext) -> list[Observation]:
    UntieEmbeddingsPass()(ctx.model)
    ctx.state["plan"] = _plan(ctx)  # the pass refuses a group size that does not divide a planned K
    return []


def _build_hadamard_groups(ctx: StageContext) -> list[ir.passes.PassBase]:
    # An input R4 already spread over all its channels gains nothing from groups inside it, and
    # residual-stream inputs got theirs inside R1.
    by_name = nodes_by_name(ctx.model.graph)
    activations = {x: readers for x, readers in ctx.state["plan"].activations.items()
                   if not any(R4_METADATA_KEY in by_name[r].metadata_props or GROUPS_IN_R1_KEY in by_name[r].metadata_props
                              for r in readers)}
    return [HadamardGroupsPass(activations, ctx.settings.hadamard_group_size)]


# --- QUANTIZE -----------------------------------------------------------------------------------

def _observe_hessians(ctx: StageContext, plan: QuantPlan) -> list[Observation]:
    """Hessian observers for every planned input; their sums land in ctx.state["hessian_store"]. Sequential
    GPTQ rounds each weight as soon as its Hessian is complete (onnxquant.sequential)."""
    observers = {name: HessianObserver(ctx.settings.hessian_token_stride) for name in plan.activations}
    ctx.state["hessian_observers"] = observers
    store = ctx.state["hessian_store"] = SpillingStore(ctx.scratch / "hessians")
    sequential = None
    if ctx.settings.sequential:
        rounder = _WeightRounder(plan, store, ctx.settings.gptq, progress=False)
        sequential = ctx.state["sequential"] = SequentialRounding(ctx.model.graph, plan, store, rounder,
                                                                  CachedRounder(ctx.scratch / "rounded"))
        ctx.state["segment_bytes"] = layer_segment_bytes(ctx.model.graph, ctx.folder.num_layers, ctx.settings.segment_bytes)

    def collect(done: list[Observation], spill: bool) -> dict[str, np.ndarray] | None:
        # Each Hessian leaves its observer as soon as its segment ends; spilled to disk when the model
        # runs in segments, so memory holds one segment's Hessians, not all of them (9.8 GB at 1.5B), and by
        # a plan search, which keeps them for every point it writes (SmolLM2 w4a16 at 113.6 MB: peak 1969 ->
        # 1825 MB; the plain run's is 1330). Sequential rounding reads them at once.
        for name, observer in done:
            if isinstance(observer, HessianObserver) and "xtx" in observer.sums:
                store.put(name, observer.sums.pop("xtx"), (spill or ctx.settings.searches_plan) and sequential is None)
        return sequential.round_ready() if sequential is not None else None

    ctx.state["segment_done"] = collect
    return list(observers.items())


def tied_embedding(graph: ir.Graph) -> tuple[str, str] | None:
    """(the embedding Gather, the MatMul reading the weight it gathers from) of a tied model (Gather(Transpose(W)))."""
    found = find_tied_embedding(graph)
    readers = [node for node in consumers(found[2]) if is_const_matmul(node)] if found is not None else []
    return (found[0].name, readers[0].name) if len(readers) == 1 else None


def _prepare_quantization(ctx: StageContext) -> list[Observation]:
    # The tie is read before untying: no earlier stage changed lm_head's weight apart from the table. AWQ
    # folds its scales into lm_head's rows alone, so it keeps the tables apart.
    if ctx.settings.folds_scales and ctx.settings.scheme.tied_embedding == "shared":
        fail("tied_embedding: shared with awq: AWQ folds its scales into lm_head's rows and not into the embedding, "
             "so the two tables differ; use gptq, or tied_embedding: auto (separate tables)")
    if ctx.settings.sequential and (ctx.settings.folds_scales or ctx.settings.exclude_most_sensitive):
        fail("sequential gptq rounds each weight during calibration, before "
             + ("awq's scales are folded" if ctx.settings.folds_scales else "--exclude_most_sensitive picks what stays float")
             + "; drop sequential (algorithm.sequential: false) or that option")
    ctx.tied = None if ctx.settings.folds_scales else tied_embedding(ctx.model.graph)
    UntieEmbeddingsPass()(ctx.model)
    scheme = ctx.settings.scheme
    unmatched = unmatched_patterns(ctx.model.graph, scheme)
    if unmatched:
        fail(f"override pattern {unmatched[0]!r} (quantize.overrides[].match, --exclude, --int8_nodes) matches no node "
             f"(MatMul or embedding) in {ctx.folder.model_file}; check the node name")
    plan = _plan(ctx)
    if ctx.settings.scheme.tied_embedding == "shared" and (reason := tie_refusal(plan, ctx.tied and ctx.tied[1])) is not None:
        fail(f"tied_embedding: shared cannot apply to {ctx.folder.model_file}: {reason}; use tied_embedding: auto "
             "(or --tied_embedding auto)")
    ctx.state["plan"] = plan
    observations: list[Observation] = []
    if scheme.static_activations and (ctx.ranges is None or set(ctx.ranges) != set(plan.activations)):
        ctx.state["range_observers"] = {name: make_range_observer(scheme.calibration, scheme.activations) for name in plan.activations}
        observations += list(ctx.state["range_observers"].items())
    if ctx.settings.needs_hessians:
        if ctx.hessians is not None and set(ctx.hessians) == set(plan.activations):
            ctx.state["hessian_store"], ctx.hessians = ctx.hessians, None
        else:
            observations += _observe_hessians(ctx, plan)
            ctx.hessian_tokens = None
    if ctx.settings.folds_scales:
        ctx.state["mean_abs"] = {name: ChannelMeanAbsObserver() for name in plan.activations}
        observations += list(ctx.state["mean_abs"].items())
    return observations


class _WeightRounder:
    """Rounds each planned weight with its node's algorithm (onnxquant.algorithms.registry). An algorithm
    that reads the Hessian gets its input's (divided by any AWQ scales folded into that input), prepared
    once for all the weights that read the input (GPTQ's factor, AWQ's diag H) and dropped once the last of
    them has been rounded. Thread-safe: weights are rounded on several threads (emitters.RoundingAhead);
    the first reader of an input prepares its Hessian while the others wait for it."""

    def __init__(self, plan: QuantPlan, hessians: SpillingStore | None, settings: GPTQSettings,
                 keep_hessians: bool = False, progress: bool = True):
        self.keep_hessians = keep_hessians  # a plan search rounds from the same Hessians again
        self.algorithms = {name: get_algorithm(node.algo) for name, node in plan.nodes.items()}
        self.reader_input = {} if hessians is None else {
            reader: activation for activation, readers in plan.activations.items() for reader in readers
            if self.algorithms[reader].needs_hessians}
        self.hessians = hessians
        self.readers_left = Counter(self.reader_input.values())
        self.settings = settings
        self.prepared: dict[str, dict[str, object]] = {}  # input -> algorithm name -> what its readers round with
        self.lock = threading.Lock()
        self.input_locks = {activation: threading.Lock() for activation in self.readers_left}
        names = sorted({self.algorithms[reader].name for reader in self.reader_input})
        # Rounding runs as the model is written; at 1.5B it takes minutes.
        self.progress = tqdm(total=len(self.reader_input), desc=" + ".join(names), unit="weight",
                             disable=not (self.reader_input and progress))

    def _prepare(self, activation: str) -> dict[str, object]:
        with self.input_locks[activation]:
            if activation not in self.prepared:
                with self.lock:
                    hessian = self.hessians.get(activation)
                    if hessian is not None and not self.keep_hessians:
                        del self.hessians[activation]
                users = {self.algorithms[r] for r, a in self.reader_input.items() if a == activation}
                self.prepared[activation] = {} if hessian is None else {
                    algorithm.name: algorithm.prepare(hessian, self.settings) for algorithm in users}
            return self.prepared[activation]

    def __call__(self, node_name: str, weight: np.ndarray, spec: QuantSpec):
        algorithm = self.algorithms[node_name]
        activation = self.reader_input.get(node_name)
        if activation is None:
            return algorithm.round(weight, spec, None, self.settings)
        prepared = self._prepare(activation).get(algorithm.name)
        if prepared is None:  # no Hessian reached this input
            return nearest_rounder(node_name, weight, spec)
        with self.lock:
            self.progress.update()
            if self.progress.n == self.progress.total:
                self.progress.close()
            self.readers_left[activation] -= 1
            if self.readers_left[activation] == 0:
                del self.prepared[activation]
        return algorithm.round(weight, spec, prepared, self.settings)


def activation_ranges(ctx: StageContext) -> dict[str, tuple[float, float]]:
    """The static activation ranges the quantize stage's calibration (or the smoothing pass) gave."""
    if "range_observers" in ctx.state:
        return {name: observer.range() for name, observer in ctx.state["range_observers"].items()}
    return ctx.ranges or {}


def hessian_tokens(ctx: StageContext) -> dict[str, int]:
    return ctx.hessian_tokens or {name: observer.tokens for name, observer in ctx.state["hessian_observers"].items()}


def quantize_pass(ctx: StageContext, plan: QuantPlan, ranges: dict[str, tuple[float, float]],
                  hessians: SpillingStore | None, keep_hessians: bool = False) -> QuantizeGraphPass:
    """The pass that writes `plan` into the model, rounding each weight with its node's algorithm."""
    scheme = ctx.settings.scheme
    sequential = ctx.state.get("sequential")
    rounder = _WeightRounder(plan, hessians if ctx.settings.rounds_with_hessians and sequential is None else None,
                             ctx.settings.gptq, keep_hessians)
    if sequential is not None:  # calibration rounded the weights with Hessians; the rest are rounded now
        sequential.cache.inner, rounder = rounder, sequential.cache
    description = {"config": scheme.name, "algo": scheme.algo, "calibration": scheme.calibration.__dict__}
    if ctx.report.kept_float:
        description["kept_float"] = ctx.report.kept_float
    return QuantizeGraphPass(plan, ranges, description, rounder, scheme.column_scales, rounding_workers=usable_cores())


def _build_quantization(ctx: StageContext) -> list[ir.passes.PassBase]:
    plan = ctx.state["plan"]
    passes: list[ir.passes.PassBase] = []
    ranges = activation_ranges(ctx)
    hessians = None
    if ctx.settings.needs_hessians:
        hessians = ctx.state.pop("hessian_store")  # each is freed once rounded (float32 until used)
    if ctx.settings.exclude_most_sensitive:
        ctx.report.kept_float = _most_sensitive(ctx, plan, hessians, hessian_tokens(ctx), ranges)
        plan = plan.without(ctx.report.kept_float)
        for name in [name for name in hessians if name not in plan.activations]:
            del hessians[name]
    if ctx.settings.folds_scales:
        passes.append(_awq_pass(ctx, plan, hessians))
    quantize = quantize_pass(ctx, plan, ranges, hessians)
    ctx.state["quantize"] = quantize
    return passes + [quantize]


def _most_sensitive(ctx: StageContext, plan: QuantPlan, hessians: SpillingStore, tokens: dict[str, int],
                    ranges: dict[str, tuple[float, float]]) -> list[str]:
    """The `exclude_most_sensitive` planned MatMuls with the largest modelled output error."""
    count = ctx.settings.exclude_most_sensitive
    if count >= len(plan.matmuls):
        fail(f"--exclude_most_sensitive {count} would leave none of the {len(plan.matmuls)} quantizable MatMuls "
             "quantized; pass a smaller count")
    by_name = nodes_by_name(ctx.model.graph)
    scores = {}
    for activation, readers in tqdm(plan.activations.items(), desc="sensitivity", unit="group", leave=False):
        hessian = hessians[activation]
        for name in readers:
            weight = constant_weight(by_name[name])
            # The plain grid stands in for the pair-safe one: the ranking needs the error's size, not its last bit.
            spec = dataclasses.replace(plan.nodes[name].weights, pair_safe=False)
            scores[name] = read_initializer(weight, lambda w: matmul_sensitivity(
                w, hessian, tokens[activation], spec, plan.activation_spec, ranges.get(activation)))
    ranked = sorted(scores, key=scores.get, reverse=True)[:count]
    for name in ranked:
        log.info("kept in float: %s (modelled relative output error %.2e)", name, scores[name])
    return ranked


def _awq_pass(ctx: StageContext, plan: QuantPlan, hessians: SpillingStore) -> FoldChannelScalesPass:
    """AWQ scales for every group whose producer can absorb them; Hessians rescaled to match."""
    graph = ctx.model.graph
    by_name = nodes_by_name(graph)
    targets = [t for t in fold_targets(graph, plan.activations) if t.kind != "mul"]
    scales = {}
    for target in tqdm(targets, desc="awq search", unit="group", leave=False):
        tensors = [constant_weight(by_name[name]).const_value for name in target.readers]
        specs = [plan.nodes[name].weights for name in target.readers]
        hessian = hessians[target.activation]
        s, alpha = awq_scales(target, [t.numpy() for t in tensors], specs, hessian,
                              ctx.state["mean_abs"][target.activation].mean)
        for tensor in tensors:
            release_tensor(tensor)  # the search touched every page of these weights
        scales[target.activation] = s
        ctx.report.awq_alphas.append(alpha)
        _divide_hessian(hessians, target.activation, s)
    return FoldChannelScalesPass(targets, scales)


# --- KV CACHE -----------------------------------------------------------------------------------

def _prepare_kv_cache(ctx: StageContext) -> list[Observation]:
    """Observers of every layer's present key and value. They join the quantize stage's pass, which sees
    the model after every float stage but before its weights are rounded: K and V of float weights, where
    the builder's calibrator reads those of its quantized-weight baseline. Without a calibrating quantize
    stage they have a pass of their own, on the model as the float stages leave it."""
    kv, folder = ctx.settings.kv_cache, ctx.folder
    attention = {node.outputs[1].name: node for node in ctx.model.graph
                 if node.op_type == "GroupQueryAttention" and len(node.outputs) >= 3}
    rows = 0 if kv.method == "minmax" else max(1, SAMPLE_ROWS // max(1, len(ctx.samples)))
    observers = {}
    for key, value in present_names(folder):
        node = attention[key]
        layout = rotary_layout({name: attr.value for name, attr in node.attributes.items()})
        observers[key] = KVCacheObserver(folder.num_kv_heads, folder.head_size, rows, layout if kv.rotary_envelope else None,
                                         _rope_frequencies(node), folder.context_length)
        observers[value] = KVCacheObserver(folder.num_kv_heads, folder.head_size, rows)
    ctx.state["kv_observers"] = observers
    return list(observers.items())


def _rope_frequencies(attention: ir.Node) -> np.ndarray | None:
    """Each RoPE pair's angle per position from the cos/sin caches GroupQueryAttention rotates K by (inputs
    7, 8), None when it reads none (RoPE outside it: K's envelope is then the pair norm, for any position)."""
    caches = [attention.inputs[i] if len(attention.inputs) > i else None for i in (7, 8)]
    if any(value is None or value.const_value is None for value in caches):
        return None
    return rope_frequencies(*(read_initializer(value, lambda a: a.astype(np.float64)) for value in caches))


def _build_kv_cache(ctx: StageContext) -> list[ir.passes.PassBase]:
    kv = ctx.settings.kv_cache
    scales = {name: cache_scale(observer, kv.dtype, kv.granularity, kv.method, kv.percentile)
              for name, observer in ctx.state.pop("kv_observers").items()}
    keys = [scale for name, scale in scales.items() if name.endswith("key")]
    values = [scale for name, scale in scales.items() if not name.endswith("key")]
    if keys and values:
        log.info("KV cache %s (%s): k_scale %.3g..%.3g, v_scale %.3g..%.3g", kv.scheme, kv.method,
                 min(s.min() for s in keys), max(s.max() for s in keys), min(s.min() for s in values),
                 max(s.max() for s in values))
    return [QuantizeKVCachePass(scales, kv.dtype, kv.granularity, ctx.folder.head_size)]


# R1 and SmoothQuant fold into norm weights; a plain decoder gets its norms fused first.
FUSE_NORMS = Stage("fuse_norms", lambda s: s.fuse_norms or s.rotation is not None or s.sq_alpha is not None, lambda ctx: [],
                   _build_norm_fusion, checkpoint=True)
ROTATE = Stage("rotate", lambda s: s.rotation is not None, _prepare_rotation, _build_rotation, checkpoint=True)
SMOOTH = Stage("smooth", lambda s: s.sq_alpha is not None, _prepare_smoothing, _build_smoothing, checkpoint=True)
R4 = Stage("r4", lambda s: s.r4, _prepare_r4, _build_r4, checkpoint=True)
HADAMARD_GROUPS = Stage("hadamard_groups", lambda s: s.hadamard_group_size is not None, _prepare_hadamard_groups,
                        _build_hadamard_groups, checkpoint=True)
QUANTIZE = Stage("quantize", lambda s: not s.skip_quantization, _prepare_quantization, _build_quantization, checkpoint=False)
KV_CACHE = Stage("kv_cache", lambda s: s.kv_cache is not None, _prepare_kv_cache, _build_kv_cache, checkpoint=False,
                 joins="quantize")
STAGES = (FUSE_NORMS, ROTATE, SMOOTH, R4, HADAMARD_GROUPS, QUANTIZE, KV_CACHE)


def scratch_copies(settings: QuantizeSettings) -> int:
    """How many whole-model scratch copies a run may write at most: one per float stage that applies."""
    return sum(1 for stage in STAGES if stage.checkpoint and stage.applies(settings))


def _user_error_in(exc: BaseException) -> UserError | None:
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__
    return None


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> None:
    """Run passes in order; a user error raised inside one reaches the CLI as itself."""
    if not passes:
        return
    try:
        ir.passes.Sequential(*passes)(model)
    except (ir.passes.PassError, ir.passes.PreconditionError) as exc:
        user_error = _user_error_in(exc)
        if user_error is not None:
            raise user_error from None
        raise


def save_model(model: ir.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=path.name + ".data")


def quantize_model(folder: GenAIFolder, output_model: Path, settings: QuantizeSettings, samples: np.ndarray | None,
                   scratch: Path, recipe: tuple[Stage, ...] = STAGES,
                   after_checkpoint: Callable[[str, Path], None] | None = None,
                   times: PhaseTimes | None = None,
                   plan_search: Callable[[StageContext, Path, PhaseTimes], None] | None = None) -> QuantizeReport:
    """Run the recipe's stages on `folder`'s model and write the result to `output_model`.

    `after_checkpoint(stage name, model file)`, when given, runs on each float stage's model file
    (each is then checkpointed right away); each phase's seconds add up in `times`, when given.
    `plan_search(ctx, output_model, times)`, when given, replaces the quantize stage's build and write: it
    gets the calibrated context with the float stages' model on disk at `ctx.model_path` and writes the
    model it chooses (onnxquant.mixed_precision).
    """
    report = QuantizeReport()
    times = times if times is not None else PhaseTimes()
    start = time.perf_counter()
    with times.phase("load"):
        model = ir.load(folder.model_file)
    if QUANT_METADATA_KEY in model.metadata_props:
        fail(f"{folder.model_file} is already quantized ({model.metadata_props[QUANT_METADATA_KEY]}); "
             "pass the float export instead")
    ctx = StageContext(model, folder.model_file, folder, settings, samples, report, scratch)

    def checkpoint(folder_name: str, phase: str) -> None:
        previous = ctx.model_path.parent if ctx.model_path.parent.parent == scratch else None
        ctx.model_path = scratch / folder_name / "model.onnx"
        with times.phase(phase):
            save_model(ctx.model, ctx.model_path)
            ctx.model = ir.load(ctx.model_path)
        if previous is not None:
            shutil.rmtree(previous)  # the reloaded model no longer reads it

    # A float stage's changes reach the disk only when something reads them there: the next
    # calibration pass, or --verify's probe after each stage (a 7 GB write saved at 1.5B otherwise).
    unsaved = False
    applied = [s for s in recipe if s.applies(settings)]
    joined_states: dict[str, dict] = {}  # a stage prepared ahead, its observers in the previous stage's pass
    for number, stage in enumerate(applied):
        if stage.name in joined_states:
            ctx.state, observations = joined_states.pop(stage.name), []
        else:
            ctx.state = {}
            with times.phase(f"{stage.name}_prepare"):
                observations = stage.prepare(ctx)
            following = applied[number + 1] if number + 1 < len(applied) else None
            if following is not None and following.joins == stage.name:
                own_state, ctx.state = ctx.state, {}
                with times.phase(f"{following.name}_prepare"):
                    observations = observations + following.prepare(ctx)
                joined_states[following.name], ctx.state = ctx.state, own_state
        if observations:
            if unsaved:
                checkpoint(f"stage{number}-before-{stage.name}", f"checkpoint_before_{stage.name}")
                unsaved = False
            with times.phase(f"{stage.name}_calibration"):
                stage_samples = samples[:ctx.state.get("sample_count", len(samples))]
                run = run_calibration(ctx.model_path, token_sample_reader(ctx.model_path, folder, stage_samples), observations,
                                      desc=f"calibration ({stage.name})",
                                      segment_bytes=ctx.state.get("segment_bytes", settings.segment_bytes),
                                      on_segment_done=ctx.state.get("segment_done"),
                                      sequential="sequential" in ctx.state)
            report.calibration_seconds += run.seconds
            report.calibration_passes += 1
            report.calibration_segments = max(report.calibration_segments, run.segments)
        if stage is QUANTIZE and plan_search is not None:
            if unsaved:
                checkpoint(f"stage{number}-before-{stage.name}", f"checkpoint_before_{stage.name}")
            plan_search(ctx, output_model, times)
            report.seconds = time.perf_counter() - start
            return report
        with times.phase(f"{stage.name}_passes"):
            passes = stage.build(ctx)
            run_passes(ctx.model, passes)
        if "fold" in ctx.state:
            report.inserted_muls += ctx.state["fold"].inserted_muls
        if "quantize" in ctx.state:
            report.quantized_nodes = ctx.state["quantize"].quantized_nodes
        if not passes:
            continue
        if stage.checkpoint and after_checkpoint is not None:
            checkpoint(f"stage{number}-{stage.name}", f"{stage.name}_checkpoint")
            with times.phase(f"{stage.name}_verify"):
                after_checkpoint(stage.name, ctx.model_path)
        elif stage.checkpoint:
            unsaved = True
    # Weights are rounded (GPTQ included) as they are written, so this phase holds the rounding too.
    # The rounding threads (emitters.RoundingAhead) each take one core: BLAS threads on top only
    # contend with them (GPTQ's small products ran slower on two BLAS threads than on one).
    with times.phase("round_and_write"), threadpool_limits(1, user_api="blas"):
        save_result(ctx, output_model)
    report.seconds = time.perf_counter() - start
    return report


def save_result(ctx: StageContext, output_model: Path) -> None:
    """Write the quantized model; microscaling models get their standard form beside the CPU-runnable one."""
    model, ctx.model = ctx.model, None
    if needs_emulation(model):
        # The standard form is written first; the CPU-runnable form is a pass over it, read back from
        # disk, so no weight is rounded twice.
        standard = output_model.with_name(standard_model_name(output_model.name))
        opset, ir_version = model.opset_imports.get("", 0), model.ir_version
        model.opset_imports[""] = max(opset, STANDARD_OPSET)
        model.ir_version = max(model.ir_version or 0, STANDARD_IR_VERSION)
        save_model(model, standard)
        del model
        emulated = ir.load(standard)
        run_passes(emulated, [EmulateMicroscalingPass()])
        emulated.opset_imports[""], emulated.ir_version = opset, ir_version
        save_model(emulated, output_model)
    else:
        save_model(model, output_model)


# The standard form of microscaling models (FLOAT4E2M1 codes, FLOAT8E8M0 scales) needs opset 24+, IR 11+.
STANDARD_OPSET = 25
STANDARD_IR_VERSION = 11


def needs_emulation(model: ir.Model) -> bool:
    unsupported = (ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0)
    return any(value.const_value is not None and value.const_value.dtype in unsupported
               for value in model.graph.initializers.values())
