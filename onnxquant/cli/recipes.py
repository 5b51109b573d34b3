"""`onnxquant recipes`: the built-in recipes, one line each with the figure its file records; `--show NAME`
prints one as YAML (a starting point for a recipe file of your own)."""

from __future__ import annotations

import argparse

from onnxquant.cli import HelpFormatter
from onnxquant.errors import run_cli


def build_parser(prog: str = "onnxquant recipes") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--show", default=None, metavar="NAME", help="print this recipe (a name or a file) in full")
    return parser


def main(argv: list[str] | None = None, prog: str = "onnxquant recipes") -> int:
    from onnxquant.recipes import builtin_recipes, load_recipe

    args = build_parser(prog).parse_args(argv)
    if args.show is not None:
        print(load_recipe(args.show).resolved().to_yaml(), end="")
        return 0
    found = builtin_recipes()
    width = max(len(b.name) for b in found)
    for builtin in found:
        m = builtin.measured
        figure = ""
        if m:
            delta = 100 * (m["perplexity"] / m["float"] - 1)
            figure = f"  [{m['model']}: perplexity {m['perplexity']:.2f} ({delta:+.1f}%), {m['size_mb']:.1f} MB]"
        print(f"{builtin.name:<{width}}  {builtin.recipe.description}{figure}")
    return 0


if __name__ == "__main__":
    run_cli(main)
