"""Mixed precision under a measured budget: each quantized MatMul (and the embedding) gets one of the
recipe's candidate formats so that the model is the smallest within `max_delta` of float's perplexity, or
the most accurate within `max_size_mb`, measured on held-out windows of the calibration text.

The model is calibrated once. From its Hessians every node's error in every candidate format is modelled
(`algorithms.sensitivity`: the relative output error of round-to-nearest; for the embedding, which has no
input to take a Hessian of, the relative error of its rows) and its bytes counted (`stored_bytes`). An
allocation is a multiple-choice knapsack over (bytes, modelled error), solved by a Lagrange multiplier
(each node takes the format minimizing error + lambda * bytes, lambda bisected to the byte budget) and
a greedy fill of what is left. A *point* is an allocation written with the recipe's own rounding
(GPTQ re-rounds from the same Hessians; every rounded weight is cached for later points) and measured:
its file size and its perplexity on the held-out windows against the float model's. The size budget
needs one point (two when the byte model misses the size); the perplexity budget bisects the size
between the all-smallest and the all-largest points, interpolating log(delta) against size, until the
smallest point within the budget is pinned to about 1% of its size.

The chosen allocation is written into the quantize stage as overrides (one per format, a regular
expression naming its nodes), so the recipe saved beside the model writes it again without searching.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from onnxquant.errors import fail
from onnxquant.rounded_weights import CachedRounder
from onnxquant.spec import QuantSpec

log = logging.getLogger(__name__)

FLOAT = None  # the float "format": the node stays as it is


@dataclass(frozen=True)
class Budget:
    """What the search must meet: `max_delta` (held-out perplexity at most (1 + max_delta) times float's, the
    smallest such model) or `max_size_mb` (the most accurate model of at most that many MB), not both.
    `windows` held-out windows of `window_tokens` (at most the model's context) measure each point; `max_points`
    caps how many points are measured."""

    max_delta: float | None = None
    max_size_mb: float | None = None
    windows: int = 2
    # As long as the evaluation's blocks: on SmolLM2 the test split's delta (2048-token blocks) was 1.6x the
    # held-out delta on 512-token windows (+7.9% against +4.96% at 113.6 MB, +4.11% against +2.43% at 143.2 MB).
    window_tokens: int = 2048
    max_points: int = 7

    def __post_init__(self) -> None:
        if (self.max_delta is None) == (self.max_size_mb is None):
            fail("give one budget: --max_delta (the smallest model within that much of float) or --max_size_mb "
                 "(the most accurate model within that size), not both and not neither")
        if self.max_delta is not None and not 0 < self.max_delta < 10:
            fail(f"--max_delta must be a positive percentage of float's perplexity, got {self.max_delta * 100:g}%")
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            fail(f"--max_size_mb must be a positive size in MB, got {self.max_size_mb:g}")
        if self.windows < 1 or self.max_points < 2 or self.window_tokens < 2:
            fail("the budget's windows must be at least 1, window_tokens at least 2 and max_points at least 2")

    def describe(self) -> str:
        if self.max_delta is not None:
            return f"max_delta={self.max_delta * 100:g}%"
        return f"max_size_mb={self.max_size_mb:g}"


@dataclass(frozen=True)
class MeasuredPoint:
    """One allocation written and measured on the held-out windows."""

    size_mb: float
    perplexity: float
    float_perplexity: float
    agreement: float
    formats: dict[str, int]  # format name -> nodes in it

    @property
    def delta(self) -> float:
        return self.perplexity / self.float_perplexity - 1.0

    def summary(self) -> str:
        mix = " ".join(f"{name}:{count}" for name, count in self.formats.items())
        return (f"size_mb={self.size_mb:.1f} held_out_ppl={self.perplexity:.3f} delta={self.delta * 100:+.2f}% "
                f"top1_agreement={self.agreement:.3f} formats=[{mix}]")

    def to_dict(self) -> dict:
        return {"size_mb": round(self.size_mb, 2), "held_out_perplexity": round(self.perplexity, 4),
                "delta_percent": round(self.delta * 100, 3), "top1_agreement": round(self.agreement, 4),
                "formats": dict(self.formats)}


@dataclass
class SearchResult:
    budget: Budget
    points: list[MeasuredPoint] = field(default_factory=list)
    chosen: int = -1

    def to_dict(self) -> dict:
        return {"budget": self.budget.describe(), "windows": self.budget.windows, "window_tokens": self.budget.window_tokens,
                "metric": "held-out perplexity",
                "chosen": self.chosen, "points": [p.to_dict() for p in self.points]}


# --- formats, bytes and modelled errors ----------------------------------------------------------

def format_name(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    if spec.granularity == "per_block":
        return f"{spec.dtype}_b{spec.block_size}"
    return f"{spec.dtype}_{spec.granularity}"


def default_candidates(scheme) -> tuple[QuantSpec | None, ...]:
    """The candidate set of a scheme: weight-only 4-bit blocks -> 4-bit blocks of 128 / 64 / 32 (the scheme's
    element type), 8-bit blocks of 128, float; static int8 activations -> int8 weights per tensor, per
    channel, float; anything else -> the scheme's weights and float."""
    weights = scheme.weights
    if weights.granularity == "per_block" and not weights.is_float and weights.bits == 4:
        fours = [dataclasses.replace(weights, block_size=size) for size in (128, 64, 32)]
        eight = QuantSpec("uint8" if not weights.symmetric else "int8", "per_block", weights.symmetric, 128)
        return (*fours, eight, FLOAT)
    if scheme.static_activations and not weights.is_float and weights.bits == 8:
        return (dataclasses.replace(weights, granularity="per_tensor", block_size=0),
                dataclasses.replace(weights, granularity="per_channel", block_size=0), FLOAT)
    return (weights, FLOAT)


def check_lowering(spec: QuantSpec | None, scheme) -> None:
    """Refuse a candidate no emitter writes for this recipe (a 4-bit grid outside MatMulNBits, microscaling
    under static integer activations)."""
    if spec is None:
        return
    if spec.granularity != "per_block" and spec.bits != 8:
        fail(f"candidate format {format_name(spec)} cannot be written: 4-bit weights go in blocks (MatMulNBits or "
             "microscaling); give a per_block grid or drop it from quantize.candidates")
    if spec.granularity == "per_block" and spec.is_float and scheme.static_activations and not scheme.activations.is_float:
        fail(f"candidate format {format_name(spec)} cannot be written beside static integer activations; drop it "
             "from quantize.candidates")


def stored_bytes(op: str, spec: QuantSpec | None, k: int, n: int) -> int:
    """Bytes one weight of K x N (a MatMul's [K, N], an embedding's [N rows, K]) takes in `spec`'s lowering."""
    if spec is None:
        return 4 * k * n
    if spec.granularity == "per_block":
        blocks = -(-k // spec.block_size)
        codes = n * blocks * spec.block_size * spec.bits // 8
        scale = {"float32": 4}.get(spec.scale_dtype, 1) * n * blocks
        zero = 0 if spec.symmetric or spec.is_float else (n * -(-blocks // 2) if spec.bits == 4 else n * blocks)
        return codes + scale + zero
    if op == "Gather" or spec.granularity == "per_channel":
        return k * n + (4 if spec.symmetric else 5) * n
    return k * n + 8


def candidate_for(op: str, spec: QuantSpec | None) -> QuantSpec | None:
    """The grid a candidate gives an embedding (8 bits: int8 rows, as the plan's overrides do)."""
    from onnxquant.plan import embedding_spec

    return spec if spec is None or op == "MatMul" else embedding_spec(spec)


@dataclass
class NodeOptions:
    name: str
    op: str
    specs: list[QuantSpec | None]
    sizes: list[int]
    # Relative output error of each format. (Weighting it by how much of the residual stream each node writes,
    # the stream's energy summed over earlier writes, made the 113.6 MB SmolLM2 point worse: held-out +5.41%
    # against +4.91%; the weights spanned 1000x, RMSNorm undoes most of the stream's growth. The error of each
    # weight as GPTQ rounds it, instead of round to nearest, made it worse too: 113.6 MB after R1, held-out +5.53%
    # against +6.27% but test 22.7391 against 22.6547: GPTQ fits the very Hessian the error is measured on.)
    errors: list[float]


def _matmul_errors(weight: np.ndarray, hessian: np.ndarray, tokens: int, specs, activation_spec, value_range) -> list[float]:
    from onnxquant.algorithms.sensitivity import matmul_sensitivity

    return [0.0 if spec is None else matmul_sensitivity(weight, hessian, tokens, dataclasses.replace(spec, pair_safe=False),
                                                        activation_spec, value_range) for spec in specs]


def _embedding_errors(table: np.ndarray, specs) -> list[float]:
    from onnxquant.spec import round_to_nearest

    weight = np.asarray(table, dtype=np.float32).T  # rows are the N "columns" the grids are per
    clean = float(np.einsum("kn,kn->", weight, weight, dtype=np.float64))
    errors = []
    for spec in specs:
        if spec is None:
            errors.append(0.0)
            continue
        delta = round_to_nearest(weight, spec).dequantize() - weight
        errors.append(float(np.einsum("kn,kn->", delta, delta, dtype=np.float64)) / clean)
    return errors


def node_options(ctx, plan, candidates: tuple[QuantSpec | None, ...], hessians, tokens, ranges) -> list[NodeOptions]:
    """Every planned node's candidate formats with their bytes and modelled errors."""
    from onnxquant.graph_utils import read_initializer
    from onnxquant.patterns import constant_weight, nodes_by_name
    from onnxquant.runtime import usable_cores

    by_name = nodes_by_name(ctx.model.graph)
    reader_input = {reader: activation for activation, readers in plan.activations.items() for reader in readers}
    names = list(plan.nodes)
    # One activation's readers in turn, so each Hessian is read from disk once.
    names.sort(key=lambda name: (reader_input.get(name, ""), name))

    def options(name: str) -> NodeOptions:
        planned = plan.nodes[name]
        specs = list(dict.fromkeys(candidate_for(planned.op, spec) for spec in candidates))
        if planned.op == "Gather":
            value = by_name[name].inputs[0]
            n, k = value.shape[0], value.shape[1]
            errors = read_initializer(value, lambda table: _embedding_errors(table, specs))
        else:
            value = constant_weight(by_name[name])
            k, n = value.shape[0], value.shape[1]
            activation = reader_input[name]
            hessian = hessians[activation]
            errors = read_initializer(value, lambda w: _matmul_errors(w, hessian, tokens[activation], specs,
                                                                      plan.activation_spec, ranges.get(activation)))
        return NodeOptions(name, planned.op, specs, [stored_bytes(planned.op, s, int(k), int(n)) for s in specs], errors)

    # Nodes are modelled on one thread per core; numpy's products release the GIL.
    with ThreadPoolExecutor(usable_cores()) as pool, threadpool_limits(1, user_api="blas"):
        return list(tqdm(pool.map(options, names), total=len(names), desc="modelling formats", unit="node"))


# --- allocation ----------------------------------------------------------------------------------

def allocate(options: list[NodeOptions], budget_bytes: float) -> list[int]:
    """Each node's option index: least total modelled error with total bytes <= budget_bytes (a Lagrange
    multiplier bisected to the budget, then the best error-per-byte upgrades that still fit)."""

    def pick(lam: float) -> list[int]:
        return [min(range(len(o.specs)), key=lambda i: (o.errors[i] + lam * o.sizes[i], o.sizes[i])) for o in options]

    def total(choice: list[int]) -> int:
        return sum(o.sizes[i] for o, i in zip(options, choice))

    smallest = [min(range(len(o.sizes)), key=lambda i: (o.sizes[i], o.errors[i])) for o in options]
    if total(smallest) >= budget_bytes:
        return smallest
    low, high = 1e-30, 1.0
    while total(pick(high)) > budget_bytes:
        high *= 10.0
        if high > 1e300:  # a node whose smaller formats model as infinitely worse: take the smallest mix
            return smallest
    for _ in range(100):  # bisection in log space: total bytes fall as lambda grows
        middle = math.sqrt(low * high)
        if total(pick(middle)) > budget_bytes:
            low = middle
        else:
            high = middle
        if high / low < 1.0 + 1e-9:
            break
    choice = pick(high)
    left = budget_bytes - total(choice)
    while True:
        best, best_gain = None, 0.0
        for node, (o, i) in enumerate(zip(options, choice)):
            for j in range(len(o.specs)):
                extra = o.sizes[j] - o.sizes[i]
                gain = o.errors[i] - o.errors[j]
                if gain > 0 and 0 < extra <= left and gain / extra > best_gain:
                    best, best_gain = (node, j, extra), gain / extra
        if best is None:
            return choice
        node, j, extra = best
        choice[node] = j
        left -= extra


LAYER_INDEX = re.compile(r"layers[./](\d+)[./]")


def largest_quantized(options: list[NodeOptions]) -> list[int]:
    """Each node in its largest format other than float."""
    return [max((i for i, s in enumerate(o.specs) if s is not None), key=lambda i: o.sizes[i], default=0) for o in options]


def scale_errors_by_measurement(options: list[NodeOptions], ends: list[int], smallest, ends_high, largest) -> None:
    """Put the modelled errors of the nodes outside the decoder layers (the embedding, lm_head: `ends`) and of the
    layers' nodes on the scale of measured perplexity. Relative output errors compare nodes within the layers,
    but not a layer's MatMul with lm_head, whose output is the logits: measured on SmolLM2 (w4a16, 113.6 MB), the
    plain model left lm_head and the embedding at 4 bits, and the last 4-bit nodes cost +3% held-out. Three
    points give the two scales: all smallest, the ends largest, all largest."""
    (small, d_small), (mixed, d_mixed), (large, d_large) = [(c, p.delta) for c, p in (smallest, ends_high, largest)]
    in_ends = set(ends)

    def modelled(choice: list[int], ends_part: bool) -> float:
        return sum(o.errors[i] for n, (o, i) in enumerate(zip(options, choice)) if (n in in_ends) == ends_part)

    floor = 0.05 * max(d_small - d_large, 1e-6)  # a noisy difference must not zero a whole class out
    gain_ends = max(d_small - d_mixed, floor) / max(modelled(small, True) - modelled(mixed, True), 1e-30)
    gain_layers = max(d_mixed - d_large, floor) / max(modelled(mixed, False) - modelled(large, False), 1e-30)
    log.info("measured scale of modelled errors: ends x%.3g, decoder layers x%.3g", gain_ends, gain_layers)
    for n, o in enumerate(options):
        gain = gain_ends if n in in_ends else gain_layers
        o.errors = [e * gain for e in o.errors]


def chosen_overrides(options: list[NodeOptions], choice: list[int], scheme):
    """Recipe overrides that give every node its chosen format: one per format, naming its nodes by an
    anchored regular expression (only nodes whose format differs from what the recipe gives them)."""
    from onnxquant.plan import embedding_weights
    from onnxquant.recipes import Grid, Override

    by_format: dict[QuantSpec | None, list[str]] = {}
    for o, i in zip(options, choice):
        spec = o.specs[i]
        current = scheme.node_format(o.name).weights if o.op == "MatMul" else embedding_weights(scheme, o.name)
        if spec != current:
            by_format.setdefault(spec, []).append(o.name)
    overrides = []
    for spec, names in by_format.items():
        match = "re:^(?:" + "|".join(re.escape(name) for name in sorted(names)) + ")$"
        overrides.append(Override(match, keep_float=True) if spec is None else Override(match, weights=Grid.of(spec)))
    return tuple(overrides)


def format_counts(options: list[NodeOptions], choice: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o, i in zip(options, choice):
        counts[format_name(o.specs[i])] = counts.get(format_name(o.specs[i]), 0) + 1
    return dict(sorted(counts.items()))


def candidates_of(recipe, scheme) -> tuple[QuantSpec | None, ...]:
    from onnxquant import recipes

    quantize = recipe.stage(recipes.Quantize)
    given = tuple(None if c == "float" else c.spec() for c in quantize.candidates)
    return tuple(dict.fromkeys(given)) if given else default_candidates(scheme)


def check_budget(budget: Budget, recipe, settings, folder) -> None:
    """Refuse, before any work, a budget this recipe cannot search or a size no candidate mix reaches."""
    from onnxquant import recipes

    if recipe.stage(recipes.Quantize) is None or settings.skip_quantization:
        fail("--max_delta / --max_size_mb choose the quantize stage's formats; the recipe has none to choose "
             "(add a quantize stage or drop --skip_quantization)")
    if settings.folds_scales:
        fail("--max_delta / --max_size_mb with awq: AWQ folds its scales into the graph before rounding, which each "
             "measured point would repeat; use gptq or rtn for the search")
    if settings.kv_cache is not None:
        fail("--max_delta / --max_size_mb measure the weights' formats with the float KV cache; search without the "
             "kv_cache stage, then quantize with OUT/quantization_recipe.yaml and --kv_cache_quant_scheme")
    if settings.exclude_most_sensitive:
        fail("--max_delta / --max_size_mb choose which nodes stay float themselves; drop --exclude_most_sensitive")
    if settings.sequential:
        fail("--max_delta / --max_size_mb re-round every candidate from one set of float Hessians; sequential gptq "
             "rounds during calibration for one format only: drop sequential (algorithm.sequential: false)")
    if settings.scheme.tied_embedding == "shared":
        fail("--max_delta / --max_size_mb choose the embedding's and lm_head's formats apart, so their table is not "
             "shared; use tied_embedding: auto (the search then writes them separately)")
    candidates = candidates_of(recipe, settings.scheme)
    for spec in candidates:
        check_lowering(spec, settings.scheme)
    if budget.max_size_mb is not None:
        smallest = smallest_size_mb(folder.model_file, settings.scheme, candidates)
        if smallest > budget.max_size_mb:
            fail(f"--max_size_mb {budget.max_size_mb:g} is below the smallest model the candidates give (about "
                 f"{smallest:.1f} MB, every node in its smallest format); pass at least {math.ceil(smallest):g} or "
                 "add a smaller format to quantize.candidates")


def smallest_size_mb(model_file: Path, scheme, candidates) -> float:
    """The modelled size of the model with every planned node in its smallest candidate format."""
    import onnx_ir as ir

    from onnxquant.passes import UntieEmbeddingsPass
    from onnxquant.patterns import constant_weight, nodes_by_name
    from onnxquant.plan import plan_quantization

    model = ir.load(model_file)
    UntieEmbeddingsPass()(model)
    plan = plan_quantization(model.graph, scheme)
    by_name = nodes_by_name(model.graph)
    total = PlanSearch.unplanned_bytes(model.graph, plan)
    for name, planned in plan.nodes.items():
        if planned.op == "Gather":
            n, k = by_name[name].inputs[0].shape
        else:
            k, n = constant_weight(by_name[name]).shape
        total += min(stored_bytes(planned.op, candidate_for(planned.op, spec), int(k), int(n)) for spec in candidates)
    return total / 1e6


# --- the search ----------------------------------------------------------------------------------

class PlanSearch:
    """`quantize_model`'s plan_search: writes the chosen model to the output and keeps what it measured."""

    def __init__(self, budget: Budget, recipe, verifier):
        self.budget = budget
        self.recipe = recipe
        self.verifier = verifier  # a RunVerifier on the budget's held-out windows
        self.result = SearchResult(budget)
        self.chosen_recipe = recipe
        self.quality = None
        self.measured: dict[tuple[int, ...], tuple[MeasuredPoint, Path]] = {}  # allocation -> its point and folder

    def __call__(self, ctx, output_model: Path, times) -> None:
        from onnxquant import recipes
        from onnxquant.passes import UntieEmbeddingsPass
        from onnxquant.pipeline import activation_ranges, hessian_tokens, quantize_pass, run_passes, save_result
        from onnxquant.plan import plan_quantization
        import onnx_ir as ir

        settings, scheme = ctx.settings, ctx.settings.scheme
        plan = ctx.state["plan"]
        quantize = self.recipe.stage(recipes.Quantize)
        candidates = candidates_of(self.recipe, scheme)
        hessians = ctx.state["hessian_store"]
        ranges = activation_ranges(ctx)
        with times.phase("search_model_errors"):
            options = node_options(ctx, plan, candidates, hessians, hessian_tokens(ctx), ranges)
        # Bytes outside the planned weights: first the float graph's other initializers, then what each
        # measured point shows (its file size less its modelled weights).
        fixed = [self.unplanned_bytes(ctx.model.graph, plan)]
        rounder_cache = CachedRounder(ctx.scratch / "rounded")
        trials = ctx.scratch / "points"
        measured = self.measured

        def measure(choice: list[int]) -> MeasuredPoint:
            key = tuple(choice)
            if key in measured:
                return measured[key][0]
            overrides = chosen_overrides(options, choice, scheme)
            point_recipe = self.recipe.with_stage(dataclasses.replace(quantize, overrides=quantize.overrides + overrides))
            point_scheme = point_recipe.stage(recipes.Quantize).resolved_scheme()
            folder = trials / f"point{len(measured)}"
            with times.phase("search_write_points"):
                ctx.model = ir.load(ctx.model_path)
                UntieEmbeddingsPass()(ctx.model)
                point_plan = plan_quantization(ctx.model.graph, point_scheme)
                point_ctx = dataclasses.replace(ctx, settings=dataclasses.replace(settings, scheme=point_scheme))
                quantize_graph = quantize_pass(point_ctx, point_plan, ranges, hessians, keep_hessians=True)
                rounder_cache.inner = quantize_graph.rounder
                quantize_graph.rounder = rounder_cache
                run_passes(ctx.model, [quantize_graph])
                with threadpool_limits(1, user_api="blas"):
                    save_result(ctx, folder / output_model.name)
            from onnxquant.genai_folder import model_bytes

            with times.phase("search_measure_points"):
                quality = self.verifier.quality(folder / output_model.name)
            point = MeasuredPoint(model_bytes(folder, output_model.name) / 1e6, quality.quant_ppl, quality.float_ppl,
                                  quality.agreement, format_counts(options, choice))
            fixed[0] = point.size_mb * 1e6 - sum(o.sizes[i] for o, i in zip(options, choice))
            log.debug("point %d: bytes outside the modelled weights %d", len(measured), fixed[0])
            measured[key] = (point, folder)
            self.result.points.append(point)
            log.info("mixed precision point %d: %s", len(self.result.points), point.summary())
            return point

        def at_size(size_mb: float) -> list[int]:
            return allocate(options, size_mb * 1e6 - fixed[0])

        smallest, largest = allocate(options, 0), largest_quantized(options)
        low = measure(smallest)
        if self.budget.max_delta is not None and low.delta <= self.budget.max_delta:
            chosen = smallest  # the smallest model is within the budget already
        else:
            high = measure(largest)
            ends = [n for n, o in enumerate(options) if not LAYER_INDEX.search(o.name)]
            if ends and len(ends) < len(options):
                ends_high = [largest[n] if n in ends else smallest[n] for n in range(len(options))]
                scale_errors_by_measurement(options, ends, (smallest, low), (ends_high, measure(ends_high)),
                                            (largest, high))
            if self.budget.max_size_mb is not None:
                chosen = self._within_size(options, measure, at_size)
            else:
                chosen = self._within_delta(options, measure, at_size, (smallest, low), (largest, high))
        point, folder = measured[tuple(chosen)]
        self.result.chosen = self.result.points.index(point)
        for path in folder.iterdir():
            shutil.move(str(path), output_model.parent / path.name)
        overrides = chosen_overrides(options, chosen, scheme)
        # The search writes the embedding and lm_head apart; the saved recipe says so, so that it writes the same bytes.
        separate = dataclasses.replace(quantize.lowering, tied_embedding="separate")
        self.chosen_recipe = self.recipe.with_stage(dataclasses.replace(quantize, overrides=quantize.overrides + overrides,
                                                                        lowering=separate))
        from onnxquant.verification import QualityReport

        self.quality = QualityReport(point.float_perplexity, point.perplexity, point.agreement, self.verifier.held_out)
        ctx.report.quantized_nodes = sum(1 for o, i in zip(options, chosen) if o.specs[i] is not None)
        shutil.rmtree(trials, ignore_errors=True)
        shutil.rmtree(rounder_cache.folder, ignore_errors=True)

    @staticmethod
    def unplanned_bytes(graph, plan) -> int:
        from onnxquant.patterns import constant_weight, nodes_by_name

        by_name = nodes_by_name(graph)
        planned = {by_name[name].inputs[0].name if node.op == "Gather" else constant_weight(by_name[name]).name
                   for name, node in plan.nodes.items()}
        return sum(value.const_value.nbytes for name, value in graph.initializers.items()
                   if name not in planned and value.const_value is not None)

    def _within_size(self, options, measure, at_size) -> list[int]:
        limit = self.budget.max_size_mb
        smallest = allocate(options, 0)
        target = limit
        for _ in range(self.budget.max_points):
            choice = at_size(target)
            point = measure(choice)
            if point.size_mb <= limit:
                return choice
            if choice == smallest:
                break
            target -= (point.size_mb - limit) * 1.02 + 0.05  # the byte model missed: aim below by the miss
        best = min(self.result.points, key=lambda p: p.size_mb)
        fail(f"--max_size_mb {limit:g}: no candidate mix fits (the smallest measured is {best.size_mb:.1f} MB); pass at "
             f"least {math.ceil(best.size_mb * 10) / 10:g} or add a smaller format to quantize.candidates")

    def _within_delta(self, options, measure, at_size, smallest, largest) -> list[int]:
        limit = self.budget.max_delta
        (_, low), (high_choice, high) = smallest, largest
        if high.delta > limit and any(None in o.specs for o in options):
            high_choice = [o.specs.index(None) if None in o.specs else i for o, i in zip(options, high_choice)]
            high = measure(high_choice)
        if high.delta > limit:
            closest = min(self.result.points, key=lambda p: p.delta)
            fail(f"--max_delta {limit * 100:g}%: no candidate mix is within it on the held-out windows (the closest "
                 f"measured is {closest.delta * 100:+.2f}% at {closest.size_mb:.1f} MB); relax --max_delta to at least "
                 f"{math.ceil(closest.delta * 1000) / 10:g}% or add float to quantize.candidates")
        best = min((p for p in self.result.points if p.delta <= limit), key=lambda p: p.size_mb)
        low = max((p for p in self.result.points if p.delta > limit and p.size_mb < best.size_mb), key=lambda p: p.size_mb)
        best_choice = next(list(key) for key, (point, _) in self.measured.items() if point is best)
        low_point, high_point = low, best
        floor = 1e-4
        while len(self.result.points) < self.budget.max_points:
            if high_point.size_mb - low_point.size_mb < 0.01 * high_point.size_mb:
                break
            # log(delta) is close to linear in size between two points; aim a little inside the budget.
            target_delta = 0.9 * limit
            la, lb, lt = (math.log(max(p, floor)) for p in (low_point.delta, high_point.delta, target_delta))
            fraction = 0.5 if la == lb else min(max((la - lt) / (la - lb), 0.1), 0.9)
            size = low_point.size_mb + fraction * (high_point.size_mb - low_point.size_mb)
            choice = at_size(size)
            if tuple(choice) in self.measured:  # no other mix between the two points: nothing new to measure
                break
            point = measure(choice)
            if point.delta <= limit:
                high_point = point
                if point.size_mb < best.size_mb:
                    best_choice, best = choice, point
            else:
                low_point = point
            if limit * 0.8 <= point.delta <= limit:
                break
        return best_choice
