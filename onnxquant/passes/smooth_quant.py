"""SmoothQuant, folded into the graph so no extra op runs at inference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import (add_initializer, constant_weight, matmul_bias, nodes_by_name, read_initializer,
                                   transform_initializer)
from onnxquant.rotation_config import NORM_OPS, norm_weight_index


@dataclass(frozen=True)
class SmoothTarget:
    """One quantized activation and where its 1/s can be folded.

    kind: "norm" (scale the norm weight), "up" (scale up_proj's output columns, which
    silu(gate) * up is linear in), "v" (scale the v columns of the attention input projection,
    which the attention output is linear in), or "mul" (no foldable producer: insert a Mul).
    """

    activation: str
    readers: tuple[str, ...]
    kind: str
    producer: str | None = None  # the node whose weight absorbs 1/s
    kv_groups: int = 1  # for "v": query heads per kv head
    head_size: int = 0


def _is_const_matmul(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "MatMul" and constant_weight(node) is not None


def _linear_producer(value: ir.Value) -> ir.Node | None:
    """The constant-weight MatMul producing `value`, directly or through its bias Add."""
    node = value.producer()
    if _is_const_matmul(node):
        return node
    if node is not None and node.op_type == "Add":
        for candidate in (v.producer() for v in node.inputs):
            if _is_const_matmul(candidate) and matmul_bias(candidate) is not None and matmul_bias(candidate)[0] is node:
                return candidate
    return None


def classify_target(activation: ir.Value, readers: list[ir.Node]) -> SmoothTarget:
    names = tuple(r.name for r in readers)
    producer = activation.producer()
    if {use.node.name for use in activation.uses()} != set(names):
        # Another node (e.g. a MatMul left out by --exclude) reads the activation too: dividing it
        # at the producer would change that node's input, so only an explicit Mul is exact.
        return SmoothTarget(activation.name, names, "mul")
    if producer is not None and producer.op_type in NORM_OPS and activation is producer.outputs[0]:
        return SmoothTarget(activation.name, names, "norm", producer.name)
    if producer is not None and producer.op_type == "Mul":
        for index, value in enumerate(producer.inputs):
            up = value.producer()
            other = producer.inputs[1 - index].producer()
            if _is_const_matmul(up) and len(list(value.uses())) == 1 and other is not None and other.op_type == "Mul":
                return SmoothTarget(activation.name, names, "up", up.name)
    if producer is not None and producer.op_type == "GroupQueryAttention" and activation is producer.outputs[0]:
        heads = producer.attributes.get_int("num_heads")
        kv_heads = producer.attributes.get_int("kv_num_heads")
        packed = len(producer.inputs) < 3 or producer.inputs[2] is None
        source = producer.inputs[0] if packed else producer.inputs[2]
        linear = _linear_producer(source)
        if linear is not None and len(list(source.uses())) == 1:
            width = constant_weight(linear).shape[1]
            head_size = width // (heads + 2 * kv_heads) if packed else width // kv_heads
            return SmoothTarget(activation.name, names, "v", linear.name, heads // kv_heads, head_size)
    return SmoothTarget(activation.name, names, "mul")


def smooth_targets(graph: ir.Graph, exclude: tuple[str, ...] = ()) -> list[SmoothTarget]:
    """One target per activation that the quantizer will quantize (see plan_quantization)."""
    from onnxquant.passes.insert_qdq import plan_quantization

    by_name = nodes_by_name(graph)
    targets = []
    for activation, reader_names in plan_quantization(graph, exclude, include_embedding=False).activations.items():
        readers = [by_name[name] for name in reader_names]
        targets.append(classify_target(readers[0].inputs[0], readers))
    return targets


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); channels with no signal keep s = 1."""
    act = np.maximum(act_absmax.astype(np.float64), 0.0)
    wgt = np.maximum(weight_absmax.astype(np.float64), 0.0)
    scales = np.ones_like(act)
    ok = (act > 0) & (wgt > 0)
    scales[ok] = act[ok] ** alpha / wgt[ok] ** (1.0 - alpha)
    return np.clip(scales, 1e-5, 1e5)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Divide each target activation X by s per input channel and multiply the readers' weight rows by s.

    Reader MatMuls: W[j, :] <- s_j W[j, :]. The division is folded into the producer:
    "norm": the norm weight g <- g / s (one s shared by all readers of that norm, from the max of
    their weights); "up": up_proj's output columns and bias / s; "v": the v columns of the
    qkv projection and bias / s, with s shared by the query heads of each kv group (the max of
    their statistics), because every query head of a group reads the same v. Targets with no
    foldable producer get an explicit Mul by 1/s. The float model computes the same function.
    """

    def __init__(self, targets: list[SmoothTarget], act_absmax: dict[str, np.ndarray], alpha: float):
        super().__init__()
        self.targets = targets
        self.act_absmax = act_absmax
        self.alpha = alpha
        self.inserted_muls = 0
        self.divisors: dict[str, np.ndarray] = {}  # activation name -> per-channel s it was divided by

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        for target in self.targets:
            readers = [by_name[name] for name in target.readers]
            weights = [constant_weight(r) for r in readers]
            w_absmax = np.max([read_initializer(w, lambda a: np.abs(a).max(axis=1)) for w in weights], axis=0)
            x_absmax = self.act_absmax[target.activation]
            if target.kind == "v":
                x_grouped = x_absmax.reshape(-1, target.kv_groups, target.head_size).max(axis=1)
                w_grouped = w_absmax.reshape(-1, target.kv_groups, target.head_size).max(axis=1)
                s_v = smoothing_scales(x_grouped, w_grouped, self.alpha)  # [kv_heads, head_size]
                scales = np.repeat(s_v, target.kv_groups, axis=0).reshape(-1)
                self._fold_into_v(by_name[target.producer], s_v.reshape(-1))
            else:
                scales = smoothing_scales(x_absmax, w_absmax, self.alpha)
                if target.kind == "norm":
                    norm = by_name[target.producer]
                    transform_initializer(norm.inputs[norm_weight_index(norm)], lambda g, s=scales: g / s)
                elif target.kind == "up":
                    self._fold_into_columns(by_name[target.producer], scales, slice(None))
                else:
                    self._insert_mul(graph, readers, scales)
            self.divisors[target.activation] = scales
            for weight in weights:
                transform_initializer(weight, lambda w, s=scales: w.astype(np.float64) * s[:, None], blocks_along=1)
        return ir.passes.PassResult(model, modified=bool(self.targets))

    @staticmethod
    def _fold_into_columns(linear: ir.Node, scales: np.ndarray, columns: slice) -> None:
        def divide(w, s=scales, c=columns):
            w = w.astype(np.float64).copy()
            w[..., c] /= s
            return w

        transform_initializer(constant_weight(linear), divide, blocks_along=0)
        bias = matmul_bias(linear)
        if bias is not None:
            transform_initializer(bias[1], divide)

    def _fold_into_v(self, linear: ir.Node, s_v: np.ndarray) -> None:
        width = constant_weight(linear).shape[1]
        self._fold_into_columns(linear, s_v, slice(width - len(s_v), width))

    def _insert_mul(self, graph: ir.Graph, readers: list[ir.Node], scales: np.ndarray) -> None:
        activation = readers[0].inputs[0]
        inverse = add_initializer(graph, f"{activation.name}/smooth_inverse_scale", (1.0 / scales).astype(np.float32))
        mul = ir.node("Mul", [activation, inverse], name=f"{activation.name}/SmoothQuantMul")
        mul.outputs[0].name = f"{activation.name}/smoothed"
        mul.outputs[0].dtype, mul.outputs[0].shape = activation.dtype, activation.shape
        graph.insert_before(readers[0], mul)
        for reader in readers:
            reader.replace_input_with(0, mul.outputs[0])
        self.inserted_muls += 1
