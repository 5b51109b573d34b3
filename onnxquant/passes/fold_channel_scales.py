"""Divide activations by per-channel scales and fold the division away (SmoothQuant, AWQ)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import add_initializer, transform_initializer
from onnxquant.patterns import constant_weight, nodes_by_name, norm_weight
from onnxquant.scale_folding import FoldTarget, transform_producer_columns


def scaled_activation_name(activation: str) -> str:
    """The name of X / s where an explicit Mul computes it ("mul" targets)."""
    return f"{activation}/scaled"


class FoldChannelScalesPass(ir.passes.InPlacePass):
    """For each target activation X with scales s: readers' weights W[j, :] <- s_j W[j, :], and X <- X / s
    folded into the producer named by the target (see onnxquant.scale_folding): the norm weight
    g <- g / s, up_proj's output columns and bias / s, the v columns of the q/k/v projection and
    bias / s (s must already be shared within each kv group), or, for "mul" targets, an explicit
    `Mul` by 1/s in front of the readers. The float model computes the same function.
    """

    def __init__(self, targets: list[FoldTarget], scales: dict[str, np.ndarray]):
        super().__init__()
        self.targets = targets
        self.scales = scales
        self.inserted_muls: list[tuple[str, str]] = []  # (activation, reason)

    def requires(self, model: ir.Model) -> None:
        for target in self.targets:
            scales = self.scales[target.activation]
            if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
                raise ir.passes.PreconditionError(f"scales of {target.activation} must be positive and finite")
            if target.kind == "v" and not np.array_equal(target.shared(scales), scales):
                raise ir.passes.PreconditionError(f"scales of {target.activation} differ within a kv group")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        for target in self.targets:
            scales = np.asarray(self.scales[target.activation], dtype=np.float64)
            readers = [by_name[name] for name in target.readers]
            if target.kind == "norm":
                transform_initializer(norm_weight(by_name[target.producer]), lambda g, s=scales: g / s)
            elif target.kind == "up":
                transform_producer_columns(by_name[target.producer], lambda w, s=scales: w / s)
            elif target.kind == "v":
                heads_per_kv = target.kv_groups
                s_v = scales.reshape(-1, heads_per_kv, target.head_size)[:, 0, :].reshape(-1)
                transform_producer_columns(by_name[target.producer], lambda w, s=s_v: w / s, last=len(s_v))
            else:
                self._insert_mul(graph, readers, scales, target.reason)
            for reader in readers:
                transform_initializer(constant_weight(reader), lambda w, s=scales: w.astype(np.float64) * s[:, None],
                                      blocks_along=1)
        return ir.passes.PassResult(model, modified=bool(self.targets))

    def _insert_mul(self, graph: ir.Graph, readers: list[ir.Node], scales: np.ndarray, reason: str) -> None:
        activation = readers[0].inputs[0]
        inverse = add_initializer(graph, f"{activation.name}/channel_inverse_scale", (1.0 / scales).astype(np.float32))
        mul = ir.node("Mul", [activation, inverse], name=f"{activation.name}/ChannelScaleMul")
        mul.outputs[0].name = scaled_activation_name(activation.name)
        mul.outputs[0].dtype, mul.outputs[0].shape = activation.dtype or ir.DataType.FLOAT, activation.shape
        graph.insert_before(readers[0], mul)
        for reader in readers:
            reader.replace_input_with(0, mul.outputs[0])
        self.inserted_muls.append((activation.name, reason))

