import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxquant.graph_utils import transform_initializer

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_blockwise_transform_equals_whole_transform(monkeypatch):
    import onnxquant.graph_utils as graph_utils

    monkeypatch.setattr(graph_utils, "BLOCK_ELEMENTS", 64)  # force many blocks on a small tensor
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 24)).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    whole = ir.Value(name="w", const_value=ir.tensor(weight))
    blocks = ir.Value(name="w", const_value=ir.tensor(weight))
    transform_initializer(whole, lambda w: q.T @ w.astype(np.float64))
    transform_initializer(blocks, lambda w: q.T @ w.astype(np.float64), blocks_along=1)
    np.testing.assert_array_equal(whole.const_value.numpy(), blocks.const_value.numpy())


def test_benchmark_prints_the_table_for_every_recipe(tiny_models, tmp_path, calib_text_path, test_text_path, test_text):
    from onnxquant.evaluation import eval_windows, evaluate_perplexity
    from onnxquant.genai_folder import open_genai_folder

    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "-m", "onnxquant.benchmark.run", "--model", str(tiny_models.onnx("tiny-llama-96")),
         "--calib_data", str(calib_text_path), "--eval_data", str(test_text_path), "--blocks", "2",
         "--block_size", "128", "--num_calib_data", "4", "--seq_len", "64", "--prefill_tokens", "64",
         "--new_tokens", "8", "--configs", "float", "int8", "int8+r1+sq", "--sweep", "int8+r1+sq",
         "--sq_alphas", "0.3", "0.5", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    header = "| config | ppl | delta_pct | quant_s | quant_vs_floor | peak_rss_mb | size_mb | kv_bytes_tok | prefill_ms | decode_tok_s |"
    assert text.count(header) == 2  # main table and alpha sweep
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\S+) \| ([\d.]+) \|.*$", text, re.M)}
    assert {"float", "int8", "int8+r1+sq", "int8+r1+sq@0.3", "int8+r1+sq@0.5"} <= rows.keys()
    cells = [c.strip() for c in rows["int8"].strip("|").split("|")]
    ppl, delta, ratio, rss, size = (float(cells[i]) for i in (1, 2, 4, 5, 6))
    float_ppl = float(rows["float"].split("|")[2])
    # ppl is the validate perplexity of the int8 model over the first 2 blocks, delta_pct its change against float's
    int8 = open_genai_folder(tmp_path / "work" / "int8")
    windows = eval_windows(int8, test_text[:20000], 128, 2)
    assert ppl == pytest.approx(evaluate_perplexity(int8, windows, "genai", progress=False).perplexity, abs=1e-4)
    assert delta == pytest.approx(100 * (ppl / float_ppl - 1), abs=0.01)
    # the quantize child takes longer than the float forward pass it contains, and its peak RSS is a process
    # that loaded onnxruntime (measured 220 MB), not the launcher's
    assert ratio > 1 and rss > 100
    assert size < float(rows["float"].split("|")[7])  # int8 weights make the file smaller
    assert float(cells[7]) == 2 * int8.num_layers * int8.num_kv_heads * int8.head_size * 4  # a float32 KV cache per token
    assert float(cells[9]) > 0  # decode tokens/s measured


def test_child_peak_rss_does_not_include_the_parents(tmp_path):
    """A child of a big process reports its own peak, not the parent's RSS at fork."""
    from onnxquant.benchmark.run import run_child

    script = tmp_path / "child.py"
    script.write_text("print(sum(range(10)))\n")
    ballast = np.ones(400 * 1024 * 1024 // 8)  # 400 MB resident in this process
    _, peak_mb, stdout = run_child([str(script)], tmp_path / "child.log")
    assert stdout.strip() == "45"
    assert peak_mb < 200 < ballast.nbytes / 2**20


def test_decode_profile_lists_op_types_by_time(tiny_models, tmp_path):
    result = subprocess.run([sys.executable, str(TOOLS / "profile_decode.py"), str(tiny_models.onnx("tiny-llama-96")),
                             "--steps", "3", "--past", "16"], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| ([0-9.]+) \| (\d+) \|$", result.stdout, re.MULTILINE)
    assert ("MatMul" in {op for op, _, _ in rows}) and re.search(r"wall [0-9.]+ ms/step", result.stdout)
    times = [float(ms) for _, ms, _ in rows]
    assert times == sorted(times, reverse=True)
    assert not list(tmp_path.glob("decode_profile*"))  # the trace is removed


def test_ort_static_peer_is_w8a8_with_onnxquants_settings(tiny_models, tmp_path, calib_text_path, test_text):
    # The INT8 peer is ORT's quantize_static with INT8_PER_CHANNEL's settings: its MatMul inputs are
    # quantized and nothing else, and on a tiny model (no outliers to tell them apart) both quantizers
    # land on the same perplexity within 1%.
    import math

    import onnx

    from onnxquant.data import tokenize
    from onnxquant.evaluation import window_nll
    from conftest import prefill_logits, run_module

    source = tiny_models.onnx("tiny-llama-96")
    calib = ["--calib_data", str(calib_text_path), "--num_calib_data", "8", "--seq_len", "128"]
    peer = subprocess.run([sys.executable, "-m", "onnxquant.benchmark.peers", "ort_static_int8_pc", "--input", str(source),
                           "--output", str(tmp_path / "peer"), *calib], capture_output=True, text=True, timeout=600)
    assert peer.returncode == 0, peer.stderr[-3000:]
    ours = run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(tmp_path / "ours"),
                      "--config", "INT8_PER_CHANNEL", "--use_moving_average", *calib)
    assert ours.returncode == 0, ours.stderr[-3000:]

    graph = onnx.load(str(tmp_path / "peer" / "model.onnx"), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    matmul_inputs = {node.input[0] for node in graph.node if node.op_type == "MatMul"}
    quantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"
                 and producer.get(node.input[0]) is not None and producer[node.input[0]].op_type == "QuantizeLinear"}
    assert quantized and quantized <= matmul_inputs

    ids = tokenize(source, test_text[:4000])[:256]
    ppl = {name: math.exp(window_nll(prefill_logits(tmp_path / name, ids)[0], ids)) for name in ("peer", "ours")}
    assert abs(ppl["peer"] / ppl["ours"] - 1) < 0.01, ppl


def test_speed_note_skips_a_crashed_recipe():
    from onnxquant.benchmark.run import Row, speed_note

    rows = [Row("float", 20.0, extra={"decode_spread": (40.0, 45.0)}), Row("broken", float("nan"), extra={"crashed": True})]
    note = speed_note(rows)
    assert "float 40.0–45.0" in note and "broken" not in note


def test_olive_peer_without_its_venv_says_how_to_make_one(tiny_models, tmp_path):
    from conftest import assert_user_error

    env = {key: value for key, value in os.environ.items() if key != "ONNXQUANT_OLIVE_PYTHON"}
    result = subprocess.run([sys.executable, "-m", "onnxquant.benchmark.peers", "olive_rtn", "--input",
                             str(tiny_models.onnx("tiny-llama-96")), "--output", str(tmp_path / "olive")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert_user_error(result, "ONNXQUANT_OLIVE_PYTHON", "install.md")
    assert not (tmp_path / "olive").exists()


@pytest.mark.slow  # the builder's calibration and a builder rebuild in a child process
def test_builder_kv_peer_writes_the_builders_int8_cache_over_the_same_weights(tiny_models, tmp_path, calib_text_path):
    import onnx
    from onnx import numpy_helper

    from onnxquant.genai_folder import open_genai_folder
    from onnxquant.kv_cache import stored_cache_size

    source = tiny_models.onnx("tiny-llama-96")
    peer = subprocess.run([sys.executable, "-m", "onnxquant.benchmark.peers", "builder_kv", "--input", str(source),
                           "--gguf", str(tiny_models.hf("tiny-llama-96")), "--output", str(tmp_path / "peer"),
                           "--kv_scheme", "int8_per_channel", "--calib_data", str(calib_text_path), "--num_calib_data", "4",
                           "--seq_len", "64"], capture_output=True, text=True, timeout=900)
    assert peer.returncode == 0, peer.stderr[-3000:]
    folder, float_folder = open_genai_folder(tmp_path / "peer"), open_genai_folder(source)
    assert stored_cache_size(folder).bytes_per_token * 4 == stored_cache_size(float_folder).bytes_per_token
    graph = onnx.load(str(folder.model_file)).graph
    scales = [init for init in graph.initializer if init.name.endswith("attn.k_scale")]
    assert len(scales) == folder.num_layers and all(numpy_helper.to_array(s).min() > 0 for s in scales)
