"""`onnxquant validate`: wikitext-2 perplexity of an ORT-GenAI model folder.

Protocol: tokenize the whole text once with the folder's tokenizer (no special tokens), cut
consecutive non-overlapping windows of `block_size` tokens, run each window from an empty KV
cache, and report PPL = exp(mean NLL over the block_size - 1 predicted positions of all windows).
"""

from __future__ import annotations

import argparse

from onnxquant.cli import HelpFormatter
from onnxquant.errors import fail, run_cli


def build_parser(prog: str = "onnxquant validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="ORT-GenAI model folder")
    parser.add_argument("--do_onnx_eval", action="store_true",
                        help="accepted for compatibility with AMD Quark's oga_validate.py; evaluation always runs")
    parser.add_argument("--block_size", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--max_blocks", type=int, default=None, help="evaluate only the first N blocks (default: all)")
    parser.add_argument("--dataset", choices=("wikitext2",), default=None,
                        help="load this dataset's test split from the Hugging Face hub with `datasets` instead of --dataset_path")
    parser.add_argument("--dataset_path", default=None,
                        help="local text file (default: the embedded WikiText-2 raw test split)")
    parser.add_argument("--backend", choices=("genai", "ort"), default="genai",
                        help="genai: ONNX Runtime GenAI (default); ort: plain onnxruntime cross-check")
    parser.add_argument("--compare", default=None, metavar="FLOAT_DIR",
                        help="also run this (float) model on the same windows and print the KL divergence of the token "
                             "distributions (mean, median, p99, max), top-1 agreement and the mean change in the "
                             "correct token's probability, as llama.cpp's perplexity --kl-divergence")
    return parser


def main(argv: list[str] | None = None, prog: str = "onnxquant validate") -> int:
    from onnxquant.api import compare, evaluate
    from onnxquant.data import load_hub_text

    args = build_parser(prog).parse_args(argv)
    if args.dataset is not None and args.dataset_path is not None:
        fail("give --dataset or --dataset_path, not both")
    text = args.dataset_path
    if args.dataset is not None:
        text = _hub_text_file(load_hub_text(args.dataset, "test"))
    measure = evaluate if args.compare is None else (lambda model, **kw: compare(model, args.compare, **kw))
    result = measure(args.model_name_or_path, text=text, block_size=args.block_size, max_blocks=args.max_blocks,
                     backend=args.backend)
    print(result.summary())
    return 0


def _hub_text_file(text: str):
    import tempfile
    from pathlib import Path

    handle = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
    with handle:
        handle.write(text)
    return Path(handle.name)


if __name__ == "__main__":
    run_cli(main)
