"""Grids and emitters on small hand-built graphs: what ORT computes equals the dequantized weights."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.emitters import EMITTERS, EmitContext
from onnxquant.plan import PlannedNode
from onnxquant.runtime import make_session
from onnxquant.spec import QuantSpec, block_grid, padded_blocks, quantize_array, round_to_nearest


def test_grid_limits_follow_the_element_type():
    assert (QuantSpec("int4", "per_block", block_size=32).qmin, QuantSpec("int4", "per_block", block_size=32).qmax) == (-8, 7)
    assert QuantSpec("uint4", "per_block", symmetric=False, block_size=32).qmax == 15
    assert QuantSpec("int8").symmetric_levels == 127


@pytest.mark.parametrize("kwargs", [dict(dtype="int3"), dict(granularity="per_row"),
                                    dict(granularity="per_block", block_size=100), dict(granularity="per_block"),
                                    dict(dtype="int4", pair_safe=True, granularity="per_block", block_size=32)])
def test_invalid_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(**kwargs)


def test_symmetric_4bit_block_uses_minus_eight_for_the_largest_magnitude():
    block = np.array([[[0.5, -2.0, 1.0, 0.25]]], dtype=np.float32)
    spec = QuantSpec("int4", "per_block", block_size=16)
    scale, zero = block_grid(block, spec)
    codes = quantize_array(block, scale[..., None], zero[..., None], spec)
    assert codes[0, 0, 1] == -8 and scale[0, 0] == pytest.approx(0.25)


def _toy(path, weight, op="MatMul"):
    k, n = weight.shape
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/toy/MatMul")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])]
    else:
        node = helper.make_node("Gather", ["w", "ids"], ["y"], name="/toy/Gather")
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])]
    graph = helper.make_graph([node], "toy", inputs, outputs, [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]), path)


def _emit(path, spec, op):
    model = ir.load(path)
    node = next(iter(model.graph))
    EMITTERS[(op, "blocked")](EmitContext(model.graph), node, PlannedNode(node.name, op, spec))
    out = path.with_name("q.onnx")
    ir.save(model, out)
    return out


@pytest.mark.parametrize("spec", [QuantSpec("uint4", "per_block", symmetric=False, block_size=32),
                                  QuantSpec("int4", "per_block", block_size=16),
                                  QuantSpec("uint8", "per_block", symmetric=False, block_size=32)])
def test_matmul_nbits_computes_with_the_dequantized_weight_at_any_k(tmp_path, spec):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80, 24)).astype(np.float32)  # K = 80: the last block is padded
    _toy(tmp_path / "toy.onnx", weight)
    session = make_session(_emit(tmp_path / "toy.onnx", spec, "MatMul"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node] == ["MatMulNBits"]
    x = rng.standard_normal((5, 80)).astype(np.float32)
    expected = x @ round_to_nearest(weight, spec).dequantize()
    # 8-bit blocks run at accuracy_level 4, which also rounds x to int8 per block at run time.
    atol = 1e-4 if spec.bits == 4 else 0.02 * np.abs(expected).max()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("spec", [QuantSpec("uint4", "per_block", symmetric=False, block_size=32),
                                  QuantSpec("int4", "per_block", block_size=32)])
def test_gather_block_quantized_returns_the_dequantized_rows(tmp_path, spec):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((50, 72)).astype(np.float32)  # hidden 72: padded to 96, sliced back
    _toy(tmp_path / "toy.onnx", table, op="Gather")
    session = make_session(_emit(tmp_path / "toy.onnx", spec, "Gather"))
    ids = np.array([3, 0, 49, 3], dtype=np.int64)
    expected = round_to_nearest(table.T, spec).dequantize().T[ids]
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], expected, rtol=1e-5, atol=1e-6)


def test_padded_blocks_keep_the_weight_and_pad_with_zeros():
    weight = np.arange(10, dtype=np.float32).reshape(5, 2)
    blocks = padded_blocks(weight, 4)
    assert blocks.shape == (2, 2, 4)
    assert blocks[0, 1].tolist() == [8.0, 0.0, 0.0, 0.0]
