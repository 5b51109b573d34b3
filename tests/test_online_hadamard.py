import numpy as np
import onnx
import pytest

from onnxquant.hadamard import hadamard_factors, hadamard_matrix
from onnxquant.passes.online_hadamard import _factors, kronecker_rows

from conftest import assert_float_pass_exact


@pytest.mark.parametrize("k", [256, 320, 1536, 8960])
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
