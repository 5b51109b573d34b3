"""The optimum exporter (`export --exporter optimum`) and quantizing its plain decoders: the same float
model as the builder's, INT8 and 4-bit near float, R1 and SmoothQuant exact after the norm fusion or
refused in one line.

optimum-onnx pins transformers<4.58, so it runs from its own environment: $ONNXQUANT_OPTIMUM_PYTHON,
else one this module makes once under ~/.cache (about 30 s with the torch wheel on disk)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxquant.genai_folder import open_genai_folder
from onnxquant.optimum_export import OPTIMUM_PYTHON_ENV, OPTIMUM_REQUIREMENT, transformers4_config
from onnxquant.patterns import ROTATION_METADATA_KEY
from onnxquant.rotation_config import plain_decoder_pairs
from onnxquant.evaluation import eval_windows, evaluate_perplexity

from conftest import assert_float_pass_exact, assert_user_error, float_pass_run, prefill_logits, relative_logit_error, run_module

REPO = Path(__file__).resolve().parents[1]

# It makes optimum its own environment with pip (about 45 s) and exports every model twice: `pytest -m slow`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def optimum_python() -> str:
    if os.environ.get(OPTIMUM_PYTHON_ENV):
        return os.environ[OPTIMUM_PYTHON_ENV]
    env = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxquant-tests" / "venv-optimum"
    python, ready = env / "bin" / "python", env / ".ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                                  OPTIMUM_REQUIREMENT], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"could not install {OPTIMUM_REQUIREMENT} into {env}: {install.stderr.strip()[-300:]}")
        ready.touch()
    return str(python)


class _OptimumExports:
    def __init__(self, root: Path, tiny_models, python: str):
        self.root, self.tiny_models, self.python = root, tiny_models, python

    def onnx(self, name: str) -> Path:
        path = self.root / f"{name}-optimum"
        if not path.exists():
            result = run_module("onnxquant.cli.export", "--model_path", str(self.tiny_models.hf(name)), "--output_path",
                                str(path), "--exporter", "optimum", "--optimum_python", self.python)
            assert result.returncode == 0, result.stderr[-3000:]
        return path


@pytest.fixture(scope="session")
def optimum_exports(tmp_path_factory, tiny_models, optimum_python) -> _OptimumExports:
    return _OptimumExports(tmp_path_factory.mktemp("optimum"), tiny_models, optimum_python)


def _perplexity(folder_path: Path, test_text: str, windows=None) -> float:
    folder = open_genai_folder(folder_path)
    windows = windows if windows is not None else eval_windows(folder, test_text[:20000], 128, 4)
    return evaluate_perplexity(folder, windows, "genai", progress=False).perplexity


@pytest.mark.parametrize("name", ["tiny-llama-96", "tiny-qwen2-96"])
def test_optimum_export_is_the_builders_float_model(tiny_models, optimum_exports, test_text, name):
    builder, optimum = tiny_models.onnx(name), optimum_exports.onnx(name)
    ids = (np.arange(200) * 7) % 250 + 3
    assert relative_logit_error(prefill_logits(builder, ids), prefill_logits(optimum, ids)) < 1e-4
    assert abs(_perplexity(optimum, test_text) / _perplexity(builder, test_text) - 1) < 1e-4


def test_rope_parameters_reach_transformers_4():
    """transformers 4 ignores transformers 5's rope_parameters and would export RoPE with theta 10000."""
    gemma3 = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    assert transformers4_config(gemma3) == {**gemma3, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": None}
    llama3 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert transformers4_config(llama3)["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}


@pytest.mark.parametrize("name", ["tiny-llama-96", "tiny-qwen3-96", "tiny-gemma-96"])
def test_plain_decoder_rotation_and_smoothing_are_exact(optimum_exports, tmp_path, calib_text_path, test_text, name):
    out = tmp_path / "rot"
    assert_float_pass_exact(optimum_exports.onnx(name), out, calib_text_path, test_text, "--include_rotation",
                            "--include_sq", "--include_r4", "--hadamard_group_size", "16", tokens=200)
    assert "graph structure" in ir.load(out / "model.onnx").metadata_props[ROTATION_METADATA_KEY]


def test_plain_decoder_with_sandwich_norms_is_refused_rotation(optimum_exports, tmp_path, calib_text_path):
    result = float_pass_run(optimum_exports.onnx("tiny-gemma3-96"), tmp_path / "rot", calib_text_path, "--include_rotation")
    assert_user_error(result, "sandwich norms", "without --include_rotation")
    assert not (tmp_path / "rot").exists()


@pytest.mark.parametrize("scheme,bound", [(("--config", "INT8_PER_CHANNEL", "--include_rotation", "--include_sq"), 0.05),
                                          (("--config", "UINT4_PER_GROUP_ASYM", "--block_size", "32", "--algo", "gptq"), 0.40),
                                          (("--config", "FP8_E4M3"), 0.05),  # float8 codes need opset 19+; optimum's is 18
                                          (("--config", "MXFP4"), 0.40)])
def test_plain_decoder_quantizes_near_float(optimum_exports, tmp_path, calib_text_path, test_text, scheme, bound):
    source = optimum_exports.onnx("tiny-llama-96")
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(tmp_path / "q"),
                        "--calib_data", str(calib_text_path), "--num_calib_data", "8", "--seq_len", "128", *scheme)
    assert result.returncode == 0, result.stderr[-3000:]
    windows = eval_windows(open_genai_folder(source), test_text[:20000], 128, 4)
    ratio = _perplexity(tmp_path / "q", test_text, windows) / _perplexity(source, test_text, windows)
    assert abs(ratio - 1) < bound, ratio


def test_optimum_exporter_without_optimum_is_refused(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.export", "--model_path", str(tiny_models.hf("tiny-llama-96")), "--output_path",
                        str(tmp_path / "out"), "--exporter", "optimum", "--optimum_python", sys.executable)
    assert_user_error(result, OPTIMUM_REQUIREMENT, "--optimum_python")
    assert not (tmp_path / "out").exists()


def test_gemma2_is_refused_by_the_optimum_exporter(tiny_models, optimum_python, tmp_path):
    result = run_module("onnxquant.cli.export", "--model_path", str(tiny_models.hf("tiny-gemma2-96")), "--output_path",
                        str(tmp_path / "out"), "--exporter", "optimum", "--optimum_python", optimum_python)
    assert_user_error(result, "soft-capping", "builder")
    assert not (tmp_path / "out").exists()


def _plain_graph(extra_reader: bool) -> ir.Graph:
    """ids -> Gather(E) -> SimplifiedLayerNormalization -> MatMul(W), optionally with a Relu on the residual."""
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["n"]))
    table = ir.Value(name="E", const_value=ir.tensor(np.ones((8, 4), np.float32)))
    gain = ir.Value(name="g", const_value=ir.tensor(np.ones(4, np.float32)))
    weight = ir.Value(name="W", const_value=ir.tensor(np.ones((4, 3), np.float32)))
    for value in (table, gain, weight):
        value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), value.const_value.shape
    gather = ir.node("Gather", [table, ids], name="embed")
    norm = ir.node("SimplifiedLayerNormalization", [gather.outputs[0], gain], name="norm")
    matmul = ir.node("MatMul", [norm.outputs[0], weight], name="head")
    nodes = [gather, norm, matmul] + ([ir.node("Relu", [gather.outputs[0]], name="peek")] if extra_reader else [])
    graph = ir.Graph([ids], [matmul.outputs[0]], nodes=nodes, initializers=[table, gain, weight])
    return graph


def test_plain_decoder_pairs_follow_the_graph():
    (pair,) = plain_decoder_pairs(_plain_graph(extra_reader=False))
    assert [n.name for n in pair.prev_nodes] == ["embed"] and [n.name for n in pair.next_nodes] == ["head"]


def test_plain_decoder_residual_read_elsewhere_is_refused():
    from onnxquant.errors import UserError

    with pytest.raises(UserError, match="'peek' \\(Relu\\) reads the residual stream"):
        plain_decoder_pairs(_plain_graph(extra_reader=True))


def test_hessian_of_an_unshaped_activation_is_summed_inside_ort(tmp_path):
    """optimum stores no activation shapes; the width comes from the reading MatMul's weight."""
    from onnxquant.calibration import HessianObserver, build_calibration_model

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", 4]))
    weight = ir.Value(name="W", const_value=ir.tensor(np.ones((4, 3), np.float32)))
    weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT), weight.const_value.shape
    relu = ir.node("Relu", [x], name="act")  # its output carries no shape, as in optimum's graphs
    matmul = ir.node("MatMul", [relu.outputs[0], weight], name="proj")
    relu.outputs[0].name = "hidden"
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=[relu, matmul], initializers=[weight], opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=9), tmp_path / "m.onnx")
    calib = build_calibration_model(tmp_path / "m.onnx", [("hidden", HessianObserver())])
    assert [total.shape for total in calib.running_sums] == [(4, 4)]
