"""The public API: export a checkpoint, quantize it by a recipe, measure it, generate with it.

    import onnxquant
    onnxquant.export(None, "runs/smollm2-fp32")                      # the embedded SmolLM2-135M-Instruct
    result = onnxquant.quantize("runs/smollm2-fp32", "runs/smollm2-w8a8", "w8a8")
    print(result.quality.ratio, result.size_mb)
    print(onnxquant.evaluate("runs/smollm2-w8a8", max_blocks=4).perplexity)

`quantize` owns the whole run: it claims the output folder, builds it beside the target and renames it
into place at the end (a failure leaves nothing), copies the tokenizer and genai_config.json, checks the
result against the float model (the collapse guard), and writes `quantization_recipe.yaml` beside the
model: the recipe as it ran, the onnxquant version and the calibration text's name and sha256, so that
`quantize(model, out, "OUT/quantization_recipe.yaml")` writes the same bytes again.
User mistakes raise `onnxquant.errors.UserError` (one sentence naming the problem and the fix).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from onnxquant.errors import UserError, fail
from onnxquant.recipes import CalibrationData, KVCache, Recipe, RecipeError, load_recipe

if TYPE_CHECKING:
    from onnxquant.mixed_precision import Budget, SearchResult
    from onnxquant.pipeline import QuantizeReport
    from onnxquant.verification import Int8ActivationReport, QualityReport

log = logging.getLogger(__name__)

RECIPE_FILE = "quantization_recipe.yaml"


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantize run wrote and measured."""

    output: Path  # the model file (OUT/model.onnx)
    recipe: Recipe  # as it ran, every setting explicit
    size_mb: float  # the model file and its external data
    standard_size_mb: float  # microscaling recipes: the standard-form copy beside it (0: none)
    seconds: float
    peak_rss_mb: float
    phase_seconds: dict[str, float]
    quality: "QualityReport | None"  # quick perplexity ratio and top-1 agreement against float (None: not checked)
    exact_errors: dict[str, float]  # verify.exact_checks: each float stage's relative logit change
    report: "QuantizeReport"  # per-stage details (nodes quantized, alphas chosen, calibration passes)
    summary_line: str  # the one-line summary the CLI prints
    search: "SearchResult | None" = None  # a budget's search (mixed precision): the points it measured
    int8_activations: "Int8ActivationReport | None" = None  # accuracy_level 4 against level 0 (None: no node at 4)

    def to_dict(self) -> dict:
        """Plain data (JSON-ready): paths as text, the recipe in its file form."""
        quality = None if self.quality is None else {**dataclasses.asdict(self.quality), "ratio": self.quality.ratio}
        return {"output": str(self.output), "recipe": self.recipe.to_dict(), "size_mb": self.size_mb,
                "standard_size_mb": self.standard_size_mb, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "phase_seconds": self.phase_seconds, "quality": quality, "exact_errors": self.exact_errors,
                "summary_line": self.summary_line, "search": None if self.search is None else self.search.to_dict(),
                "int8_activations": None if self.int8_activations is None else dataclasses.asdict(self.int8_activations)}

    @property
    def degraded(self) -> bool:
        """True when the collapse guard fired and verify.allow_degraded kept the result."""
        limit = self.recipe.verify.collapse_ratio
        return self.quality is not None and bool(limit) and self.quality.ratio > limit


def _text_source(calibration: CalibrationData) -> tuple[str, str]:
    """The calibration text and the name it is recorded under."""
    from onnxquant.data import WIKITEXT_CALIB_FILE, resolve_text

    text = resolve_text(calibration.text, calibration.dataset, "validation")
    if calibration.text is not None:
        return text, str(Path(calibration.text).absolute())
    if calibration.dataset is not None:
        return text, f"hub:{calibration.dataset}/validation"
    return text, f"embedded:{WIKITEXT_CALIB_FILE}"


def _recorded_sha256(recipe: str | Path | Recipe) -> str | None:
    """The calibration sha256 a saved quantization_recipe.yaml records, if `recipe` is such a file."""
    if isinstance(recipe, Recipe) or not Path(recipe).is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    produced = data.get("produced_by") if isinstance(data, dict) else None
    return ((produced or {}).get("calibration") or {}).get("sha256")


def _resolve_calibration(recipe: Recipe, calibration: str | Path | CalibrationData | None) -> Recipe:
    if calibration is None:
        return recipe
    if not isinstance(calibration, CalibrationData):
        calibration = dataclasses.replace(recipe.calibration, text=str(calibration), dataset=None)
    return dataclasses.replace(recipe, calibration=calibration)


def quantize(model: str | Path, output: str | Path, recipe: str | Path | Recipe = "w8a8", *,
             calibration: str | Path | CalibrationData | None = None, budget: "Budget | None" = None,
             overwrite: bool = False) -> QuantizeResult:
    """Quantize the ORT-GenAI folder `model` into the new folder `output` by `recipe`.

    `recipe` is a built-in name (`onnxquant.recipes.builtin_recipes()`), a YAML or JSON file, or a
    `Recipe`; `calibration` replaces its calibration text (a file path) or its whole calibration section.
    `output` may also name the model file (`OUT/model.onnx`). With a `budget` (onnxquant.mixed_precision.Budget:
    max_delta or max_size_mb) each node's format is searched among the stage's candidates, measured on held-out
    windows, and the chosen formats are saved in the recipe beside the model as overrides. Raises `UserError`
    for a mistake in what was asked, `CollapsedModelError` (exit code 3) when the result collapsed, and writes
    nothing then.

    >>> result = quantize("runs/smollm2-fp32", "runs/smollm2-w4", "w4a16")  # doctest: +SKIP
    >>> print(result.summary_line, result.quality.summary())  # doctest: +SKIP
    """
    from onnxquant.genai_folder import open_genai_folder
    from onnxquant.memory import share_one_malloc_arena
    from onnxquant.staging import claimed_output

    recorded = _recorded_sha256(recipe)
    recipe = _resolve_calibration(load_recipe(recipe), calibration).resolved()
    share_one_malloc_arena()
    folder = open_genai_folder(model)
    folder.check_fits_context(recipe.calibration.seq_len, "the calibration window (calibration.seq_len, --seq_len)")
    kv_cache = recipe.stage(KVCache)
    if kv_cache is not None:
        from onnxquant.kv_cache import check_kv_cache_target

        check_kv_cache_target(folder, kv_cache.dtype)
    out = Path(output)
    output_dir, output_name = (out.parent, out.name) if out.suffix == ".onnx" else (out, "model.onnx")
    with claimed_output(output_dir):
        return _quantize(folder, output_dir, output_name, recipe, recorded, overwrite, budget)


def _search_for(budget, recipe: Recipe, settings, folder):
    """The settings a budget's search runs by, after refusing what it cannot search."""
    from onnxquant.mixed_precision import check_budget

    check_budget(budget, recipe, settings, folder)
    return dataclasses.replace(settings, searches_plan=True)


def _quantize(folder, output_dir: Path, output_name: str, recipe: Recipe, recorded_sha256: str | None,
              overwrite: bool, budget=None) -> QuantizeResult:
    from onnxquant import __version__
    from onnxquant.data import cut_windows, tokenize_prefix
    from onnxquant.genai_folder import copy_sidecar_files, model_bytes, standard_model_name
    from onnxquant.memory import peak_rss_mb
    from onnxquant.pipeline import quantize_model, scratch_copies, settings_for
    from onnxquant.staging import check_output_dir, owned_temp_dir, require_free_space, staged_output_dir
    from onnxquant.timing import PhaseTimes
    from onnxquant.verification import RunVerifier, held_out_windows

    settings = settings_for(recipe)
    check_output_dir(output_dir, [folder.path], overwrite)
    if budget is not None:
        settings = _search_for(budget, recipe, settings, folder)
    # The output is at most the input's size; each float stage may write a scratch copy of the model.
    input_bytes = model_bytes(folder.path, folder.model_file.name)
    require_free_space(output_dir, input_bytes * (1 + scratch_copies(settings)), f"quantizing {folder.model_file}")
    verify, calib = recipe.verify, recipe.calibration
    kv_cache = recipe.stage(KVCache)
    from onnxquant.kv_cache import KERNEL_DTYPES

    # The result is checked on this machine's CPU: a cache the CPU kernel cannot hold (fp8, written for CUDA)
    # leaves the result unchecked.
    checkable = kv_cache is None or kv_cache.dtype in KERNEL_DTYPES["cpu"]
    quantizes = not settings.skip_quantization or kv_cache is not None
    checks = verify.exact_checks or budget is not None or (verify.collapse_ratio > 0 and quantizes and checkable)
    if verify.collapse_ratio > 0 and quantizes and not checkable:
        log.warning("the %s KV cache has no CPU kernel: the result is written unchecked (no collapse guard)",
                    kv_cache.dtype)
    # A search measures its points on its own held-out windows; the collapse guard then reads the chosen one's.
    windows = verify.windows if budget is None else budget.windows
    window_tokens = calib.seq_len if budget is None else min(budget.window_tokens, folder.context_length or budget.window_tokens)
    samples, verifier, times = None, None, PhaseTimes()
    text, text_name = _text_source(calib)
    sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if recorded_sha256 is not None and recorded_sha256 != sha256:
        fail(f"the calibration text {text_name} is not the one this recipe was made with (sha256 {sha256[:12]}… "
             f"against {recorded_sha256[:12]}…), so the model would differ; pass the same text or drop produced_by")
    if settings.needs_calibration or checks:
        calibrated = calib.samples if settings.needs_calibration else 0
        ids = tokenize_prefix(folder.path, text, calibrated * calib.seq_len + windows * window_tokens)
        if settings.needs_calibration:
            samples = cut_windows(ids, calib.seq_len, calib.samples, "calibration text")
        if checks:
            with times.phase("verify_float"):
                held_out = (held_out_windows(ids, calibrated, calib.seq_len, windows) if budget is None else
                            held_out_windows(ids[calibrated * calib.seq_len:], 0, window_tokens, windows))
                verifier = RunVerifier(folder, *held_out,
                                       verify.exact_checks, settings.segment_bytes)
    quality, search, int8_activations = None, None, None
    if budget is not None:
        from onnxquant.mixed_precision import PlanSearch

        search = PlanSearch(budget, recipe, verifier)
    with staged_output_dir(output_dir) as staging, owned_temp_dir(".onnxquant-scratch-",
                                                                  output_dir.absolute().parent) as scratch:
        report = quantize_model(folder, staging / output_name, settings, samples, scratch,
                                after_checkpoint=verifier.after_stage if verifier and verify.exact_checks else None,
                                times=times, plan_search=search)
        copy_sidecar_files(folder, staging, output_name)
        if kv_cache is not None:
            from onnxquant.kv_cache import target_provider, write_kv_cache_config

            write_kv_cache_config(staging / "genai_config.json", target_provider(folder))
        provenance = {"onnxquant": __version__, "input": str(folder.path.absolute()),
                      "calibration": {"text": text_name, "sha256": sha256, "samples": calib.samples,
                                      "seq_len": calib.seq_len}}
        if search is not None:
            recipe = search.chosen_recipe
            provenance["mixed_precision"] = search.result.to_dict()
        import yaml

        (staging / RECIPE_FILE).write_text(
            yaml.safe_dump({**recipe.to_dict(), "produced_by": provenance}, sort_keys=False, width=120), encoding="utf-8")
        if search is not None:
            quality = collapse_guard(search.quality, recipe, settings)
        elif verifier is not None and quantizes and checkable:
            with times.phase("verify_result"):
                quality = collapse_guard(verifier.quality(staging / output_name), recipe, settings)
        if verifier is not None and quantizes and checkable:
            with times.phase("verify_int8_activations"):
                int8_activations = int8_activation_guard(verifier, staging / output_name, recipe)
    size_mb = model_bytes(output_dir, output_name) / 1e6
    standard_mb = model_bytes(output_dir, standard_model_name(output_name)) / 1e6
    peak = peak_rss_mb()
    summary = report.summary(settings, peak, size_mb) + (f" standard_size_mb={standard_mb:.1f}" if standard_mb else "")
    if search is not None:
        summary += f" budget={budget.describe()} points_measured={len(search.result.points)}"
    if kv_cache is not None:
        from onnxquant.kv_cache import cache_size

        summary += " " + cache_size(folder, kv_cache.dtype).summary()
    if int8_activations is not None:
        summary += f" int8_activation_agreement={int8_activations.agreement:.3f} int8_activation_kl={int8_activations.kl_mean:.4f}"
    return QuantizeResult(output_dir / output_name, recipe, size_mb, standard_mb, report.seconds, peak,
                          dict(times.seconds), quality, dict(verifier.exact_errors) if verifier else {}, report, summary,
                          None if search is None else search.result, int8_activations)


def int8_activation_guard(verifier, model_file: Path, recipe: Recipe):
    """Refuse (Int8ActivationError, exit 3) a result whose accuracy_level-4 MatMulNBits pick other tokens than the
    same weights with float activations, beyond the recipe's verify bounds, unless verify.allow_degraded keeps it."""
    from onnxquant.verification import Int8ActivationError, int8_activation_message

    report = verifier.int8_activations(model_file)
    if report is None:
        return None
    log.info("%s", report.summary())
    bounds = recipe.verify
    if report.agreement < bounds.int8_activation_agreement or not report.kl_mean <= bounds.int8_activation_kl:
        message = int8_activation_message(report, bounds.int8_activation_agreement, bounds.int8_activation_kl,
                                          len(verifier.windows))
        if not bounds.allow_degraded:
            raise Int8ActivationError(message)
        log.warning("%s; kept because verify.allow_degraded is set", message)
    return report


def collapse_guard(quality, recipe: Recipe, settings):
    """Refuse a collapsed result (CollapsedModelError, exit 3) unless verify.allow_degraded keeps it; a result
    whose logits are not finite is refused whatever the limit."""
    from onnxquant.verification import CollapsedModelError, collapse_message

    limit = recipe.verify.collapse_ratio
    # A NaN ratio compares False with any limit: a model whose logits are not finite has collapsed whatever
    # the limit, and allow_degraded does not keep it (it keeps a worse model, not a broken one).
    finite = math.isfinite(quality.ratio)
    if not finite or (limit and quality.ratio > limit):
        message = collapse_message(quality, limit, settings.scheme.name, settings.sq_alpha is not None)
        if not finite or not recipe.verify.allow_degraded:
            raise CollapsedModelError(message)
        log.warning("the collapse guard fired (%s); kept because verify.allow_degraded is set", quality.summary())
    return quality


def _require_export_memory(name: str, model_bytes: int, available: int | None) -> None:
    """Refuse an export whose builder would not fit in memory, naming the largest model that would."""
    from onnxquant.exporter import EXPORT_PEAK_BASE, EXPORT_PEAK_RATIO, export_peak_bytes

    needed = export_peak_bytes(model_bytes)
    if available is not None and needed > available:
        largest = max(0.0, (available - EXPORT_PEAK_BASE) / EXPORT_PEAK_RATIO)
        fail(f"exporting {name} needs about {needed / 1e9:.1f} GB of memory (the ORT-GenAI builder holds the whole "
             f"float32 model, {model_bytes / 1e9:.1f} GB) but {available / 1e9:.1f} GB are available: the largest model "
             f"that fits here is about {largest / 4e9:.1f} B parameters; free memory or export on a larger machine")


def export(model: str | Path | None, output: str | Path, *, precision: str = "fp32", execution_provider: str = "cpu",
           exporter: str = "builder", optimum_python: str | None = None, overwrite: bool = False) -> Path:
    """Export a Hugging Face checkpoint folder or GGUF file (None: the embedded SmolLM2-135M-Instruct) into the
    new ORT-GenAI folder `output`, with the ORT-GenAI model builder or optimum; returns the folder.

    >>> export(None, "runs/smollm2-fp32")  # doctest: +SKIP
    PosixPath('runs/smollm2-fp32')
    """
    from onnxquant.checkpoint import float32_export_bytes, float32_model_bytes, resolve_model_source
    from onnxquant.exporter import export_model
    from onnxquant.optimum_export import optimum_python as find_optimum_python
    from onnxquant.staging import available_memory_bytes, check_output_dir, claimed_output, require_free_space

    source = resolve_model_source(None if model is None else str(model))
    output = Path(output)
    optimum = None
    if exporter == "optimum":
        if (precision, execution_provider) != ("fp32", "cpu"):
            fail("the optimum exporter writes fp32 models for the CPU; drop --precision and --execution_provider")
        optimum = find_optimum_python(optimum_python)
    elif exporter != "builder":
        fail(f"unknown exporter {exporter!r}; use builder or optimum")
    elif optimum_python is not None:
        fail("--optimum_python applies to --exporter optimum; add --exporter optimum or drop it")
    if precision == "fp16" and execution_provider == "cpu":
        fail("the ORT-GenAI builder makes fp16 models only for cuda or dml; use --precision fp32 for the CPU")
    with claimed_output(output):
        check_output_dir(output, [source.path], overwrite)
        require_free_space(output, float32_export_bytes(source), f"exporting {source.path.name}")
        if optimum is None:
            _require_export_memory(source.path.name, float32_model_bytes(source), available_memory_bytes())
        export_model(source, output, precision, execution_provider, optimum)
    return output


def _windows(folders: list, text: str | Path | None, block_size: int, max_blocks: int | None, backend: str):
    """The evaluation windows of the first folder's tokenization, after checking the settings against every folder."""
    from onnxquant.data import resolve_text
    from onnxquant.evaluation import BACKENDS, eval_windows

    if block_size < 2:
        fail(f"--block_size must be at least 2, got {block_size}")
    if max_blocks is not None and max_blocks < 1:
        fail(f"--max_blocks must be at least 1, got {max_blocks}")
    if backend not in BACKENDS:
        fail(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
    for folder in folders:
        folder.check_fits_context(block_size, "--block_size")
    return eval_windows(folders[0], resolve_text(text, None, "test"), block_size, max_blocks)


def evaluate(model: str | Path, *, text: str | Path | None = None, block_size: int = 2048, max_blocks: int | None = None,
             backend: str = "genai", progress: bool = True):
    """WikiText-2 perplexity (or of the text file `text`) of an ORT-GenAI folder, over consecutive windows of
    `block_size` tokens each run from an empty cache; returns `PerplexityResult` (perplexity, blocks, tokens,
    seconds, block_nll). A model whose logits are not finite is an error, not a perplexity.

    >>> evaluate("runs/smollm2-fp32", max_blocks=16).perplexity  # doctest: +SKIP
    20.8217...
    """
    from onnxquant.evaluation import evaluate_perplexity
    from onnxquant.genai_folder import open_genai_folder

    folder = open_genai_folder(model)
    windows = _windows([folder], text, block_size, max_blocks, backend)
    result = evaluate_perplexity(folder, windows, backend, progress)
    if not math.isfinite(result.perplexity):
        fail(f"the perplexity of {folder.path} is {result.perplexity} (its logits are not finite): the model is broken; "
             "re-quantize it from the float export")
    return result


def compare(model: str | Path, reference: str | Path, *, text: str | Path | None = None, block_size: int = 2048,
            max_blocks: int | None = None, backend: str = "genai", progress: bool = True):
    """`model` against `reference` (its float model) on the same windows: both perplexities, the KL divergence
    of the token distributions (mean, median, 99th percentile, maximum), top-1 agreement and the mean change
    in the probability of the correct token; returns `ComparisonResult`.

    >>> print(compare("runs/smollm2-w8a8", "runs/smollm2-fp32", max_blocks=4).summary())  # doctest: +SKIP
    """
    from onnxquant.evaluation import compare_models
    from onnxquant.genai_folder import open_genai_folder

    folder, ref = open_genai_folder(model), open_genai_folder(reference)
    if folder.vocab_size != ref.vocab_size:
        fail(f"{folder.path} and {ref.path} have different vocabularies ({folder.vocab_size} and {ref.vocab_size} "
             "tokens); compare a quantized model with the float model it was made from")
    windows = _windows([folder, ref], text, block_size, max_blocks, backend)
    result = compare_models(folder, ref, windows, backend, progress)
    if not math.isfinite(result.perplexity) or not math.isfinite(result.kl_mean):
        fail(f"the logits of {folder.path} are not finite: the model is broken; re-quantize it from the float export")
    return result


def generate(model: str | Path, prompt: str, *, max_new_tokens: int = 64, chat_template: bool = True) -> str:
    """Greedy generation through ORT-GenAI: the answer to `prompt` (with the model's chat template).

    >>> print(generate("runs/smollm2-w8a8", "What is the capital of France?", max_new_tokens=16))  # doctest: +SKIP
    """
    from onnxquant.generation import GreedyGenerator
    from onnxquant.genai_folder import open_genai_folder

    if max_new_tokens < 1:
        fail(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompt.strip():
        fail("--prompt is empty; give the text to answer")
    folder = open_genai_folder(model)
    generator = GreedyGenerator(folder)
    ids = generator.prompt_ids(prompt, chat_template)
    folder.check_fits_context(len(ids) + max_new_tokens, "the prompt plus --max_new_tokens")
    return generator.generate(ids, max_new_tokens).text


__all__ = ["QuantizeResult", "RECIPE_FILE", "Recipe", "RecipeError", "UserError", "compare", "evaluate", "export",
           "generate", "quantize"]
