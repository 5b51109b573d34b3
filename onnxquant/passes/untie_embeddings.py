"""Give the token embedding its own weight when it shares lm_head's."""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.graph_utils import add_initializer
from onnxquant.patterns import consumers, find_tied_embedding


class UntieEmbeddingsPass(ir.passes.InPlacePass):
    """Rewrite `Gather(Transpose(W), ids)` into `Gather(E, ids)` with a new initializer E = Wᵀ.

    The ORT-GenAI builder ties SmolLM2's embedding to lm_head this way. Passes that change lm_head
    alone (folding the final norm into it, rotating its input side) need the two apart; E is
    computed lazily when the model is written. The Transpose is removed when nothing else reads it.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = find_tied_embedding(model.graph)
        if found is None:
            return ir.passes.PassResult(model, modified=False)
        gather, transpose, weight = found
        perm = transpose.attributes.get_ints("perm", None)
        if perm not in (None, [1, 0], (1, 0)):
            return ir.passes.PassResult(model, modified=False)
        shared = weight.const_value
        rows, cols = shared.shape[1], shared.shape[0]
        embedding = add_initializer(model.graph, "model.embed_tokens.weight", lambda: shared.numpy().T,
                                    dtype=shared.dtype, shape=(rows, cols))
        gather.replace_input_with(0, embedding)
        if not consumers(transpose.outputs[0]):
            model.graph.remove(transpose, safe=True)
        return ir.passes.PassResult(model, modified=True)
