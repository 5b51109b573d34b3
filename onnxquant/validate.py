"""`python -m onnxquant.validate`: wikitext-2 perplexity of an ORT-GenAI model folder.

Protocol: tokenize the whole text once with the folder's tokenizer (no special tokens), cut
consecutive non-overlapping windows of `block_size` tokens, run each window from an empty KV
cache, and report PPL = exp(mean NLL over the block_size - 1 predicted positions of all windows).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onnxquant.data import cut_windows, resolve_text, tokenize
from onnxquant.cli import HelpFormatter
from onnxquant.errors import fail, run_cli
from onnxquant.genai_folder import GenAIFolder, open_genai_folder
from onnxquant.runtime import usable_cores


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    blocks: int
    tokens: int
    seconds: float
    block_nll: tuple[float, ...]  # mean NLL of each window

    def summary(self) -> str:
        return f"perplexity={self.perplexity:.4f} blocks={self.blocks} tokens={self.tokens} seconds={self.seconds:.1f}"


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Mean negative log-likelihood of window[1:] under logits[:-1] (logits [seq, vocab]).

    Exponentials run in float32 after subtracting each row's peak (so they cannot overflow) and
    the sums accumulate in float64: 7x faster than all-float64, 3e-10 relative difference.
    """
    scores = logits[:-1]
    targets = window[1:]
    peak = scores.max(axis=1, keepdims=True)
    shifted = scores - peak
    np.exp(shifted, out=shifted)
    log_norm = np.log(shifted.sum(axis=1, dtype=np.float64)) + peak[:, 0]
    picked = scores[np.arange(len(targets)), targets]
    return float(np.mean(log_norm - picked))


class GenAIBackend:
    """Logits through ONNX Runtime GenAI: Generator + append_tokens + get_output('logits')."""

    def __init__(self, folder: GenAIFolder):
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(folder.path))
        # ORT-GenAI's default session runs about half as fast as one thread per core here.
        threads = {"intra_op_num_threads": usable_cores()}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.kv_capacity = folder.kv_capacity

    def logits(self, window: np.ndarray) -> np.ndarray:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.kv_capacity(len(window)))
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(window.reshape(1, -1).astype(np.int32))
        return np.asarray(generator.get_output("logits"))[0]


class OrtBackend:
    """Logits through a plain onnxruntime session, as a cross-check of the GenAI path (of the folder's
    model, or of another model file with the same inputs, e.g. a pipeline checkpoint)."""

    def __init__(self, folder: GenAIFolder, model_file: Path | None = None):
        from onnxquant.runtime import input_specs, make_session

        self.folder = folder
        self.session = make_session(model_file or folder.model_file)
        self.specs = input_specs(self.session)

    def logits(self, window: np.ndarray) -> np.ndarray:
        from onnxquant.runtime import prefill_feeds

        feeds = prefill_feeds(self.specs, self.folder, window.reshape(1, -1))
        return self.session.run(["logits"], feeds)[0][0]


BACKENDS = {"genai": GenAIBackend, "ort": OrtBackend}


def evaluate_perplexity(folder: GenAIFolder, windows: np.ndarray, backend: str = "genai", progress: bool = True) -> PerplexityResult:
    start = time.perf_counter()
    runner = BACKENDS[backend](folder)
    nlls = []
    for window in tqdm(windows, desc="perplexity", unit="block", disable=not progress):
        nlls.append(window_nll(runner.logits(window), window))
    seconds = time.perf_counter() - start
    return PerplexityResult(
        perplexity=math.exp(float(np.mean(nlls))),
        blocks=len(windows),
        tokens=int(windows.size),
        seconds=seconds,
        block_nll=tuple(nlls),
    )


def eval_windows(folder: GenAIFolder, text: str, block_size: int, max_blocks: int | None) -> np.ndarray:
    ids = tokenize(folder.path, text)
    available = len(ids) // block_size
    count = None if max_blocks is None or available == 0 else min(max_blocks, available)
    return cut_windows(ids, block_size, count, "evaluation text")


def build_parser(prog: str = "python -m onnxquant.validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="ORT-GenAI model folder")
    parser.add_argument("--do_onnx_eval", action="store_true",
                        help="accepted for compatibility with AMD Quark's oga_validate.py; evaluation always runs")
    parser.add_argument("--block_size", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--max_blocks", type=int, default=None, help="evaluate only the first N blocks (default: all)")
    parser.add_argument("--dataset", choices=("wikitext2",), default=None,
                        help="load this dataset's test split from the Hugging Face hub with `datasets` instead of --dataset_path")
    parser.add_argument("--dataset_path", default=None,
                        help="local text file (default: the embedded WikiText-2 raw test split)")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default="genai",
                        help="genai: ONNX Runtime GenAI (default); ort: plain onnxruntime cross-check")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m onnxquant.validate") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.block_size < 2:
        fail(f"--block_size must be at least 2, got {args.block_size}")
    if args.max_blocks is not None and args.max_blocks < 1:
        fail(f"--max_blocks must be at least 1, got {args.max_blocks}")
    folder = open_genai_folder(args.model_name_or_path)
    folder.check_fits_context(args.block_size, "--block_size")
    text = resolve_text(args.dataset_path, args.dataset, "test")
    windows = eval_windows(folder, text, args.block_size, args.max_blocks)
    result = evaluate_perplexity(folder, windows, args.backend)
    if not math.isfinite(result.perplexity):
        fail(f"the perplexity of {folder.path} is {result.perplexity} (its logits are not finite): the model is broken; "
             "re-quantize it from the float export")
    print(result.summary())
    return 0


if __name__ == "__main__":
    run_cli(main)
