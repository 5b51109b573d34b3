"""The README's family support matrix, measured: for each tiny recipe in models/, build the random
checkpoint, export it with the ORT-GenAI builder, compare its logits with transformers, quantize it
(INT8_PER_CHANNEL W8A8 and UINT4 block 32), and run R1, SmoothQuant and Hadamard groups with
--verify (each float stage's logits against the float model), printing one markdown row per family.
With `--exporter optimum` the same runs on optimum's plain decoders (their R1 and SmoothQuant cells
start with the norm fusion's own exactness figure).

    python tools/family_matrix.py [--workdir runs/families] [--recipes tiny-gemma2-96 ...]
                                  [--exporter optimum --optimum_python .venv-optimum/bin/python]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from onnxquant.checkpoint import resolve_model_source
from onnxquant.errors import UserError
from onnxquant.exporter import export_model
from onnxquant.optimum_export import optimum_python
from onnxquant.genai_folder import open_genai_folder
from onnxquant.resources import model_recipe_dir
from onnxquant.runtime import input_specs, make_session, prefill_feeds
from onnxquant.tiny_models import build_tiny_model

PROBE_IDS = (np.arange(300) * 7) % 250 + 3  # longer than the Gemma recipes' sliding window (256)


def export_error(hf_dir: Path, onnx_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor(PROBE_IDS[None])).logits.numpy()
    folder = open_genai_folder(onnx_dir)
    session = make_session(folder.model_file)
    logits = session.run(["logits"], prefill_feeds(input_specs(session), folder, PROBE_IDS[None]))[0]
    return float(np.abs(logits - reference).max() / np.abs(reference).max())


def quantize(source: Path, out: Path, *flags: str) -> str:
    """One cell: the verify figures of a run, or the first line of its refusal."""
    command = [sys.executable, "-m", "onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
               "--num_calib_data", "8", "--seq_len", "128", "--overwrite", *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        error = next((line for line in result.stderr.splitlines() if line.startswith("error:")), result.stderr[-200:])
        reason = re.search(r"\(([^)]*)\)", error)  # the refusals name their reason in parentheses
        return "refused: " + (reason.group(1) if reason else error.removeprefix("error: ")[:80])
    exact = re.findall(r"exact_(\w+)=([\d.e+-]+)", result.stdout)
    if exact:
        return ", ".join(f"{value}" for _, value in exact)
    ratio = re.search(r"ratio=([\d.]+)", result.stdout)
    return f"ratio {ratio.group(1)}" if ratio else "ran"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/families")
    parser.add_argument("--recipes", nargs="*", default=None)
    parser.add_argument("--exporter", choices=("builder", "optimum"), default="builder")
    parser.add_argument("--optimum_python", default=None, help="see `onnxquant export --help`")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    optimum = optimum_python(args.optimum_python) if args.exporter == "optimum" else None
    suffix = "-onnx" if optimum is None else "-optimum"
    recipes = args.recipes or sorted(p.stem for p in model_recipe_dir().glob("tiny-*.json"))
    print("| recipe | architecture | export vs transformers | INT8_PER_CHANNEL | UINT4 b32 | R1 (+ SQ) exact | SmoothQuant exact | "
          "Hadamard groups 16 exact |")
    print("|---|---|---|---|---|---|---|---|")
    for name in recipes:
        hf_dir, onnx_dir = workdir / name, workdir / f"{name}{suffix}"
        if not hf_dir.exists():
            build_tiny_model(name, hf_dir)
        architecture = resolve_model_source(str(hf_dir)).architecture
        if not onnx_dir.exists():
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the table
                    export_model(resolve_model_source(str(hf_dir)), onnx_dir, optimum=optimum)
            except UserError as exc:
                print(f"| {name} | {architecture} | export refused: {exc} |" + " |" * 5, flush=True)
                continue
        out = workdir / "q"
        cells = [f"{export_error(hf_dir, onnx_dir):.1e}",
                 quantize(onnx_dir, out, "--config", "INT8_PER_CHANNEL"),
                 quantize(onnx_dir, out, "--config", "UINT4_PER_GROUP_ASYM", "--block_size", "32"),
                 quantize(onnx_dir, out, "--skip_quantization", "--verify", "--include_rotation", "--include_sq"),
                 quantize(onnx_dir, out, "--skip_quantization", "--verify", "--include_sq"),
                 quantize(onnx_dir, out, "--skip_quantization", "--verify", "--hadamard_group_size", "16")]
        print(f"| {name} | {architecture} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
