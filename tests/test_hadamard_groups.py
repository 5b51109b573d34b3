"""--hadamard_group_size: block-diagonal Hadamard groups folded into the weights, online on the activations."""

import json

import numpy as np
import onnx
import pytest

from onnxquant.algorithms.rtn import clip_search
from onnxquant.data import tokenize
from onnxquant.passes.hadamard_groups import group_rotation
from onnxquant.patterns import GROUPS_IN_R1_KEY, HADAMARD_GROUPS_METADATA_KEY, ONLINE_ROTATION_KEY, ROTATION_METADATA_KEY
from onnxquant.spec import QuantSpec, round_to_nearest

from conftest import assert_float_pass_exact, assert_user_error, float_pass_run, prefill_logits, relative_logit_error, run_module


@pytest.mark.parametrize("name,group", [("tiny-llama-96", 32), ("tiny-qwen2-96", 16)])
def test_hadamard_groups_keep_float_logits(tiny_models, tmp_path, calib_text_path, test_text, name, group):
    source = tiny_models.onnx(name)
    result = float_pass_run(source, tmp_path / "h", calib_text_path, "--hadamard_group_size", str(group))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = tokenize(source, test_text[:3000])[:256]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(tmp_path / "h", ids)) < 1e-4
    metadata = onnx.load(tmp_path / "h" / "model.onnx", load_external_data=False).metadata_props
    applied = json.loads(next(p.value for p in metadata if p.key == HADAMARD_GROUPS_METADATA_KEY))
    # Groups within a head (head size 16) fold into v (R2); the rest run online.
    assert applied["folded_into_v"] == (2 if group == 16 else 0)


def test_groups_on_the_residual_stream_go_into_r1(tiny_models, tmp_path, calib_text_path, test_text):
    source = tiny_models.onnx("tiny-llama-96")
    assert_float_pass_exact(source, tmp_path / "r", calib_text_path, test_text, "--include_rotation", "--include_sq",
                            "--hadamard_group_size", "32")
    model = onnx.load(tmp_path / "r" / "model.onnx", load_external_data=False)
    metadata = {p.key: json.loads(p.value) for p in model.metadata_props
                if p.key in (HADAMARD_GROUPS_METADATA_KEY, ROTATION_METADATA_KEY)}
    assert metadata[ROTATION_METADATA_KEY]["hadamard_groups"] == 32
    # Online groups remain only on the o_proj and down_proj inputs (2 layers); the residual readers have R1's.
    assert metadata[HADAMARD_GROUPS_METADATA_KEY]["online"] == 2 * 2
    in_r1 = [n.name for n in model.graph.node if any(p.key == GROUPS_IN_R1_KEY for p in n.metadata_props)]
    assert len(in_r1) == 2 * 3 + 1  # fused qkv_proj, gate_proj, up_proj per layer; lm_head


def test_group_rotation_is_orthonormal():
    h = group_rotation(32)
    np.testing.assert_allclose(h @ h.T, np.eye(32), atol=1e-12)


def test_mxfp4_with_hadamard_groups_quantizes_weights_not_rotations(tiny_models, tmp_path):
    source = tiny_models.onnx("tiny-llama-96")
    counts = {}
    for group in (None, "32"):
        out = tmp_path / f"q{group}"
        flags = ("--hadamard_group_size", group) if group else ()
        result = run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
                            "--config", "MXFP4_A16", "--clip_search", "--num_calib_data", "4", "--seq_len", "128", *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        model = onnx.load(out / "model.standard.onnx", load_external_data=False)
        rotations = [n for n in model.graph.node if any(p.key == ONLINE_ROTATION_KEY for p in n.metadata_props)]
        counts[group] = (sum(n.op_type == "DequantizeLinear" for n in model.graph.node), len(rotations))
    # Same weights quantized; one rotation per activation group (q/k/v, o, gate/up, down per layer, lm_head).
    assert counts["32"][0] == counts[None][0] and counts[None][1] == 0 and counts["32"][1] == 2 * 4 + 1


def test_e8m0_mse_search_never_loses_to_the_ocp_scale():
    rng = np.random.default_rng(0)
    weight = (rng.standard_t(3, size=(256, 64))).astype(np.float32)
    spec = QuantSpec("float4e2m1", "per_block", block_size=32, scale_dtype="e8m0")
    ocp, searched = round_to_nearest(weight, spec), clip_search(weight, spec)
    error = lambda q: float(((q.dequantize() - weight) ** 2).sum())  # noqa: E731
    assert error(searched) < error(ocp)
    assert np.any(searched.scale > ocp.scale)  # some blocks took the next exponent up instead of saturating


def test_group_size_that_does_not_divide_k_names_the_node(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "q"), "--config", "MXFP4_A16", "--hadamard_group_size", "64")
    assert_user_error(result, "--hadamard_group_size 64 does not divide K=96 of MatMul", "/MatMul'")
    assert not (tmp_path / "q").exists()


def test_unknown_group_size_is_refused(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "q"), "--hadamard_group_size", "48")
    assert_user_error(result, "--hadamard_group_size 48 is not one of 16, 32, 64, 128")
    assert not (tmp_path / "q").exists()


def test_group_size_that_does_not_divide_the_hidden_size_with_r1(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "q"), "--include_rotation", "--hadamard_group_size", "64")
    assert_user_error(result, "--hadamard_group_size 64 does not divide the hidden size 96 that R1 rotates")
    assert not (tmp_path / "q").exists()
