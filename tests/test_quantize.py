import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from onnxquant.algorithms.range_search import range_error
from onnxquant.calibration import MinMaxObserver, MovingAverageMinMaxObserver, MseRangeObserver, PercentileObserver, run_calibration
from onnxquant.genai_folder import open_genai_folder
from onnxquant.passes import QuantizeGraphPass
from onnxquant.plan import plan_quantization
from onnxquant.runtime import make_session
from onnxquant.schemes import SCHEMES
from onnxquant.spec import quant_params, quantize_array
from onnxquant.evaluation import eval_windows, evaluate_perplexity

from conftest import assert_user_error, run_module


def test_moving_average_matches_hand_computed_sequence():
    observer = MovingAverageMinMaxObserver(averaging_constant=0.5)
    for low, high in [(-4.0, 8.0), (-2.0, 4.0), (-8.0, 0.0)]:
        observer.update({"min": np.float32(low), "max": np.float32(high)})
    # min: -4 -> -4 + 0.5 * (-2 + 4) = -3 -> -3 + 0.5 * (-8 + 3) = -5.5 ; max: 8 -> 6 -> 3
    assert observer.range() == pytest.approx((-5.5, 3.0))


def test_minmax_keeps_extremes():
    observer = MinMaxObserver()
    for low, high in [(-1.0, 2.0), (-3.0, 1.0)]:
        observer.update({"min": low, "max": high})
    assert observer.range() == (-3.0, 2.0)


def test_percentile_clips_a_lone_outlier():
    observer = PercentileObserver(99.0)
    data = np.concatenate([np.linspace(-1, 1, 10_000), [50.0]]).astype(np.float32)
    observer.update({"values": data})
    low, high = observer.range()
    assert low == pytest.approx(-1.0, abs=0.05) and high == pytest.approx(1.0, abs=0.05)


def _outlier_tensor():
    data = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)
    data[:3] = [40.0, -25.0, 30.0]
    return data


@pytest.mark.parametrize("scheme", ["INT8_TRANSFORMER_DEFAULT", "INT8_SYMMETRIC_ACT"])
def test_mse_range_clips_outliers_when_that_lowers_the_error(scheme):
    spec, data = SCHEMES[scheme].activations, _outlier_tensor()
    observer = MseRangeObserver(spec)
    observer.update({"values": data})
    low, high = observer.range()
    values, ones = data.astype(np.float64), np.ones(data.size)
    assert -25.0 <= low < 0.0 < high <= 40.0 and (low, high) != (-25.0, 40.0)
    assert range_error(values, ones, low, high, spec) < range_error(values, ones, -25.0, 40.0, spec)


def test_mse_range_keeps_the_extremes_on_fp8():
    # FP8's error is relative, so the Gaussian bulk loses nothing to the outliers' wide range.
    observer = MseRangeObserver(SCHEMES["FP8_E4M3"].activations)
    observer.update({"values": _outlier_tensor()})
    assert observer.range() == (-25.0, 40.0)


def test_symmetric_and_asymmetric_grids():
    scale, zero = quant_params(-2.0, 5.0, SCHEMES["INT8_SYMMETRIC_ACT"].activations)
    assert scale == pytest.approx(5.0 / 127) and zero == 0
    scale, zero = quant_params(-2.0, 5.0, SCHEMES["INT8_TRANSFORMER_DEFAULT"].activations)
    assert scale == pytest.approx(7.0 / 255) and zero == round(2.0 / (7.0 / 255))


class _ArrayReader(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _toy_matmul_model(path, weight):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/toy/MatMul")], "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_per_tensor_scales_are_max_abs_over_127_on_a_toy_graph(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    batches = [{"x": rng.normal(size=(5, 4)).astype(np.float32) * k} for k in (1.0, 3.0, 2.0)]
    path = tmp_path / "toy.onnx"
    _toy_matmul_model(path, weight)
    observers = {"x": MinMaxObserver()}
    run_calibration(path, _ArrayReader(batches), observers)
    every_x = np.concatenate([b["x"] for b in batches])
    assert observers["x"].range() == pytest.approx((every_x.min(), every_x.max()))

    model = ir.load(path)
    plan = plan_quantization(model.graph, SCHEMES["INT8_SYMMETRIC_ACT"])
    assert plan.activations == {"x": ["/toy/MatMul"]}
    QuantizeGraphPass(plan, {"x": observers["x"].range()}, {"config": "INT8_SYMMETRIC_ACT"})(model)
    inits = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    assert inits["x/act_scale"] == pytest.approx(np.abs(every_x).max() / 127)
    assert inits["w_scale"] == pytest.approx(np.abs(weight).max() / 127)
    assert inits["w_quantized"].dtype == np.int8 and "w" not in inits

    out_path = tmp_path / "toy_qdq.onnx"
    ir.save(model, out_path)
    session = make_session(out_path)
    x = batches[1]["x"]
    assert session.run(None, {"x": x})[0] == pytest.approx(x @ weight, abs=0.1)


def test_column_scales_after_the_matmul_give_the_in_kernel_products(tmp_path):
    """Per-channel weights: Mul(MatMul(X, DQ(W_q, 1.0)), scales) computes what DQ(W_q, scales, axis=1)
    does, the graph output keeps its name, and the integer kernel sees one scalar scale."""
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(4, 3)) * [0.01, 1.0, 100.0]).astype(np.float32)
    _toy_matmul_model(tmp_path / "toy.onnx", weight)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    outputs, graphs = {}, {}
    for placement in ("after_matmul", "in_kernel"):
        model = ir.load(tmp_path / "toy.onnx")
        plan = plan_quantization(model.graph, SCHEMES["INT8_PER_CHANNEL"])
        QuantizeGraphPass(plan, {"x": (float(x.min()), float(x.max()))}, {"config": "INT8_PER_CHANNEL"},
                          column_scales=placement)(model)
        ir.save(model, tmp_path / f"{placement}.onnx")
        outputs[placement] = make_session(tmp_path / f"{placement}.onnx").run(["y"], {"x": x})[0]
        graphs[placement] = onnx.load(str(tmp_path / f"{placement}.onnx")).graph
    np.testing.assert_allclose(outputs["after_matmul"], outputs["in_kernel"], rtol=1e-6)
    after = graphs["after_matmul"]
    mul = next(n for n in after.node if n.op_type == "Mul")
    matmul = next(n for n in after.node if n.op_type == "MatMul")
    weight_dq = next(n for n in after.node if n.output[0] == matmul.input[1])
    scalars = {i.name for i in after.initializer if list(i.dims) == []}
    assert mul.input[0] == matmul.output[0] and mul.output[0] == "y" and weight_dq.input[1] in scalars
    assert not any(n.op_type == "Mul" for n in graphs["in_kernel"].node)


def test_column_scales_flag_needs_a_per_channel_scheme(tiny_input, tmp_path, calib_text_path):
    result = _quantize("--input_model_path", tiny_input, "--output_model_path", str(tmp_path / "o"),
                       "--config", "INT8_TRANSFORMER_DEFAULT", "--column_scales", "in_kernel",
                       "--calib_data", str(calib_text_path))
    assert_user_error(result, "--column_scales applies to the per-channel int8 weight schemes")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_int8(tiny_models, tmp_path_factory, calib_text_path):
    out = tmp_path_factory.mktemp("q") / "int8"
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96") / "model.onnx"),
                        "--output_model_path", str(out / "model.onnx"), "--num_calib_data", "8", "--seq_len", "128",
                        "--calib_data", str(calib_text_path), "--use_moving_average")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout.strip().splitlines()


def test_quantized_folder_runs_in_ort_genai_close_to_float(tiny_models, tiny_int8, test_text):
    out, _ = tiny_int8
    float_folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    quant_folder = open_genai_folder(out)
    windows = eval_windows(float_folder, test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(float_folder, windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(quant_folder, windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < 0.05


def test_quantized_graph_has_int8_weights_and_qdq_pairs(tiny_int8):
    out, lines = tiny_int8
    summary = lines[-1]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert ops.count("QuantizeLinear") == 9  # 2 layers x (qkv, o, gate/up shared, down) + lm_head
    producers = {o: n for n in graph.node for o in n.output}
    for matmul in matmuls:
        assert producers[matmul.input[0]].op_type == "DequantizeLinear"
        assert producers[matmul.input[1]].op_type == "DequantizeLinear"
    assert all(init.data_type != TensorProto.FLOAT or init.dims in ([], [1]) or len(init.dims) == 1
               for init in graph.initializer if init.name.endswith("weight"))
    assert re.fullmatch(r"quantized=\d+ nodes config=INT8_TRANSFORMER_DEFAULT seconds=[\d.]+ peak_rss_mb=\d+ size_mb=[\d.]+", summary)


def test_time_line_accounts_for_the_run(tiny_int8):
    """The `time:` line names the calibration and the write, and its phases add up to no more than the run."""
    _, lines = tiny_int8
    phases = dict(re.findall(r"(\w+)=([\d.]+)s", lines[-2]))
    assert lines[-2].startswith("time: ") and {"quantize_calibration", "round_and_write"} <= phases.keys()
    total = float(re.search(r"seconds=([\d.]+)", lines[-1]).group(1))
    inside = sum(float(v) for k, v in phases.items() if not k.startswith("verify"))
    # seconds= is printed to 0.1 s, so the run took at least total - 0.05 (a 0.1 s tiny run printed 0.1 with phases of 0.0496).
    assert 0.5 * (total - 0.05) <= inside <= total + 0.2


def _peak_rss(tiny_models, tmp_path, calib_text_path, samples):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-576")),
                        "--output_model_path", str(tmp_path / f"q{samples}"), "--num_calib_data", str(samples),
                        "--seq_len", "256", "--calib_data", str(calib_text_path), "--use_moving_average")
    assert result.returncode == 0, result.stderr[-3000:]
    return int(re.search(r"peak_rss_mb=(\d+)", result.stdout).group(1))


def test_memory_stays_flat_as_calibration_samples_grow(tiny_models, tmp_path, calib_text_path):
    small = _peak_rss(tiny_models, tmp_path, calib_text_path, 8)
    large = _peak_rss(tiny_models, tmp_path, calib_text_path, 32)
    assert large <= small * 1.05 + 10, (small, large)


def _quantize(*args):
    return run_module("onnxquant.cli.quantize", *args)


@pytest.fixture()
def tiny_input(tiny_models):
    return str(tiny_models.onnx("tiny-llama-96") / "model.onnx")


def test_unknown_config(tiny_input, tmp_path, calib_text_path):
    result = _quantize("--input_model_path", tiny_input, "--output_model_path", str(tmp_path / "o"),
                       "--config", "INT3_MAGIC", "--calib_data", str(calib_text_path))
    assert_user_error(result, "unknown --config 'INT3_MAGIC'")
    assert not (tmp_path / "o").exists()


def test_input_not_a_genai_folder(tmp_path, calib_text_path):
    (tmp_path / "plain").mkdir()
    result = _quantize("--input_model_path", str(tmp_path / "plain"), "--output_model_path", str(tmp_path / "o"),
                       "--calib_data", str(calib_text_path))
    assert_user_error(result, "genai_config.json")


def test_calibration_text_too_short(tiny_input, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n" * 3)
    result = _quantize("--input_model_path", tiny_input, "--output_model_path", str(tmp_path / "o"),
                       "--calib_data", str(short), "--num_calib_data", "64", "--seq_len", "512")
    assert_user_error(result, "tokens", "not 64")
    assert not (tmp_path / "o").exists()


def test_output_equal_to_input_is_refused(tiny_models, calib_text_path):
    folder = tiny_models.onnx("tiny-llama-96")
    before = (folder / "model.onnx").read_bytes()
    result = _quantize("--input_model_path", str(folder / "model.onnx"), "--output_model_path", str(folder / "model.onnx"),
                       "--calib_data", str(calib_text_path))
    assert_user_error(result, "overlaps the input")
    assert (folder / "model.onnx").read_bytes() == before


def test_existing_output_needs_overwrite(tiny_input, tmp_path, calib_text_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    result = _quantize("--input_model_path", tiny_input, "--output_model_path", str(tmp_path / "o"),
                       "--calib_data", str(calib_text_path))
    assert_user_error(result, "--overwrite")
    assert (tmp_path / "o" / "x").read_text() == "keep"


def test_exclude_that_matches_nothing(tiny_input, tmp_path, calib_text_path):
    result = _quantize("--input_model_path", tiny_input, "--output_model_path", str(tmp_path / "o"),
                       "--calib_data", str(calib_text_path), "--exclude", "no_such_node")
    assert_user_error(result, "'no_such_node' (quantize.overrides[].match, --exclude, --int8_nodes) matches no node")


@pytest.mark.parametrize("scheme", ["INT8_PER_CHANNEL", "INT8_TRANSFORMER_DEFAULT"])
def test_pair_safe_weight_grid_keeps_adjacent_pairs_within_128(scheme):
    """The uint8-activation schemes' grids: no two adjacent input rows of a column sum past 128 in
    |int8|, so ORT's u8 x s8 AVX2 kernel (int16 pair sums) cannot saturate. On a tall weight, where
    clamping matters, the searched bound loses strictly less than both ends of its search (per column
    for a per-channel grid): the largest pair (nothing clamped, coarse) and max |w| (fine, pairs clamped)."""
    from onnxquant.spec import clamp_pairs, round_to_nearest

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8192, 4)).astype(np.float32)
    weight[10:12, 3] = [5.0, -4.9]  # a large adjacent pair in column 3
    spec = SCHEMES[scheme].weights
    assert spec.pair_safe
    rounded = round_to_nearest(weight, spec)
    q = rounded.codes.astype(np.int32)
    assert (np.abs(q[0::2]) + np.abs(q[1::2])).max() <= 128
    axis = (0,) if spec.granularity == "per_channel" else None

    def error(bound):  # of the pair-safe grid with this symmetric bound
        scale, zero = quant_params(-bound, bound, spec)
        codes = quantize_array(weight, scale, zero, spec)
        clamp_pairs(codes)
        return ((codes.astype(np.float32) * scale - weight) ** 2).sum(axis=axis)

    searched = ((rounded.dequantize() - weight) ** 2).sum(axis=axis)
    largest = np.abs(weight).max(axis=axis)
    pair_bound = np.maximum(largest, (np.abs(weight[0::2]) + np.abs(weight[1::2])).max(axis=axis))
    assert np.all(searched < error(pair_bound)) and np.all(searched < error(largest))


def test_pair_safe_per_tensor_search_beats_the_largest_pair_bound():
    from onnxquant.spec import round_to_nearest

    weight = np.random.default_rng(2).standard_normal((576, 256)).astype(np.float32)
    spec = SCHEMES["INT8_TRANSFORMER_DEFAULT"].weights
    pair_bound = (np.abs(weight[0::2]) + np.abs(weight[1::2])).max()
    scale, zero = quant_params(-pair_bound, pair_bound, spec)
    by_pair_bound = quantize_array(weight, scale, zero, spec).astype(np.float32) * scale
    searched = round_to_nearest(weight, spec).dequantize()
    assert ((searched - weight) ** 2).sum() < 0.8 * ((by_pair_bound - weight) ** 2).sum()
