"""A tied embedding at 4 bits reads lm_head's MatMulNBits table (one copy on disk), on hand-built graphs
and through the CLI on the tiny tied Llama."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import assert_user_error, run_module
from test_pass_units import EMBED, LM_HEAD, decoder, ids_feed, run

from onnxquant.passes import QuantizeGraphPass, UntieEmbeddingsPass
from onnxquant.pipeline import tied_embedding
from onnxquant.plan import plan_quantization, tie_refusal
from onnxquant.schemes import SCHEMES, uint8_blocks


def _scheme(mode: str = "auto", **changes):
    scheme = SCHEMES["UINT4_PER_GROUP_ASYM"].with_block_size(16)
    return dataclasses.replace(scheme, algo="rtn", tied_embedding=mode, **changes)


def _quantized(mode: str) -> ir.Model:
    model = decoder(tied=True)
    lm_head = tied_embedding(model.graph)[1]
    UntieEmbeddingsPass()(model)
    QuantizeGraphPass(plan_quantization(model.graph, _scheme(mode), tied_lm_head=lm_head), {}, {})(model)
    return model


def _stored_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values())


def test_shared_table_gives_the_separate_tables_outputs_with_one_copy():
    # Round to nearest on the same blocks gives the same codes either way, so the logits agree exactly.
    shared, separate = _quantized("auto"), _quantized("separate")
    feeds = ids_feed()
    np.testing.assert_array_equal(run(shared, feeds)[0], run(separate, feeds)[0])
    gather = next(n for n in shared.graph if n.op_type == "GatherBlockQuantized")
    nbits = next(n for n in shared.graph if n.op_type == "MatMulNBits" and n.name.startswith(LM_HEAD))
    assert gather.inputs[0].producer().inputs[0] is nbits.inputs[1]  # Reshape of lm_head's B
    assert gather.inputs[2:] == nbits.inputs[2:]  # the same scales and zero points
    assert _stored_bytes(separate) - _stored_bytes(shared) >= nbits.inputs[1].const_value.nbytes


def test_untied_model_has_no_tie_to_share():
    model = decoder(tied=False)
    assert tied_embedding(model.graph) is None
    plan = plan_quantization(model.graph, _scheme())
    assert plan.nodes[EMBED].shares is None
    assert "not tied" in tie_refusal(plan, None)


def test_lm_head_on_another_grid_keeps_the_embedding_apart():
    model = decoder(tied=True)
    lm_head = tied_embedding(model.graph)[1]
    UntieEmbeddingsPass()(model)
    from onnxquant.schemes import NodeOverride

    plan = plan_quantization(model.graph, _scheme(overrides=(NodeOverride("lm_head", uint8_blocks(16)),)),
                             tied_lm_head=lm_head)
    assert plan.nodes[EMBED].shares is None
    assert "4-bit" in tie_refusal(plan, lm_head)


def test_lm_head_left_float_unshares_the_embedding():
    model = decoder(tied=True)
    lm_head = tied_embedding(model.graph)[1]
    UntieEmbeddingsPass()(model)
    plan = plan_quantization(model.graph, _scheme(), tied_lm_head=lm_head)
    assert plan.nodes[EMBED].shares == LM_HEAD
    assert plan.without([LM_HEAD]).nodes[EMBED].shares is None


def _w4(tiny_models, name, out, calib_text_path, *flags):
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx(name)),
                      "--output_model_path", str(out), "--calib_data", str(calib_text_path), "--num_calib_data", "4",
                      "--seq_len", "64", "--config", "UINT4_PER_GROUP_ASYM", *flags)


@pytest.mark.parametrize("flags", [(), ("--include_rotation",)])
def test_cli_writes_one_vocabulary_table_for_the_tied_llama(tiny_models, tmp_path, calib_text_path, flags):
    result = _w4(tiny_models, "tiny-llama-96", tmp_path / "w4", calib_text_path, "--algo", "gptq",
                 "--tied_embedding", "shared", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    graph = onnx.load(str(tmp_path / "w4" / "model.onnx"), load_external_data=False).graph
    producers = {output: n for n in graph.node for output in n.output}
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = producers[gather.input[0]]
    assert reshape.op_type == "Reshape" and reshape.input[0] == "lm_head.MatMul.weight_Q4"
    assert not [i.name for i in graph.initializer if i.name.startswith("model.embed_tokens")]  # no table of its own


@pytest.mark.parametrize("name,flags,needle", [
    ("tiny-qwen2-96", (), "not tied"),
    ("tiny-llama-96", ("--algo", "awq"), "AWQ folds its scales"),
    ("tiny-llama-96", ("--int8_nodes", "lm_head"), "lm_head is not on a 4-bit"),
])
def test_shared_request_that_cannot_share_is_refused(tiny_models, tmp_path, calib_text_path, name, flags, needle):
    result = _w4(tiny_models, name, tmp_path / "o", calib_text_path, "--tied_embedding", "shared", *flags)
    assert_user_error(result, "tied_embedding: shared", needle)
    assert not (tmp_path / "o").exists()


# --- R1 keeps the tie --------------------------------------------------------------------------

def _retied_after_r1(rotation):
    """The tied decoder after untie, norm folding and R1 by `rotation`, then RetieEmbeddingsPass: (model, pass,
    logits before, logits after, the tie before)."""
    from test_pass_units import pairs

    from onnxquant.passes import FoldNormIntoReadersPass, RetieEmbeddingsPass, RotateR1Pass

    model = decoder(tied=True)
    feeds = ids_feed()
    before = run(model, feeds)
    tie = tied_embedding(model.graph)
    UntieEmbeddingsPass()(model)
    FoldNormIntoReadersPass(pairs(model))(model)
    RotateR1Pass(pairs(model), rotation, {})(model)
    retie = RetieEmbeddingsPass(*tie)
    assert retie(model).modified
    return model, retie, before[0], run(model, feeds)[0], tie


def test_retie_after_r1_is_exact_and_restores_the_builder_form():
    from test_pass_units import HIDDEN, orthogonal

    from onnxquant.patterns import find_tied_embedding

    model, retie, before, after, tie = _retied_after_r1(orthogonal(HIDDEN))
    assert retie.residual < 1e-6 and not retie.online
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    assert find_tied_embedding(model.graph) is not None
    assert tied_embedding(model.graph) == tie


def test_retie_after_a_hadamard_r1_mixes_online_in_float():
    """R1 by a (signed) Hadamard: M = Hᵀ diag(γ) H runs as small rotations around a Mul, no dense hidden² weight."""
    from test_pass_units import HIDDEN

    from onnxquant.hadamard import rotation_matrix
    from onnxquant.patterns import ONLINE_ROTATION_KEY

    model, retie, before, after, tie = _retied_after_r1(rotation_matrix(HIDDEN, random_signs=True).matrix)
    assert retie.online
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    mixing = [node for node in model.graph if node.op_type == "MatMul" and "tied_input" in node.name]
    assert len(mixing) == 4 and all(ONLINE_ROTATION_KEY in node.metadata_props for node in mixing)
    assert max(v.const_value.size for v in model.graph.initializers.values() if "tied_input" in v.name) < HIDDEN * HIDDEN
    assert tied_embedding(model.graph) == tie


def test_retie_leaves_a_lm_head_that_is_not_the_table_alone():
    from onnxquant.passes import RetieEmbeddingsPass

    model = decoder(tied=False)  # the embedding is its own random table
    assert not RetieEmbeddingsPass(EMBED, LM_HEAD)(model).modified
