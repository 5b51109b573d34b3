"""Tie the embedding to lm_head again after R1, through one small MatMul before lm_head."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import add_initializer
from onnxquant.patterns import TIED_INPUT_METADATA_KEY, constant_weight, nodes_by_name

# ‖W − M Eᵀ‖ / ‖W‖ above which lm_head is not the tied table times a hidden x hidden matrix (float32 rounding
# of the rotated weights leaves about 1e-7).
RETIE_TOLERANCE = 1e-5
ROWS_PER_CHUNK = 8192  # vocabulary rows per float64 chunk of the least squares


class RetieEmbeddingsPass(ir.passes.InPlacePass):
    """Rewrite `MatMul(n, W)` (lm_head) with `W = M Eᵀ` (E the embedding table, M hidden x hidden) into
    `MatMul(MatMul(n, M), Eᵀ)` and the embedding `Gather(E, ids)` into `Gather(Transpose(Eᵀ), ids)`: the
    builder's tied form again, so the quantizer can store one table for both.

    R1 on a tied model unties it: the embedding becomes E Q, lm_head Qᵀ diag(γ) Eᵀ with the final norm's γ
    folded in, so lm_head = M (E Q)ᵀ with M = Qᵀ diag(γ) Q. M is found by least squares over the vocabulary
    (M = W E (Eᵀ E)⁻¹, in float64 by chunks of rows), so any exact fold of the same kind (a scalar, a
    rotation, channel scales) is recovered; when the residual is above RETIE_TOLERANCE nothing changes.
    The extra MatMul costs hidden² per token (SmolLM2: 0.33 M against lm_head's 28.3 M); it carries
    TIED_INPUT_METADATA_KEY, by which the plan keeps it at 8 bits when the rest is 4-bit.
    """

    def __init__(self, embedding: str, lm_head: str):
        super().__init__()
        self.embedding = embedding
        self.lm_head = lm_head
        self.residual: float | None = None

    def requires(self, model: ir.Model) -> None:
        by_name = nodes_by_name(model.graph)
        for name in (self.embedding, self.lm_head):
            if name not in by_name:
                raise ir.passes.PreconditionError(f"{name} is not in the graph")
        if not by_name[self.embedding].inputs[0].is_initializer():
            raise ir.passes.PreconditionError(f"{self.embedding} does not read its own table")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        gather, lm_head = by_name[self.embedding], by_name[self.lm_head]
        table_value, weight_value = gather.inputs[0], constant_weight(lm_head)
        table, weight = table_value.const_value.numpy(), weight_value.const_value.numpy()  # [V, h], [h, V]
        if table.shape[::-1] != weight.shape:
            return ir.passes.PassResult(model, modified=False)
        hidden = table.shape[1]
        gram, cross = np.zeros((hidden, hidden)), np.zeros((hidden, hidden))
        for start in range(0, table.shape[0], ROWS_PER_CHUNK):
            rows = table[start:start + ROWS_PER_CHUNK].astype(np.float64)
            gram += rows.T @ rows
            cross += weight[:, start:start + ROWS_PER_CHUNK].astype(np.float64) @ rows
        mixing = np.linalg.solve(gram.T, cross.T).T  # cross @ gram⁻¹
        squared, total = 0.0, 0.0
        for start in range(0, table.shape[0], ROWS_PER_CHUNK):
            rows = table[start:start + ROWS_PER_CHUNK].astype(np.float64)
            columns = weight[:, start:start + ROWS_PER_CHUNK].astype(np.float64)
            squared += float(((columns - mixing @ rows.T) ** 2).sum())
            total += float((columns ** 2).sum())
        self.residual = (squared / total) ** 0.5 if total else 0.0
        if not self.residual <= RETIE_TOLERANCE:
            return ir.passes.PassResult(model, modified=False)
        transposed = np.ascontiguousarray(table.T)
        weight_value.const_value = ir.tensor(transposed, name=weight_value.name)
        mix = add_initializer(graph, f"{weight_value.name}.tied_input", mixing.astype(table.dtype))
        mix_node = ir.node("MatMul", [lm_head.inputs[0], mix], name=f"{lm_head.name.rsplit('/', 1)[0]}/tied_input/MatMul")
        mix_node.metadata_props[TIED_INPUT_METADATA_KEY] = lm_head.name
        graph.insert_before(lm_head, mix_node)
        mix_node.outputs[0].name = f"{mix_node.name}/output_0"
        lm_head.replace_input_with(0, mix_node.outputs[0])
        transpose = ir.node("Transpose", [weight_value], attributes={"perm": [1, 0]}, name=f"{lm_head.name.rsplit('/', 1)[0]}/Transpose")
        transpose.outputs[0].name = f"{transpose.name}/output_0"
        graph.insert_before(gather, transpose)
        gather.replace_input_with(0, transpose.outputs[0])
        if not list(table_value.uses()) and table_value.name in graph.initializers:
            graph.initializers.pop(table_value.name)
        return ir.passes.PassResult(model, modified=True)
