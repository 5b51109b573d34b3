"""Tie the embedding to lm_head again after R1, through a small mixing before lm_head."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import add_initializer
from onnxquant.hadamard import hadamard_factors
from onnxquant.passes.hadamard_groups import insert_online_rotation
from onnxquant.passes.online_hadamard import _factors
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
    When M = Hᵀ diag(g) H for the normalized Hadamard H = A ⊗ B of the hidden size (R1's rotation, with or
    without random signs, which cancel in M), it runs online in that factored form: the hidden vector
    reshaped to [a, b], rotated by two small MatMuls, scaled by g, rotated back (float, exact; A, B and g
    are 1.3k + 256 + 576 numbers on SmolLM2 instead of M's 332k; the planner never quantizes online
    rotations). Otherwise M is a dense MatMul, costing hidden² per token (SmolLM2: 0.33 M against
    lm_head's 28.3 M); it carries TIED_INPUT_METADATA_KEY, by which the plan keeps it at 8 bits when
    the rest is 4-bit.
    """

    def __init__(self, embedding: str, lm_head: str):
        super().__init__()
        self.embedding = embedding
        self.lm_head = lm_head
        self.residual: float | None = None
        self.online = False  # M ran as Hᵀ diag(g) H in the graph

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
        prefix = f"{lm_head.name.rsplit('/', 1)[0]}/tied_input"
        factored = _hadamard_diagonal(mixing)
        if factored is not None:
            self.online = True
            _insert_online_mixing(graph, lm_head, prefix, *factored, table.dtype)
        else:
            mix = add_initializer(graph, f"{weight_value.name}.tied_input", mixing.astype(table.dtype))
            mix_node = ir.node("MatMul", [lm_head.inputs[0], mix], name=f"{prefix}/MatMul")
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


def _hadamard_diagonal(mixing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(A, B, g) with mixing = Hᵀ diag(g) H, H = A ⊗ B the normalized Hadamard of its order, when that holds
    to RETIE_TOLERANCE; None otherwise."""
    n = len(mixing)
    if hadamard_factors(n) is None:
        return None
    left, right = _factors(n)
    hadamard = np.kron(left, right)
    g = np.diag(hadamard @ mixing @ hadamard.T)
    residual = np.linalg.norm(mixing - hadamard.T @ (g[:, None] * hadamard)) / (np.linalg.norm(mixing) or 1.0)
    return (left, right, g) if residual <= RETIE_TOLERANCE else None


def _insert_online_mixing(graph: ir.Graph, lm_head: ir.Node, prefix: str, left: np.ndarray, right: np.ndarray,
                          g: np.ndarray, dtype) -> None:
    """lm_head reads x·Hᵀ·diag(g)·H, on x reshaped to [a, b]: x·(A ⊗ B) is Aᵀ X B on that grid."""
    a, b = len(left), len(right)
    constants = {name: add_initializer(graph, f"{prefix}/constants/{name}", array.astype(dtype)) for name, array in (
        ("left", left), ("left_transposed", left.T), ("right", right), ("right_transposed", right.T),
        ("scale", g.reshape(a, b)))}

    def mix(grid: ir.Value) -> list[ir.Node]:
        steps = [("MatMul", "unrotate_right", None, "right_transposed"), ("MatMul", "unrotate_left", "left", None),
                 ("Mul", "scale", None, "scale"), ("MatMul", "rotate_right", None, "right"),
                 ("MatMul", "rotate_left", "left_transposed", None)]
        nodes, current = [], grid
        for op, name, before, after in steps:
            inputs = [constants[before], current] if before else [current, constants[after]]
            node = ir.node(op, inputs, name=f"{prefix}/{name}/{op}")
            node.outputs[0].name = f"{prefix}/{name}"
            nodes.append(node)
            current = node.outputs[0]
        return nodes

    insert_online_rotation(graph, lm_head.inputs[0], [lm_head], prefix, (a, b), "grid", mix, "tied_input")
