"""Place QuantizeLinear/DequantizeLinear: int8 weights with a DQ, and a Q -> DQ pair per activation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import (add_initializer, constant_weight, is_initializer, map_blocks, nodes_by_name,
                                   read_initializer, release_tensor)
from onnxquant.schemes import QuantScheme, TensorQuant, quant_params, quantize_array

QUANT_METADATA_KEY = "onnxquant.quantization"


@dataclass
class QuantPlan:
    """What to quantize: reader MatMuls grouped by their (shared) activation, and the embedding."""

    activations: dict[str, list[str]] = field(default_factory=dict)  # activation name -> reader MatMul names
    embedding: str | None = None  # name of the embedding Gather with an initializer table


def plan_quantization(graph: ir.Graph, exclude: tuple[str, ...] = (), include_embedding: bool = True) -> QuantPlan:
    """Every MatMul with a constant 2-D float weight, less names containing an `exclude` entry.

    Readers of the same activation (fused q/k/v is one; gate and up share the norm output) are
    grouped so they share one Q/DQ pair.
    """
    plan = QuantPlan()
    for node in graph:
        if any(pattern in node.name for pattern in exclude):
            continue
        if node.op_type == "MatMul" and node.domain == "":
            weight = constant_weight(node)
            if weight is None or weight.dtype != ir.DataType.FLOAT or len(weight.shape) != 2:
                continue
            plan.activations.setdefault(node.inputs[0].name, []).append(node.name)
        elif include_embedding and node.op_type == "Gather" and is_initializer(node.inputs[0]):
            if node.inputs[0].dtype == ir.DataType.FLOAT and len(node.inputs[0].shape) == 2 and plan.embedding is None:
                plan.embedding = node.name
    return plan


def weight_bound(weight: np.ndarray, reduce_axes: tuple[int, ...] | None, pair_safe: bool) -> np.ndarray:
    """max |w| over `reduce_axes`; pair-safe: at least the largest |w[k]| + |w[k+1]| of adjacent
    input rows (k even), so that scale = bound / 127 keeps every pair of int8 values within 128."""
    magnitude = np.abs(weight)
    bound = magnitude.max(axis=reduce_axes)
    if pair_safe and weight.ndim == 2 and weight.shape[0] >= 2:
        even = weight.shape[0] - weight.shape[0] % 2
        pairs = magnitude[0:even:2] + magnitude[1:even:2]
        bound = np.maximum(bound, pairs.max(axis=reduce_axes))
    return bound


def _quantize_weight_lazily(graph: ir.Graph, weight: ir.Value, spec: TensorQuant, axis: int | None):
    """Lazily quantized int8 copy of `weight` with its scale; axis None = per tensor."""
    source = weight.const_value
    reduce_axes = tuple(a for a in range(len(source.shape)) if a != axis) if axis is not None else None
    amax = read_initializer(weight, lambda a: weight_bound(a, reduce_axes, spec.pair_safe))
    scale, zero_point = quant_params(-amax, amax, spec)
    grid_scale = scale if axis is None else np.expand_dims(scale, reduce_axes)
    grid_zero = zero_point if axis is None else np.expand_dims(zero_point, reduce_axes)

    def rows_of(grid: np.ndarray, rows: slice) -> np.ndarray:
        return grid[rows] if np.ndim(grid) and grid.shape[0] > 1 else grid  # per-row grids follow the block

    def compute() -> np.ndarray:
        array = source.numpy()
        out = map_blocks(array, lambda block, rows: quantize_array(block, rows_of(grid_scale, rows),
                                                                   rows_of(grid_zero, rows), spec),
                         0, spec.numpy_dtype)
        del array
        release_tensor(source)
        return out

    quantized = add_initializer(graph, f"{weight.name}_quantized", compute,
                                dtype=ir.DataType.INT8 if spec.signed else ir.DataType.UINT8, shape=tuple(source.shape))
    return quantized, scale, zero_point


class InsertQDQPass(ir.passes.InPlacePass):
    """Quantize the planned MatMuls (and the embedding) with the scheme's grids.

    - Weight W of a MatMul -> int8 initializer W_q and `DequantizeLinear(W_q, scale, 0)` feeding
      the MatMul (per tensor, or per output column with axis=1).
    - Activation X read by one or more planned MatMuls -> `DequantizeLinear(QuantizeLinear(X))`
      with a static scale/zero point from the calibrated range, shared by all those readers.
    - Embedding table E [vocab, hidden] -> int8 rows with one scale per row, gathered first and
      scaled after (`Cast(Gather(E_q, ids)) * Gather(scale, ids)`), so only the looked-up rows
      are ever dequantized.
    The rewritten graph uses standard ONNX ops that ORT's CPU provider fuses into integer kernels.
    """

    def __init__(self, scheme: QuantScheme, plan: QuantPlan, ranges: dict[str, tuple[float, float]]):
        super().__init__()
        self.scheme = scheme
        self.plan = plan
        self.ranges = ranges
        self.quantized_nodes = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        weight_axis = 1 if self.scheme.weights.per_channel else None
        for activation_name, reader_names in self.plan.activations.items():
            readers = [by_name[name] for name in reader_names]
            self._quantize_activation(graph, readers, activation_name)
            for reader in readers:
                self._quantize_matmul_weight(graph, reader, weight_axis)
                self.quantized_nodes += 1
        if self.plan.embedding is not None:
            self._quantize_embedding(graph, by_name[self.plan.embedding])
            self.quantized_nodes += 1
        model.metadata_props[QUANT_METADATA_KEY] = json.dumps(
            {"config": self.scheme.name, "calibration": self.scheme.calibration.__dict__})
        return ir.passes.PassResult(model, modified=self.quantized_nodes > 0)

    def _quantize_activation(self, graph: ir.Graph, readers: list[ir.Node], name: str) -> None:
        spec = self.scheme.activations
        rmin, rmax = self.ranges[name]
        scale, zero_point = quant_params(rmin, rmax, spec)
        activation = readers[0].inputs[0]
        scale_value = add_initializer(graph, f"{name}/act_scale", scale)
        zp_value = add_initializer(graph, f"{name}/act_zero_point", zero_point)
        quant = ir.node("QuantizeLinear", [activation, scale_value, zp_value], name=f"{name}/QuantizeLinear")
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale_value, zp_value], name=f"{name}/DequantizeLinear")
        quant.outputs[0].name, dequant.outputs[0].name = f"{name}/quantized", f"{name}/dequantized"
        dequant.outputs[0].dtype = activation.dtype
        graph.insert_before(readers[0], [quant, dequant])
        for reader in readers:
            reader.replace_input_with(0, dequant.outputs[0])

    def _quantize_matmul_weight(self, graph: ir.Graph, matmul: ir.Node, axis: int | None) -> None:
        weight = constant_weight(matmul)
        quantized, scale, zero_point = _quantize_weight_lazily(graph, weight, self.scheme.weights, axis)
        scale_value = add_initializer(graph, f"{weight.name}_scale", scale)
        zp_value = add_initializer(graph, f"{weight.name}_zero_point", zero_point)
        attributes = {"axis": axis} if axis is not None else {}
        dequant = ir.node("DequantizeLinear", [quantized, scale_value, zp_value], attributes=attributes,
                          name=f"{matmul.name}/weight/DequantizeLinear")
        dequant.outputs[0].name = f"{weight.name}_dequantized"
        dequant.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(matmul, dequant)
        matmul.replace_input_with(1, dequant.outputs[0])
        if not list(weight.uses()):
            graph.initializers.pop(weight.name)

    def _quantize_embedding(self, graph: ir.Graph, gather: ir.Node) -> None:
        table = gather.inputs[0]
        spec = TensorQuant(signed=True, symmetric=True, per_channel=True)
        quantized, scale, _ = _quantize_weight_lazily(graph, table, spec, axis=0)
        scale_value = add_initializer(graph, f"{table.name}_row_scale", scale)
        ids = gather.inputs[1]
        rows = ir.node("Gather", [quantized, ids], name=f"{gather.name}/quantized_rows")
        as_float = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{gather.name}/Cast")
        row_scale = ir.node("Gather", [scale_value, ids], name=f"{gather.name}/row_scale")
        axes = add_initializer(graph, f"{gather.name}/unsqueeze_axes", np.array([-1], dtype=np.int64))
        unsqueeze = ir.node("Unsqueeze", [row_scale.outputs[0], axes], name=f"{gather.name}/row_scale_unsqueeze")
        mul = ir.node("Mul", [as_float.outputs[0], unsqueeze.outputs[0]], name=f"{gather.name}/dequantize_rows")
        graph.insert_before(gather, [rows, as_float, row_scale, unsqueeze, mul])
        output = gather.outputs[0]
        output.replace_all_uses_with(mul.outputs[0])
        mul.outputs[0].dtype, mul.outputs[0].shape = output.dtype, output.shape
        old_name = output.name
        graph.remove(gather, safe=True)
        mul.outputs[0].name = old_name
        if not list(table.uses()):
            graph.initializers.pop(table.name)
