"""Sequential GPTQ: segments observed on the outputs of the weights already rounded."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from onnxquant.calibration import HessianObserver, run_calibration
from onnxquant.recipes import Algorithm, RecipeError

from conftest import assert_user_error, run_module


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _two_matmuls(path, w1, w2) -> None:
    """h = x·w1, y = h·w2: w1 and w2 of equal size, so a budget of about one weight cuts between them."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def _observe(tmp_path, sequential: bool):
    """Hessians of x, h and y, with w1 replaced by round(w1) once the segment holding `first` has run."""
    rng = np.random.default_rng(5)
    w1, w2 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    _two_matmuls(tmp_path / "two.onnx", w1, w2)
    batches = [{"x": rng.standard_normal((1, n, 8)).astype(np.float32)} for n in (7, 7)]  # calibration samples are of one length
    observers = {"x": HessianObserver(), "h": HessianObserver(), "y": HessianObserver()}  # calibration drops what no observer reads

    def segment_done(done, segmented):
        assert segmented
        return {"w1": np.round(w1)} if any(name == "x" for name, _ in done) else None

    rows = np.concatenate([b["x"][0] for b in batches])  # the runner frees each sample's values as it goes
    run_calibration(tmp_path / "two.onnx", _Reader(batches), observers, segment_bytes=w1.nbytes + 64,
                    on_segment_done=segment_done, sequential=sequential)
    return {name: observer.sum for name, observer in observers.items()}, rows, w1, w2


def test_sequential_calibration_observes_later_segments_on_the_replaced_weights(tmp_path):
    hessians, x, w1, w2 = _observe(tmp_path, sequential=True)
    h_float = x @ w1  # h is observed in the segment that computes it, before w1 is replaced
    np.testing.assert_allclose(hessians["h"], h_float.T @ h_float, rtol=1e-5)
    y = x @ np.round(w1) @ w2  # the next segment reads h of the replaced w1
    np.testing.assert_allclose(hessians["y"], y.T @ y, rtol=1e-5)


def test_one_pass_calibration_observes_the_float_weights(tmp_path):
    hessians, x, w1, w2 = _observe(tmp_path, sequential=False)
    y = x @ w1 @ w2
    np.testing.assert_allclose(hessians["y"], y.T @ y, rtol=1e-5)


def _quantize(tiny_models, out, calib_text_path, *flags):
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                      "--output_model_path", str(out), "--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq",
                      "--num_calib_data", "8", "--seq_len", "128", "--calib_data", str(calib_text_path), *flags)


def _codes(folder):
    graph = onnx.load(str(folder / "model.onnx")).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_Q4")}


def test_sequential_gptq_rounds_the_first_layer_alike_and_later_ones_on_rounded_inputs(tiny_models, tmp_path, calib_text_path):
    one_pass, sequential = tmp_path / "one", tmp_path / "seq"
    assert _quantize(tiny_models, one_pass, calib_text_path).returncode == 0
    result = _quantize(tiny_models, sequential, calib_text_path, "--sequential")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibration_segments=" in result.stderr + result.stdout
    a, b = _codes(one_pass), _codes(sequential)
    assert a.keys() == b.keys()
    # qkv reads the embedding (never rounded during calibration): the same Hessian, the same codes
    assert np.array_equal(a["model.layers.0.attn.qkv_proj.MatMul.weight_Q4"], b["model.layers.0.attn.qkv_proj.MatMul.weight_Q4"])
    assert not np.array_equal(a["model.layers.1.attn.qkv_proj.MatMul.weight_Q4"], b["model.layers.1.attn.qkv_proj.MatMul.weight_Q4"])
    assert not np.array_equal(a["lm_head.MatMul.weight_Q4"], b["lm_head.MatMul.weight_Q4"])
    # the recipe saved beside the model says how it was rounded
    assert "sequential: true" in (sequential / "quantization_recipe.yaml").read_text()


def test_sequential_gptq_is_byte_identical_across_runs(tiny_models, tmp_path, calib_text_path):
    for name in ("a", "b"):
        assert _quantize(tiny_models, tmp_path / name, calib_text_path, "--sequential").returncode == 0
    assert (tmp_path / "a" / "model.onnx.data").read_bytes() == (tmp_path / "b" / "model.onnx.data").read_bytes()


def test_sequential_applies_to_gptq_only():
    with pytest.raises(ValueError, match="applies to gptq"):
        Algorithm(name="awq", sequential=True)
    with pytest.raises(ValueError, match="applies to gptq"):
        Algorithm(name="rtn", sequential=True)


@pytest.mark.parametrize("flags,needle", [
    (("--sequential", "--exclude_most_sensitive", "2"), "--exclude_most_sensitive"),
    (("--sequential", "--max_size_mb", "1"), "sequential"),
])
def test_sequential_refusals(tiny_models, tmp_path, calib_text_path, flags, needle):
    result = _quantize(tiny_models, tmp_path / "o", calib_text_path, *flags)
    assert_user_error(result, needle)
    assert not (tmp_path / "o").exists()
