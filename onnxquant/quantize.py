"""`python -m onnxquant.quantize`: graph passes and calibrated quantization of an ORT-GenAI folder.

Order: QuaRot R1 rotation (--include_rotation) -> SmoothQuant (--include_sq) -> quantization
(INT8 QDQ, or 4-bit MatMulNBits with --algo rtn|awq|gptq). Flags follow AMD Quark's ONNX LLM
example. The stages live in onnxquant.pipeline; this module only reads the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import tempfile
from pathlib import Path

from onnxquant.data import calibration_windows, load_hub_text, read_text_file
from onnxquant.errors import fail, run_cli
from onnxquant.genai_folder import copy_sidecar_files, open_genai_folder
from onnxquant.pipeline import QuantizeSettings, RotationSettings, quantize_model
from onnxquant.schemes import ALGORITHMS, SCHEMES, NodeOverride, get_scheme, uint8_blocks
from onnxquant.spec import BLOCK_SIZES
from onnxquant.staging import check_output_dir, staged_output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onnxquant.quantize", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--input_model_path", required=True, help="model.onnx of an ORT-GenAI folder (or the folder)")
    add("--output_model_path", required=True, help="model.onnx in a new folder (or the folder)")
    add("--config", default="INT8_TRANSFORMER_DEFAULT", help=f"scheme: {', '.join(SCHEMES)}")
    add("--block_size", type=int, default=None, help="4-bit schemes: weights per block along K (16..256, power of two)")
    add("--algo", choices=ALGORITHMS, default=None, help="4-bit schemes: weight rounding (default rtn)")
    add("--accuracy_level", type=int, default=0, help="MatMulNBits accuracy_level: 0, 1, 2 or 4 (int8 compute)")
    add("--clip_search", action="store_true", help="RTN: per-block clip ratio minimizing the block's error")
    add("--int8_nodes", action="append", default=[], help="4-bit schemes: keep nodes matching this at 8 bits (repeatable), e.g. lm_head")
    add("--num_calib_data", type=int, default=64, help="number of calibration samples")
    add("--seq_len", type=int, default=512, help="tokens per calibration sample")
    add("--calib_data", default=None, help="calibration text file, e.g. ../shared/data/wikitext-2/wiki.valid.tokens")
    add("--dataset", choices=("wikitext2", "pileval"), default="wikitext2", help="hub dataset when --calib_data is not given")
    add("--use_moving_average", action="store_true", help="moving-average MinMax observers")
    add("--moving_average_constant", type=float, default=0.01)
    add("--calib_method", default="minmax", help="minmax or percentile+<p> (e.g. percentile+99.999)")
    add("--exclude", action="append", default=[], help="leave nodes whose name contains this in float (repeatable)")
    add("--include_rotation", action="store_true", help="apply the QuaRot R1 rotation")
    add("--r_config_path", default=None, help="rotation config JSON (default: rotation_configs/<family>.json)")
    add("--hidden_size", type=int, default=None, help="rotation size; must equal the model's hidden size")
    add("--use_random_had", action="store_true", help="multiply the Hadamard by a seeded random ±1 diagonal")
    add("--seed", type=int, default=0)
    add("--include_sq", action="store_true", help="apply SmoothQuant, folded into the graph")
    add("--sq_alpha", type=float, default=None, help="SmoothQuant migration strength in (0, 1) (default: the scheme's)")
    add("--skip_quantization", action="store_true", help="run only the graph passes; write a float model")
    add("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def parse_calib_method(value: str) -> dict:
    if value == "minmax":
        return {"method": "minmax"}
    number = value.partition("+")[2] if value.startswith("percentile") else "x"
    try:
        percentile = float(number) if number else 99.999
    except ValueError:
        fail(f"--calib_method {value!r} is not minmax or percentile+<p> with p in (50, 100], e.g. percentile+99.999")
    if not 50.0 < percentile <= 100.0:
        fail(f"--calib_method {value!r}: the percentile must be a number in (50, 100], e.g. percentile+99.999")
    return {"method": "percentile", "percentile": percentile}


def settings_from_args(args) -> QuantizeSettings:
    scheme = get_scheme(args.config)
    if not 0.0 < args.moving_average_constant <= 1.0:
        fail(f"--moving_average_constant must be in (0, 1], got {args.moving_average_constant}")
    scheme = scheme.with_calibration(moving_average=args.use_moving_average, averaging_constant=args.moving_average_constant,
                                     **parse_calib_method(args.calib_method))
    blocked = scheme.weights.granularity == "per_block"
    for flag, value in (("--block_size", args.block_size), ("--algo", args.algo), ("--int8_nodes", args.int8_nodes or None)):
        if value is not None and not blocked:
            fail(f"{flag} applies to the 4-bit schemes (UINT4_PER_GROUP_ASYM, INT4_PER_GROUP_SYM), not {scheme.name}")
    if args.block_size is not None and args.block_size not in BLOCK_SIZES:
        fail(f"--block_size {args.block_size} is not a power of two in 16..256; use one of {', '.join(map(str, BLOCK_SIZES))}")
    if args.accuracy_level not in (0, 1, 2, 4):
        fail(f"--accuracy_level {args.accuracy_level} is not 0, 1, 2 or 4")
    block_size = args.block_size or scheme.weights.block_size
    changes = {"algo": args.algo or scheme.algo, "accuracy_level": args.accuracy_level, "clip_search": args.clip_search}
    if blocked:
        changes["weights"] = dataclasses.replace(scheme.weights, block_size=block_size)
        changes["embedding"] = dataclasses.replace(scheme.embedding, block_size=block_size)
    overrides = [NodeOverride(p, uint8_blocks(block_size)) for p in args.int8_nodes] + [NodeOverride(p) for p in args.exclude]
    scheme = dataclasses.replace(scheme, overrides=tuple(overrides), **changes)
    rotation = None
    if args.include_rotation:
        rotation = RotationSettings(Path(args.r_config_path) if args.r_config_path else None, args.hidden_size,
                                    args.use_random_had, args.seed)
    sq_alpha = None
    if args.include_sq:
        sq_alpha = scheme.sq_alpha if args.sq_alpha is None else args.sq_alpha
        if not 0.0 < sq_alpha < 1.0:
            fail(f"--sq_alpha must be between 0 and 1 (exclusive), got {sq_alpha}")
    return QuantizeSettings(scheme, rotation, sq_alpha, args.skip_quantization)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    folder = open_genai_folder(args.input_model_path)
    out = Path(args.output_model_path)
    output_dir, output_name = (out.parent, out.name) if out.suffix == ".onnx" else (out, "model.onnx")
    check_output_dir(output_dir, [folder.path], args.overwrite)
    if args.num_calib_data < 1 or args.seq_len < 2:
        fail("--num_calib_data must be at least 1 and --seq_len at least 2")
    samples = None
    if settings.needs_calibration:
        text = read_text_file(args.calib_data) if args.calib_data else load_hub_text(args.dataset, "validation")
        samples = calibration_windows(folder.path, text, args.num_calib_data, args.seq_len)
    with staged_output_dir(output_dir) as staging, tempfile.TemporaryDirectory(
            prefix=".onnxquant-scratch-", dir=output_dir.absolute().parent) as scratch:
        report = quantize_model(folder, staging / output_name, settings, samples, Path(scratch))
        copy_sidecar_files(folder, staging)
        if output_name != folder.model_file.name:
            config = copy.deepcopy(folder.config)
            config["model"]["decoder"]["filename"] = output_name
            (staging / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    size_mb = sum(f.stat().st_size for f in output_dir.iterdir() if f.name.startswith(output_name)) / 1e6
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extras = f" rotation=R1" if settings.rotation is not None else ""
    if settings.sq_alpha is not None:
        extras += f" smoothed={report.smoothed} sq_alpha={settings.sq_alpha} sq_inserted_muls={len(report.inserted_muls)}"
    if report.calibration_passes and (settings.sq_alpha is not None or settings.scheme.algo != "rtn"):
        extras += f" calibration_passes={report.calibration_passes}"
    config_name = "none(float)" if settings.skip_quantization else settings.scheme.name
    algo = f" algo={settings.scheme.algo}" if settings.scheme.weight_only and not settings.skip_quantization else ""
    print(f"quantized={report.quantized_nodes} nodes config={config_name}{algo} seconds={report.seconds:.1f} "
          f"peak_rss_mb={peak_rss_mb:.0f} size_mb={size_mb:.1f}{extras}")
    return 0


if __name__ == "__main__":
    run_cli(main)
