"""Qwen2.5-Coder-1.5B end to end (slow: about an hour and 10 GB of RAM on 2 cores). Needs the
GGUF that tools/assemble_qwen_gguf.py assembles from PyPI; skipped, saying so, when it is absent."""

import os
import re
from pathlib import Path

import pytest

from conftest import run_module

QWEN_GGUF = Path(os.environ.get("ONNXQUANT_QWEN_GGUF", Path(__file__).parents[1] / "runs" / "qwen2.5-coder-1.5b-q4_k_m.gguf"))


def _perplexity(folder: Path) -> float:
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(folder), "--max_blocks", "4", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(re.search(r"perplexity=([\d.]+)", result.stdout).group(1))


@pytest.mark.slow
def test_qwen_1_5b_int8_and_gptq_4bit_stay_near_float_in_bounded_memory(tmp_path):
    if not QWEN_GGUF.is_file():
        pytest.skip(f"{QWEN_GGUF} is absent: run `python tools/assemble_qwen_gguf.py --output {QWEN_GGUF}` "
                    "or set ONNXQUANT_QWEN_GGUF")
    float_dir = tmp_path / "fp32"
    export = run_module("onnxquant.cli.export", "--model_path", str(QWEN_GGUF), "--output_path", str(float_dir), timeout=3600)
    assert export.returncode == 0, export.stderr[-3000:]
    float_mb = sum(f.stat().st_size for f in float_dir.iterdir()) / 1e6
    assert float_mb > 2000 and (float_dir / "model.onnx.data").is_file()  # past the protobuf limit: external data
    float_ppl = _perplexity(float_dir)
    recipes = {"int8": (["--config", "INT8_PER_CHANNEL", "--use_moving_average", "--include_rotation", "--include_sq",
                         "--hadamard_group_size", "64"], 1.03),
               "w4-gptq": (["--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq"], 1.10)}
    for name, (flags, ppl_bound) in recipes.items():
        out = tmp_path / name
        quantize = run_module("onnxquant.cli.quantize", "--input_model_path", str(float_dir), "--output_model_path", str(out),
                              "--num_calib_data", "16", *flags, timeout=7200)
        assert quantize.returncode == 0, quantize.stderr[-3000:]
        assert "calibration_segments=" in quantize.stdout  # 7 GB of weights run in pieces of 1 GB
        peak_mb = float(re.search(r"peak_rss_mb=(\d+)", quantize.stdout).group(1))
        assert peak_mb <= float_mb, (name, peak_mb, float_mb)
        assert _perplexity(out) <= ppl_bound * float_ppl, name
