import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from onnxquant.algorithms.smooth_quant import choose_alpha, smoothed_error, smoothing_scales
from onnxquant.data import tokenize
from onnxquant.schemes import get_scheme
from onnxquant.spec import dequantize_array, quant_params, quantize_array, round_to_nearest

from conftest import assert_float_pass_exact, assert_user_error, float_pass_run, prefill_logits, relative_logit_error


def test_smoothing_scale_formula():
    act = np.array([8.0, 1.0, 0.0])
    wgt = np.array([2.0, 4.0, 1.0])
    # s = act^0.5 / w^0.5; a channel that never fires keeps s = 1
    assert smoothing_scales(act, wgt, 0.5) == pytest.approx([2.0, 0.5, 1.0])


@pytest.mark.parametrize("name", ["tiny-llama3-64", "tiny-llama-96", "tiny-qwen2-96", "tiny-llama-576"])
@pytest.mark.parametrize("flags", [("--include_sq",), ("--include_rotation", "--include_sq")])
def test_smoothed_float_model_keeps_its_logits(tiny_models, tmp_path, calib_text_path, test_text, name, flags):
    source = tiny_models.onnx(name)
    result = float_pass_run(source, tmp_path / "sq", calib_text_path, *flags, "--sq_alpha", "0.6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sq_inserted_muls=0" in result.stdout  # every target folded into a producer
    name = "model.layers.0.mlp.up_proj.MatMul.weight"
    before = ir.load(source / "model.onnx").graph.initializers[name].const_value.numpy()
    after = ir.load(tmp_path / "sq" / "model.onnx").graph.initializers[name].const_value.numpy()
    assert np.abs(after - before).max() > 1e-2 * np.abs(before).max()  # rows scaled by s, and still the same function:
    ids = tokenize(source, test_text[:3000])[:256]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(tmp_path / "sq", ids)) < 1e-4


def test_excluded_reader_of_a_norm_gets_an_explicit_mul(tiny_models, tmp_path, calib_text_path, test_text):
    """gate_proj left in float still reads the norm output, so 1/s cannot go into the norm weight."""
    source = tiny_models.onnx("tiny-llama-96")
    result = float_pass_run(source, tmp_path / "sq", calib_text_path, "--include_sq", "--exclude", "gate_proj")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sq_inserted_muls=2" in result.stdout  # one per layer: the post-attention norm
    ids = tokenize(source, test_text[:3000])[:256]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(tmp_path / "sq", ids)) < 1e-4


@pytest.mark.slow
def test_rotation_and_smoothquant_together_keep_smollm2_logits(smollm2_onnx, tmp_path, calib_text_path, test_text):
    result = float_pass_run(smollm2_onnx, tmp_path / "rsq", calib_text_path, "--include_rotation", "--include_sq")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = tokenize(smollm2_onnx, test_text[:4000])[:256]
    assert relative_logit_error(prefill_logits(smollm2_onnx, ids), prefill_logits(tmp_path / "rsq", ids)) < 1e-4


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "-0.2"])
def test_alpha_outside_open_unit_interval(tiny_models, tmp_path, calib_text_path, alpha):
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path, "--include_sq", "--sq_alpha", alpha)
    assert_user_error(result, "--sq_alpha must be between 0 and 1")


def test_smoothquant_without_calibration_data(tiny_models, tmp_path):
    from conftest import run_module

    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "o"), "--skip_quantization", "--include_sq",
                        "--calib_data", str(tmp_path / "missing.txt"))
    assert_user_error(result, "missing.txt does not exist")


def _activation_scales(folder):
    import onnx_ir as ir

    model = ir.load(folder / "model.onnx")
    return {v.name: float(v.const_value.numpy()) for v in model.graph.initializers.values()
            if v.name.endswith("/act_scale")}


def test_one_pass_smoothquant_ranges_equal_a_second_calibration(tiny_models, tmp_path, calib_text_path, monkeypatch, capsys):
    """The quantizer's ranges derived from per-sample channel extrema equal those a second ORT
    pass over the smoothed model observes (moving average, so the sample order matters too)."""
    import onnxquant.pipeline as pipeline
    import onnxquant.cli.quantize as quantize

    source = tiny_models.onnx("tiny-llama-96")
    flags = ["--input_model_path", str(source), "--calib_data", str(calib_text_path), "--num_calib_data", "6",
             "--seq_len", "128", "--use_moving_average", "--moving_average_constant", "0.3", "--include_sq"]
    assert quantize.main([*flags, "--output_model_path", str(tmp_path / "one")]) == 0
    assert "calibration_passes=1" in capsys.readouterr().out
    monkeypatch.setattr(pipeline, "ONE_PASS_BUDGET_BYTES", 0)
    assert quantize.main([*flags, "--output_model_path", str(tmp_path / "two")]) == 0
    assert "calibration_passes=2" in capsys.readouterr().out
    one, two = _activation_scales(tmp_path / "one"), _activation_scales(tmp_path / "two")
    assert len(one) >= 5 and one.keys() == two.keys()
    for name in one:
        assert one[name] == pytest.approx(two[name], rel=1e-4), name


def test_sq_num_calib_data_chooses_the_scales_from_the_first_samples(tiny_models, tmp_path, calib_text_path, monkeypatch, capsys):
    """--sq_num_calib_data 2 of 6: the same smoothed model and ranges whether the smoothing pass is
    carried (one pass over 6, scales from the first 2 samples' extrema) or runs alone on 2 samples
    before the quantizer's pass over 6; and not the model that scales from all 6 give."""
    import onnxquant.pipeline as pipeline
    import onnxquant.cli.quantize as quantize

    flags = ["--input_model_path", str(tiny_models.onnx("tiny-llama-96")), "--calib_data", str(calib_text_path),
             "--num_calib_data", "6", "--seq_len", "128", "--use_moving_average", "--moving_average_constant", "0.3",
             "--include_sq"]
    runs = {"all": ([], 1), "first2": (["--sq_num_calib_data", "2"], 1)}
    for run, (extra, passes) in runs.items():
        assert quantize.main([*flags, *extra, "--output_model_path", str(tmp_path / run)]) == 0
        assert f"calibration_passes={passes}" in capsys.readouterr().out
    monkeypatch.setattr(pipeline, "ONE_PASS_BUDGET_BYTES", 0)
    assert quantize.main([*flags, "--sq_num_calib_data", "2", "--output_model_path", str(tmp_path / "two_passes")]) == 0
    assert "calibration_passes=2" in capsys.readouterr().out
    first2, two_passes, every = (_activation_scales(tmp_path / run) for run in ("first2", "two_passes", "all"))
    assert first2.keys() == two_passes.keys() == every.keys()
    assert all(first2[name] == pytest.approx(two_passes[name], rel=1e-4) for name in first2)
    assert any(first2[name] != pytest.approx(every[name], rel=1e-3) for name in first2)


def test_one_pass_hessians_equal_a_second_calibration(tiny_models, tmp_path, calib_text_path, monkeypatch, capsys):
    """GPTQ's Hessians carried from the smoothing pass as H / (s sᵀ) equal those a second ORT pass over
    the smoothed model sums, also where an explicit Mul renames the input (gate_proj left in float)."""
    import dataclasses

    import onnxquant.cli.quantize as quantize
    import onnxquant.pipeline as pipeline
    from onnxquant.algorithms import registry
    from onnxquant.algorithms.gptq import GPTQ, factor_hessian

    seen: dict[str, list[np.ndarray]] = {"one": [], "two": []}
    # Hessians are paired by the order they are factored: the writer's order only when one thread rounds.
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 1)
    flags = ["--input_model_path", str(tiny_models.onnx("tiny-llama-96")), "--calib_data", str(calib_text_path),
             "--num_calib_data", "6", "--seq_len", "128", "--use_moving_average", "--config", "INT8_PER_CHANNEL",
             "--include_rotation", "--include_sq", "--sq_alpha", "0.6", "--algo", "gptq", "--exclude", "gate_proj"]
    for run, budget, passes in (("one", pipeline.ONE_PASS_BUDGET_BYTES, 1), ("two", 0, 2)):
        monkeypatch.setattr(pipeline, "ONE_PASS_BUDGET_BYTES", budget)
        monkeypatch.setitem(registry._REGISTRY, "gptq", dataclasses.replace(
            GPTQ, prepare=lambda h, *a, run=run: seen[run].append(np.array(h)) or factor_hessian(h, *a)))
        assert quantize.main([*flags, "--output_model_path", str(tmp_path / run)]) == 0
        assert f"calibration_passes={passes}" in capsys.readouterr().out
    assert len(seen["one"]) == len(seen["two"]) == 9  # 2 layers x (qkv, o, up, down) + lm_head
    for one, two in zip(seen["one"], seen["two"]):
        assert np.abs(one - two).max() <= 1e-4 * np.abs(two).max()
    one, two = _activation_scales(tmp_path / "one"), _activation_scales(tmp_path / "two")
    assert one.keys() == two.keys() and all(one[name] == pytest.approx(two[name], rel=1e-4) for name in one)


@pytest.mark.parametrize("diagonal", [False, True], ids=["hessian", "diagonal"])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_alpha_search_models_the_measured_output_error(alpha, diagonal):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, 0] *= 30.0  # an outlier channel, what SmoothQuant migrates
    weight = rng.standard_normal((64, 96)).astype(np.float32)
    scheme = get_scheme("INT8_TRANSFORMER_DEFAULT")
    scales = smoothing_scales(np.abs(x).max(axis=0), np.abs(weight).max(axis=1), alpha)
    smoothed_x, smoothed_w = (x / scales).astype(np.float32), (weight * scales[:, None]).astype(np.float32)
    value_range = (float(smoothed_x.min()), float(smoothed_x.max()))
    scale, zero = quant_params(*value_range, scheme.activations)
    x_q = dequantize_array(quantize_array(smoothed_x, scale, zero, scheme.activations), scale, zero)
    w_q = round_to_nearest(smoothed_w, dataclasses.replace(scheme.weights, pair_safe=False)).dequantize()
    measured = float(((x_q @ w_q - x @ weight) ** 2).sum())
    hessian = (x * x).sum(axis=0) if diagonal else x.T @ x
    modelled = smoothed_error(scales, weight, hessian, len(x), scheme.weights, scheme.activations, value_range)
    assert modelled == pytest.approx(measured, rel=0.15)


def test_alpha_search_picks_the_least_modelled_error_nearest_the_default_on_ties():
    assert choose_alpha({0.3: 2.0, 0.5: 1.0, 0.7: 1.5}) == 0.5
    assert choose_alpha({0.4: 1.0, 0.6: 1.0, 0.8: 3.0}) in (0.4, 0.6)
    assert choose_alpha({0.3: 1.0, 0.5: 1.0}) == 0.5


def test_auto_alpha_keeps_the_float_model_and_reports_its_choices(tiny_models, tmp_path, calib_text_path, test_text):
    result = assert_float_pass_exact(tiny_models.onnx("tiny-llama-96"), tmp_path / "auto", calib_text_path, test_text,
                                     "--include_sq", "--sq_alpha", "auto")
    summary = result.stdout.strip().splitlines()[-1]
    assert "sq_alpha=auto(min=" in summary and "smoothed=" in summary


def test_alpha_without_smoothquant_is_refused(tiny_models, tmp_path, calib_text_path):
    result = float_pass_run(tiny_models.onnx("tiny-llama-96"), tmp_path / "o", calib_text_path, "--sq_alpha", "auto")
    assert_user_error(result, "--sq_alpha applies to SmoothQuant; add --include_sq")
    assert not (tmp_path / "o").exists()
