"""The same quantized model gives the same numbers on every x86 CPU.

ONNX Runtime fuses an activation Q/DQ pair, an int8 weight DQ and the MatMul into an integer kernel.
On AVX2-only CPUs its u8 x s8 kernel adds adjacent products in int16 and saturates; on AVX-512 VNNI
it does not. Unfused (optimizations off), every op runs in float. So a grid that cannot saturate
gives fused == unfused on any CPU, and these tests pin both the grid and the equality.
"""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxquant.data import tokenize
from onnxquant.genai_folder import open_genai_folder
from onnxquant.runtime import input_specs, make_session, prefill_feeds, session_options
from onnxquant.evaluation import window_nll

from conftest import run_module

INT8_SCHEMES = ["INT8_TRANSFORMER_DEFAULT", "INT8_PER_CHANNEL", "INT8_SYMMETRIC_ACT", "INT8_SYMMETRIC_ACT_PER_CHANNEL", "FP8_E4M3"]


@pytest.fixture(scope="module")
def rotated_models(tiny_models, tmp_path_factory, calib_text_path):
    """tiny-llama-576 quantized with R1 (rotation spreads weights, so per-tensor grids fill up) per scheme."""
    root = tmp_path_factory.mktemp("cpu")
    out = {}
    for scheme in INT8_SCHEMES:
        result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-576")),
                            "--output_model_path", str(root / scheme), "--config", scheme, "--include_rotation",
                            "--calib_data", str(calib_text_path), "--num_calib_data", "8", "--seq_len", "128")
        assert result.returncode == 0, result.stderr[-3000:]
        out[scheme] = root / scheme
    return out


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    return math.exp(window_nll(logits[0], ids[0]))


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_fused_kernels_equal_op_by_op_evaluation(rotated_models, test_text, scheme):
    # Fusion moves float rounding in norms and attention, which flips a few activation codes by one
    # step (max logit change up to ~2.5% here, RMS ~0.4%); saturation would change the perplexity by
    # orders of magnitude (SmolLM2: 20.8 -> 615754), so the bound is on the perplexity and top-1.
    folder = open_genai_folder(rotated_models[scheme])
    ids = tokenize(folder.path, test_text[:4000])[:256].reshape(1, -1)
    unfused_options = session_options()
    unfused_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused, unfused = (make_session(folder.model_file, options) for options in (session_options(), unfused_options))
    fused_logits, unfused_logits = (s.run(["logits"], prefill_feeds(input_specs(s), folder, ids))[0] for s in (fused, unfused))
    assert abs(_perplexity(fused_logits, ids) / _perplexity(unfused_logits, ids) - 1) < 1e-3
    assert np.mean(fused_logits.argmax(-1) == unfused_logits.argmax(-1)) > 0.99


@pytest.mark.parametrize("scheme", ["INT8_TRANSFORMER_DEFAULT", "INT8_PER_CHANNEL"])
def test_uint8_activation_schemes_write_pair_safe_weights(rotated_models, scheme):
    model = onnx.load(rotated_models[scheme] / "model.onnx")
    matmul_weights = {node.input[1] for node in model.graph.node if node.op_type == "MatMul"}
    dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear" and node.output[0] in matmul_weights}
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in dequantized and t.data_type == onnx.TensorProto.INT8]
    assert weights
    for codes in weights:
        magnitude = np.abs(codes.astype(np.int32))
        assert (magnitude[0::2] + magnitude[1::2]).max() <= 128
