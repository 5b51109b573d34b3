"""EmulateMicroscalingPass: the standard microscaling form rewritten into ops ONNX Runtime's CPU
provider runs, computing the same numbers.

Rewrite rules (one per DequantizeLinear with a constant input the CPU provider lacks):
- codes FLOAT4E2M1 [K, N], block scale S [K/B, N], block_size B:
      DequantizeLinear(codes, S) -> Reshape(Mul(Reshape(Gather(T, Cast<int32>(codes_u4)), [K/B, B, N]),
                                                 Unsqueeze(S, 1)), [K, N])
  where codes_u4 holds each code's 4 bits as UINT4 (same storage) and T is the table of the 16
  E2M1 values in code order, so T[code] * S is exactly what the DequantizeLinear computes;
- a FLOAT8E8M0 scale initializer -> float32 (each is a power of two: exact), and the
  DequantizeLinear's output_dtype attribute dropped (a float32 scale gives float32 by itself).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import add_initializer

E2M1_TABLE = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, name, np.asarray(array))


class EmulateMicroscalingPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        table = None
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            codes, scale = node.inputs[0], node.inputs[1]
            if scale.const_value is not None and scale.const_value.dtype == ir.DataType.FLOAT8E8M0:
                node.replace_input_with(1, self._float32_copy(graph, scale))
                node.attributes.pop("output_dtype", None)  # an opset-23 attribute; float32 scales give float32
                scale = node.inputs[1]
                modified = True
            if codes.const_value is None or codes.const_value.dtype != ir.DataType.FLOAT4E2M1:
                continue
            if table is None:
                table = _const(graph, "microscaling/e2m1_table", E2M1_TABLE)
            self._rewrite_fp4(graph, node, table)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _float32_copy(graph: ir.Graph, value: ir.Value) -> ir.Value:
        tensor = value.const_value
        return add_initializer(graph, f"{value.name}_float", lambda: tensor.numpy().astype(np.float32),
                               dtype=ir.DataType.FLOAT, shape=tuple(tensor.shape))

    @staticmethod
    def _rewrite_fp4(graph: ir.Graph, node: ir.Node, table: ir.Value) -> None:
        codes, scale = node.inputs[0], node.inputs[1]
        k, n = codes.const_value.shape
        block = node.attributes["block_size"].as_int()
        tensor = codes.const_value
        bits = add_initializer(graph, f"{codes.name}_u4", lambda: tensor.numpy().view(np.uint8).astype(ml_dtypes.uint4),
                               dtype=ir.DataType.UINT4, shape=(k, n))
        name = node.name
        cast = ir.node("Cast", [bits], attributes={"to": ir.DataType.INT32}, name=f"{name}/Cast")
        gather = ir.node("Gather", [table, cast.outputs[0]], name=f"{name}/Gather")
        blocked = ir.node("Reshape", [gather.outputs[0], _const(graph, f"{name}/blocked_shape", np.array([k // block, block, n]))],
                          name=f"{name}/Reshape")
        per_block = ir.node("Unsqueeze", [scale, _const(graph, f"{name}/axis1", np.array([1]))], name=f"{name}/Unsqueeze")
        scaled = ir.node("Mul", [blocked.outputs[0], per_block.outputs[0]], name=f"{name}/Mul")
        weight = ir.node("Reshape", [scaled.outputs[0], _const(graph, f"{name}/weight_shape", np.array([k, n]))],
                         name=f"{name}/weight")
        graph.insert_before(node, [cast, gather, blocked, per_block, scaled, weight])
        output = node.outputs[0]
        weight.outputs[0].dtype = ir.DataType.FLOAT
        output.replace_all_uses_with(weight.outputs[0])
        name_of_output = output.name
        graph.remove(node, safe=True)
        weight.outputs[0].name = name_of_output
        if not list(codes.uses()):
            graph.initializers.pop(codes.name)
