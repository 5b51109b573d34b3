"""Faults a run must survive: a model with non-finite logits, a run killed outright, two runs into one
folder, lengths beyond the model's context. Each ends in one line and a stated exit code, nothing left behind."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_user_error, run_module


@pytest.fixture(scope="module")
def source(tiny_models):
    return tiny_models.onnx("tiny-llama-96")


def _quantize_args(source, out, *flags):
    return ["-m", "onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
            "--num_calib_data", "4", "--seq_len", "128", *flags]


def _leftovers(parent, out):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and out.name in p.name
                  or p.name.startswith(".onnxquant-"))


@pytest.fixture(scope="module")
def nan_model(source, tmp_path_factory):
    """The tiny model quantized to INT8, then the scale of one weight's DequantizeLinear set to NaN (an
    activation scale would not do: QuantizeLinear saturates NaN to a code)."""
    out = tmp_path_factory.mktemp("nan") / "int8"
    result = subprocess.run([sys.executable, *_quantize_args(source, out, "--config", "INT8_PER_CHANNEL")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    model = onnx.load(str(out / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    scale = next(initializers[n.input[1]] for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0] in initializers)
    scale.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(scale).shape, np.nan, np.float32), scale.name))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out


def test_non_finite_result_is_a_collapse(source, nan_model):
    from onnxquant.api import collapse_guard
    from onnxquant.data import embedded_text, tokenize
    from onnxquant.genai_folder import open_genai_folder
    from onnxquant.pipeline import settings_for
    from onnxquant.recipes import Recipe, Verify
    from onnxquant.verification import CollapsedModelError, RunVerifier

    recipe = Recipe(verify=Verify(allow_degraded=True))
    windows = tokenize(source, embedded_text("validation")[:20000])[:256].reshape(2, 128)
    quality = RunVerifier(open_genai_folder(source), windows, True, False).quality(nan_model / "model.onnx")
    with pytest.raises(CollapsedModelError, match="not finite"):
        collapse_guard(quality, recipe, settings_for(recipe))


def test_validate_refuses_a_non_finite_perplexity(nan_model):
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(nan_model), "--block_size", "128",
                        "--max_blocks", "1")
    assert_user_error(result, "perplexity", "not finite")
    assert "perplexity=nan" not in result.stdout


def test_killed_run_leaves_nothing_after_the_next_run(source, tmp_path):
    out = tmp_path / "out"
    flags = ("--include_rotation", "--include_sq", "--skip_quantization")
    victim = subprocess.Popen([sys.executable, *_quantize_args(source, out, *flags)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".onnxquant-scratch-") for p in tmp_path.iterdir()):
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it made its scratch folder"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert _leftovers(tmp_path, out), "the killed run left nothing to clean up"
    result = subprocess.run([sys.executable, *_quantize_args(source, out, *flags)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left by killed onnxquant runs" in result.stderr and "MB freed" in result.stderr
    assert _leftovers(tmp_path, out) == []
    assert (out / "model.onnx").is_file()


def test_second_run_into_a_claimed_folder_is_refused(source, tmp_path):
    out = tmp_path / "conc" / "out"
    first = subprocess.Popen([sys.executable, *_quantize_args(source, out, "--config", "INT8_PER_CHANNEL")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out.with_name(".out.onnxquant-lock")
    deadline = time.monotonic() + 60
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never claimed its folder"
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # holds the claim while the second run tries, however fast the first is
    second = subprocess.run([sys.executable, *_quantize_args(source, out, "--config", "UINT4_PER_GROUP_ASYM")],
                            capture_output=True, text=True)
    first.send_signal(signal.SIGCONT)
    assert_user_error(second, "being written by another onnxquant run", f"pid {first.pid}")
    assert first.wait() == 0, first.stderr.read()[-2000:]
    props = onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props
    assert any("INT8_PER_CHANNEL" in prop.value for prop in props)
    assert not lock.exists()


def _context(source) -> int:
    return json.loads((source / "genai_config.json").read_text())["model"]["context_length"]


def test_calibration_length_beyond_the_context(source, tmp_path):
    too_long = str(_context(source) + 1)
    result = subprocess.run([sys.executable, *_quantize_args(source, tmp_path / "out", "--seq_len", too_long)],
                            capture_output=True, text=True)
    assert_user_error(result, f"(calibration.seq_len, --seq_len) is {too_long} tokens", f"context of {_context(source)} tokens")
    assert list(tmp_path.iterdir()) == []


def test_evaluation_length_beyond_the_context(source):
    too_long = str(_context(source) * 2)
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(source), "--block_size", too_long)
    assert_user_error(result, f"--block_size is {too_long} tokens", f"context of {_context(source)} tokens")


def test_generation_length_beyond_the_context(source):
    result = run_module("onnxquant.cli.generate", "--model_name_or_path", str(source), "--no_chat_template",
                        "--max_new_tokens", str(_context(source)))
    assert_user_error(result, "the prompt plus --max_new_tokens", f"context of {_context(source)} tokens")


def test_generate_compare_refuses_models_of_different_vocabularies(source, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(source, other)
    config = json.loads((other / "genai_config.json").read_text())
    config["model"]["vocab_size"] += 1
    (other / "genai_config.json").write_text(json.dumps(config))
    result = run_module("onnxquant.cli.generate", "--model_name_or_path", str(source), "--compare", str(other),
                        "--no_chat_template", "--max_new_tokens", "4")
    assert_user_error(result, "different vocabularies")
