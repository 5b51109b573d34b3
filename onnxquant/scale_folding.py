"""Where a per-input-channel scale of a MatMul activation can go so the float model is unchanged.

SmoothQuant and AWQ both divide an activation X by s (per channel) and multiply the rows of its
readers' weights by s. The division is exact and free when it folds into the producer of X:

- "norm": X is an RMSNorm output; its weight absorbs 1/s.
- "up": X = silu(gate) * up, linear in up, so up_proj's output columns (and bias) absorb 1/s.
- "v": X is the attention output, linear in v, so the v columns of the q/k/v projection absorb
  1/s; with grouped-query attention every query head of a group reads the same v head, so s is
  shared by the heads of a group (`FoldTarget.shared` reduces a statistic to that form).
- "mul": nothing foldable; an explicit `Mul` by 1/s is inserted, and `reason` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import transform_initializer
from onnxquant.patterns import NORM_OPS, constant_weight, is_const_matmul, linear_producer, matmul_bias


@dataclass(frozen=True)
class FoldTarget:
    activation: str
    readers: tuple[str, ...]
    kind: str  # "norm", "up", "v" or "mul"
    producer: str | None = None  # the node whose weight absorbs 1/s
    kv_groups: int = 1  # for "v": query heads per kv head
    head_size: int = 0
    reason: str = ""  # for "mul": why no producer could absorb 1/s

    def shared(self, per_channel: np.ndarray, reduce=np.max) -> np.ndarray:
        """A per-channel statistic made equal across the query heads that share a v head."""
        if self.kind != "v" or self.kv_groups == 1:
            return per_channel
        grouped = reduce(per_channel.reshape(-1, self.kv_groups, self.head_size), axis=1)
        return np.repeat(grouped, self.kv_groups, axis=0).reshape(-1)


def classify(activation: ir.Value, readers: list[ir.Node]) -> FoldTarget:
    names = tuple(r.name for r in readers)
    producer = activation.producer()
    if {use.node.name for use in activation.uses()} != set(names):
        others = sorted({use.node.name for use in activation.uses()} - set(names))
        return FoldTarget(activation.name, names, "mul",
                          reason=f"also read by {others[0]}, which keeps its input (excluded or not a constant MatMul)")
    if producer is None:
        return FoldTarget(activation.name, names, "mul", reason="a graph input")
    if producer.op_type in NORM_OPS and activation is producer.outputs[0]:
        return FoldTarget(activation.name, names, "norm", producer.name)
    if producer.op_type == "Mul":
        for index, value in enumerate(producer.inputs):
            up = value.producer()
            other = producer.inputs[1 - index].producer()
            if is_const_matmul(up) and len(list(value.uses())) == 1 and other is not None and other.op_type == "Mul":
                return FoldTarget(activation.name, names, "up", up.name)
    if producer.op_type == "GroupQueryAttention" and activation is producer.outputs[0]:
        heads = producer.attributes.get_int("num_heads")
        kv_heads = producer.attributes.get_int("kv_num_heads")
        packed = len(producer.inputs) < 3 or producer.inputs[2] is None
        source = producer.inputs[0] if packed else producer.inputs[2]
        linear = linear_producer(source)
        if linear is not None and len(list(source.uses())) == 1:
            width = constant_weight(linear).shape[1]
            head_size = width // (heads + 2 * kv_heads) if packed else width // kv_heads
            return FoldTarget(activation.name, names, "v", linear.name, heads // kv_heads, head_size)
        return FoldTarget(activation.name, names, "mul", reason="the attention's v does not come from one constant MatMul")
    return FoldTarget(activation.name, names, "mul", reason=f"produced by a {producer.op_type}, which is not linear per channel")


def fold_targets(graph: ir.Graph, groups: dict[str, list[str]]) -> list[FoldTarget]:
    """One target per activation group (activation name -> reader MatMul names)."""
    by_name = {node.name: node for node in graph}
    targets = []
    for reader_names in groups.values():
        readers = [by_name[name] for name in reader_names]
        targets.append(classify(readers[0].inputs[0], readers))
    return targets


def transform_producer_columns(linear: ir.Node, transform: Callable[[np.ndarray], np.ndarray], last: int | None = None) -> None:
    """Apply `transform` (float64) to the last `last` output columns (all when None) of a MatMul's
    weight and of its bias: how an "up" or "v" producer absorbs a per-channel scale or a rotation."""

    def apply(w: np.ndarray) -> np.ndarray:
        w = w.astype(np.float64).copy()
        columns = slice(None) if last is None else slice(w.shape[-1] - last, None)
        w[..., columns] = transform(w[..., columns])
        return w

    transform_initializer(constant_weight(linear), apply, blocks_along=0)
    bias = matmul_bias(linear)
    if bias is not None:
        transform_initializer(bias[1], apply)
