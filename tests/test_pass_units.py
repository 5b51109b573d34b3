"""One behaviour per test for the float-exact passes, on hand-built builder-style graphs of hidden 16.

The exact rewrites (fold, rotations, Hadamards, untie) are checked by running the graph in ONNX
Runtime before and after the pass on random inputs; the structural promises by inspecting the graph.
"""

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant.errors import UserError
from onnxquant.passes import (FoldNormIntoReadersPass, FuseNormOpsPass, HadamardGroupsPass, RotateR1Pass,
                              UntieEmbeddingsPass)
from onnxquant.passes.fuse_norm_ops import FUSED_NORMS_METADATA_KEY
from onnxquant.passes.hadamard_groups import _rotate_row_groups, group_rotation
from onnxquant.passes.online_hadamard import OnlineHadamardPass, r4_activations
from onnxquant.patterns import (GROUPS_IN_R1_KEY, HADAMARD_GROUPS_METADATA_KEY, ONLINE_ROTATION_KEY, R4_METADATA_KEY,
                                ROTATION_METADATA_KEY, ResolvedPair, is_const_matmul, nodes_by_name)
from onnxquant.runtime import make_session

HIDDEN, VOCAB, BATCH, SEQ = 16, 24, 2, 5
EMBED, NORM1, GATE, UP, DOWN, NORM2, LM_HEAD = (
    "/model/embed_tokens/Gather", "/model/layers.0/input_layernorm/LayerNorm", "/model/layers.0/mlp/gate_proj/MatMul",
    "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul",
    "/model/layers.0/post_attention_layernorm/SkipLayerNorm", "/lm_head/MatMul")
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
TOL = dict(rtol=1e-5, atol=1e-5)


def _f32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def decoder(ffn: int = 32, *, unit_gains: bool = False, tied: bool = False, act_shape: bool = False,
            seed: int = 0) -> ir.Model:
    """ids -> Gather(E) -> RMSNorm(g1) -> gate, up(+bias) -> SiLU(gate)*up -> down(+bias) ->
    SkipRMSNorm(down + embedding, g2) -> lm_head -> logits, as the ORT-GenAI builder names it.

    `tied`: the embedding is Gather(Transpose(lm_head's weight)). `act_shape`: the down_proj input
    has a declared [batch, seq, ffn] shape (the builder's graphs carry one)."""
    rng = np.random.default_rng(seed)
    gains = (lambda: np.ones(HIDDEN)) if unit_gains else (lambda: 0.5 + rng.random(HIDDEN))
    w_lm = rng.standard_normal((HIDDEN, VOCAB))
    inits = [numpy_helper.from_array(_f32(a), n) for n, a in [
        ("g1", gains()), ("w_gate", rng.standard_normal((HIDDEN, ffn))), ("w_up", rng.standard_normal((HIDDEN, ffn))),
        ("b_up", rng.standard_normal(ffn)), ("w_down", rng.standard_normal((ffn, HIDDEN)) / 4),
        ("b_down", rng.standard_normal(HIDDEN)), ("g2", gains()), ("w_lm", w_lm)]]
    nodes = []
    if tied:
        nodes.append(helper.make_node("Transpose", ["w_lm"], ["embed_table"], name="/lm_head/Transpose", perm=[1, 0]))
    else:
        inits.append(numpy_helper.from_array(_f32(rng.standard_normal((VOCAB, HIDDEN))), "embed_table"))
    nodes += [
        helper.make_node("Gather", ["embed_table", "ids"], ["h0"], name=EMBED),
        helper.make_node("SimplifiedLayerNormalization", ["h0", "g1"], ["n1"], name=NORM1, axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n1", "w_gate"], ["gate"], name=GATE),
        helper.make_node("MatMul", ["n1", "w_up"], ["up0"], name=UP),
        helper.make_node("Add", ["up0", "b_up"], ["up"], name="/model/layers.0/mlp/up_proj/Add"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="/model/layers.0/mlp/act_fn/Sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="/model/layers.0/mlp/act_fn/Mul"),
        helper.make_node("Mul", ["silu", "up"], ["act"], name="/model/layers.0/mlp/Mul"),
        helper.make_node("MatMul", ["act", "w_down"], ["down0"], name=DOWN),
        helper.make_node("Add", ["down0", "b_down"], ["down"], name="/model/layers.0/mlp/down_proj/Add"),
        helper.make_node("SkipSimplifiedLayerNormalization", ["down", "h0", "g2"], ["n2", "", "", "residual"], name=NORM2,
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("MatMul", ["n2", "w_lm"], ["logits"], name=LM_HEAD)]
    value_info = [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["batch", "seq", ffn])] if act_shape else []
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
                              inits, value_info=value_info)
    return ir.from_proto(helper.make_model(graph, opset_imports=OPSETS))


def ids_feed(seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ), dtype=np.int64)}


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(ir.to_proto(model).SerializeToString()).run(None, feeds)


def assert_same_outputs(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, **TOL)


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy().copy()


def node(model: ir.Model, name: str) -> ir.Node:
    return nodes_by_name(model.graph)[name]


def pairs(model: ir.Model) -> list[ResolvedPair]:
    """The two R1 pairs of `decoder`: the embedding -> input norm -> gate/up; the embedding and
    down_proj -> the skip norm -> lm_head."""
    n = nodes_by_name(model.graph)
    return [ResolvedPair((n[EMBED],), n[NORM1], (n[GATE], n[UP])),
            ResolvedPair((n[EMBED], n[DOWN]), n[NORM2], (n[LM_HEAD],))]


def orthogonal(n: int, seed: int = 3) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def online_rotation_matmuls(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "MatMul" and ONLINE_ROTATION_KEY in n.metadata_props]


# --- FoldNormIntoReadersPass ---------------------------------------------------------------------

def test_fold_norm_keeps_outputs_and_moves_each_gain_into_its_readers_rows():
    model = decoder()
    feeds = ids_feed()
    before = run(model, feeds)
    g1, g2 = weight(model, "g1"), weight(model, "g2")
    originals = {name: weight(model, name) for name in ("w_gate", "w_up", "w_lm")}
    assert FoldNormIntoReadersPass(pairs(model))(model).modified
    assert_same_outputs(before, run(model, feeds))
    # Both norm kinds: SimplifiedLayerNormalization (weight input 1) and the Skip variant (input 2).
    assert np.array_equal(weight(model, "g1"), np.ones(HIDDEN)) and np.array_equal(weight(model, "g2"), np.ones(HIDDEN))
    for name, gain in (("w_gate", g1), ("w_up", g1), ("w_lm", g2)):
        np.testing.assert_allclose(weight(model, name), gain[:, None] * originals[name], rtol=1e-6)


def test_fold_norm_leaves_reader_biases_alone():
    model = decoder()
    bias = weight(model, "b_up")
    FoldNormIntoReadersPass(pairs(model))(model)
    assert np.array_equal(weight(model, "b_up"), bias)


def test_fold_norm_with_unit_gains_changes_nothing():
    model = decoder(unit_gains=True)
    gate = weight(model, "w_gate")
    assert not FoldNormIntoReadersPass(pairs(model))(model).modified
    assert np.array_equal(weight(model, "w_gate"), gate)


def test_fold_norm_refuses_a_reader_that_does_not_read_the_norm():
    model = decoder()
    n = nodes_by_name(model.graph)
    wrong = ResolvedPair((n[EMBED],), n[NORM1], (n[DOWN],))  # down_proj reads the MLP product, not the norm
    with pytest.raises(ir.passes.PreconditionError, match="is not a constant MatMul reading"):
        FoldNormIntoReadersPass([wrong])(model)


def test_fold_norm_keeps_outputs_when_two_norms_share_one_gain_initializer():
    # What DeduplicateInitializersPass (run by onnxscript's optimizer) makes of two byte-equal gains.
    model = decoder()
    node(model, NORM2).replace_input_with(2, model.graph.initializers["g1"])
    feeds = ids_feed()
    before = run(model, feeds)
    FoldNormIntoReadersPass(pairs(model))(model)
    assert_same_outputs(before, run(model, feeds))


# --- RotateR1Pass --------------------------------------------------------------------------------

def _folded(**kwargs) -> ir.Model:
    model = decoder(**kwargs)
    FoldNormIntoReadersPass(pairs(model))(model)
    return model


def test_r1_with_an_orthogonal_q_keeps_outputs():
    model = _folded()
    feeds = ids_feed()
    before = run(model, feeds)
    RotateR1Pass(pairs(model), orthogonal(HIDDEN), {"R1": HIDDEN})(model)
    assert_same_outputs(before, run(model, feeds))


def test_r1_rotates_writers_on_the_output_side_and_readers_on_the_input_side():
    model = _folded()
    q = orthogonal(HIDDEN)
    old = {name: weight(model, name).astype(np.float64) for name in ("embed_table", "w_down", "b_down", "w_gate", "w_up", "w_lm", "b_up")}
    RotateR1Pass(pairs(model), q, {"R1": HIDDEN})(model)
    # The embedding is a writer of both pairs but rotated once; so is every shared reader.
    for name in ("embed_table", "w_down", "b_down"):
        np.testing.assert_allclose(weight(model, name), old[name] @ q, rtol=1e-5, atol=1e-6)
    for name in ("w_gate", "w_up", "w_lm"):
        np.testing.assert_allclose(weight(model, name), q.T @ old[name], rtol=1e-5, atol=1e-6)
    assert np.array_equal(weight(model, "b_up"), old["b_up"].astype(np.float32))  # a reader's bias stays
    assert all(model.graph.initializers[n].dtype == ir.DataType.FLOAT for n in old)  # weights keep their dtype


def test_r1_marks_the_model_rotated_and_refuses_a_second_rotation():
    model = _folded()
    description = {"R1": HIDDEN, "matrix": "test"}
    RotateR1Pass(pairs(model), orthogonal(HIDDEN), description)(model)
    assert json.loads(model.metadata_props[ROTATION_METADATA_KEY]) == description
    with pytest.raises(ir.passes.PreconditionError, match="already rotated"):
        RotateR1Pass(pairs(model), orthogonal(HIDDEN), description)(model)


def test_r1_refuses_a_norm_whose_weight_is_not_folded():
    model = decoder()
    with pytest.raises(ir.passes.PreconditionError, match="fold it first"):
        RotateR1Pass(pairs(model), orthogonal(HIDDEN), {})(model)


@pytest.mark.parametrize("side", ["writer", "reader"])
def test_r1_refuses_a_writer_or_reader_that_is_not_a_gather_or_constant_matmul(side):
    model = _folded()
    n = nodes_by_name(model.graph)
    sigmoid = n["/model/layers.0/mlp/act_fn/Sigmoid"]
    pair = (ResolvedPair((sigmoid,), n[NORM1], (n[GATE], n[UP])) if side == "writer"
            else ResolvedPair((n[EMBED],), n[NORM1], (sigmoid,)))
    with pytest.raises(ir.passes.PreconditionError, match="writes the residual stream" if side == "writer" else "reads a norm"):
        RotateR1Pass([pair], orthogonal(HIDDEN), {})(model)


def test_r1_with_group_size_puts_hadamard_groups_into_q_and_marks_the_readers():
    model = _folded()
    feeds = ids_feed()
    before = run(model, feeds)
    old = {name: weight(model, name) for name in ("w_gate", "w_up", "w_lm")}
    # Q = I: the readers then see exactly B = diag(H8, H8), the weights Bᵀ W.
    RotateR1Pass(pairs(model), np.eye(HIDDEN), {"R1": HIDDEN}, group_size=8)(model)
    assert_same_outputs(before, run(model, feeds))
    h = group_rotation(8)
    for name in old:
        np.testing.assert_allclose(weight(model, name), _rotate_row_groups(old[name], h), rtol=1e-5, atol=1e-6)
    assert {name: node(model, name).metadata_props.get(GROUPS_IN_R1_KEY) for name in (GATE, UP, LM_HEAD)} == \
        {GATE: "8", UP: "8", LM_HEAD: "8"}
    assert json.loads(model.metadata_props[ROTATION_METADATA_KEY])["hadamard_groups"] == 8


def test_r1_keeps_outputs_when_two_readers_share_one_weight_initializer():
    model = decoder(unit_gains=True)
    node(model, UP).replace_input_with(1, model.graph.initializers["w_gate"])
    feeds = ids_feed()
    before = run(model, feeds)
    RotateR1Pass(pairs(model), orthogonal(HIDDEN), {})(model)
    assert_same_outputs(before, run(model, feeds))


# --- UntieEmbeddingsPass -------------------------------------------------------------------------

def test_untie_gives_the_embedding_its_own_initializer_and_drops_the_transpose():
    model = decoder(tied=True)
    feeds = ids_feed()
    before = run(model, feeds)
    lm_head = weight(model, "w_lm")
    assert UntieEmbeddingsPass()(model).modified
    assert_same_outputs(before, run(model, feeds))
    table = node(model, EMBED).inputs[0]
    assert isinstance(table.const_value, ir.LazyTensor)  # Wᵀ is computed when the model is written
    assert table.is_initializer() and table is not model.graph.initializers["w_lm"]
    assert node(model, LM_HEAD).inputs[1] is model.graph.initializers["w_lm"]
    assert table.shape == ir.Shape([VOCAB, HIDDEN]) and np.array_equal(table.const_value.numpy(), lm_head.T)
    assert not any(n.op_type == "Transpose" for n in model.graph)


def test_untie_lets_lm_head_change_alone():
    # Folding the final norm into lm_head is exact only once the embedding no longer reads lm_head's weight.
    model = decoder(tied=True)
    feeds = ids_feed()
    before = run(model, feeds)
    UntieEmbeddingsPass()(model)
    FoldNormIntoReadersPass(pairs(model))(model)
    assert_same_outputs(before, run(model, feeds))


def test_untie_keeps_a_transpose_that_something_else_reads():
    model = decoder(tied=True)
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    extra = ir.node("Identity", [transpose.outputs[0]], name="other_reader")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    UntieEmbeddingsPass()(model)
    assert transpose in list(model.graph) and extra.inputs[0] is transpose.outputs[0]
    assert node(model, EMBED).inputs[0] is not transpose.outputs[0]


def test_untie_leaves_untied_and_non_transposing_graphs_alone():
    untied = decoder()
    assert not UntieEmbeddingsPass()(untied).modified
    odd = decoder(tied=True)
    transpose = next(n for n in odd.graph if n.op_type == "Transpose")
    transpose.attributes["perm"] = ir.AttrInt64s("perm", [0, 1])
    assert not UntieEmbeddingsPass()(odd).modified
    assert node(odd, EMBED).inputs[0] is transpose.outputs[0]


# --- HadamardGroupsPass --------------------------------------------------------------------------

@pytest.mark.parametrize("act_shape", [True, False], ids=["3d-activation", "unknown-shape"])
def test_hadamard_groups_online_keep_outputs(act_shape):
    model = decoder(act_shape=act_shape)
    feeds = ids_feed()
    before = run(model, feeds)
    HadamardGroupsPass({"n1": [GATE, UP], "act": [DOWN]}, group_size=8)(model)
    assert_same_outputs(before, run(model, feeds))
    # A [batch, seq, K] activation reshapes with constant shapes; otherwise its shape is read at run time.
    # (n1 has no declared shape in either graph.)
    shapes = {n.name for n in model.graph if n.op_type == "Shape"}
    assert shapes == ({"n1/hadamard_group/Shape"} if act_shape else {"n1/hadamard_group/Shape", "act/hadamard_group/Shape"})


def test_hadamard_groups_insert_one_tagged_rotation_per_activation_shared_by_its_readers():
    model = decoder(act_shape=True)
    old_down = weight(model, "w_down")
    HadamardGroupsPass({"n1": [GATE, UP], "act": [DOWN]}, group_size=8)(model)
    rotations = online_rotation_matmuls(model)
    assert len(rotations) == 2 and all(n.metadata_props[ONLINE_ROTATION_KEY] == "hadamard_group_8" for n in rotations)
    assert not any(is_const_matmul(n) for n in rotations)  # the planner never takes them for weights
    gate, up = node(model, GATE), node(model, UP)
    assert gate.inputs[0] is up.inputs[0] and gate.inputs[0].name == "n1/hadamard_group/rotated"
    np.testing.assert_allclose(weight(model, "w_down"), _rotate_row_groups(old_down, group_rotation(8)), rtol=1e-5, atol=1e-6)
    assert json.loads(model.metadata_props[HADAMARD_GROUPS_METADATA_KEY]) == {"group_size": 8, "online": 2, "folded_into_v": 0}


def test_hadamard_groups_leave_readers_outside_the_group_reading_x():
    model = decoder()
    feeds = ids_feed()
    before = run(model, feeds)
    up_weight = weight(model, "w_up")
    HadamardGroupsPass({"n1": [GATE]}, group_size=8)(model)
    assert_same_outputs(before, run(model, feeds))
    assert node(model, UP).inputs[0] is node(model, NORM1).outputs[0]
    assert np.array_equal(weight(model, "w_up"), up_weight)


def test_hadamard_group_size_that_does_not_divide_k_is_a_precondition_error():
    model = decoder(ffn=24)
    with pytest.raises(ir.passes.PreconditionError) as raised:
        HadamardGroupsPass({"act": [DOWN]}, group_size=16)(model)
    assert isinstance(raised.value.__cause__, UserError)
    assert f"--hadamard_group_size 16 does not divide K=24 of MatMul '{DOWN}'" in str(raised.value.__cause__)


HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 8
QKV, ATTENTION, O_PROJ = "/model/layers.0/attn/qkv_proj/MatMul", "/model/layers.0/attn/GroupQueryAttention", "/model/layers.0/attn/o_proj/MatMul"


def attention(seed: int = 0) -> ir.Model:
    """x -> packed qkv_proj (+bias) -> GroupQueryAttention (4 heads, 2 kv heads of 8) -> o_proj -> y."""
    rng = np.random.default_rng(seed)
    width = (HEADS + 2 * KV_HEADS) * HEAD_SIZE
    inits = [numpy_helper.from_array(_f32(rng.standard_normal((HIDDEN, width))), "w_qkv"),
             numpy_helper.from_array(_f32(rng.standard_normal(width)), "b_qkv"),
             numpy_helper.from_array(_f32(rng.standard_normal((HEADS * HEAD_SIZE, HIDDEN))), "w_o")]
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv0"], name=QKV),
             helper.make_node("Add", ["qkv0", "b_qkv"], ["qkv"], name="/model/layers.0/attn/qkv_proj/Add"),
             helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_seq"],
                              ["attn", "present_key", "present_value"], name=ATTENTION, domain="com.microsoft",
                              num_heads=HEADS, kv_num_heads=KV_HEADS),
             helper.make_node("MatMul", ["attn", "w_o"], ["y"], name=O_PROJ)]
    past = ["batch", KV_HEADS, "past", HEAD_SIZE]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, past),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, past),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_seq", TensorProto.INT32, [])]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=OPSETS))


def attention_feeds() -> dict[str, np.ndarray]:
    empty = np.zeros((BATCH, KV_HEADS, 0, HEAD_SIZE), np.float32)
    return {"x": _f32(np.random.default_rng(1).standard_normal((BATCH, SEQ, HIDDEN))), "past_key": empty, "past_value": empty,
            "seqlens_k": np.full(BATCH, SEQ - 1, np.int32), "total_seq": np.array(SEQ, np.int32)}


def test_hadamard_groups_within_a_head_fold_into_v_offline():
    model = attention()
    feeds = attention_feeds()
    before = run(model, feeds)
    old_qkv = weight(model, "w_qkv")
    HadamardGroupsPass({"attn": [O_PROJ]}, group_size=8)(model)
    assert_same_outputs(before, run(model, feeds))
    assert online_rotation_matmuls(model) == [] and node(model, O_PROJ).inputs[0].name == "attn"
    new_qkv = weight(model, "w_qkv")
    v_start = (HEADS + KV_HEADS) * HEAD_SIZE
    assert np.array_equal(new_qkv[:, :v_start], old_qkv[:, :v_start])  # q and k columns untouched
    assert not np.allclose(new_qkv[:, v_start:], old_qkv[:, v_start:])
    assert json.loads(model.metadata_props[HADAMARD_GROUPS_METADATA_KEY])["folded_into_v"] == 1


def test_hadamard_groups_wider_than_a_head_run_online_on_the_attention_output():
    model = attention()
    feeds = attention_feeds()
    before = run(model, feeds)
    HadamardGroupsPass({"attn": [O_PROJ]}, group_size=16)(model)
    assert_same_outputs(before, run(model, feeds))
    assert len(online_rotation_matmuls(model)) == 1
    assert json.loads(model.metadata_props[HADAMARD_GROUPS_METADATA_KEY]) == {"group_size": 16, "online": 1, "folded_into_v": 0}


# --- OnlineHadamardPass (R4) ---------------------------------------------------------------------

@pytest.mark.parametrize("ffn,factors", [(32, "8x4"), (24, "12x2")], ids=["sylvester-32", "paley-24"])
def test_r4_keeps_outputs(ffn, factors):
    model = decoder(ffn, act_shape=True)
    feeds = ids_feed()
    before = run(model, feeds)
    OnlineHadamardPass({"act": [DOWN]})(model)
    assert_same_outputs(before, run(model, feeds))
    assert node(model, DOWN).metadata_props[R4_METADATA_KEY] == factors


def test_r4_runs_the_factored_hadamard_as_two_tagged_matmuls_and_records_it():
    model = decoder(32, act_shape=True)
    OnlineHadamardPass({"act": [DOWN]})(model)
    by_name = nodes_by_name(model.graph)
    right, left = by_name["act/r4/MatMul_right"], by_name["act/r4/MatMul_left"]
    assert right.inputs[1].const_value.shape == ir.Shape([4, 4]) and left.inputs[0].const_value.shape == ir.Shape([8, 8])
    assert {n.name for n in online_rotation_matmuls(model)} == {right.name, left.name}
    assert all(n.metadata_props[ONLINE_ROTATION_KEY] == "r4_32" for n in (right, left))
    assert by_name[DOWN].inputs[0].name == "act/r4/rotated"
    assert json.loads(model.metadata_props[R4_METADATA_KEY]) == {"down_proj": 1, "factors": {"32": "8x4"}}


def test_r4_activations_keep_only_inputs_read_by_down_proj_alone():
    planned = {"n1": [GATE, UP], "act": [DOWN], "mixed": [DOWN, GATE]}
    assert r4_activations(planned) == {"act": [DOWN]}


def test_r4_refuses_no_down_proj_and_a_k_without_a_hadamard_matrix():
    with pytest.raises(ir.passes.PreconditionError) as nothing:
        OnlineHadamardPass({})(decoder())
    assert "no quantized down_proj MatMul" in str(nothing.value.__cause__)
    with pytest.raises(ir.passes.PreconditionError) as unknown:
        OnlineHadamardPass({"act": [DOWN]})(decoder(ffn=22))  # 22 = 2 * 11: no Hadamard matrix of that order
    assert isinstance(unknown.value.__cause__, UserError) and "no Hadamard matrix of order K=22" in str(unknown.value.__cause__)


# --- FuseNormOpsPass -----------------------------------------------------------------------------

def plain_norms(inverse: str = "Div") -> ir.Model:
    """Two RMSNorms in standard ops, as torch exports them: w1 * (x * 1/sqrt(mean(x²) + eps)) and the same
    of x + r; outputs the two norms and the residual sum. `inverse`: 1/sqrt as Div(1, .) or Reciprocal."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(_f32(0.5 + rng.random(HIDDEN)), "w1"), numpy_helper.from_array(_f32(0.5 + rng.random(HIDDEN)), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"), numpy_helper.from_array(_f32(2.0), "two"),
             numpy_helper.from_array(_f32(1e-5), "eps"), numpy_helper.from_array(_f32(1.0), "one")]

    def rms(x: str, w: str, tag: str) -> list:
        root = [helper.make_node("Pow", [x, "two"], [f"{tag}_sq"]),
                helper.make_node("ReduceMean", [f"{tag}_sq", "axes"], [f"{tag}_mean"]),  # defaults left implicit
                helper.make_node("Add", [f"{tag}_mean", "eps"], [f"{tag}_var"]),
                helper.make_node("Sqrt", [f"{tag}_var"], [f"{tag}_rms"])]
        inv = (helper.make_node("Div", ["one", f"{tag}_rms"], [f"{tag}_inv"]) if inverse == "Div"
               else helper.make_node("Reciprocal", [f"{tag}_rms"], [f"{tag}_inv"]))
        return root + [inv, helper.make_node("Mul", [x, f"{tag}_inv"], [f"{tag}_normed"]),
                       helper.make_node("Mul", [w, f"{tag}_normed"], [f"{tag}_out"])]

    nodes = rms("x", "w1", "a") + [helper.make_node("Add", ["x", "r"], ["s"])] + rms("s", "w2", "b")
    dims = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(nodes, "plain", [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in "xr"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("a_out", "b_out", "s")], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=OPSETS))


@pytest.mark.parametrize("inverse", ["Div", "Reciprocal"])
def test_fuse_norms_rewrites_plain_rmsnorms_into_the_builder_ops(inverse):
    model = plain_norms(inverse)
    rng = np.random.default_rng(1)
    feeds = {n: _f32(rng.standard_normal((BATCH, SEQ, HIDDEN))) for n in "xr"}
    before = run(model, feeds)
    assert FuseNormOpsPass.needed(model.graph)
    FuseNormOpsPass()(model)
    assert_same_outputs(before, run(model, feeds))
    ops = sorted((n.domain, n.op_type) for n in model.graph)
    assert ops == [("", "SimplifiedLayerNormalization"), ("com.microsoft", "SkipSimplifiedLayerNormalization")]
    assert model.metadata_props[FUSED_NORMS_METADATA_KEY] == "2 norms, 1 with the residual add"


def test_fuse_norms_leaves_a_builder_graph_alone():
    model = decoder()
    ops = [(n.name, n.op_type) for n in model.graph]
    assert not FuseNormOpsPass.needed(model.graph)
    assert not FuseNormOpsPass()(model).modified
    assert [(n.name, n.op_type) for n in model.graph] == ops and FUSED_NORMS_METADATA_KEY not in model.metadata_props
