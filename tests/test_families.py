"""Every builder family beyond Llama and Qwen2, on its tiny random recipe in models/: the export
matches transformers, INT8 and 4-bit quantize and validate, R1 is exact or refused, SmoothQuant and
Hadamard groups are exact."""

import numpy as np
import pytest

from onnxquant.genai_folder import open_genai_folder
from onnxquant.evaluation import eval_windows, evaluate_perplexity

from conftest import (assert_float_pass_exact, assert_user_error, float_pass_run, prefill_logits, relative_logit_error,
                      run_module)

ROTATABLE = {"tiny-mistral-96": True, "tiny-qwen3-96": True, "tiny-phi3-96": True, "tiny-gemma-96": True,
             "tiny-gemma2-96": False, "tiny-gemma3-96": False}  # Gemma 2/3: sandwich norms
FAMILIES = sorted(ROTATABLE)


@pytest.mark.slow  # a torch comparison
@pytest.mark.parametrize("name", FAMILIES)
def test_export_matches_transformers(tiny_models, name):
    import torch
    from transformers import AutoModelForCausalLM

    ids = (np.arange(300) * 7) % 250 + 3  # longer than the Gemma recipes' sliding window (256)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.hf(name), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor(ids[None])).logits.numpy()
    # Gemma's builder rounds the sqrt(hidden) embedding scale to two decimals (9.8 for 9.798): 3e-4.
    assert relative_logit_error(reference, prefill_logits(tiny_models.onnx(name), ids)) < 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_rotation_is_exact_or_refused(tiny_models, tmp_path, calib_text_path, test_text, name):
    source, flags = tiny_models.onnx(name), ("--include_rotation", "--include_sq")
    if ROTATABLE[name]:
        assert_float_pass_exact(source, tmp_path / "rot", calib_text_path, test_text, *flags, tokens=300)
        return
    assert_user_error(float_pass_run(source, tmp_path / "rot", calib_text_path, *flags), "sandwich norms", "without --include_rotation")
    assert not (tmp_path / "rot").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_smoothquant_and_hadamard_groups_are_exact(tiny_models, tmp_path, calib_text_path, test_text, name):
    assert_float_pass_exact(tiny_models.onnx(name), tmp_path / "sq", calib_text_path, test_text,
                            "--include_sq", "--hadamard_group_size", "16", tokens=300)


# INT8 W8A8 stays within 5% of float; 4-bit block 32 within 40% (random tiny weights carry no
# low-rank structure to protect, so 4-bit costs them far more than it costs a trained model).
@pytest.mark.parametrize("scheme,bound", [(("--config", "INT8_PER_CHANNEL"), 0.05),
                                          (("--config", "UINT4_PER_GROUP_ASYM", "--block_size", "32"), 0.40)])
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_model_validates_near_float(tiny_models, tmp_path, calib_text_path, test_text, name, scheme, bound):
    source = tiny_models.onnx(name)
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(tmp_path / "q"),
                        "--calib_data", str(calib_text_path), "--num_calib_data", "8", "--seq_len", "128", *scheme)
    assert result.returncode == 0, result.stderr[-3000:]
    float_folder = open_genai_folder(source)
    windows = eval_windows(float_folder, test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(float_folder, windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(open_genai_folder(tmp_path / "q"), windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < bound, (quant_ppl, float_ppl)
