"""Embedded data, the `onnxquant` command, generation, built-in verification, the collapse guard, determinism."""

import hashlib
import subprocess
import sys

import pytest

from onnxquant.data import EMBEDDED_SHA256, EMBEDDED_SPLITS, embedded_bytes, embedded_text, read_text_file

from conftest import assert_user_error, run_module


@pytest.mark.parametrize("name", sorted(EMBEDDED_SHA256))
def test_embedded_wikitext_is_byte_identical_to_the_shared_copy(outside_wikitext_dir, name):
    data = embedded_bytes(name)
    assert hashlib.sha256(data).hexdigest() == EMBEDDED_SHA256[name]
    assert data == (outside_wikitext_dir / name).read_bytes()


@pytest.mark.parametrize("split", sorted(EMBEDDED_SPLITS))
def test_embedded_text_equals_the_shared_file_read_as_text(outside_wikitext_dir, split):
    assert embedded_text(split) == read_text_file(outside_wikitext_dir / EMBEDDED_SPLITS[split])


def test_embedded_splits_decode_as_text():
    assert embedded_text("test").startswith(" = Robert Boulter = ")
    assert " = Homarus gammarus = " in embedded_text("validation")[:40]


def test_console_script_lists_subcommands_and_defaults():
    top = subprocess.run([sys.executable, "-m", "onnxquant.cli", "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for name in ("export", "quantize", "validate", "generate", "benchmark"):
        assert f"    {name}" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "onnxquant.cli", "quantize", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "usage: onnxquant quantize" in sub.stdout
    text = " ".join(sub.stdout.split())  # argparse wraps lines
    assert "samples (default: 64)" in text and "(default: INT8_TRANSFORMER_DEFAULT)" in text


def _quantize_args(source, out, *flags):
    return ["--input_model_path", str(source), "--output_model_path", str(out), "--num_calib_data", "4", "--seq_len", "128",
            "--use_moving_average", *flags]


def _quantize(source, out, *flags):
    return run_module("onnxquant.cli.quantize", *_quantize_args(source, out, *flags))


# `onnxquant quantize` with every weight scale of the written model times 4 before the collapse guard measures it:
# a collapse (tiny-llama-96: quick perplexity 8.7e4 x float's) whatever INT8 itself does to the model.
CORRUPTED_WEIGHT_SCALES = """
import onnx
from onnx import numpy_helper
import onnxquant.pipeline as pipeline
from onnxquant.cli.quantize import main
from onnxquant.errors import run_cli

original = pipeline.quantize_model

def corrupted(folder, output, *args, **kwargs):
    report = original(folder, output, *args, **kwargs)
    model = onnx.load(str(output))
    weights = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in weights:
            scale = weights[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 4, scale.name))
    onnx.save(model, str(output))
    return report

pipeline.quantize_model = corrupted
run_cli(main)
"""


def _quantize_collapsed(source, out, *flags):
    return subprocess.run([sys.executable, "-c", CORRUPTED_WEIGHT_SCALES, *_quantize_args(source, out, *flags)],
                          capture_output=True, text=True, timeout=600)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("flags", [("--include_rotation", "--include_sq"),
                                   ("--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq", "--block_size", "32")])
def test_same_input_and_flags_give_byte_identical_output_from_embedded_data(tiny_models, tmp_path, flags):
    source = tiny_models.onnx("tiny-llama-96")
    runs = [_quantize(source, tmp_path / name, *flags) for name in ("a", "b")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_verify_reports_exact_float_stages_and_agreement(tiny_models, tmp_path):
    result = _quantize(tiny_models.onnx("tiny-llama-96"), tmp_path / "q", "--include_rotation", "--include_sq", "--verify")
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("verify:"))
    fields = dict(item.split("=") for item in line.split() if "=" in item)
    assert float(fields["exact_rotate"]) < 1e-4 and float(fields["exact_smooth"]) < 1e-4
    assert float(fields["ratio"]) < 1.05 and float(fields["top1_agreement"]) > 0.5


def test_collapse_guard_refuses_and_writes_nothing(tiny_models, tmp_path):
    result = _quantize_collapsed(tiny_models.onnx("tiny-llama-96"), tmp_path / "q")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "collapsed" in result.stderr and "--allow_degraded" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".*"))


def test_allow_degraded_keeps_the_output(tiny_models, tmp_path):
    result = _quantize_collapsed(tiny_models.onnx("tiny-llama-96"), tmp_path / "q", "--allow_degraded")
    assert result.returncode == 0 and "degraded=kept" in result.stdout, result.stderr[-2000:]
    assert (tmp_path / "q" / "model.onnx").is_file()


@pytest.mark.slow
def test_collapse_guard_catches_per_tensor_smoothquant_alpha_0_9(smollm2_onnx, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(smollm2_onnx), "--output_model_path",
                        str(tmp_path / "q"), "--include_sq", "--sq_alpha", "0.9", "--use_moving_average")
    assert result.returncode == 3 and "collapsed" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "q").exists()


def test_generate_compare_of_a_model_with_itself_agrees_fully(tiny_models):
    folder = str(tiny_models.onnx("tiny-llama-96"))
    result = run_module("onnxquant.cli.generate", "--model_name_or_path", folder, "--compare", folder,
                        "--max_new_tokens", "12", "--no_chat_template", "--prompt", "The history of")
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert "identical_prefix=12" in last and "agreement=1.000 (12/12)" in last


def test_generate_on_a_quantized_model_reports_agreement(tiny_models, tmp_path):
    source = tiny_models.onnx("tiny-llama-96")
    quantized = _quantize(source, tmp_path / "q")
    assert quantized.returncode == 0, quantized.stderr[-2000:]
    result = run_module("onnxquant.cli.generate", "--model_name_or_path", str(source), "--compare", str(tmp_path / "q"),
                        "--max_new_tokens", "16", "--no_chat_template", "--prompt", "The history of")
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    # INT8 ranks first at least 12 of the float model's 16 greedy tokens (measured 14; an unrelated tiny model, 0).
    assert "tokens=16 " in last and float(last.split("agreement=")[1].split()[0]) >= 0.75, last


def test_generate_rejects_an_empty_prompt(tiny_models):
    assert_user_error(run_module("onnxquant.cli.generate", "--model_name_or_path", str(tiny_models.onnx("tiny-llama-96")),
                                 "--prompt", "  "), "--prompt is empty")
