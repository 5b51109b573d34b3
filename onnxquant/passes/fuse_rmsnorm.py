"""Fold RMSNorm weights into the MatMuls that read the norm."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import constant_weight, initializer_array, transform_initializer
from onnxquant.rotation_config import ResolvedPair, norm_weight_index


class FoldNormIntoReadersPass(ir.passes.InPlacePass):
    """For each norm with weight g and each reader MatMul with weight W [K, N]: W <- diag(g) W, g <- 1.

    RMSNorm(x) * g @ W == RMSNorm(x) @ (diag(g) W), so the float model is unchanged; with g = 1
    the norm commutes with an orthogonal rotation of its input, which R1 needs. Reader biases are
    unaffected.
    """

    def __init__(self, pairs: list[ResolvedPair]):
        super().__init__()
        self.pairs = pairs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for pair in self.pairs:
            weight = pair.norm_node.inputs[norm_weight_index(pair.norm_node)]
            gain = initializer_array(weight).astype(np.float64)
            if np.all(gain == 1.0):
                continue
            for reader in pair.next_nodes:
                reader_weight = constant_weight(reader)
                if reader.op_type != "MatMul" or reader_weight is None:
                    raise ValueError(f"{reader.name} is not a MatMul with a constant weight")
                transform_initializer(reader_weight, lambda w, g=gain: w.astype(np.float64) * g[:, None],
                                      blocks_along=1)
            transform_initializer(weight, lambda g: np.ones_like(g))
            modified = True
        return ir.passes.PassResult(model, modified=modified)
