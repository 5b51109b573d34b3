"""Passes on small hand-built graphs, including graphs where a pattern must not match."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.passes import FoldChannelScalesPass
from onnxquant.runtime import make_session
from onnxquant.scale_folding import classify, fold_targets


def _graph(tmp_path, producer: str, extra_reader: bool = False):
    rng = np.random.default_rng(0)
    nodes = []
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")]
    if producer == "norm":
        inits.append(numpy_helper.from_array((1 + rng.random(8)).astype(np.float32), "g"))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["h"], name="norm", axis=-1, epsilon=1e-5))
    else:
        nodes.append(helper.make_node("Relu", ["x"], ["h"], name="relu"))
    nodes.append(helper.make_node("MatMul", ["h", "w"], ["y"], name="reader"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["h"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 8]))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])], outputs, inits)
    path = tmp_path / "toy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _target(path):
    model = ir.load(path)
    return model, fold_targets(model.graph, {"h": ["reader"]})[0]


def test_norm_output_folds_into_the_norm(tmp_path):
    _, target = _target(_graph(tmp_path, "norm"))
    assert (target.kind, target.producer) == ("norm", "norm")


def test_relu_output_cannot_fold_and_says_why(tmp_path):
    _, target = _target(_graph(tmp_path, "relu"))
    assert target.kind == "mul" and "Relu" in target.reason


def test_activation_read_by_another_node_cannot_fold(tmp_path):
    _, target = _target(_graph(tmp_path, "norm", extra_reader=True))
    assert target.kind == "mul" and "other" in target.reason


@pytest.mark.parametrize("producer,extra", [("norm", False), ("relu", False), ("norm", True)])
def test_folded_scales_leave_the_outputs_unchanged(tmp_path, producer, extra):
    path = _graph(tmp_path, producer, extra)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    before = make_session(path).run(None, {"x": x})
    model, target = _target(path)
    scales = np.linspace(0.5, 4.0, 8)
    fold = FoldChannelScalesPass([target], {"h": scales})
    fold(model)
    assert len(fold.inserted_muls) == (0 if target.kind == "norm" else 1)
    ir.save(model, tmp_path / "folded.onnx")
    after = make_session(tmp_path / "folded.onnx").run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    folded_weight = model.graph.initializers["w"].const_value.numpy()
    assert not np.allclose(folded_weight, onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]))


def test_non_positive_scales_are_a_precondition_error(tmp_path):
    model, target = _target(_graph(tmp_path, "norm"))
    with pytest.raises(ir.passes.PreconditionError):
        FoldChannelScalesPass([target], {"h": np.zeros(8)})(model)


def test_classify_ignores_a_mul_without_a_linear_side(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["h"], name="mul"), helper.make_node("MatMul", ["h", "w"], ["y"], name="reader")],
        "toy", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    reader = next(n for n in model.graph if n.name == "reader")
    assert classify(reader.inputs[0], [reader]).kind == "mul"
