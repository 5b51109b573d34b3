"""`python -m onnxquant.quantize`: graph passes and calibrated QDQ placement on an ORT-GenAI folder.

Order: untie embeddings -> fold RMSNorm weights -> QuaRot R1 rotation (--include_rotation) ->
SmoothQuant (--include_sq) -> QDQ placement calibrated through ONNX Runtime. Flags follow AMD
Quark's ONNX LLM example. Each stage writes its model to a scratch folder and the next stage
memory-maps it, so weights stream through one tensor at a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from onnxquant.calibration import ChannelAbsMaxObserver, ChannelExtremaRecorder, make_observer, run_calibration, token_sample_reader
from onnxquant.data import cut_windows, load_hub_text, read_text_file, tokenize_prefix
from onnxquant.errors import fail, run_cli
from onnxquant.genai_folder import GenAIFolder, copy_sidecar_files, open_genai_folder
from onnxquant.graph_utils import constant_weight, nodes_by_name
from onnxquant.hadamard import rotation_matrix
from onnxquant.passes import (FoldNormIntoReadersPass, InsertQDQPass, RotateR1Pass, SmoothQuantPass,
                              UntieEmbeddingsPass)
from onnxquant.passes.insert_qdq import plan_quantization
from onnxquant.passes.rotate_r1 import ROTATION_METADATA_KEY
from onnxquant.passes.smooth_quant import smooth_targets
from onnxquant.rotation_config import load_rotation_config, resolve_pairs
from onnxquant.schemes import SCHEMES, QuantScheme, get_scheme
from onnxquant.staging import check_output_dir, staged_output_dir


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
    exclude: tuple[str, ...] = ()


@dataclass
class QuantizeReport:
    quantized_nodes: int = 0
    smoothed: int = 0
    smooth_muls: int = 0
    calibration_seconds: float = 0.0
    calibration_passes: int = 0
    seconds: float = 0.0


def save_model(model: ir.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=path.name + ".data")


def _rotate(model: ir.Model, folder: GenAIFolder, settings: RotationSettings) -> list[ir.passes.Pass]:
    if ROTATION_METADATA_KEY in model.metadata_props:
        fail(f"{folder.model_file} is already rotated ({model.metadata_props[ROTATION_METADATA_KEY]}); "
             "quantize the unrotated export or drop --include_rotation")
    hidden = folder.hidden_size
    if settings.hidden_size is not None and settings.hidden_size != hidden:
        fail(f"--hidden_size {settings.hidden_size} differs from the model's hidden size {hidden}; drop it or pass {hidden}")
    UntieEmbeddingsPass()(model)
    config = load_rotation_config(settings.config_path, folder.model_type, folder.num_layers)
    pairs = resolve_pairs(config, model.graph)
    rotation = rotation_matrix(hidden, settings.random_hadamard, settings.seed)
    description = {"R1": hidden, "matrix": rotation.kind, "seed": settings.seed, "config": config.source}
    return [FoldNormIntoReadersPass(pairs), RotateR1Pass(pairs, rotation.matrix, description)]


def _run_passes(model: ir.Model, passes: list[ir.passes.Pass]) -> None:
    for graph_pass in tqdm(passes, desc="graph passes", unit="pass", leave=False):
        graph_pass(model)


def quantize_model(folder: GenAIFolder, output_model: Path, settings: QuantizeSettings, samples: np.ndarray | None,
                   scratch: Path) -> QuantizeReport:
    """Write the passed and quantized model to `output_model` (its external data beside it)."""
    report = QuantizeReport()
    start = time.perf_counter()
    current_path = folder.model_file
    model = ir.load(current_path)
    stage = 0

    def checkpoint() -> None:
        """Write the model with its pending weight transforms; continue from the written copy."""
        nonlocal model, current_path, stage
        stage += 1
        current_path = scratch / f"stage{stage}" / "model.onnx"
        save_model(model, current_path)
        model = ir.load(current_path)

    if settings.rotation is not None:
        _run_passes(model, _rotate(model, folder, settings.rotation))
        checkpoint()
    ranges: dict[str, tuple[float, float]] | None = None
    if settings.sq_alpha is not None:
        ranges = _smooth(model, current_path, folder, settings, samples, report)
        checkpoint()
    if not settings.skip_quantization:
        # The embedding gets its own int8 table; untying changes no activation, so the on-disk
        # model still serves calibration and one plan covers both.
        UntieEmbeddingsPass()(model)
        plan = plan_quantization(model.graph, settings.exclude)
        if ranges is None or set(ranges) != set(plan.activations):
            observers = {name: make_observer(settings.scheme.calibration) for name in plan.activations}
            run = run_calibration(current_path, token_sample_reader(current_path, folder, samples), observers)
            report.calibration_seconds += run.seconds
            report.calibration_passes += 1
            ranges = {name: observer.range() for name, observer in observers.items()}
        qdq = InsertQDQPass(settings.scheme, plan, ranges)
        _run_passes(model, [qdq])
        report.quantized_nodes = qdq.quantized_nodes
    save_model(model, output_model)
    report.seconds = time.perf_counter() - start
    return report


# Per-sample channel extrema for one-pass SmoothQuant + QDQ calibration cost 8 bytes per channel
# per sample; above this budget the quantizer calibrates the smoothed model a second time instead.
ONE_PASS_BUDGET_BYTES = 512 * 1024 * 1024


def _smooth(model: ir.Model, model_path: Path, folder: GenAIFolder, settings: QuantizeSettings,
            samples: np.ndarray, report: QuantizeReport) -> dict[str, tuple[float, float]] | None:
    """Fold SmoothQuant into `model` from statistics gathered through ORT on `model_path`.

    When every target folds into a producer and the scheme calibrates with (moving-average)
    MinMax, the same pass also yields the quantizer's activation ranges of the smoothed model
    (see ChannelExtremaRecorder), returned here; otherwise None and the quantizer calibrates again.
    """
    # Untying changes no activation, so the statistics can come from the model file as it is.
    UntieEmbeddingsPass()(model)
    targets = smooth_targets(model.graph, settings.exclude)
    if not targets:
        fail(f"--include_sq: {folder.model_file} has no MatMul with a constant weight left to smooth "
             "(check --exclude); drop --include_sq")
    plan = plan_quantization(model.graph, settings.exclude)
    channels = _channel_count(model.graph, plan)
    one_pass = (not settings.skip_quantization and settings.scheme.calibration.method == "minmax"
                and all(target.kind != "mul" for target in targets)
                and 8 * channels * len(samples) <= ONE_PASS_BUDGET_BYTES)
    if one_pass:
        observers = {name: ChannelExtremaRecorder() for name in plan.activations}
    else:
        observers = {target.activation: ChannelAbsMaxObserver() for target in targets}
    run = run_calibration(model_path, token_sample_reader(model_path, folder, samples), observers,
                          desc="calibration (smoothquant" + (" + ranges)" if one_pass else ")"))
    report.calibration_seconds += run.seconds
    report.calibration_passes += 1
    smooth = SmoothQuantPass(targets, {t.activation: observers[t.activation].absmax for t in targets},
                             settings.sq_alpha)
    _run_passes(model, [smooth])
    report.smoothed, report.smooth_muls = len(targets), smooth.inserted_muls
    if not one_pass:
        return None
    return {name: recorder.replay(make_observer(settings.scheme.calibration), smooth.divisors.get(name)).range()
            for name, recorder in observers.items()}


def _channel_count(graph: ir.Graph, plan) -> int:
    """Total width of the planned activations: each is its readers' weight row count."""
    by_name = nodes_by_name(graph)
    return sum(constant_weight(by_name[readers[0]]).shape[0] for readers in plan.activations.values())


def calibration_windows(folder: GenAIFolder, text: str, count: int, seq_len: int) -> np.ndarray:
    """The first `count` consecutive windows of `seq_len` tokens of `text`, shape [count, seq_len]."""
    ids = tokenize_prefix(folder.path, text, count * seq_len)
    return cut_windows(ids, seq_len, count, "calibration text")


def calibration_samples(folder: GenAIFolder, args) -> np.ndarray:
    text = read_text_file(args.calib_data) if args.calib_data else load_hub_text(args.dataset, "validation")
    return calibration_windows(folder, text, args.num_calib_data, args.seq_len)


def parse_calib_method(value: str) -> dict:
    if value == "minmax":
        return {"method": "minmax"}
    if value.startswith("percentile"):
        _, _, number = value.partition("+")
        try:
            percentile = float(number) if number else 99.999
        except ValueError:
            percentile = -1.0
        if not 50.0 < percentile <= 100.0:
            fail(f"--calib_method {value!r}: the percentile must be a number in (50, 100], e.g. percentile+99.999")
        return {"method": "percentile", "percentile": percentile}
    fail(f"--calib_method {value!r} is not minmax or percentile+<p>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onnxquant.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_model_path", required=True, help="model.onnx of an ORT-GenAI folder (or the folder)")
    parser.add_argument("--output_model_path", required=True, help="model.onnx in a new folder (or the folder)")
    parser.add_argument("--config", default="INT8_TRANSFORMER_DEFAULT", help=f"scheme: {', '.join(SCHEMES)}")
    parser.add_argument("--num_calib_data", type=int, default=64, help="number of calibration samples")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--calib_data", default=None, help="calibration text file, e.g. ../shared/data/wikitext-2/wiki.valid.tokens")
    parser.add_argument("--dataset", choices=("wikitext2", "pileval"), default="wikitext2",
                        help="hub dataset (loaded with `datasets`) when --calib_data is not given")
    parser.add_argument("--use_moving_average", action="store_true",
                        help="moving-average MinMax observers (constant --moving_average_constant)")
    parser.add_argument("--moving_average_constant", type=float, default=0.01)
    parser.add_argument("--calib_method", default="minmax", help="minmax or percentile+<p> (e.g. percentile+99.999)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="leave nodes whose name contains this text in float (repeatable), e.g. --exclude lm_head")
    parser.add_argument("--include_rotation", action="store_true", help="apply the QuaRot R1 rotation")
    parser.add_argument("--r_config_path", default=None, help="rotation config JSON (default: rotation_configs/<family>.json)")
    parser.add_argument("--hidden_size", type=int, default=None, help="rotation size; must equal the model's hidden size")
    parser.add_argument("--use_random_had", action="store_true", help="multiply the Hadamard by a seeded random ±1 diagonal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--include_sq", action="store_true", help="apply SmoothQuant, folded into the graph")
    parser.add_argument("--sq_alpha", type=float, default=None, help="SmoothQuant migration strength in (0, 1) (default: the scheme's)")
    parser.add_argument("--skip_quantization", action="store_true", help="run only the graph passes; write a float model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser



def settings_from_args(args) -> QuantizeSettings:
    scheme = get_scheme(args.config)
    scheme = scheme.with_calibration(moving_average=args.use_moving_average,
                                     averaging_constant=args.moving_average_constant,
                                     **parse_calib_method(args.calib_method))
    if not 0.0 < args.moving_average_constant <= 1.0:
        fail(f"--moving_average_constant must be in (0, 1], got {args.moving_average_constant}")
    rotation = None
    if args.include_rotation:
        rotation = RotationSettings(Path(args.r_config_path) if args.r_config_path else None, args.hidden_size,
                                    args.use_random_had, args.seed)
    sq_alpha = None
    if args.include_sq:
        sq_alpha = scheme.sq_alpha if args.sq_alpha is None else args.sq_alpha
        if not 0.0 < sq_alpha < 1.0:
            fail(f"--sq_alpha must be between 0 and 1 (exclusive), got {sq_alpha}")
    return QuantizeSettings(scheme, rotation, sq_alpha, args.skip_quantization, tuple(args.exclude))


def _output_paths(value: str) -> tuple[Path, str]:
    path = Path(value)
    if path.suffix == ".onnx":
        return path.parent, path.name
    return path, "model.onnx"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    folder = open_genai_folder(args.input_model_path)
    output_dir, output_name = _output_paths(args.output_model_path)
    check_output_dir(output_dir, [folder.path], args.overwrite)
    if args.num_calib_data < 1 or args.seq_len < 2:
        fail("--num_calib_data must be at least 1 and --seq_len at least 2")
    needs_data = not settings.skip_quantization or settings.sq_alpha is not None
    samples = calibration_samples(folder, args) if needs_data else None
    if settings.exclude:
        names = [node.name for node in ir.load(folder.model_file).graph]
        for pattern in settings.exclude:
            if not any(pattern in name for name in names):
                fail(f"--exclude {pattern!r} matches no node in {folder.model_file}; check the node name")
    with staged_output_dir(output_dir) as staging, tempfile.TemporaryDirectory(
        prefix=".onnxquant-scratch-", dir=output_dir.absolute().parent
    ) as scratch:
        report = quantize_model(folder, staging / output_name, settings, samples, Path(scratch))
        copy_sidecar_files(folder, staging)
        if output_name != folder.model_file.name:
            config = copy.deepcopy(folder.config)
            config["model"]["decoder"]["filename"] = output_name
            (staging / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    size_mb = sum(f.stat().st_size for f in output_dir.iterdir() if f.name.startswith(output_name)) / 1e6
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extras = ""
    if settings.sq_alpha is not None:
        extras = f" smoothed={report.smoothed} sq_alpha={settings.sq_alpha} sq_inserted_muls={report.smooth_muls}"
    if settings.rotation is not None:
        extras += " rotation=R1"
    if settings.sq_alpha is not None and report.calibration_passes:
        extras += f" calibration_passes={report.calibration_passes}"
    config_name = "none(float)" if settings.skip_quantization else settings.scheme.name
    print(f"quantized={report.quantized_nodes} nodes config={config_name} seconds={report.seconds:.1f} "
          f"peak_rss_mb={peak_rss_mb:.0f} size_mb={size_mb:.1f}{extras}")
    return 0


if __name__ == "__main__":
    run_cli(main)
