import json
import shutil

import numpy as np
import pytest

from onnxquant.data import tokenize
from onnxquant.hadamard import hadamard_matrix, rotation_matrix

from conftest import assert_float_pass_exact, assert_user_error, float_pass_run, prefill_logits, relative_logit_error


@pytest.mark.parametrize("n", [64, 96, 576, 896, 1536, 3072])
def test_hadamard_rotation_is_orthogonal(n):
    q = rotation_matrix(n).matrix
    assert np.allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert np.allclose(np.abs(q), 1 / np.sqrt(n))  # a real Hadamard, not a fallback


def test_random_hadamard_is_seeded_and_orthogonal():
    a, b, c = (rotation_matrix(576, True, seed).matrix for seed in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.allclose(a @ a.T, np.eye(576), atol=1e-12)


def test_size_without_hadamard_falls_back_with_a_warning():
    assert hadamard_matrix(100) is None
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 100"):
        rotation = rotation_matrix(100, seed=3)
    assert rotation.kind == "random-orthogonal"
    assert np.allclose(rotation.matrix @ rotation.matrix.T, np.eye(100), atol=1e-10)


@pytest.mark.parametrize("name", ["tiny-llama3-64", "tiny-llama-96", "tiny-qwen2-96", "tiny-llama-576"])
def test_rotated_float_model_keeps_its_logits(tiny_models, tmp_path, calib_text_path, test_text, name):
    assert_float_pass_exact(tiny_models.onnx(name), tmp_path / "rot", calib_text_path, test_text, "--include_rotation")


def test_quark_format_config_is_accepted(tiny_models, tmp_path, calib_text_path, test_text):
    source = tiny_models.onnx("tiny-llama-96")
    pairs = [{"prev_nodes": ["/model/embed_tokens/Gather"], "norm_node": "/model/layers.0/input_layernorm/LayerNorm",
              "next_nodes": ["/model/layers.0/attn/qkv_proj/MatMul"]}]
    for i in range(2):
        pairs.append({"prev_nodes": [f"/model/layers.{i}/attn/o_proj/MatMul"],
                      "norm_node": f"/model/layers.{i}/post_attention_layernorm/SkipLayerNorm",
                      "next_nodes": [f"/model/layers.{i}/mlp/gate_proj/MatMul", f"/model/layers.{i}/mlp/up_proj/MatMul"]})
    pairs.append({"prev_nodes": ["/model/layers.0/mlp/down_proj/MatMul"], "norm_node": "/model/layers.1/input_layernorm/SkipLayerNorm",
                  "next_nodes": ["/model/layers.1/attn/qkv_proj/MatMul"]})
    pairs.append({"prev_nodes": ["/model/layers.1/mlp/down_proj/MatMul"], "norm_node": "/model/layers.2/final_norm_layernorm/SkipLayerNorm",
                  "next_nodes": ["/lm_head/MatMul"]})
    config = tmp_path / "quark.json"
    config.write_text(json.dumps({"R1_pairs": pairs}))
    result = float_pass_run(source, tmp_path / "rot", calib_text_path, "--include_rotation", "--r_config_path", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = tokenize(source, test_text[:2000])[:128]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(tmp_path / "rot", ids)) < 1e-4


def test_config_naming_a_missing_node(tiny_models, tmp_path, calib_text_path):
    config = {"R1_pairs": [{"prev_nodes": ["/model/embed_tokens/Gather"], "norm_node": "/model/layers.0/nope/LayerNorm",
                            "next_nodes": []}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path,
                            "--include_rotation", "--r_config_path", str(path))
    assert_user_error(result, "'/model/layers.0/nope/LayerNorm' is not in the graph")
    assert not (tmp_path / "o").exists()


def test_config_that_misses_a_reader(tiny_models, tmp_path, calib_text_path):
    from onnxquant.resources import rotation_config_dir

    config = json.loads((rotation_config_dir() / "llama.json").read_text())
    config["R1_pairs"][2]["next_nodes"] = ["/model/layers.{i}/mlp/gate_proj/MatMul"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(config))
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path,
                            "--include_rotation", "--r_config_path", str(path))
    assert_user_error(result, "up_proj/MatMul", "is not in its next_nodes")


def test_hidden_size_mismatch(tiny_models, tmp_path, calib_text_path):
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path,
                            "--include_rotation", "--hidden_size", "128")
    assert_user_error(result, "--hidden_size 128", "96")


def test_family_without_config(tiny_models, tmp_path, calib_text_path):
    folder = tmp_path / "other"
    shutil.copytree(tiny_models.onnx("tiny-llama-96"), folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["type"] = "olmo"
    (folder / "genai_config.json").write_text(json.dumps(config))
    result = float_pass_run(folder, tmp_path / "o", calib_text_path, "--include_rotation")
    assert_user_error(result, "no rotation config for model type 'olmo'", "--r_config_path")


def test_already_rotated_graph_is_refused(tiny_models, tmp_path, calib_text_path):
    first = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "rot", calib_text_path, "--include_rotation")
    assert first.returncode == 0, first.stderr[-2000:]
    second = float_pass_run(tmp_path / "rot", tmp_path / "rot2", calib_text_path, "--include_rotation")
    assert_user_error(second, "already rotated")
    assert not (tmp_path / "rot2").exists()


@pytest.mark.slow
def test_rotated_smollm2_keeps_its_logits(smollm2_onnx, tmp_path, calib_text_path, test_text):
    result = float_pass_run(smollm2_onnx, tmp_path / "rot", calib_text_path, "--include_rotation")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = tokenize(smollm2_onnx, test_text[:4000])[:256]
    assert relative_logit_error(prefill_logits(smollm2_onnx, ids), prefill_logits(tmp_path / "rot", ids)) < 1e-4
