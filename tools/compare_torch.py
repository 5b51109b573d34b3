"""Perplexity of an exported ORT-GenAI folder against the original PyTorch model, same windows.

    python tools/compare_torch.py --onnx runs/smollm2-fp32 [--model_path PATH] \
        --dataset_path ../shared/data/wikitext-2/wiki.test.raw --block_size 2048 --max_blocks 16 [--max_blocks 147]

Prints one markdown row per --max_blocks value (each a prefix of the same windows).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from onnxquant.checkpoint import resolve_model_source
from onnxquant.data import read_text_file
from onnxquant.genai_folder import open_genai_folder
from onnxquant.torch_reference import load_torch_model, torch_block_nll
from onnxquant.evaluation import eval_windows, evaluate_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--model_path", default=None, help="the checkpoint the folder was exported from (default: embedded)")
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--max_blocks", type=int, action="append", default=None)
    args = parser.parse_args()
    counts = sorted(args.max_blocks or [16])
    folder = open_genai_folder(args.onnx)
    windows = eval_windows(folder, read_text_file(args.dataset_path), args.block_size, counts[-1])
    start = time.perf_counter()
    onnx = evaluate_perplexity(folder, windows, "genai")
    onnx_s = time.perf_counter() - start
    start = time.perf_counter()
    torch_nll = torch_block_nll(load_torch_model(resolve_model_source(args.model_path)), windows)
    torch_s = time.perf_counter() - start
    print("| blocks | ort-genai ppl | torch ppl | rel diff |")
    print("|---|---|---|---|")
    for n in counts:
        n = min(n, len(windows))
        a = math.exp(float(np.mean(onnx.block_nll[:n])))
        b = math.exp(float(np.mean(torch_nll[:n])))
        print(f"| {n} | {a:.4f} | {b:.4f} | {abs(a / b - 1):.2e} |")
    print(f"ort-genai seconds={onnx_s:.1f} torch seconds={torch_s:.1f} blocks={len(windows)}")


if __name__ == "__main__":
    main()
