"""`onnxquant`: one command with the subcommands export, quantize, validate, generate, recipes and benchmark.

Each subcommand is the module `onnxquant.cli.<name>` (`python -m onnxquant.cli.<name>` takes the same
flags); every one of them is a thin layer over the Python API in onnxquant.api.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from onnxquant.errors import run_cli

SUBCOMMANDS = {
    "export": ("onnxquant.cli.export", "HF checkpoint folder, GGUF file or the embedded SmolLM2 -> ORT-GenAI folder"),
    "quantize": ("onnxquant.cli.quantize", "quantize an ORT-GenAI folder by a recipe (--recipe w8a8, a file, or flags)"),
    "validate": ("onnxquant.cli.validate", "wikitext-2 perplexity of an ORT-GenAI folder"),
    "generate": ("onnxquant.cli.generate", "greedy generation with the chat template; --compare against another folder"),
    "recipes": ("onnxquant.cli.recipes", "the built-in recipes with their measured figures"),
    "benchmark": ("onnxquant.benchmark.run", "recipes and the peers side by side in one run: perplexity, size, speed"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each flag's default, unless its help names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or action.option_strings == [] or "default" in text
        return text if quiet else f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxquant", description=__doc__, formatter_class=HelpFormatter,
                                     epilog="`onnxquant <subcommand> --help` lists a subcommand's flags.")
    commands = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # prints the usage and the subcommand list, exits 2 on an unknown name
        return 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"onnxquant {argv[0]}")


def entry_point() -> None:
    run_cli(main)


if __name__ == "__main__":
    entry_point()
