"""`python -m onnxquant.quantize`: QuaRot R1 (--include_rotation) -> SmoothQuant (--include_sq) ->
INT8 QDQ, or 4-bit MatMulNBits (--algo rtn|awq|gptq), on an ORT-GenAI folder. Flags follow AMD Quark's
ONNX LLM example; the stages live in onnxquant.pipeline, this module only reads the command line."""

from __future__ import annotations

import argparse
import math
import dataclasses
from pathlib import Path

from onnxquant.cli import HelpFormatter
from onnxquant.data import cut_windows, resolve_text, tokenize_prefix
from onnxquant.emitters.qdq import has_column_scales
from onnxquant.errors import fail, run_cli
from onnxquant.genai_folder import copy_sidecar_files, model_bytes, open_genai_folder, standard_model_name
from onnxquant.memory import peak_rss_mb, share_one_malloc_arena
from onnxquant.pipeline import QuantizeSettings, RotationSettings, quantize_model
from onnxquant.schemes import ALGORITHMS, COLUMN_SCALE_PLACEMENTS, SCHEMES, NodeOverride, get_scheme, uint8_blocks
from onnxquant.segments import DEFAULT_SEGMENT_MB
from onnxquant.spec import BLOCK_SIZES, E8M0_ROUNDINGS
from onnxquant.staging import check_output_dir, claimed_output, owned_temp_dir, require_free_space, staged_output_dir
from onnxquant.timing import PhaseTimes
from onnxquant.verification import (DEFAULT_COLLAPSE_RATIO, CollapsedModelError, RunVerifier, collapse_message,
                                    held_out_windows)

VERIFY_WINDOWS = 4
HADAMARD_GROUP_SIZES = (16, 32, 64, 128)


def build_parser(prog: str = "python -m onnxquant.quantize") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--input_model_path", required=True, help="model.onnx of an ORT-GenAI folder (or the folder)")
    add("--output_model_path", required=True, help="model.onnx in a new folder (or the folder)")
    add("--config", default="INT8_TRANSFORMER_DEFAULT", help=f"scheme: {', '.join(SCHEMES)}")
    add("--block_size", type=int, default=None, help="blocked weight schemes: weights per block along K (16..256, power of two; default: the scheme's, 128 for 4-bit, 32 for MX, 16 for NVFP4)")
    add("--algo", choices=ALGORITHMS, default=None,
        help="weight rounding (default rtn); gptq for every scheme, awq for the weight-only ones")
    add("--accuracy_level", type=int, default=0, help="MatMulNBits accuracy_level: 0, 1, 2 or 4 (int8 compute)")
    add("--clip_search", action="store_true", help="RTN: per-block clip ratio minimizing the block's error")
    add("--column_scales", choices=COLUMN_SCALE_PLACEMENTS, default=None,
        help="per-channel int8 weights: apply the column scales by a Mul after an integer MatMul with one scalar "
             "scale (default; faster decode on ORT's CPU kernels) or inside the fused kernel (in_kernel; no extra "
             "pass over the output, for prefill-heavy use)")
    add("--mx_scale_rounding", choices=E8M0_ROUNDINGS, default=None,
        help="MX schemes: E8M0 block scales by OCP's floor rule (default; a block's largest values may saturate) "
             "or rceil (the smallest power of two that does not saturate)")
    add("--int8_nodes", action="append", default=[], help="blocked weight schemes: keep nodes matching this at 8 bits (repeatable), e.g. lm_head")
    add("--num_calib_data", type=int, default=64, help="number of calibration samples")
    add("--seq_len", type=int, default=512, help="tokens per calibration sample")
    add("--calib_data", default=None, help="calibration text file (default: the embedded WikiText-2 validation split)")
    add("--dataset", choices=("wikitext2", "pileval"), default=None,
        help="load this dataset from the Hugging Face hub with `datasets` instead of --calib_data")
    add("--use_moving_average", action="store_true", help="moving-average MinMax observers")
    add("--moving_average_constant", type=float, default=0.01)
    add("--calib_method", default="minmax", help="activation ranges: minmax, percentile+<p> (e.g. percentile+99.999) or mse (the range minimizing quantization error)")
    add("--exclude", action="append", default=[], help="leave nodes whose name contains this in float (repeatable)")
    add("--exclude_most_sensitive", type=int, default=0, metavar="N",
        help="mixed precision: keep the N MatMuls with the largest modelled output error (weight and activation grids, "
             "from the calibration Hessian) in float")
    add("--hessian_token_stride", type=int, default=1, metavar="N",
        help="gptq, awq, --exclude_most_sensitive: gather the calibration Hessian from every N-th token of each sample "
             "(default 1: all); its in-graph products cost about as much as the model's own MatMuls, N divides that cost")
    add("--sq_num_calib_data", type=int, default=None, metavar="N",
        help="SmoothQuant: choose the scales from the channel maxima of the first N calibration samples (default: "
             "all); the quantizer's ranges and Hessians still use every sample. When R4 or Hadamard groups follow "
             "smoothing, the smoothing pass then runs on N samples only (the main job: 16 of 64)")
    add("--include_rotation", action="store_true", help="apply the QuaRot R1 rotation")
    add("--r_config_path", default=None, help="rotation config JSON (default: rotation_configs/<family>.json)")
    add("--hidden_size", type=int, default=None, help="rotation size; must equal the model's hidden size")
    add("--use_random_had", action="store_true", help="multiply the Hadamard by a seeded random ±1 diagonal")
    add("--seed", type=int, default=0)
    add("--hadamard_group_size", type=int, default=None,
        help="block-diagonal Hadamard groups of this size (16, 32, 64 or 128) on every quantized MatMul's input, folded into its weight")
    add("--include_r4", action="store_true",
        help="QuaRot R4: a full online Hadamard (in Kronecker-factored form) on every down_proj input, folded into its weight")
    add("--include_sq", action="store_true", help="apply SmoothQuant, folded into the graph")
    add("--sq_alpha", default=None,
        help="SmoothQuant migration strength in (0, 1) (default: the scheme's), or auto: each activation's alpha "
             "from 0.3..0.8 by the modelled output error of its readers (weight and activation grids, calibration Hessian)")
    add("--skip_quantization", action="store_true", help="run only the graph passes; write a float model")
    add("--overwrite", action="store_true", help="replace a non-empty output folder")
    add("--verify", action="store_true", help="also check that each float stage (rotation, smoothing, Hadamard groups) left the logits exact")
    add("--collapse_ratio", type=float, default=DEFAULT_COLLAPSE_RATIO,
        help="refuse the result when its quick perplexity exceeds the float model's by this factor (0: no check)")
    add("--allow_degraded", action="store_true", help="keep the output even when the collapse guard fires")
    add("--segment_mb", type=float, default=DEFAULT_SEGMENT_MB,
        help="run calibration and the verification probe in consecutive pieces of the model holding about this many "
             "MB of weights each (a model within it runs whole), which bounds memory on large models")
    return parser


def parse_calib_method(value: str) -> dict:
    if value in ("minmax", "mse"):
        return {"method": value}
    head, _, number = value.partition("+")
    try:
        percentile = float(number or 99.999) if head == "percentile" else -1.0
    except ValueError:
        percentile = -1.0
    if not 50.0 < percentile <= 100.0:
        fail(f"--calib_method {value!r} is not minmax, mse or percentile+<p> with p in (50, 100], e.g. percentile+99.999")
    return {"method": "percentile", "percentile": percentile}


def parse_alpha(value: str) -> float:
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0.0 < alpha < 1.0:
        fail(f"--sq_alpha must be between 0 and 1 (exclusive) or auto, got {value}")
    return alpha


def settings_from_args(args) -> QuantizeSettings:
    scheme = get_scheme(args.config)
    if not 0.0 < args.moving_average_constant <= 1.0:
        fail(f"--moving_average_constant must be in (0, 1], got {args.moving_average_constant}")
    scheme = scheme.with_calibration(moving_average=args.use_moving_average, averaging_constant=args.moving_average_constant,
                                     **parse_calib_method(args.calib_method))
    blocked = scheme.weights.granularity == "per_block"
    if args.algo == "awq" and scheme.activations is not None:
        fail(f"--algo awq applies to the weight-only schemes (its scales fold like SmoothQuant's, which "
             f"quantized activations take through --include_sq), not {scheme.name}; use --algo gptq or --include_sq")
    for flag, value in (("--block_size", args.block_size), ("--int8_nodes", args.int8_nodes or None)):
        if value is not None and not blocked:
            blocked_schemes = ", ".join(name for name, s in SCHEMES.items() if s.weights.granularity == "per_block")
            fail(f"{flag} applies to the blocked weight schemes ({blocked_schemes}), not {scheme.name}")
    if args.block_size is not None and args.block_size not in BLOCK_SIZES:
        fail(f"--block_size {args.block_size} is not a power of two in 16..256; use one of {', '.join(map(str, BLOCK_SIZES))}")
    if args.column_scales is not None and not has_column_scales(scheme.weights):
        per_channel = ", ".join(name for name, s in SCHEMES.items() if has_column_scales(s.weights))
        fail(f"--column_scales applies to the per-channel int8 weight schemes ({per_channel}), not {scheme.name}")
    if args.accuracy_level not in (0, 1, 2, 4):
        fail(f"--accuracy_level {args.accuracy_level} is not 0, 1, 2 or 4")
    if args.mx_scale_rounding is not None:
        if scheme.weights.scale_dtype != "e8m0":
            mx_schemes = ", ".join(name for name, s in SCHEMES.items() if s.weights.scale_dtype == "e8m0")
            fail(f"--mx_scale_rounding applies to the MX schemes ({mx_schemes}), not {scheme.name}")
        scheme = scheme.with_scale_rounding(args.mx_scale_rounding)
    block_size = args.block_size or scheme.weights.block_size
    scheme = scheme.with_block_size(block_size) if blocked else scheme
    overrides = [NodeOverride(p, uint8_blocks(block_size)) for p in args.int8_nodes] + [NodeOverride(p) for p in args.exclude]
    scheme = dataclasses.replace(scheme, overrides=tuple(overrides), algo=args.algo or scheme.algo,
                                 accuracy_level=args.accuracy_level, clip_search=args.clip_search,
                                 column_scales=args.column_scales or scheme.column_scales)
    rotation = RotationSettings(Path(args.r_config_path) if args.r_config_path else None, args.hidden_size,
                                args.use_random_had, args.seed) if args.include_rotation else None
    sq_alpha, sq_alpha_search = None, args.sq_alpha == "auto"
    if args.sq_alpha is not None and not args.include_sq:
        fail("--sq_alpha applies to SmoothQuant; add --include_sq or drop --sq_alpha")
    if args.include_sq:
        sq_alpha = scheme.sq_alpha if args.sq_alpha is None or sq_alpha_search else parse_alpha(args.sq_alpha)
    group = args.hadamard_group_size
    if group is not None and group not in HADAMARD_GROUP_SIZES:
        fail(f"--hadamard_group_size {group} is not one of {', '.join(map(str, HADAMARD_GROUP_SIZES))}")
    if args.exclude_most_sensitive < 0:
        fail(f"--exclude_most_sensitive {args.exclude_most_sensitive} is negative; pass a count of MatMuls (0: none)")
    if args.hessian_token_stride < 1 or args.hessian_token_stride > args.seq_len:
        fail(f"--hessian_token_stride must be between 1 and --seq_len ({args.seq_len}), got {args.hessian_token_stride}")
    if args.sq_num_calib_data is not None:
        if not args.include_sq:
            fail("--sq_num_calib_data applies to SmoothQuant; add --include_sq or drop --sq_num_calib_data")
        if not 1 <= args.sq_num_calib_data <= args.num_calib_data:
            fail(f"--sq_num_calib_data must be between 1 and --num_calib_data ({args.num_calib_data}), got {args.sq_num_calib_data}")
    if not 0 < args.segment_mb < float("inf"):
        fail(f"--segment_mb must be a positive number of MB, got {args.segment_mb:g}")
    return QuantizeSettings(scheme, rotation, sq_alpha, args.skip_quantization, sq_alpha_search=sq_alpha_search,
                            hadamard_group_size=group, r4=args.include_r4,
                            exclude_most_sensitive=args.exclude_most_sensitive, hessian_token_stride=args.hessian_token_stride,
                            sq_num_calib_data=args.sq_num_calib_data,
                            segment_bytes=int(args.segment_mb * (1 << 20)))


def main(argv: list[str] | None = None, prog: str = "python -m onnxquant.quantize") -> int:
    args = build_parser(prog).parse_args(argv)
    settings = settings_from_args(args)
    share_one_malloc_arena()
    folder = open_genai_folder(args.input_model_path)
    folder.check_fits_context(args.seq_len, "--seq_len")
    out = Path(args.output_model_path)
    output_dir, output_name = (out.parent, out.name) if out.suffix == ".onnx" else (out, "model.onnx")
    with claimed_output(output_dir):
        return _quantize(args, settings, folder, output_dir, output_name)


def _quantize(args, settings: QuantizeSettings, folder, output_dir: Path, output_name: str) -> int:
    check_output_dir(output_dir, [folder.path], args.overwrite)
    # The output is at most the input's size; each float stage (rotation, smoothing, Hadamard groups) writes a scratch copy.
    input_bytes = model_bytes(folder.path, folder.model_file.name)
    float_stages = sum(x is not None for x in (settings.rotation, settings.sq_alpha, settings.hadamard_group_size)) + settings.r4
    require_free_space(output_dir, input_bytes * (1 + float_stages), f"quantizing {folder.model_file}")
    if args.num_calib_data < 1 or args.seq_len < 2:
        fail("--num_calib_data must be at least 1 and --seq_len at least 2")
    if args.collapse_ratio < 0 or 0 < args.collapse_ratio <= 1:
        fail(f"--collapse_ratio must be above 1 (or 0 to turn the check off), got {args.collapse_ratio}")
    checks = args.verify or (args.collapse_ratio > 0 and not settings.skip_quantization)
    samples, verifier, times = None, None, PhaseTimes()
    if settings.needs_calibration or checks:
        calibrated = args.num_calib_data if settings.needs_calibration else 0
        ids = tokenize_prefix(folder.path, resolve_text(args.calib_data, args.dataset, "validation"),
                              (calibrated + VERIFY_WINDOWS) * args.seq_len)
        if settings.needs_calibration:
            samples = cut_windows(ids, args.seq_len, args.num_calib_data, "calibration text")
        if checks:
            with times.phase("verify_float"):
                verifier = RunVerifier(folder, *held_out_windows(ids, calibrated, args.seq_len, VERIFY_WINDOWS), args.verify,
                                       settings.segment_bytes)
    with staged_output_dir(output_dir) as staging, owned_temp_dir(".onnxquant-scratch-",
                                                                  output_dir.absolute().parent) as scratch:
        report = quantize_model(folder, staging / output_name, settings, samples, Path(scratch),
                                after_checkpoint=verifier.after_stage if verifier and args.verify else None, times=times)
        copy_sidecar_files(folder, staging, output_name)
        if verifier is not None:
            with times.phase("verify_result"):
                guard(verifier, staging / output_name, settings, args)
    size_mb = model_bytes(output_dir, output_name) / 1e6
    standard_mb = model_bytes(output_dir, standard_model_name(output_name)) / 1e6
    print(times.summary(), flush=True)
    print(report.summary(settings, peak_rss_mb(), size_mb) + (f" standard_size_mb={standard_mb:.1f}" if standard_mb else ""))
    return 0


def guard(verifier: RunVerifier, model_file: Path, settings: QuantizeSettings, args) -> None:
    """Print the verification line; refuse a collapsed result unless --allow_degraded."""
    parts = [verifier.summary()]
    if not settings.skip_quantization:
        quality = verifier.quality(model_file)
        parts.append(quality.summary())
        # A NaN ratio compares False with any limit: a model whose logits are not finite has collapsed whatever
        # the limit, and --allow_degraded does not keep it (it keeps a worse model, not a broken one).
        finite = math.isfinite(quality.ratio)
        if not finite or (args.collapse_ratio and quality.ratio > args.collapse_ratio):
            message = collapse_message(quality, args.collapse_ratio, settings.scheme.name, settings.sq_alpha is not None)
            if not finite or not args.allow_degraded:
                raise CollapsedModelError(message)
            parts.append("degraded=kept (--allow_degraded)")
    print("verify: " + " ".join(part for part in parts if part), flush=True)


if __name__ == "__main__":
    run_cli(main)
