"""The quantized KV cache (issue 36): the GroupQueryAttention rewrite on a hand-built graph and what ORT's
kernel stores, a tiny model generating through ORT-GenAI near float, the recipe stage and its flags, and
the refusals (one line, exit 2, nothing written)."""

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import yaml

import onnxquant
from onnxquant.cli.quantize import build_parser
from onnxquant.cli.quark_flags import given_flags, recipe_from_flags
from onnxquant.errors import UserError
from onnxquant.passes.quantize_kv_cache import QuantizeKVCachePass
from onnxquant.recipes import CalibrationData, KVCache, Quantize, Recipe, RecipeError

from conftest import assert_user_error, run_module

HEADS, KV_HEADS, HEAD = 4, 2, 8
TOKENS = 5
CALIBRATION = CalibrationData(samples=4, seq_len=128)


def _gqa_model() -> ir.Model:
    """One GroupQueryAttention reading a float past and writing present.0.key/value, as the builder names them."""
    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    f = ir.DataType.FLOAT
    inputs = [value("q", f, [1, "s", HEADS * HEAD]), value("k", f, [1, "s", KV_HEADS * HEAD]),
              value("v", f, [1, "s", KV_HEADS * HEAD]),
              value("past_key_values.0.key", f, [1, KV_HEADS, "p", "kv_cache_dim"]),
              value("past_key_values.0.value", f, [1, KV_HEADS, "p", "kv_cache_dim"]),
              value("seqlens_k", ir.DataType.INT32, [1]), value("total", ir.DataType.INT32, [])]
    node = ir.node("GroupQueryAttention", inputs, domain="com.microsoft", name="/model/layers.0/attn/GroupQueryAttention",
                   attributes={"num_heads": HEADS, "kv_num_heads": KV_HEADS}, num_outputs=3)
    for output, name, length in zip(node.outputs, ("out", "present.0.key", "present.0.value"), ("s", "t", "t")):
        width = HEADS * HEAD if name == "out" else "kv_cache_dim"
        output.name, output.type = name, ir.TensorType(f)
        output.shape = ir.Shape([1, "s", width] if name == "out" else [1, KV_HEADS, length, width])
    graph = ir.Graph(inputs, list(node.outputs), nodes=[node], opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, past_dtype=np.float32, past_width=HEAD) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, TOKENS, HEADS * HEAD), np.float32),
             "k": rng.standard_normal((1, TOKENS, KV_HEADS * HEAD), np.float32),
             "v": rng.standard_normal((1, TOKENS, KV_HEADS * HEAD), np.float32),
             "seqlens_k": np.array([TOKENS - 1], np.int32), "total": np.array(TOKENS, np.int32)}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        feeds[name] = np.zeros((1, KV_HEADS, 0, past_width), past_dtype)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _channel_scales(present: np.ndarray, qmax: float) -> np.ndarray:
    """absmax / qmax per channel (kv_head * head_size + d) of a [1, kv_heads, tokens, head_size] cache."""
    return (np.abs(present).max(axis=(0, 2)).reshape(-1) / qmax).astype(np.float32)


def _quantized(dtype: str, granularity: str = "per_channel", scales=None) -> tuple[ir.Model, dict]:
    _, key, value = _run(_gqa_model())
    qmax = {"int8": 128.0, "int4": 8.0}[dtype]
    scales = scales or {"present.0.key": _channel_scales(key, qmax), "present.0.value": _channel_scales(value, qmax)}
    model = _gqa_model()
    QuantizeKVCachePass(scales, dtype, granularity, HEAD)(model)
    return model, scales


def _rounded(present: np.ndarray, scale: np.ndarray, low: int, high: int) -> np.ndarray:
    """clip(rint(x / scale)) of a [1, kv_heads, tokens, head_size] cache with per-channel scales."""
    rows = present.transpose(0, 2, 1, 3).reshape(TOKENS, -1)
    return np.clip(np.rint(rows / scale), low, high).reshape(1, TOKENS, KV_HEADS, HEAD).transpose(0, 2, 1, 3)


def test_pass_writes_the_builders_gqa_form():
    model, scales = _quantized("int8", "per_tensor", {"present.0.key": np.array([0.02], np.float32),
                                                      "present.0.value": np.array([0.03], np.float32)})
    (node,) = model.graph
    assert [node.inputs[i].name for i in (12, 13)] == ["model.layers.0.attn.k_scale", "model.layers.0.attn.v_scale"]
    assert node.inputs[12].const_value.numpy().tolist() == pytest.approx([0.02])
    assert node.attributes["k_quant_type"].value == node.attributes["v_quant_type"].value == "PER_TENSOR"
    assert node.attributes["kv_cache_bit_width"].value == 8
    caches = [model.graph.inputs[3], model.graph.inputs[4], *model.graph.outputs[1:]]
    assert {value.dtype for value in caches} == {ir.DataType.INT8}
    assert str(caches[0].shape[-1]) == "kv_cache_dim"  # int8 keeps the builder's symbolic width


def test_int8_cache_holds_k_over_its_scale_rounded_and_attention_stays_near_float():
    out_float, key, _ = _run(_gqa_model())
    model, scales = _quantized("int8")
    out, cached_key, _ = _run(model, np.int8)
    assert cached_key.dtype == np.int8
    np.testing.assert_array_equal(cached_key, _rounded(key, scales["present.0.key"], -128, 127))
    assert np.abs(out - out_float).max() < 0.05 * np.abs(out_float).max()


def test_int4_cache_packs_two_offset_nibbles_per_byte_low_first():
    _, key, _ = _run(_gqa_model())
    model, scales = _quantized("int4")
    assert model.graph.outputs[1].dtype == ir.DataType.UINT8 and model.graph.outputs[1].shape[-1] == HEAD // 2
    _, packed, _ = _run(model, np.uint8, HEAD // 2)
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(1, KV_HEADS, TOKENS, HEAD).astype(int) - 8
    np.testing.assert_array_equal(nibbles, _rounded(key, scales["present.0.key"], -8, 7))


def test_pass_refuses_a_cache_that_is_already_quantized():
    model, scales = _quantized("int8")
    with pytest.raises(ir.passes.PreconditionError) as raised:
        QuantizeKVCachePass(scales, "int8", "per_channel", HEAD)(model)
    assert isinstance(raised.value.__cause__, UserError)


def test_recipe_with_a_kv_cache_round_trips_yaml_and_orders_it_last():
    recipe = Recipe(stages=(Quantize(), KVCache("int4", "per_tensor", "percentile", 99.9, rotary_envelope=False))).resolved()
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    with pytest.raises(RecipeError, match="quantize must come before kv_cache"):
        Recipe.from_dict({"onnxquant_recipe": 1, "stages": [{"kv_cache": {}}, {"quantize": {}}]})
    with pytest.raises(RecipeError, match="kv_cache.method: mse models integer rounding"):
        Recipe.from_dict({"onnxquant_recipe": 1, "stages": [{"kv_cache": {"dtype": "fp8", "method": "mse"}}]})


def _flags(*argv):
    argv = ["in", "out", *argv]
    return recipe_from_flags(build_parser().parse_args(argv), given_flags(build_parser, argv))


def test_builder_scheme_flag_means_a_kv_cache_stage():
    recipe = _flags("--skip_quantization", "--kv_cache_quant_scheme", "int4_per_channel",
                    "--kv_cache_calib_method", "percentile+99.9")
    assert recipe.float_only and recipe.stage(KVCache) == KVCache("int4", "per_channel", "percentile", 99.9)
    assert _flags("--kv_cache_quant_scheme", "none").stage(KVCache) is None


@pytest.fixture(scope="module")
def tiny_source(tiny_models):
    return tiny_models.onnx("tiny-llama-96")


@pytest.fixture(scope="module")
def int8_cache(tiny_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "int8"
    recipe = Recipe(stages=(Quantize("INT8_PER_CHANNEL"), KVCache("int8", "per_channel")), calibration=CALIBRATION)
    return onnxquant.quantize(tiny_source, out, recipe)


def test_int8_per_channel_cache_generates_through_genai_near_float(tiny_source, tmp_path, test_text):
    from onnxquant.data import tokenize
    from onnxquant.evaluation import GenAIBackend
    from onnxquant.genai_folder import open_genai_folder

    out = onnxquant.quantize(tiny_source, tmp_path / "kv", Recipe(stages=(KVCache("int8", "per_channel"),),
                                                                  calibration=CALIBRATION)).output.parent
    window = tokenize(tiny_source, test_text[:5000])[:200]  # held out, and past the 128-token calibration window
    quantized, reference = (GenAIBackend(open_genai_folder(path)).logits(window) for path in (out, tiny_source))
    # Measured: median 0.023 of the largest logit, top-1 agreement 0.94 (the random model is touchy).
    assert np.median(np.abs(quantized - reference).max(axis=1)) < 0.05 * np.abs(reference).max()
    assert np.mean(quantized.argmax(axis=1) == reference.argmax(axis=1)) > 0.85
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {v.type.tensor_type.elem_type for v in proto.graph.output if v.name.startswith("present.")} == {onnx.TensorProto.INT8}


def test_kv_observers_join_the_quantize_stages_pass_and_the_saved_recipe_reproduces(int8_cache):
    assert int8_cache.report.calibration_passes == 1
    assert "kv_cache=int8_per_channel" in int8_cache.summary_line and int8_cache.quality is not None
    saved = Recipe.from_file(int8_cache.output.parent / "quantization_recipe.yaml")
    assert saved == int8_cache.recipe and saved.stage(KVCache) == KVCache("int8", "per_channel")


def _with_config(source, folder, edit):
    shutil.copytree(source, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    edit(config)
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def test_fp8_cache_is_written_for_a_cuda_folder_in_the_standard_form(tiny_source, tmp_path):
    cuda = _with_config(tiny_source, tmp_path / "cuda", lambda c: c["model"]["decoder"]["session_options"]
                        ["provider_options"].append({"cuda": {}}))
    result = onnxquant.quantize(cuda, tmp_path / "fp8", Recipe(stages=(KVCache("fp8", "per_tensor"),), calibration=CALIBRATION))
    proto = onnx.load(str(result.output), load_external_data=False)
    caches = [v for v in [*proto.graph.input, *proto.graph.output] if v.name.startswith(("past_key_values", "present"))]
    assert {v.type.tensor_type.elem_type for v in caches} == {onnx.TensorProto.FLOAT8E4M3FN}
    assert result.quality is None  # no CPU kernel runs it here
    assert json.loads((tmp_path / "fp8" / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True


def _quantize_cli(source, out, *flags):
    return run_module("onnxquant.cli.quantize", str(source), str(out), "--skip_quantization", "--num_calib_data", "4",
                      "--seq_len", "128", *flags)


def _drop_present_outputs(folder):
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kept = [v for v in proto.graph.output if not v.name.startswith("present.")]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(folder / "model.onnx"))


def _plain_attention(folder):
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.op_type = "MultiHeadAttention"  # stands for a cache concatenated outside GQA
    onnx.save(proto, str(folder / "model.onnx"))


def _sliding_window_cache(folder):
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.attribute.append(onnx.helper.make_attribute("sliding_window_cache", 1))  # as Gemma 2's layers have it
    onnx.save(proto, str(folder / "model.onnx"))


@pytest.mark.parametrize("edit, flags, needles", [
    (None, ["--kv_cache_quant_scheme", "fp8_per_tensor"], ["fp8 KV cache needs a provider", "targets cpu", "int8 or int4"]),
    (_drop_present_outputs, ["--kv_cache_quant_scheme", "int8_per_channel"], ["has no KV cache"]),
    (_plain_attention, ["--kv_cache_quant_scheme", "int8_per_channel"], ["outside attention", "onnxquant export"]),
    (None, ["--kv_cache_quant_scheme", "int8_per_channel", "--seq_len", "4096"], ["calibration window", "longer than the model's context"]),
    (_sliding_window_cache, ["--kv_cache_quant_scheme", "int4_per_channel"], ["sliding-window cache", "multiple of 32, not 16"]),
], ids=["fp8-on-cpu", "no-kv-cache", "plain-decoder", "window-past-context", "sliding-window-cache"])
def test_bad_kv_cache_input_is_one_line_and_writes_nothing(tiny_source, tmp_path, edit, flags, needles):
    source = tiny_source
    if edit is not None:
        source = tmp_path / "source"
        shutil.copytree(tiny_source, source)
        edit(source)
    out = tmp_path / "out"
    assert_user_error(_quantize_cli(source, out, *flags), *needles)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _cache_graph(model_file):
    """What a quantized cache changes: cache I/O types and shapes, each GQA's inputs and attributes, the scales."""
    proto = onnx.load(str(model_file))
    io = {v.name: (v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
          for v in [*proto.graph.input, *proto.graph.output] if v.name.startswith(("past_key_values", "present"))}
    attention = [(list(n.input), sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))
                 for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    scales = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in proto.graph.initializer if i.name.endswith("_scale")}
    return io, attention, scales


@pytest.mark.slow  # a builder export in a child process: about 15 s idle, 55 s on the shared machine
def test_rewrite_equals_the_builders_own_export_with_the_same_scales(tiny_models, tiny_source, tmp_path):
    """The builder, given our scales as its kv_cache_scale_file, writes the same graph and genai_config.json."""
    import subprocess
    import sys

    ours = onnxquant.quantize(tiny_source, tmp_path / "ours", Recipe(stages=(KVCache("int4", "per_channel"),),
                                                                      calibration=CALIBRATION)).output
    scales = _cache_graph(ours)[2]
    layers = range(2)
    (tmp_path / "scales.json").write_text(json.dumps({"scales": {
        "k_scales": [scales[f"model.layers.{i}.attn.k_scale"] for i in layers],
        "v_scales": [scales[f"model.layers.{i}.attn.v_scale"] for i in layers]}}))
    built = tmp_path / "builder"
    subprocess.run([sys.executable, "-m", "onnxquant.builder_compat", "-i", str(tiny_models.hf("tiny-llama-96")),
                    "-o", str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache"), "--extra_options",
                    "kv_cache_quant_scheme=int4_per_channel", f"kv_cache_scale_file={tmp_path / 'scales.json'}"],
                   check=True, capture_output=True)
    assert _cache_graph(ours) == _cache_graph(built / "model.onnx")
    assert json.loads((ours.parent / "genai_config.json").read_text()) == json.loads((built / "genai_config.json").read_text())


def test_rotary_envelope_bounds_k_at_every_position_of_the_context_and_is_tighter_for_slow_pairs():
    from onnxquant.kv_cache import pair_envelope

    context, tokens, half = 64, 16, 4
    theta = np.array([1.0, 0.3, 0.01, 0.001])
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((tokens, 1, 2, half))  # one head, half layout: channel d pairs with d + half

    def rotated(q):  # K of each token as RoPE leaves it at position q (HF's rotate_half form)
        angle = q[:, None] * theta
        return np.concatenate([raw[:, 0, 0] * np.cos(angle) - raw[:, 0, 1] * np.sin(angle),
                               raw[:, 0, 1] * np.cos(angle) + raw[:, 0, 0] * np.sin(angle)], axis=-1)

    seen = rotated(np.arange(tokens, dtype=float))  # token p cached at position p
    bound = pair_envelope(seen, 1, 2 * half, "half", theta, context)
    worst = np.max([np.abs(rotated(np.full(tokens, float(q)))) for q in range(context)], axis=0)
    assert (worst <= bound + 1e-6).all()
    norm = pair_envelope(seen, 1, 2 * half, "half")
    assert np.allclose(bound[:, :2], norm[:, :2])  # fast pairs turn fully within the context
    assert (bound[:, 3] < norm[:, 3] - 1e-3).mean() > 0.5  # the slowest pair's bound is mostly below its norm
