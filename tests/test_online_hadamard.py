import numpy as np
import onnx
import pytest

from onnxquant.hadamard import hadamard_factors, hadamard_matrix
from onnxquant.passes.online_hadamard import _factors, kronecker_rows

from conftest import assert_float_pass_exact, run_module


@pytest.mark.parametrize("k", [256, 320, 1536, pytest.param(8960, marks=pytest.mark.slow)])
def test_factored_hadamard_is_the_dense_one(k):
    left, right = _factors(k)
    dense = np.kron(left, right)
    assert np.allclose(dense @ dense.T, np.eye(k), atol=1e-10)
    assert np.allclose(np.abs(dense), 1 / np.sqrt(k))
    weight = np.random.default_rng(0).standard_normal((k, 3))
    assert np.allclose(kronecker_rows(weight, left, right), dense.T @ weight)


def test_kronecker_factors_rebuild_hadamard_matrix():
    assert np.array_equal(np.kron(*hadamard_factors(1536)), hadamard_matrix(1536))
    assert [len(f) for f in hadamard_factors(1536)] == [12, 128]


@pytest.mark.parametrize("name", ["tiny-llama-96", "tiny-qwen2-96"])
def test_r4_keeps_float_logits_and_stays_online_in_float(tiny_models, tmp_path, calib_text_path, test_text, name):
    assert_float_pass_exact(tiny_models.onnx(name), tmp_path / "r4", calib_text_path, test_text,
                            "--include_rotation", "--include_sq", "--include_r4")
    graph = onnx.load(str(tmp_path / "r4" / "model.onnx"), load_external_data=False).graph
    assert sum(n.name.endswith("/r4/MatMul_left") for n in graph.node) == 2  # one per layer's down_proj
    quantized = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx(name)),
                           "--output_model_path", str(tmp_path / "q"), "--calib_data", str(calib_text_path),
                           "--num_calib_data", "2", "--seq_len", "64", "--include_rotation", "--include_sq", "--include_r4")
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    dequantized = lambda value: value in producer and producer[value].op_type == "DequantizeLinear"  # noqa: E731
    # The rotation MatMuls multiply by their float r4_* factors, unquantized; down_proj reads their result quantized.
    rotations = [n for n in graph.node if "/r4/MatMul_" in n.name]
    assert len(rotations) == 2 * 2 and all(n.op_type == "MatMul" and not any(map(dequantized, n.input)) and
                                           any(i in floats and i.startswith("r4_") for i in n.input) for n in rotations)
    down = [n for n in graph.node if n.name.endswith("/mlp/down_proj/MatMul")]
    assert len(down) == 2 and all(dequantized(n.input[0]) and dequantized(n.input[1]) for n in down)
    quantized_inputs = {producer[producer[n.input[0]].input[0]].input[0] for n in down}  # what each Q/DQ pair reads
    assert quantized_inputs == {n.output[0] for n in graph.node if n.name.endswith("/r4/Reshape_back")}
