"""Where one decoded token's time goes: ONNX Runtime's per-node profile, summed by op type.

    python tools/profile_decode.py FOLDER [FOLDER ...] [--past 128] [--steps 50]

Each folder's model runs one token after a zero-filled past of --past tokens (plain ORT, the
session options onnxquant uses), --steps times after 5 warm-up steps; the table lists each op type's
kernel milliseconds per step and node count, then the step's wall time. The gap between kernel
time and wall time is the executor's per-node overhead, which grows with the node count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxquant.benchmark.run import isa_flags  # noqa: E402

from onnxquant.errors import run_cli  # noqa: E402
from onnxquant.genai_folder import GenAIFolder, open_genai_folder  # noqa: E402
from onnxquant.runtime import session_options  # noqa: E402

WARMUP_STEPS = 5


def decode_feeds(session: ort.InferenceSession, folder: GenAIFolder, past: int) -> dict[str, np.ndarray]:
    """One new token at position `past` after a zero-filled cache of `past` tokens."""
    names = set(folder.past_names())
    capacity = folder.kv_capacity(past + 1) if folder.sliding_window else past
    feeds = {}
    for graph_input in session.get_inputs():
        name = graph_input.name
        if name == "input_ids":
            feeds[name] = np.array([[42]], dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + 1), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.array([[past]], dtype=np.int64)
        elif name in names:
            feeds[name] = np.zeros((1, folder.num_kv_heads, capacity, folder.head_size), dtype=np.float32)
        else:
            raise ValueError(f"unexpected graph input {name!r}; the folder is not an ORT-GenAI decoder")
    return feeds


def profile(folder: GenAIFolder, past: int, steps: int, scratch: Path) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall ms per step, {op type: (kernel ms per step, nodes)})."""
    options = session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "decode_profile")
    session = ort.InferenceSession(str(folder.model_file), sess_options=options, providers=["CPUExecutionProvider"])
    feeds = decode_feeds(session, folder, past)
    for _ in range(WARMUP_STEPS):
        session.run(["logits"], feeds)
    start = time.perf_counter()
    for _ in range(steps):
        session.run(["logits"], feeds)
    wall_ms = (time.perf_counter() - start) / steps * 1000
    trace = Path(session.end_profiling())
    microseconds, runs = collections.Counter(), collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            microseconds[event["args"]["op_name"]] += event["dur"]
            runs[event["args"]["op_name"]] += 1
    os.remove(trace)
    total_steps = WARMUP_STEPS + steps
    return wall_ms, {op: (microseconds[op] / total_steps / 1000, runs[op] // total_steps) for op in microseconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="ORT-GenAI model folders")
    parser.add_argument("--past", type=int, default=128, help="tokens already in the KV cache")
    parser.add_argument("--steps", type=int, default=50, help="profiled decode steps")
    parser.add_argument("--top", type=int, default=8, help="op types listed per folder")
    args = parser.parse_args(argv)
    print(f"ISA: {isa_flags()}; {args.steps} steps of 1 token after {args.past}; ORT {ort.__version__}")
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    for path in args.folders:
        folder = open_genai_folder(path)
        wall_ms, by_op = profile(folder, args.past, args.steps, scratch)
        kernel_ms = sum(ms for ms, _ in by_op.values())
        nodes = sum(count for _, count in by_op.values())
        print(f"\n{path}: wall {wall_ms:.2f} ms/step, kernels {kernel_ms:.2f} ms in {nodes} nodes")
        print("| op type | ms/step | nodes |\n|---|---|---|")
        for op, (ms, count) in sorted(by_op.items(), key=lambda item: -item[1][0])[: args.top]:
            print(f"| {op} | {ms:.3f} | {count} |")
    return 0


if __name__ == "__main__":
    run_cli(main)
