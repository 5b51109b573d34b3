"""4-bit weight-only quantization: GPTQ and AWQ math, and whole tiny models through ORT-GenAI."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from onnxquant.algorithms.awq import output_error
from onnxquant.algorithms.gptq import GPTQSettings, gptq_round
from onnxquant.calibration import ChannelSquareSumObserver, HessianObserver, run_calibration
from onnxquant.genai_folder import open_genai_folder
from onnxquant.spec import QuantSpec, round_to_nearest
from onnxquant.evaluation import eval_windows, evaluate_perplexity

from conftest import assert_user_error, run_module

UINT4_32 = QuantSpec("uint4", "per_block", symmetric=False, block_size=32)


def _correlated_inputs(rng, tokens, k):
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    scales = np.exp(rng.standard_normal(k))  # a few large channels, as in LLM activations
    return (rng.standard_normal((tokens, k)) @ mixing) * scales


def test_gptq_output_error_is_below_round_to_nearest():
    rng = np.random.default_rng(0)
    x = _correlated_inputs(rng, 512, 96)
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    hessian = x.T @ x
    reference = x @ weight
    rtn = np.linalg.norm(x @ round_to_nearest(weight, UINT4_32).dequantize() - reference)
    gptq = np.linalg.norm(x @ gptq_round(weight, hessian, UINT4_32).dequantize() - reference)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_awq_loss_from_the_hessian_equals_the_error_on_the_tokens():
    rng = np.random.default_rng(1)
    x = _correlated_inputs(rng, 256, 64)
    weight = rng.standard_normal((64, 16)).astype(np.float32)
    s = np.exp(rng.standard_normal(64) * 0.3)
    scaled = (weight.astype(np.float64) * s[:, None]).astype(np.float32)
    direct = np.sum(((x / s) @ (round_to_nearest(scaled, UINT4_32).dequantize() - scaled)) ** 2)
    assert output_error(weight, x.T @ x, UINT4_32, s) == pytest.approx(direct, rel=1e-6)


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _toy_matmul(path, rng) -> None:
    """y = x·w with x [1, tokens, 8] and a random w [8, 3]: one watched tensor, x."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 3])],
                              [numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_hessian_observer_sums_xtx_in_the_graph(tmp_path):
    """The full Hessian, and its diagonal alone (the SmoothQuant alpha search's), watching one tensor."""
    rng = np.random.default_rng(2)
    _toy_matmul(tmp_path / "toy.onnx", rng)
    batches = [{"x": rng.standard_normal((1, n, 8)).astype(np.float32)} for n in (5, 7)]
    observer, diagonal = HessianObserver(), ChannelSquareSumObserver()
    run_calibration(tmp_path / "toy.onnx", _Reader(batches), [("x", observer), ("x", diagonal)])
    rows = np.concatenate([b["x"][0] for b in batches])
    np.testing.assert_allclose(observer.sum, rows.T @ rows, rtol=1e-5)
    np.testing.assert_allclose(diagonal.sum, (rows * rows).sum(axis=0), rtol=1e-5)
    assert observer.tokens == diagonal.tokens == 12


def test_hessian_token_stride_sums_every_nth_token(tmp_path):
    """--hessian_token_stride 3: x xᵀ over tokens 0, 3, 6, ... of each sample, and their count."""
    rng = np.random.default_rng(3)
    _toy_matmul(tmp_path / "toy.onnx", rng)
    batches = [{"x": rng.standard_normal((1, n, 8)).astype(np.float32)} for n in (7, 9)]
    observer = HessianObserver(token_stride=3)
    run_calibration(tmp_path / "toy.onnx", _Reader(batches), [("x", observer)])
    rows = np.concatenate([b["x"][0, ::3] for b in batches])
    assert observer.tokens == len(rows) == 3 + 3
    np.testing.assert_allclose(observer.sum, rows.T @ rows, rtol=1e-5)


def _w4(tiny_models, out, calib_text_path, *flags):
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                      "--output_model_path", str(out), "--num_calib_data", "8", "--seq_len", "128",
                      "--calib_data", str(calib_text_path), "--block_size", "32", *flags)


@pytest.mark.parametrize("flags", [("--config", "UINT4_PER_GROUP_ASYM"), ("--config", "INT4_PER_GROUP_SYM"),
                                   ("--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq"),
                                   ("--config", "UINT4_PER_GROUP_ASYM", "--algo", "awq", "--int8_nodes", "lm_head"),
                                   ("--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq", "--include_rotation")])
def test_4bit_model_runs_in_ort_genai_near_float(tiny_models, tmp_path, calib_text_path, test_text, flags):
    result = _w4(tiny_models, tmp_path / "w4", calib_text_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    graph = onnx.load(str(tmp_path / "w4" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # 2 layers x (qkv, o, gate, up, down) + lm_head; with R1 the mixing that keeps the embedding tied runs
    # online in float (small Hadamard factors), the only float MatMuls left
    assert ops.count("MatMulNBits") == 11
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul"]
    assert all("/lm_head/tied_input/" in name for name in float_matmuls)
    assert len(float_matmuls) == (4 if "--include_rotation" in flags else 0)
    assert "GatherBlockQuantized" in ops  # no float copy of the vocabulary matrix is left
    float_weights = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
                     and i.name.endswith("weight")]
    assert not float_weights
    float_folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    windows = eval_windows(float_folder, test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(float_folder, windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(open_genai_folder(tmp_path / "w4"), windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < 0.15, (quant_ppl, float_ppl)


@pytest.mark.parametrize("flags,needle", [
    (("--config", "UINT4_PER_GROUP_ASYM", "--block_size", "100"), "--block_size 100 is not a power of two"),
    (("--config", "INT8_TRANSFORMER_DEFAULT", "--algo", "awq"), "--algo awq applies to the weight-only schemes"),
    (("--config", "INT8_TRANSFORMER_DEFAULT", "--block_size", "32"), "--block_size applies to the blocked weight schemes (UINT4_PER_GROUP_ASYM"),
    (("--config", "UINT4_PER_GROUP_ASYM", "--accuracy_level", "3"), "--accuracy_level 3"),
    (("--config", "UINT4_PER_GROUP_ASYM", "--int8_nodes", "no_such_head"), "'no_such_head'"),
])
def test_4bit_flag_mistakes(tiny_models, tmp_path, calib_text_path, flags, needle):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "o"), "--calib_data", str(calib_text_path), *flags)
    assert_user_error(result, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smollm2_gptq_block_128_beats_round_to_nearest(smollm2_onnx, tmp_path, calib_text_path, test_text):
    folder = open_genai_folder(smollm2_onnx)
    windows = eval_windows(folder, test_text, 2048, 2)
    ppl = {}
    for algo in ("rtn", "gptq"):
        out = tmp_path / algo
        result = run_module("onnxquant.cli.quantize", "--input_model_path", str(smollm2_onnx), "--output_model_path", str(out),
                            "--config", "UINT4_PER_GROUP_ASYM", "--algo", algo, "--calib_data", str(calib_text_path),
                            "--num_calib_data", "16", "--seq_len", "512")
        assert result.returncode == 0, result.stderr[-2000:]
        ppl[algo] = evaluate_perplexity(open_genai_folder(out), windows, "genai", progress=False).perplexity
    float_ppl = evaluate_perplexity(folder, windows, "genai", progress=False).perplexity
    assert ppl["gptq"] < 0.85 * ppl["rtn"] and ppl["gptq"] < 1.4 * float_ppl, (ppl, float_ppl)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_gptq_on_a_pair_safe_int8_grid_keeps_pairs_safe_and_beats_rtn(granularity):
    rng = np.random.default_rng(1)
    x = _correlated_inputs(rng, 512, 96)
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    spec = QuantSpec("int8", granularity, pair_safe=True)
    gptq, rtn = gptq_round(weight, x.T @ x, spec, GPTQSettings(columns_per_chunk=16)), round_to_nearest(weight, spec)
    codes = np.abs(gptq.codes.astype(np.int32))
    assert (codes[0::2] + codes[1::2]).max() <= 128
    error = lambda q: np.linalg.norm(x @ q.dequantize() - x @ weight)  # noqa: E731
    assert error(gptq) < 0.9 * error(rtn)
