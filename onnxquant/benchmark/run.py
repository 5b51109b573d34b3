"""Accuracy / speed / memory of every quantization recipe, measured in one run on this machine.

    onnxquant benchmark [--model FOLDER] [--calib_data FILE] [--eval_data FILE] [--blocks 16] [--configs NAME ...] \
        [--sweep NAME ...] [--sq_alphas 0.3 0.4 0.5 0.6 0.7 0.8] [--out results.md] [--plot results.png]

(also `python -m onnxquant.benchmark.run`). Without --model the embedded SmolLM2-135M is exported first (into
--workdir); without --calib_data / --eval_data the embedded WikiText-2 splits are used. Each recipe is quantized
in a child process of its own (`onnxquant quantize --result_json`, so that its peak RSS is its own), which hands
its result back as JSON; perplexity and speed are measured here through the API. It reports:

- ppl: validate perplexity over the first --blocks blocks x --block_size of the eval text (ORT-GenAI);
- delta_pct: change against the float model's perplexity in the same run;
- quant_s: wall seconds of the quantize child; peak_rss_mb: its peak resident set (via onnxquant.benchmark.peak_rss);
- quant_vs_floor: quant_s / the calibration floor, the seconds of one plain ORT forward pass of the
  float model over the same calibration tokens (session creation excluded), measured first;
- size_mb: model.onnx + external data on disk;
- kv_bytes_tok: KV cache bytes per token of context (all layers, K and V), from the model's cache inputs;
- prefill_ms: one --prefill_tokens sequence from an empty KV cache in plain ORT;
- decode_tok_s: --new_tokens greedy tokens through ORT-GenAI after a 128-token prompt;
  both the median of 5 rounds taken once every model is built, each round timing every model once
  after a warm-up run (interleaved, so a busy spell on a shared machine hits all models alike).

--sweep repeats recipes that use SmoothQuant at each --sq_alphas value and prints a second table; without the
flag it sweeps int8+r1+sq and int8_pc+r1+sq (about 40 minutes for SmolLM2 on 2 cores), and a bare --sweep
sweeps nothing.
Nothing is read from an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onnxquant.cli import HelpFormatter
from onnxquant.data import EMBEDDED_SPLITS, calibration_windows, resolve_text, tokenize
from onnxquant.errors import fail, run_cli
from onnxquant.genai_folder import GenAIFolder, model_bytes, open_genai_folder, standard_model_name
from onnxquant.kv_cache import stored_cache_size
from onnxquant.runtime import input_specs, make_session, prefill_feeds, usable_cores
from onnxquant.schemes import SCHEMES

SPEED_ROUNDS = 5
COLUMNS = ("config", "ppl", "delta_pct", "quant_s", "quant_vs_floor", "peak_rss_mb", "size_mb", "kv_bytes_tok", "prefill_ms",
           "decode_tok_s")


@dataclass(frozen=True)
class Recipe:
    name: str
    meaning: str
    flags: tuple[str, ...] | None  # None: the float model itself
    peer: str | None = None  # onnxquant.benchmark.peers quantizer run instead of onnxquant's (flags are its options)

    @property
    def series(self) -> str:
        if self.flags is None:
            return "float"
        if self.peer is not None:
            return "peers (ORT, ORT-GenAI builder, Olive)"
        if "--skip_quantization" in self.flags:
            return "float"  # float weights (a quantized KV cache at most)
        if "--max_size_mb" in self.flags or "--max_delta" in self.flags:
            return "onnxquant mixed precision (budget)"
        if self.flags[:1] == ("--recipe",):
            from onnxquant.recipes import Quantize, load_recipe

            scheme = load_recipe(self.flags[1]).stage(Quantize).resolved_scheme()
            if scheme.weights.is_float:
                return "onnxquant FP8 / microscaling"
            return "onnxquant W4A16" if scheme.weights.granularity == "per_block" else "onnxquant W8A8"
        if any(flag.startswith(("FP8", "MXFP", "NVFP")) for flag in self.flags):
            return "onnxquant FP8 / microscaling"
        return "onnxquant W4A16" if "--block_size" in self.flags else "onnxquant W8A8"

    @property
    def uses_sq(self) -> bool:
        return self.flags is not None and "--include_sq" in self.flags


def _q(scheme: str, *extra: str) -> tuple[str, ...]:
    return ("--config", scheme, "--use_moving_average", *extra)


R1, SQ = "--include_rotation", "--include_sq"
_W4_RECIPES = [
    Recipe(f"w4{suffix}_b{block}",
           f"{what}, block {block}" if "--int8_nodes" in algo else f"{what}, block {block}, every MatMul and the embedding at 4 bits",
           ("--config", scheme, "--block_size", str(block), *algo))
    for block in (128, 32)
    for suffix, what, scheme, algo in (
        ("_rtn", "UINT4_PER_GROUP_ASYM, round to nearest", "UINT4_PER_GROUP_ASYM", ()),
        ("_rtn_sym", "INT4_PER_GROUP_SYM, round to nearest", "INT4_PER_GROUP_SYM", ()),
        ("_awq", "UINT4_PER_GROUP_ASYM + AWQ", "UINT4_PER_GROUP_ASYM", ("--algo", "awq")),
        ("_gptq", "UINT4_PER_GROUP_ASYM + GPTQ", "UINT4_PER_GROUP_ASYM", ("--algo", "gptq")),
        ("_gptq_8bit_ends", "UINT4_PER_GROUP_ASYM + GPTQ, lm_head and embedding at 8 bits",
         "UINT4_PER_GROUP_ASYM", ("--algo", "gptq", "--int8_nodes", "lm_head", "--int8_nodes", "embed_tokens")))]
def _builtin_recipes() -> list["Recipe"]:
    from onnxquant.recipes import builtin_recipes

    return [Recipe(b.name, f"built-in recipe: {b.recipe.description}", ("--recipe", b.name)) for b in builtin_recipes()]


RECIPES = {r.name: r for r in (
    Recipe("float", "the exported float32 model", None),
    *_builtin_recipes(),
    Recipe("int8", "INT8_TRANSFORMER_DEFAULT, moving-average MinMax", _q("INT8_TRANSFORMER_DEFAULT")),
    Recipe("int8+r1", "INT8_TRANSFORMER_DEFAULT + QuaRot R1 rotation", _q("INT8_TRANSFORMER_DEFAULT", R1)),
    Recipe("int8+sq", "INT8_TRANSFORMER_DEFAULT + SmoothQuant", _q("INT8_TRANSFORMER_DEFAULT", SQ)),
    Recipe("int8+r1+sq", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant", _q("INT8_TRANSFORMER_DEFAULT", R1, SQ)),
    Recipe("int8+r1+sq+gptq", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant + GPTQ weights",
           _q("INT8_TRANSFORMER_DEFAULT", R1, SQ, "--algo", "gptq")),
    Recipe("int8+r1+sq+gptq+hs4", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant + GPTQ (Hessians from every 4th token): "
           "one calibration pass", _q("INT8_TRANSFORMER_DEFAULT", R1, SQ, "--algo", "gptq", "--hessian_token_stride", "4")),
    Recipe("int8+r1+sq+gptq+h64", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant + GPTQ + Hadamard groups of 64 (o_proj's folded into v)",
           _q("INT8_TRANSFORMER_DEFAULT", R1, SQ, "--algo", "gptq", "--hadamard_group_size", "64")),
    Recipe("int8_pc+r1+sq+h64", "INT8_PER_CHANNEL + R1 + SmoothQuant + Hadamard groups of 64",
           _q("INT8_PER_CHANNEL", R1, SQ, "--hadamard_group_size", "64")),
    Recipe("int8_pc+r1+sq+gptq", "INT8_PER_CHANNEL + R1 + SmoothQuant + GPTQ weights", _q("INT8_PER_CHANNEL", R1, SQ, "--algo", "gptq")),
    Recipe("int8_pc+r1+sq+gptq+h64", "INT8_PER_CHANNEL + R1 + SmoothQuant + GPTQ + Hadamard groups of 64",
           _q("INT8_PER_CHANNEL", R1, SQ, "--algo", "gptq", "--hadamard_group_size", "64")),
    Recipe("int8_pc+r1+sq_auto+r4+gptq+h64", "INT8_PER_CHANNEL + R1 + SmoothQuant with per-activation alpha + R4 + GPTQ + groups of 64 "
           "(the README main job before --hessian_token_stride 4)",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--include_r4", "--algo", "gptq", "--hadamard_group_size", "64")),
    Recipe("int8_pc+r1+sq_auto+r4+gptq+h64+ik", "the main job with --column_scales in_kernel (per-column scales inside "
           "the fused integer kernel, the form before this round)",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--include_r4", "--algo", "gptq", "--hadamard_group_size", "64",
              "--column_scales", "in_kernel")),
    Recipe("int8_pc+r1+sq_auto+r4+gptq+h64+hs4", "INT8_PER_CHANNEL + R1 + SmoothQuant with per-activation alpha + R4 + GPTQ "
           "(Hessians from every 4th calibration token) + groups of 64 (the README main job before --sq_num_calib_data)",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--include_r4", "--algo", "gptq", "--hadamard_group_size", "64",
              "--hessian_token_stride", "4")),
    Recipe("int8_pc+r1+sq_auto+r4+gptq+h64+sq16+hs8", "INT8_PER_CHANNEL + R1 + SmoothQuant with per-activation alpha from "
           "the first 16 samples + R4 + GPTQ (Hessians from every 8th token) + groups of 64 (the README main job)",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--sq_num_calib_data", "16", "--include_r4", "--algo", "gptq",
              "--hadamard_group_size", "64", "--hessian_token_stride", "8")),
    Recipe("int8+r1+sq+r4+gptq+h64+sq16+hs8", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant from the first 16 samples + R4 + "
           "GPTQ (Hessians from every 8th token) + groups of 64",
           _q("INT8_TRANSFORMER_DEFAULT", R1, SQ, "--sq_num_calib_data", "16", "--include_r4", "--algo", "gptq",
              "--hadamard_group_size", "64", "--hessian_token_stride", "8")),
    Recipe("int8_pc+r1+sq_auto+gptq", "INT8_PER_CHANNEL + R1 + SmoothQuant with per-activation alpha + GPTQ: one calibration "
           "pass (no online rotation after smoothing)",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--algo", "gptq")),
    Recipe("int8_pc+r1+sq_auto+gptq+hs4", "INT8_PER_CHANNEL + R1 + SmoothQuant (alpha per activation) + GPTQ, one pass, "
           "Hessians from every 4th token",
           _q("INT8_PER_CHANNEL", R1, SQ, "--sq_alpha", "auto", "--algo", "gptq", "--hessian_token_stride", "4")),
    Recipe("int8_pc+r1+sq+r4+gptq+h64", "INT8_PER_CHANNEL + R1 + SmoothQuant + R4 + GPTQ + groups of 64",
           _q("INT8_PER_CHANNEL", R1, SQ, "--include_r4", "--algo", "gptq", "--hadamard_group_size", "64")),
    Recipe("int8+r1+sq+r4+gptq+h64", "INT8_TRANSFORMER_DEFAULT + R1 + SmoothQuant + R4 + GPTQ + groups of 64",
           _q("INT8_TRANSFORMER_DEFAULT", R1, SQ, "--include_r4", "--algo", "gptq", "--hadamard_group_size", "64")),
    Recipe("int8_pc+r1+sq+gptq+h64+mse", "INT8_PER_CHANNEL + R1 + SmoothQuant + GPTQ + groups of 64, MSE activation ranges",
           _q("INT8_PER_CHANNEL", R1, SQ, "--algo", "gptq", "--hadamard_group_size", "64", "--calib_method", "mse")),
    Recipe("int8_pc+r1+sq+gptq+h64+x4", "INT8_PER_CHANNEL + R1 + SmoothQuant + GPTQ + groups of 64, the 4 most sensitive MatMuls in float",
           _q("INT8_PER_CHANNEL", R1, SQ, "--algo", "gptq", "--hadamard_group_size", "64", "--exclude_most_sensitive", "4")),
    Recipe("int8_pc+r1+sq+gptq+h64+float_lm_head", "INT8_PER_CHANNEL + R1 + SmoothQuant + GPTQ + groups of 64, lm_head in float",
           _q("INT8_PER_CHANNEL", R1, SQ, "--algo", "gptq", "--hadamard_group_size", "64", "--exclude", "lm_head")),
    Recipe("mxfp8_gptq_h32", "MXFP8 weights (GPTQ) and activations, Hadamard groups of 32",
           ("--config", "MXFP8", "--algo", "gptq", "--hadamard_group_size", "32")),
    Recipe("mxfp8_gptq_h32_rceil", "MXFP8 weights (GPTQ) and activations, Hadamard groups of 32, non-saturating (rceil) E8M0 scales",
           ("--config", "MXFP8", "--algo", "gptq", "--hadamard_group_size", "32", "--mx_scale_rounding", "rceil")),
    Recipe("fp8_h64", "FP8_E4M3 + Hadamard groups of 64", _q("FP8_E4M3", "--hadamard_group_size", "64")),
    Recipe("fp8_gptq", "FP8_E4M3 + GPTQ weights", _q("FP8_E4M3", "--algo", "gptq")),
    Recipe("int8_pc", "INT8_PER_CHANNEL (per-output-channel weights), moving average", _q("INT8_PER_CHANNEL")),
    Recipe("int8_pc+r1+sq", "INT8_PER_CHANNEL + R1 + SmoothQuant", _q("INT8_PER_CHANNEL", R1, SQ)),
    Recipe("int8_symact", "INT8_SYMMETRIC_ACT (signed symmetric activations), moving average", _q("INT8_SYMMETRIC_ACT")),
    Recipe("fp8", "FP8_E4M3 (E4M3 per-tensor weights and static activations), moving average", _q("FP8_E4M3")),
    Recipe("fp8+r1+sq", "FP8_E4M3 + R1 + SmoothQuant", _q("FP8_E4M3", R1, SQ)),
    Recipe("fp8_pc+r1+sq", "FP8_E4M3_PER_CHANNEL + R1 + SmoothQuant", _q("FP8_E4M3_PER_CHANNEL", R1, SQ)),
    Recipe("mxfp8_w", "MXFP8_A16 weight-only, round to nearest", ("--config", "MXFP8_A16")),
    Recipe("mxfp4_w", "MXFP4_A16 weight-only, round to nearest (kept with --allow_degraded: the collapse guard refuses it)",
           ("--config", "MXFP4_A16", "--allow_degraded")),
    Recipe("mxfp4_w_gptq", "MXFP4_A16 weight-only + GPTQ (its grid search includes the E8M0 exponent e+1)", ("--config", "MXFP4_A16", "--algo", "gptq")),
    Recipe("nvfp4_w", "NVFP4_A16 weight-only, round to nearest", ("--config", "NVFP4_A16")),
    Recipe("nvfp4_w_gptq", "NVFP4_A16 weight-only + GPTQ", ("--config", "NVFP4_A16", "--algo", "gptq")),
    Recipe("mxfp8_w_h32", "MXFP8_A16 weight-only, round to nearest, Hadamard groups of 32",
           ("--config", "MXFP8_A16", "--hadamard_group_size", "32")),
    Recipe("mxfp4_w_mse", "MXFP4_A16 weight-only, MSE scale search (--clip_search: E8M0 exponent e or e+1 per block)",
           ("--config", "MXFP4_A16", "--clip_search")),
    Recipe("mxfp4_w_mse_h16", "MXFP4_A16 weight-only, MSE scale search, Hadamard groups of 16",
           ("--config", "MXFP4_A16", "--clip_search", "--hadamard_group_size", "16")),
    Recipe("mxfp4_w_gptq_h16", "MXFP4_A16 weight-only + GPTQ, Hadamard groups of 16",
           ("--config", "MXFP4_A16", "--algo", "gptq", "--hadamard_group_size", "16")),
    Recipe("nvfp4_w_h16", "NVFP4_A16 weight-only, round to nearest, Hadamard groups of 16",
           ("--config", "NVFP4_A16", "--hadamard_group_size", "16")),
    Recipe("mxfp8", "MXFP8 weights and activations (per block of 32 at run time)", ("--config", "MXFP8")),
    Recipe("mxfp8_h32", "MXFP8 weights and activations, Hadamard groups of 32", ("--config", "MXFP8", "--hadamard_group_size", "32")),
    Recipe("mxfp4_gptq_h16", "MXFP4 weights (GPTQ) and activations, Hadamard groups of 16",
           ("--config", "MXFP4", "--algo", "gptq", "--hadamard_group_size", "16", "--allow_degraded")),
    Recipe("nvfp4_gptq", "NVFP4 weights (GPTQ) and activations", ("--config", "NVFP4", "--algo", "gptq", "--allow_degraded")),
    Recipe("nvfp4_w_gptq_h16", "NVFP4_A16 weight-only + GPTQ, Hadamard groups of 16",
           ("--config", "NVFP4_A16", "--algo", "gptq", "--hadamard_group_size", "16")),
    Recipe("int8_symact_pc+r1+sq", "INT8_SYMMETRIC_ACT_PER_CHANNEL + R1 + SmoothQuant",
           _q("INT8_SYMMETRIC_ACT_PER_CHANNEL", R1, SQ)),
    *_W4_RECIPES,
    *(Recipe(f"{base.name}_al4", base.meaning + ", --accuracy_level 4 (int8 activation compute in MatMulNBits)",
             (*base.flags, "--accuracy_level", "4"))
      for base in _W4_RECIPES if base.name in ("w4_gptq_b128", "w4_gptq_8bit_ends_b32")),
    *(Recipe(f"peer_{peer}_b{block}", what + f", block {block}", ("--block_size", str(block)), peer=peer)
      for block in (128, 32)
      for peer, what in (("ort_rtn_asym", "ORT MatMulNBitsQuantizer RTN asymmetric"),
                         ("ort_rtn_sym", "ORT MatMulNBitsQuantizer RTN symmetric"),
                         ("ort_hqq", "ORT MatMulNBitsQuantizer HQQ"),
                         ("builder_int4", "ORT-GenAI builder -p int4 (RTN)"),
                         ("olive_rtn", "Olive OnnxBlockWiseRtnQuantization (symmetric, accuracy level 4)"),
                         ("olive_gptq", "Olive Gptq (symmetric) + the ORT-GenAI builder"))),
    Recipe("peer_ort_static_int8", "ORT quantize_static W8A8 QDQ: int8 per-tensor weights, uint8 activations, moving-average "
           "MinMax, MatMuls with a constant weight, outputs not quantized (onnxquant's INT8_TRANSFORMER_DEFAULT settings)",
           (), peer="ort_static_int8"),
    Recipe("peer_ort_static_int8_pc", "ORT quantize_static W8A8 QDQ as peer_ort_static_int8 with per-output-channel weights "
           "(INT8_PER_CHANNEL's settings)", (), peer="ort_static_int8_pc"),
    Recipe("peer_builder_k_quant_mixed_b32", "ORT-GenAI builder -p int4 algo_config=k_quant_mixed, block 32",
           ("--block_size", "32", "--algo", "k_quant_mixed"), peer="builder_int4"),
    # Quantized KV caches on the float weights (onnxquant's kv_cache stage, the builder's calibrator + rebuild),
    # and composed with the weight recipes.
    Recipe("kv_int8_per_channel", "float weights, INT8 per-channel KV cache (minmax, K on the rotary envelope)",
           ("--skip_quantization", "--kv_cache_quant_scheme", "int8_per_channel")),
    Recipe("kv_int4_per_channel", "float weights, INT4 per-channel KV cache (percentile 99.99, K on its window's values)",
           ("--skip_quantization", "--kv_cache_quant_scheme", "int4_per_channel", "--kv_cache_calib_method", "percentile+99.99",
            "--no_kv_rotary_envelope")),
    *(Recipe(f"peer_builder_kv_{scheme}", f"ORT-GenAI kv_cache_calibration (its defaults) + the builder's rebuild, {scheme} "
             "KV cache, float weights", ("--kv_scheme", scheme), peer="builder_kv")
      for scheme in ("int8_per_channel", "int4_per_channel")),
    Recipe("w8a8_kv_int8", "w8a8 with an INT8 per-channel KV cache", ("--recipe", "w8a8", "--kv_cache_quant_scheme", "int8_per_channel")),
    Recipe("w4a16_kv_int8", "w4a16 with an INT8 per-channel KV cache", ("--recipe", "w4a16", "--kv_cache_quant_scheme", "int8_per_channel")),
    Recipe("w4a16_sequential", "w4a16 with sequential GPTQ: each Hessian from the outputs of the layers already rounded",
           ("--recipe", "w4a16", "--sequential")),
    # Mixed precision under a budget (onnxquant.mixed_precision): the plot joins these into one curve.
    *(Recipe(f"w4a16_within_{size:g}MB", f"w4a16 with each node's format searched for the best held-out perplexity within {size:g} MB",
             ("--recipe", "w4a16", "--max_size_mb", f"{size:g}")) for size in (100, 113.6, 130, 150)),
    *(Recipe(f"w4a16_within_{delta:g}pct", f"w4a16 with each node's format searched for the smallest model within +{delta:g}% "
             "held-out perplexity", ("--recipe", "w4a16", "--max_delta", f"{delta:g}%")) for delta in (3,)),
)}


def default_alpha(name: str) -> float:
    flags = RECIPES[name].flags
    return SCHEMES[flags[flags.index("--config") + 1]].sq_alpha


@dataclass
class Row:
    config: str
    ppl: float
    delta_pct: float = 0.0
    quant_s: float | None = None
    quant_vs_floor: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float = 0.0
    kv_bytes_per_token: float | None = None  # KV cache bytes per token, all layers, K and V
    prefill_ms: float | None = None  # filled by measure_speeds once every model is built
    decode_tok_s: float | None = None
    extra: dict = field(default_factory=dict)
    model: GenAIFolder | None = None  # the measured folder, timed by measure_speeds

    def cells(self) -> list[str]:
        def fmt(value, spec):
            return "–" if value is None else format(value, spec)

        if self.extra.get("crashed"):
            return [self.config, "crashed", "–", "–", "–", "–", "–", "–", "–", self.extra["summary"].replace("|", "/")]
        return [self.config, f"{self.ppl:.4f}", f"{self.delta_pct:+.2f}", fmt(self.quant_s, ".1f"),
                fmt(self.quant_vs_floor, ".2f"), fmt(self.peak_rss_mb, ".0f"), f"{self.size_mb:.1f}",
                fmt(self.kv_bytes_per_token, ".0f"), fmt(self.prefill_ms, ".0f"), fmt(self.decode_tok_s, ".1f")]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


class ChildFailed(RuntimeError):
    """A quantizer or validator child process exited non-zero."""


PEAK_RSS_LAUNCHER = Path(__file__).resolve().parent / "peak_rss.py"


def run_child(args: list[str], log: Path) -> tuple[float, float, str]:
    """Run `python args...`; return (wall seconds, peak RSS MB of that child, its stdout).

    The child runs under onnxquant/benchmark/peak_rss.py, which reports its true peak (os.wait4's ru_maxrss
    would include this process's RSS at fork)."""
    report = log.with_suffix(".peak_rss")
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    with log.open("w") as stderr:
        process = subprocess.run([sys.executable, str(PEAK_RSS_LAUNCHER), str(report), *args], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise ChildFailed(f"exit {process.returncode}: {tail[0][:160]} (log {log})")
    return seconds, float(report.read_text()), process.stdout


def model_size_mb(folder: GenAIFolder) -> float:
    """model.onnx and its data; for microscaling models the standard form (model.standard.onnx), the
    format's size, rather than the CPU-runnable emulation."""
    name = folder.model_file.name
    if (folder.path / standard_model_name(name)).is_file():
        name = standard_model_name(name)
    return model_bytes(folder.path, name) / 1e6


def calibration_floor(folder: GenAIFolder, samples: np.ndarray) -> float:
    """Seconds of one plain ORT forward pass of the whole float model over the calibration samples."""
    session = make_session(folder.model_file)
    specs = input_specs(session)
    start = time.perf_counter()
    for sample in samples:
        session.run(["logits"], prefill_feeds(specs, folder, sample.reshape(1, -1)))
    return time.perf_counter() - start


def prefill_ms(folder: GenAIFolder, ids: np.ndarray) -> float:
    """Milliseconds of one prefill of `ids` in plain ORT, timed after a warm-up run (first-run
    allocations) on the same session."""
    session = make_session(folder.model_file)
    feeds = prefill_feeds(input_specs(session), folder, ids.reshape(1, -1))
    session.run(["logits"], feeds)
    start = time.perf_counter()
    session.run(["logits"], feeds)
    return 1000 * (time.perf_counter() - start)


def decode_tokens_per_second(folder: GenAIFolder, prompt: np.ndarray, new_tokens: int) -> float:
    """Greedy decode of `new_tokens` through ORT-GenAI after the prompt (prompt time excluded), timed
    after a warm-up generation on the same loaded model."""
    import onnxruntime_genai as og

    config = og.Config(str(folder.path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": usable_cores()}}}}))
    model = og.Model(config)
    total = len(prompt) + new_tokens

    def generate() -> float:
        params = og.GeneratorParams(model)
        # min_length keeps EOS from ending the run early, so every run decodes the same count.
        params.set_search_options(max_length=folder.kv_capacity(total), min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt.reshape(1, -1).astype(np.int32))
        generated = 0
        start = time.perf_counter()
        while not generator.is_done() and generated < new_tokens:
            generator.generate_next_token()
            generated += 1
        return generated / (time.perf_counter() - start)

    generate()
    return generate()


def measure_speeds(rows: list[Row], prefill_ids: np.ndarray, prompt: np.ndarray,
                   new_tokens: int, rounds: int = SPEED_ROUNDS) -> None:
    """Fill every row's prefill_ms and decode_tok_s with the median of `rounds` samples, taken in
    interleaved rounds: each round times every model once (prefill, then decode, each after a warm-up
    run), so a busy spell on a shared machine lands on all models alike instead of on whichever one
    was being timed. Timed one model after another, minutes apart, the same quantized model's decode
    moved by +-25% here and flipped the ratios to float."""
    prefill: list[list[float]] = [[] for _ in rows]
    decode: list[list[float]] = [[] for _ in rows]
    for _ in tqdm(range(rounds), desc="speed rounds", unit="round"):
        for row, prefills, decodes in zip(rows, prefill, decode):
            prefills.append(prefill_ms(row.model, prefill_ids))
            decodes.append(decode_tokens_per_second(row.model, prompt, new_tokens))
    for row, prefills, decodes in zip(rows, prefill, decode):
        row.prefill_ms, row.decode_tok_s = statistics.median(prefills), statistics.median(decodes)
        row.extra["decode_spread"] = (min(decodes), max(decodes))


def text_flag(flag: str, path: Path | None) -> list[str]:
    """The child's text option: the user's file, or nothing so that the child reads the embedded split too."""
    return [] if path is None else [flag, str(path)]


def text_name(path: Path | None, split: str) -> str:
    return path.name if path is not None else f"{EMBEDDED_SPLITS[split]} (embedded)"


def perplexity(folder_path: Path, args, blocks: int) -> float:
    from onnxquant.api import evaluate

    return evaluate(folder_path, text=args.eval_data, block_size=args.block_size, max_blocks=blocks,
                    progress=False).perplexity


class Bench:
    def __init__(self, args, float_folder: GenAIFolder):
        self.args = args
        self.float_folder = float_folder
        self.samples = calibration_windows(float_folder.path, resolve_text(args.calib_data, None, "validation"),
                                           args.num_calib_data, args.seq_len)
        eval_ids = tokenize(float_folder.path, resolve_text(args.eval_data, None, "test"))
        self.prefill_ids = eval_ids[: args.prefill_tokens]
        self.prompt = eval_ids[: 128]
        self.floor_s = calibration_floor(float_folder, self.samples)
        print(f"calibration floor: {self.floor_s:.1f} s for {args.num_calib_data} x {args.seq_len} tokens "
              "(one plain ORT forward pass of the float model)", flush=True)
        self.float_ppl: float | None = None

    def keep(self, folder: GenAIFolder, row: Row) -> Row:
        row.size_mb, row.model = model_size_mb(folder), folder
        row.kv_bytes_per_token = stored_cache_size(folder).bytes_per_token
        return row

    def speeds(self, rows: list[Row]) -> None:
        """Time every built model among `rows` that has no speed yet (a sweep row copied from the
        main table has its row's)."""
        measure_speeds([row for row in rows if row.model is not None and row.decode_tok_s is None],
                       self.prefill_ids, self.prompt, self.args.new_tokens)

    def measure_float(self, blocks: int) -> Row:
        ppl = perplexity(self.float_folder.path, self.args, blocks)
        self.float_ppl = ppl
        return self.keep(self.float_folder, Row("float", ppl))

    def measure(self, label: str, flags: tuple[str, ...], blocks: int, peer: str | None = None) -> Row:
        out = self.args.workdir / label.replace("+", "_")
        if peer is not None:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            command = ["-m", "onnxquant.benchmark.peers", peer, "--input", str(self.float_folder.path),
                       "--output", str(out), "--num_calib_data", str(self.args.num_calib_data), "--seq_len", str(self.args.seq_len),
                       *text_flag("--calib_data", self.args.calib_data), *flags]
        else:
            command = ["-m", "onnxquant.cli.quantize", "--input_model_path", str(self.float_folder.model_file),
                       "--output_model_path", str(out / "model.onnx"), "--num_calib_data", str(self.args.num_calib_data),
                       "--seq_len", str(self.args.seq_len), *text_flag("--calib_data", self.args.calib_data), "--overwrite",
                       "--result_json", str(out.with_suffix(".result.json")), *flags]
        try:
            quant_s, rss_mb, stdout = run_child(command, self.args.workdir / f"{out.name}.quantize.log")
        except ChildFailed as exc:
            return Row(label, float("nan"), float("nan"), extra={"summary": f"crashed: {exc}", "crashed": True})
        folder = open_genai_folder(out)
        ppl = perplexity(out, self.args, blocks)
        row = Row(label, ppl, 100 * (ppl / self.float_ppl - 1), quant_s, quant_s / self.floor_s, rss_mb)
        result_file = out.with_suffix(".result.json")
        row.extra["summary"] = json.loads(result_file.read_text())["summary_line"] if result_file.is_file() else ""
        return self.keep(folder, row)


def speed_note(rows: list[Row]) -> str:
    spreads = ", ".join(f"{row.config} {low:.1f}–{high:.1f}" for row in rows if "decode_spread" in row.extra
                        for low, high in [row.extra["decode_spread"]])
    return (f"Speed: prefill_ms and decode_tok_s are medians of {SPEED_ROUNDS} interleaved rounds (every model "
            f"timed once per round, after a warm-up run). decode_tok_s min–max over the rounds: {spreads}.")


def export_default(workdir: Path) -> Path:
    target = workdir / "float"
    if not (target / "genai_config.json").is_file():
        seconds, rss, _ = run_child(["-m", "onnxquant.cli.export", "--output_path", str(target), "--overwrite"],
                                    workdir / "export.log")
        print(f"exported the embedded SmolLM2-135M in {seconds:.1f} s (peak RSS {rss:.0f} MB)", flush=True)
    return target


def write_plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'); no plot written")
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"float": "tab:gray", "onnxquant W8A8": "tab:blue", "onnxquant W4A16": "tab:green",
              "onnxquant FP8 / microscaling": "tab:purple", "peers (ORT, ORT-GenAI builder, Olive)": "tab:red",
              "onnxquant mixed precision (budget)": "tab:orange"}
    shown = [row for row in rows if not row.extra.get("crashed") and np.isfinite(row.ppl)]
    for series, color in colors.items():
        members = [row for row in shown if RECIPES[row.config.split("@")[0]].series == series]
        if members:
            ax.scatter([r.size_mb for r in members], [r.ppl for r in members], color=color, label=series, s=22)
            if series == "onnxquant mixed precision (budget)":
                members.sort(key=lambda r: r.size_mb)
                ax.plot([r.size_mb for r in members], [r.ppl for r in members], color=color, lw=1)
    ax.set_yscale("log")
    # Points of similar size stack up: the labels of each group of nearby sizes go in one column to
    # its right, ordered by perplexity, one text line apart, each tied to its point by a line.
    low, high = ax.get_ylim()
    line = np.log10(high / low) * 9 / (fig.get_size_inches()[1] * 72 * 0.8)  # 9 pt in decades
    by_size = sorted(shown, key=lambda r: r.size_mb)
    groups = [[by_size[0]]]
    for row in by_size[1:]:
        if row.size_mb - groups[-1][-1].size_mb < 40:
            groups[-1].append(row)
        else:
            groups.append([row])
    for group in groups:
        group.sort(key=lambda r: r.ppl)
        heights = [np.log10(r.ppl) for r in group]
        for i in range(1, len(heights)):
            heights[i] = max(heights[i], heights[i - 1] + line)
        shift = (heights[-1] - np.log10(group[-1].ppl)) / 2  # centre the column on the points
        x_text = max(r.size_mb for r in group) + 15
        for member, height in zip(group, heights):
            ax.annotate(member.config, (member.size_mb, member.ppl), xytext=(x_text, 10 ** (height - shift)),
                        textcoords="data", fontsize=6.5, va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.7"})
    ax.legend(fontsize=8)
    ax.set_xlabel("model size on disk (MB)")
    ax.set_ylabel("wikitext-2 perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def isa_flags() -> str:
    """The CPU features ORT's integer kernels depend on (AVX2 alone saturates u8 x s8 pair sums)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512/vnni/amx"


def git_commit() -> str:
    """The short commit, with "+uncommitted changes" when the package's tracked files differ from it."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], capture_output=True,
                               text=True, cwd=here.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" +uncommitted changes" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_parser(prog: str = "onnxquant benchmark") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="float ORT-GenAI folder (default: export the embedded SmolLM2)")
    parser.add_argument("--calib_data", type=Path, default=None, help="calibration text (default: embedded wiki.valid.tokens)")
    parser.add_argument("--eval_data", type=Path, default=None, help="evaluation text (default: embedded wiki.test.raw)")
    parser.add_argument("--blocks", type=int, default=16, help="evaluation blocks per config")
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--configs", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="NAME",
                        help=f"recipes to run (default all): {', '.join(RECIPES)}")
    parser.add_argument("--sweep", nargs="*", default=["int8+r1+sq", "int8_pc+r1+sq"], metavar="NAME",
                        help="SmoothQuant recipes to repeat at each --sq_alphas value (a bare --sweep: none)")
    parser.add_argument("--sq_alphas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--sweep_blocks", type=int, default=None, help="evaluation blocks in the sweep (default --blocks)")
    parser.add_argument("--num_calib_data", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--out", type=Path, default=None, help="write the tables (markdown) here")
    parser.add_argument("--plot", type=Path, default=None, help="perplexity vs size PNG (default: --out with .png)")
    return parser


def main(argv: list[str] | None = None, prog: str = "onnxquant benchmark") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    for name in args.sweep:
        if name not in RECIPES or not RECIPES[name].uses_sq:
            fail(f"--sweep {name!r} is not a SmoothQuant recipe; choose from "
                 f"{', '.join(n for n, r in RECIPES.items() if r.uses_sq)}")
    for path in (args.calib_data, args.eval_data):
        if path is not None and not path.is_file():
            fail(f"{path} does not exist; pass the wikitext-2 files, e.g. ../shared/data/wikitext-2/")
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    commit = git_commit()  # the code that is measured: read before the run, whatever is committed during it
    float_folder = open_genai_folder(args.model or export_default(args.workdir))
    bench = Bench(args, float_folder)

    rows = [bench.measure_float(args.blocks)]
    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    for name in args.configs:
        if name == "float":
            continue
        rows.append(bench.measure(name, RECIPES[name].flags, args.blocks, RECIPES[name].peer))
        print(markdown_table(rows[-1:]).splitlines()[-1], rows[-1].extra["summary"], flush=True)

    bench.speeds(rows)

    sweep_rows: list[Row] = []
    sweep_blocks = args.sweep_blocks or args.blocks
    if args.sweep:
        if sweep_blocks != args.blocks:
            sweep_rows.append(bench.measure_float(sweep_blocks))
        measured = {row.config: row for row in rows}
        for name in args.sweep:
            for alpha in args.sq_alphas:
                label = f"{name}@{alpha:g}"
                if alpha == default_alpha(name) and name in measured and sweep_blocks == args.blocks:
                    # The recipe ran at this alpha above, in this run: the same measurement.
                    sweep_rows.append(dataclasses.replace(measured[name], config=label))
                else:
                    sweep_rows.append(bench.measure(label, RECIPES[name].flags + ("--sq_alpha", str(alpha)), sweep_blocks))
                print(markdown_table(sweep_rows[-1:]).splitlines()[-1], flush=True)

    bench.speeds(sweep_rows)

    machine = f"{usable_cores()} CPU cores ({cpu_name()}; ISA: {isa_flags()}), {platform.system()} {platform.machine()}"
    command = " ".join([prog, *argv])
    heading = (f"Model: {float_folder.path} ({float_folder.config['model']['type']}, hidden {float_folder.hidden_size}, "
               f"{float_folder.num_layers} layers). Machine: {machine}. Commit: {commit}.\n"
               f"Calibration: {args.num_calib_data} x {args.seq_len} tokens of {text_name(args.calib_data, 'validation')}; "
               f"calibration floor {bench.floor_s:.1f} s. Evaluation: first {args.blocks} blocks x {args.block_size} "
               f"of {text_name(args.eval_data, 'test')}.\nCommand: `{command}`")
    def meaning(name: str) -> str:
        chosen = RECIPES[name].uses_sq and "--sq_alpha" not in RECIPES[name].flags
        extra = f" (alpha {default_alpha(name):g}, the scheme's default)" if chosen else ""
        return RECIPES[name].meaning + extra

    text = heading + "\n\n" + markdown_table(rows) + "\n\n" + speed_note(rows) + "\n\nRecipes:\n" + "\n".join(
        f"- `{name}`: {meaning(name)}" for name in args.configs)
    if sweep_rows:
        text += (f"\n\nSmoothQuant alpha sweep (first {sweep_blocks} blocks; `recipe@alpha`):\n\n" + markdown_table(sweep_rows))
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"tables written to {args.out}")
        plot = args.plot or args.out.with_suffix(".png")
        write_plot(rows, plot, f"{float_folder.config['model']['type']}: perplexity ({args.blocks} blocks) vs size")
    elif args.plot:
        write_plot(rows, args.plot, f"perplexity ({args.blocks} blocks) vs size")
    print(f"benchmark: configs={len(rows)} sweep={len(sweep_rows)} seconds={time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    run_cli(main)
