"""QuaRot R1: rotate the residual stream by an orthogonal matrix Q."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import initializer_array, transform_initializer
from onnxquant.passes.hadamard_groups import group_rotation
from onnxquant.patterns import (GROUPS_IN_R1_KEY, ROTATION_METADATA_KEY, ResolvedPair, constant_weight, is_const_matmul, is_embedding_gather,
                                matmul_bias, norm_weight)


class RotateR1Pass(ir.passes.InPlacePass):
    """Rotate the residual stream h -> h Q (Q orthogonal, hidden x hidden).

    Writers (prev_nodes) get their output side rotated: the embedding table E <- E Q, a writer
    MatMul W <- W Q and its bias b <- b Q. Readers (next_nodes) get the inverse on their input
    side: W <- Qᵀ W, bias unchanged. The norms in between must already have weight 1 (see
    FoldNormIntoReadersPass): RMSNorm(h Q) = RMSNorm(h) Q because Q keeps the norm of each row.
    The float model computes the same function. Math runs in float64; weights keep their dtype.
    A metadata entry marks the model as rotated.

    With `group_size` g, Q <- Q·B for B = diag(H, …, H), H the normalized g x g Hadamard: every
    reader then sees its input in Hadamard groups of g at no run-time cost, and carries
    GROUPS_IN_R1_KEY = g so that the Hadamard-groups stage does not add groups online again.
    """

    def __init__(self, pairs: list[ResolvedPair], rotation: np.ndarray, description: dict, group_size: int | None = None):
        super().__init__()
        self.pairs = pairs
        self.group_size = group_size
        if group_size is not None:
            rotation = rotation @ np.kron(np.eye(rotation.shape[0] // group_size), group_rotation(group_size))
            description = {**description, "hadamard_groups": group_size}
        self.q = rotation
        self.description = description

    def _rotate_writer(self, node: ir.Node, done: set[str]) -> None:
        q = self.q
        if node.op_type == "Gather":
            table = node.inputs[0]
            if table.name not in done:
                transform_initializer(table, lambda e: e.astype(np.float64) @ q, blocks_along=0)
                done.add(table.name)
            return
        weight = constant_weight(node)
        if weight.name in done:
            return
        transform_initializer(weight, lambda w: w.astype(np.float64) @ q, blocks_along=0)
        done.add(weight.name)
        bias = matmul_bias(node)
        if bias is not None and bias[1].name not in done:
            transform_initializer(bias[1], lambda b: b.astype(np.float64) @ q)
            done.add(bias[1].name)

    def requires(self, model: ir.Model) -> None:
        if ROTATION_METADATA_KEY in model.metadata_props:
            raise ir.passes.PreconditionError("the model is already rotated")
        for pair in self.pairs:
            if not np.all(initializer_array(norm_weight(pair.norm_node)) == 1.0):
                raise ir.passes.PreconditionError(f"{pair.norm_node.name} still has a norm weight; fold it first")
            for node in pair.prev_nodes:
                if not (is_embedding_gather(node) or is_const_matmul(node)):
                    raise ir.passes.PreconditionError(f"{node.name} writes the residual stream but is not a Gather or constant MatMul")
            for node in pair.next_nodes:
                if not is_const_matmul(node):
                    raise ir.passes.PreconditionError(f"{node.name} reads a norm but is not a constant MatMul")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        q = self.q
        writers_done: set[str] = set()
        readers_done: set[str] = set()
        # Done-sets hold the rotated tensors' names: one initializer read by two nodes is rotated once.
        for pair in self.pairs:
            for writer in pair.prev_nodes:
                self._rotate_writer(writer, writers_done)
            for reader in pair.next_nodes:
                weight = constant_weight(reader)
                if self.group_size is not None:
                    reader.metadata_props[GROUPS_IN_R1_KEY] = str(self.group_size)
                if weight.name in readers_done:
                    continue
                transform_initializer(weight, lambda w: q.T @ w.astype(np.float64), blocks_along=1)
                readers_done.add(weight.name)
        model.metadata_props[ROTATION_METADATA_KEY] = json.dumps(self.description)
        return ir.passes.PassResult(model, modified=True)
