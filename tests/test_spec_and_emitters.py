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


def _chain(path, weights):
    """x -> MatMul(w0) -> MatMul(w1) -> ..., the weights as initializers in that order."""
    nodes, names = [], ["x"]
    for i in range(len(weights)):
        names.append(f"y{i}")
        nodes.append(helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"/chain/MatMul{i}"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [None, 8])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def _write_with_rounding_ahead(tmp_path, workers: int, budget_in_weights: int) -> tuple[bytes, int]:
    """(the written weight bytes, the most weights that were ever rounding at once)."""
    import threading
    import time

    from onnxquant.emitters import RoundingAhead

    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(6)]
    _chain(tmp_path / "chain.onnx", weights)
    running, most, lock = [0], [0], threading.Lock()

    def slow_rounder(name, weight, spec):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for a second worker, if allowed, to start meanwhile
        with lock:
            running[0] -= 1
        return round_to_nearest(weight, spec)

    model = ir.load(tmp_path / "chain.onnx")
    ahead = RoundingAhead(workers)
    ctx = EmitContext(model.graph, slow_rounder, ahead=ahead)
    for node in list(model.graph):
        EMITTERS[("MatMul", "qdq")](ctx, node, PlannedNode(node.name, "MatMul", QuantSpec("int8", "per_channel")))
    ahead.budget_bytes = budget_in_weights * weights[0].nbytes
    ir.save(model, tmp_path / f"q{workers}.onnx", external_data=f"q{workers}.data")
    return (tmp_path / f"q{workers}.data").read_bytes(), most[0]


def test_rounding_ahead_on_two_threads_writes_the_same_bytes(tmp_path):
    serial, one_at_a_time = _write_with_rounding_ahead(tmp_path, workers=1, budget_in_weights=2)
    threaded, at_once = _write_with_rounding_ahead(tmp_path, workers=2, budget_in_weights=2)
    assert threaded == serial
    assert (one_at_a_time, at_once) == (1, 2)


def test_rounding_ahead_starts_no_weight_beyond_its_byte_budget(tmp_path):
    _, at_once = _write_with_rounding_ahead(tmp_path, workers=2, budget_in_weights=1)
    assert at_once == 1
