"""Mistakes and untested paths a review found: each ends in one clear line, or works and is checked."""

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxquant.data import tokenize
from onnxquant.genai_folder import open_genai_folder
from onnxquant.patterns import QUANT_METADATA_KEY, ROTATION_METADATA_KEY
from onnxquant.resources import rotation_config_dir

from conftest import assert_user_error, float_pass_run, prefill_logits, relative_logit_error, run_module


def _quark_pairs(layers=2):
    pairs = [{"prev_nodes": ["/model/embed_tokens/Gather"], "norm_node": "/model/layers.0/input_layernorm/LayerNorm",
              "next_nodes": ["/model/layers.0/attn/qkv_proj/MatMul"]}]
    for i in range(layers):
        pairs.append({"prev_nodes": [f"/model/layers.{i}/attn/o_proj/MatMul"],
                      "norm_node": f"/model/layers.{i}/post_attention_layernorm/SkipLayerNorm",
                      "next_nodes": [f"/model/layers.{i}/mlp/gate_proj/MatMul", f"/model/layers.{i}/mlp/up_proj/MatMul"]})
        nxt = f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm" if i + 1 < layers else \
            f"/model/layers.{layers}/final_norm_layernorm/SkipLayerNorm"
        reader = f"/model/layers.{i + 1}/attn/qkv_proj/MatMul" if i + 1 < layers else "/lm_head/MatMul"
        pairs.append({"prev_nodes": [f"/model/layers.{i}/mlp/down_proj/MatMul"], "norm_node": nxt, "next_nodes": [reader]})
    return pairs


@pytest.mark.parametrize("edit,needle", [
    (lambda p: p[0]["next_nodes"].append("/model/layers.0/attn/o_proj/MatMul"), "does not read"),
    (lambda p: p[1]["prev_nodes"].append("/model/layers.0/mlp/down_proj/MatMul"), "does not write the residual stream"),
    (lambda p: p[0]["next_nodes"].append("/model/layers.0/attn/GroupQueryAttention"), "not a MatMul with a constant weight"),
])
def test_config_listing_a_node_outside_its_pair_is_refused(tiny_models, tmp_path, calib_text_path, edit, needle):
    pairs = _quark_pairs()
    edit(pairs)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"R1_pairs": pairs}))
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path,
                            "--include_rotation", "--r_config_path", str(config))
    assert_user_error(result, needle)
    assert not (tmp_path / "o").exists()


def test_quantized_input_is_refused(tiny_models, tmp_path, calib_text_path):
    common = ["--calib_data", str(calib_text_path), "--num_calib_data", "2", "--seq_len", "64"]
    first = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                       "--output_model_path", str(tmp_path / "q"), *common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module("onnxquant.cli.quantize", "--input_model_path", str(tmp_path / "q"), "--output_model_path",
                        str(tmp_path / "q2"), *common)
    assert_user_error(second, "already quantized")
    assert not (tmp_path / "q2").exists()


def test_rotation_did_its_work(tiny_models, tmp_path, calib_text_path, test_text):
    source = tiny_models.onnx("tiny-llama-96")
    result = float_pass_run(source, tmp_path / "rot", calib_text_path, "--include_rotation", "--use_random_had", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    model = ir.load(tmp_path / "rot" / "model.onnx")
    assert json.loads(model.metadata_props[ROTATION_METADATA_KEY])["matrix"] == "random-hadamard"
    gains = [v.const_value.numpy() for name, v in model.graph.initializers.items() if "layernorm" in name]
    assert gains and all(np.all(g == 1.0) for g in gains)  # folded into the readers
    before = ir.load(source / "model.onnx").graph.initializers["model.layers.0.attn.o_proj.MatMul.weight"].const_value.numpy()
    after = model.graph.initializers["model.layers.0.attn.o_proj.MatMul.weight"].const_value.numpy()
    assert np.abs(after - before).max() > 1e-3  # rotated, and still the same function:
    ids = tokenize(source, test_text[:3000])[:128]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(tmp_path / "rot", ids)) < 1e-4


def _tiny_quantize(tiny_models, out, calib_text_path, *flags):
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                      "--output_model_path", str(out), "--calib_data", str(calib_text_path), "--num_calib_data", "8",
                      "--seq_len", "128", *flags)


@pytest.mark.parametrize("flags", [("--config", "INT8_PER_CHANNEL"), ("--config", "INT8_SYMMETRIC_ACT"),
                                   ("--config", "INT8_SYMMETRIC_ACT_PER_CHANNEL", "--include_rotation", "--include_sq"),
                                   ("--calib_method", "percentile+99.9"), ("--calib_method", "mse")])
def test_int8_schemes_run_near_float(tiny_models, tmp_path, calib_text_path, test_text, flags):
    from onnxquant.evaluation import eval_windows, evaluate_perplexity

    result = _tiny_quantize(tiny_models, tmp_path / "q", calib_text_path, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    float_folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    windows = eval_windows(float_folder, test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(float_folder, windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(open_genai_folder(tmp_path / "q"), windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < 0.05, (quant_ppl, float_ppl)


def test_exclude_keeps_the_node_in_float(tiny_models, tmp_path, calib_text_path):
    result = _tiny_quantize(tiny_models, tmp_path / "q", calib_text_path, "--exclude", "lm_head")
    assert result.returncode == 0, result.stderr[-2000:]
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    lm_head = next(n for n in graph.node if n.name == "/lm_head/MatMul")
    assert lm_head.input[0] not in producers or producers[lm_head.input[0]].op_type != "DequantizeLinear"
    assert lm_head.input[1] == "lm_head.MatMul.weight"


def test_output_file_name_and_overwrite(tiny_models, tmp_path, calib_text_path, test_text):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    result = _tiny_quantize(tiny_models, out / "decoder_int8.onnx", calib_text_path, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "old.txt").exists()
    folder = open_genai_folder(out)
    assert folder.model_file.name == "decoder_int8.onnx" and QUANT_METADATA_KEY in ir.load(folder.model_file).metadata_props
    from onnxquant.evaluation import eval_windows, evaluate_perplexity

    # ORT-GenAI runs the renamed file (genai_config.json names it) as the INT8 model it is: near float.
    source = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    windows = eval_windows(source, test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(source, windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(folder, windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < 0.05, (quant_ppl, float_ppl)


def test_shipped_rotation_configs_are_found():
    """Each shipped config is the one found for every model type it lists (none shadowed by another file), and
    its templates expand to one pair per RMSNorm at any depth: two per layer and the final norm."""
    from onnxquant.rotation_config import load_rotation_config

    found = {}
    for path in sorted(rotation_config_dir().glob("*.json")):
        for model_type in json.loads(path.read_text(encoding="utf-8"))["model_types"]:
            for layers in (1, 5):
                config = load_rotation_config(None, model_type, layers)
                assert config.source == path.name and len(config.pairs) == 2 * layers + 1, (model_type, config.source)
            found[model_type] = path.name
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"} <= found.keys()


def test_exclude_most_sensitive_keeps_that_many_matmuls_in_float(tiny_models, tmp_path, calib_text_path):
    result = _tiny_quantize(tiny_models, tmp_path / "q", calib_text_path, "--exclude_most_sensitive", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = re.findall(r"^kept in float: (\S+)", result.stderr, re.MULTILINE)
    assert len(kept) == 2 and "kept_float=2" in result.stdout
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers}
    assert float_matmuls == set(kept)


def test_exclude_most_sensitive_must_leave_something_quantized(tiny_models, tmp_path, calib_text_path):
    result = _tiny_quantize(tiny_models, tmp_path / "q", calib_text_path, "--exclude_most_sensitive", "99")
    assert_user_error(result, "--exclude_most_sensitive 99", "smaller count")
    assert not (tmp_path / "q").exists()
