"""`onnxquant quantize`: an ORT-GenAI folder quantized by a recipe (`--recipe w8a8`, a recipe file, or the
Quark-style flags below, which onnxquant.cli.quark_flags maps onto a recipe)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxquant.cli import HelpFormatter
from onnxquant.cli.quark_flags import add_flags, given_flags, recipe_from_flags
from onnxquant.errors import fail, run_cli
from onnxquant.timing import phase_summary


def build_parser(prog: str = "onnxquant quantize") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("input", nargs="?", default=None, help="the float ORT-GenAI folder (or --input_model_path)")
    parser.add_argument("output", nargs="?", default=None, help="a new folder for the result (or --output_model_path)")
    parser.add_argument("--input_model_path", default=None, help="model.onnx of an ORT-GenAI folder (or the folder)")
    parser.add_argument("--output_model_path", default=None, help="model.onnx in a new folder (or the folder)")
    parser.add_argument("--result_json", default=None, metavar="FILE",
                        help="also write the result (sizes, times, peak RSS, quality, the recipe) to FILE as JSON")
    budget = parser.add_argument_group("mixed precision under a measured budget (onnxquant.mixed_precision)")
    budget.add_argument("--max_delta", default=None, metavar="P%",
                        help="the smallest model whose perplexity on held-out calibration windows is within P%% of "
                             "float's (e.g. 3%%): each MatMul and the embedding get a format from quantize.candidates")
    budget.add_argument("--max_size_mb", type=float, default=None, metavar="MB",
                        help="the most accurate model of at most MB megabytes, formats chosen as for --max_delta")
    budget.add_argument("--budget_windows", type=int, default=None, metavar="N",
                        help="held-out windows (of 2048 tokens, or the context if shorter) each measured point runs on (default 2)")
    add_flags(parser)
    return parser


def parse_percent(text: str) -> float:
    """'3%' or '3' -> 0.03."""
    try:
        return float(text.strip().removesuffix("%")) / 100.0
    except ValueError:
        fail(f"--max_delta {text!r} is not a percentage; give one such as 3% or 2.5")


def budget_from(args):
    if args.max_delta is None and args.max_size_mb is None:
        if args.budget_windows is not None:
            fail("--budget_windows applies to --max_delta or --max_size_mb; add one or drop it")
        return None
    from onnxquant.mixed_precision import Budget

    windows = {} if args.budget_windows is None else {"windows": args.budget_windows}
    return Budget(None if args.max_delta is None else parse_percent(args.max_delta), args.max_size_mb, **windows)


def main(argv: list[str] | None = None, prog: str = "onnxquant quantize") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    try:
        recipe = recipe_from_flags(args, given_flags(build_parser, argv))
    except ValueError as exc:  # a combination of flags and recipe the recipe's own checks refuse
        key = f"key {exc.key}: " if getattr(exc, "key", "") else ""
        fail(f"these flags make an invalid recipe: {key}{exc}")
    if args.print_recipe:
        print(recipe.resolved().to_yaml(), end="")
        return 0
    source, target = args.input_model_path or args.input, args.output_model_path or args.output
    if source is None or target is None:
        fail("give the input folder and the output folder (onnxquant quantize IN OUT, or --input_model_path and "
             "--output_model_path)")
    budget = budget_from(args)
    from onnxquant.api import quantize

    result = quantize(source, target, recipe, budget=budget, overwrite=args.overwrite)
    if result.search is not None:
        for number, point in enumerate(result.search.points):
            chosen = " (chosen)" if number == result.search.chosen else ""
            print(f"point {number + 1}: {point.summary()}{chosen}", flush=True)
    if result.quality is not None or result.exact_errors:
        parts = [" ".join(f"exact_{stage}={error:.1e}" for stage, error in result.exact_errors.items())]
        if result.quality is not None:
            parts.append(result.quality.summary() + (" degraded=kept (allow_degraded)" if result.degraded else ""))
        print("verify: " + " ".join(part for part in parts if part), flush=True)
    print(phase_summary(result.phase_seconds), flush=True)
    print(result.summary_line)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_cli(main)
