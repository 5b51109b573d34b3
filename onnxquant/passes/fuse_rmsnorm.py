"""Fold RMSNorm weights into the MatMuls that read the norm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import initializer_array, transform_initializer
from onnxquant.patterns import ResolvedPair, constant_weight, is_const_matmul, norm_weight


class FoldNormIntoReadersPass(ir.passes.InPlacePass):
    """For each norm with weight g and each reader MatMul with weight W [K, N]: W <- diag(g) W, g <- 1.

    RMSNorm(x) * g @ W == RMSNorm(x) @ (diag(g) W), so the float model is unchanged; with g = 1
    the norm commutes with an orthogonal rotation of its input, which R1 needs. Reader biases are
    unaffected.
    """

    def __init__(self, pairs: list[ResolvedPair]):
        super().__init__()
        self.pairs = pairs

    def requires(self, model: ir.Model) -> None:
        for pair in self.pairs:
            for reader in pair.next_nodes:
                if not is_const_matmul(reader) or reader.inputs[0] is not pair.norm_node.outputs[0]:
                    raise ir.passes.PreconditionError(f"{reader.name} is not a constant MatMul reading {pair.norm_node.name}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        # Every gain is read before any is reset: norms may share one gain initializer.
        gains = [initializer_array(norm_weight(pair.norm_node)).astype(np.float64) for pair in self.pairs]
        for pair, gain in zip(self.pairs, gains):
            weight = norm_weight(pair.norm_node)
            if np.all(gain == 1.0):
                continue
            for reader in pair.next_nodes:
                transform_initializer(constant_weight(reader), lambda w, g=gain: w.astype(np.float64) * g[:, None],
                                      blocks_along=1)
            transform_initializer(weight, lambda g: np.ones_like(g))
            modified = True
        return ir.passes.PassResult(model, modified=modified)
