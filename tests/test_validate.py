import numpy as np
import pytest

from onnxquant.checkpoint import resolve_model_source
from onnxquant.genai_folder import open_genai_folder
from onnxquant.torch_reference import load_torch_model, torch_block_nll, torch_perplexity
from onnxquant.evaluation import eval_windows, evaluate_perplexity, window_nll

from conftest import run_module


def test_window_nll_matches_hand_computation():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    window = np.array([0, 1, 2])
    assert window_nll(logits, window) == pytest.approx(-(np.log(0.25) + np.log(0.1)) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama-96", "tiny-qwen2-96", "tiny-llama3-64"])
def test_genai_perplexity_equals_torch_within_0_1_percent(tiny_models, test_text, name):
    folder = open_genai_folder(tiny_models.onnx(name))
    windows = eval_windows(folder, test_text[:40000], block_size=256, max_blocks=4)
    onnx_ppl = evaluate_perplexity(folder, windows, "genai", progress=False).perplexity
    torch_ppl = torch_perplexity(load_torch_model(resolve_model_source(str(tiny_models.hf(name)))), windows)
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-3)


def test_genai_and_ort_backends_agree(tiny_models, test_text):
    folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    windows = eval_windows(folder, test_text[:20000], block_size=128, max_blocks=3)
    genai = evaluate_perplexity(folder, windows, "genai", progress=False)
    ort = evaluate_perplexity(folder, windows, "ort", progress=False)
    assert genai.perplexity == pytest.approx(ort.perplexity, rel=1e-5)


def test_validate_cli_prints_summary_last(tiny_models, test_text_path):
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--block_size", "128", "--max_blocks", "2", "--dataset_path", str(test_text_path))
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity=") and "blocks=2 tokens=256 seconds=" in last


@pytest.mark.slow
def test_embedded_smollm2_two_blocks_match_torch(smollm2_onnx, test_text):
    folder = open_genai_folder(smollm2_onnx)
    windows = eval_windows(folder, test_text, block_size=2048, max_blocks=2)
    genai = evaluate_perplexity(folder, windows, "genai", progress=False)
    torch_nll = torch_block_nll(load_torch_model(resolve_model_source(None)), windows)
    # window by window (each window's perplexity within 0.1% of torch's), not only their mean
    assert genai.block_nll == pytest.approx(torch_nll, abs=1e-3)
    assert genai.perplexity == pytest.approx(np.exp(np.mean(torch_nll)), rel=1e-3)
