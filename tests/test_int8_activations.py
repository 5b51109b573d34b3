"""accuracy_level 4 (int8 activations at run time) is checked against the same weights at level 0, and a model
with outlier activations is refused."""

import dataclasses
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxquant
from onnxquant import recipes
from onnxquant.verification import Int8ActivationError, Probe, at_level_zero, mean_kl_divergence

NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _with_outlier_channel(source, target, factor: float):
    """`source` with channel 0 of every decoder norm's output `factor` times larger and the rows of its readers'
    weights that read it `factor` times smaller: the same function in float, one large activation channel."""
    shutil.copytree(source, target)
    model = ir.load(source / "model.onnx")
    for node in model.graph:
        if node.op_type in NORMS and "final_norm" not in node.name:
            gain = node.inputs[2 if node.op_type.startswith("Skip") else 1]
            scaled = gain.const_value.numpy().copy()
            scaled[0] *= factor
            gain.const_value = ir.tensor(scaled, name=gain.name)
            for use in node.outputs[0].uses():
                if use.node.op_type == "MatMul":
                    weight = use.node.inputs[1]
                    rows = weight.const_value.numpy().copy()
                    rows[0] /= factor
                    weight.const_value = ir.tensor(rows, name=weight.name)
    for name in ("model.onnx", "model.onnx.data"):
        (target / name).unlink()
    ir.save(model, target / "model.onnx", external_data="model.onnx.data")
    return target


def _w4a16(accuracy_level: int, rotate: bool = False):
    """w4a16's quantize stage at `accuracy_level`, without its R1 unless `rotate` (R1 spreads an outlier channel)."""
    recipe = recipes.load_recipe("w4a16")
    stage = recipe.stage(recipes.Quantize)
    stage = dataclasses.replace(stage, lowering=dataclasses.replace(stage.lowering, accuracy_level=accuracy_level))
    stages = tuple(s for s in recipe.stages if rotate or not isinstance(s, recipes.Rotate))
    recipe = dataclasses.replace(recipe, stages=tuple(stage if isinstance(s, recipes.Quantize) else s for s in stages))
    return dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, samples=4, seq_len=64))


@pytest.fixture(scope="module")
def outlier_model(tiny_models, tmp_path_factory):
    return _with_outlier_channel(tiny_models.onnx("tiny-llama-96"), tmp_path_factory.mktemp("outlier") / "fp", 30.0)


def test_outlier_activations_at_level_4_are_refused(outlier_model, tmp_path):
    with pytest.raises(Int8ActivationError, match="top-1 agreement 0.[0-8]"):
        onnxquant.quantize(outlier_model, tmp_path / "out", _w4a16(4))
    assert not (tmp_path / "out").exists()


def test_r1_spreads_the_outlier_so_level_4_passes(outlier_model, tmp_path):
    result = onnxquant.quantize(outlier_model, tmp_path / "out", _w4a16(4, rotate=True))
    assert result.int8_activations.agreement >= 0.9 and result.int8_activations.kl_mean <= 0.02


def test_outlier_activations_at_level_0_are_not_checked(outlier_model, tmp_path):
    result = onnxquant.quantize(outlier_model, tmp_path / "out", _w4a16(0))
    assert result.int8_activations is None


def test_level_4_on_the_plain_model_passes_and_is_reported(tiny_models, tmp_path):
    result = onnxquant.quantize(tiny_models.onnx("tiny-llama-96"), tmp_path / "out", _w4a16(4))
    report = result.int8_activations
    assert report.nodes == 11 and report.agreement >= 0.9 and report.kl_mean <= 0.02
    assert "int8_activation_agreement=" in result.summary_line
    assert not list((tmp_path / "out").glob("*.level0.onnx"))  # the twin is gone


def test_level_zero_twin_drops_only_the_accuracy_level(tiny_models, tmp_path):
    result = onnxquant.quantize(tiny_models.onnx("tiny-llama-96"), tmp_path / "out", _w4a16(4))
    twin = at_level_zero(result.output)
    nodes = onnx.load(str(twin), load_external_data=False).graph.node
    levels = [a.name for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"]
    assert not levels and sum(n.op_type == "MatMulNBits" for n in nodes) == 11


def test_mean_kl_divergence_of_known_distributions():
    p = np.log(np.array([[0.5, 0.5]], np.float32))
    q = np.log(np.array([[0.9, 0.1]], np.float32))
    probe = lambda logits: Probe((0.0,), (np.zeros(1),), (logits,))  # noqa: E731
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert mean_kl_divergence(probe(p), probe(q)) == pytest.approx(expected, rel=1e-6)
    assert mean_kl_divergence(probe(p), probe(p)) == pytest.approx(0.0, abs=1e-12)
