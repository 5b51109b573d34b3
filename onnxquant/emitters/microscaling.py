"""Microscaling weights (MXFP8, MXFP4, NVFP4) in the standard ONNX form: element codes and block scales
read by one `DequantizeLinear(axis=0, block_size=B)` feeding the MatMul.

- MXFP8 / MXFP4: float8e4m3fn / float4e2m1 codes [K, N], float8e8m0 scales [K/B, N] (opset 24+).
- NVFP4: float4e2m1 codes, float8e4m3fn block scales that a per-tensor `DequantizeLinear` turns into
  float32 with the tensor's float32 scale, then the blocked `DequantizeLinear` of the codes.

ONNX Runtime's CPU provider runs none of FLOAT4E2M1 or FLOAT8E8M0; `passes/emulate_microscaling.py`
rewrites this form into ops it runs, computing the same numbers.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxquant.emitters import EmitContext, LazyQuantized, drop_if_unused
from onnxquant.errors import fail
from onnxquant.graph_utils import add_initializer
from onnxquant.patterns import constant_weight
from onnxquant.plan import PlannedNode

SCALE_STORAGE = {"e8m0": (ml_dtypes.float8_e8m0fnu, ir.DataType.FLOAT8E8M0),
                 "e4m3": (ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN),
                 "float32": (np.float32, ir.DataType.FLOAT)}


def emit_microscaling_weight(ctx: EmitContext, matmul: ir.Node, planned: PlannedNode) -> None:
    graph, spec = ctx.graph, planned.weights
    weight = constant_weight(matmul)
    k, n = weight.shape
    block = spec.block_size
    if k % block:
        fail(f"{matmul.name}: K = {k} is not a multiple of the block size {block}; choose a block size that divides it")
    scale_numpy, scale_ir = SCALE_STORAGE[spec.scale_dtype]

    def compute(array: np.ndarray) -> dict[str, np.ndarray]:
        rounded = ctx.rounder(matmul.name, array, spec)  # codes [N, K/B, B], scale [N, K/B]
        return {"codes": np.ascontiguousarray(rounded.codes.reshape(n, k).T),
                "scale": np.ascontiguousarray(rounded.scale.T).astype(scale_numpy),
                "tensor_scale": np.asarray(rounded.tensor_scale, np.float32)}

    parts = 3 if spec.scale_dtype == "e4m3" else 2
    lazy = LazyQuantized(weight, compute, parts=parts, ahead=ctx.ahead)
    codes = add_initializer(graph, f"{weight.name}_codes", lazy.part("codes"), dtype=spec.element.ir_dtype, shape=(k, n))
    scale = add_initializer(graph, f"{weight.name}_block_scale", lazy.part("scale"), dtype=scale_ir, shape=(k // block, n))
    nodes = []
    if spec.scale_dtype == "e4m3":
        tensor_scale = add_initializer(graph, f"{weight.name}_tensor_scale", lazy.part("tensor_scale"), dtype=ir.DataType.FLOAT,
                                       shape=())
        scale_dq = ir.node("DequantizeLinear", [scale, tensor_scale], name=f"{matmul.name}/weight/scale/DequantizeLinear")
        scale_dq.outputs[0].name, scale_dq.outputs[0].dtype = f"{weight.name}_block_scale_float", ir.DataType.FLOAT
        scale_dq.outputs[0].shape = ir.Shape([k // block, n])
        nodes.append(scale_dq)
        scale = scale_dq.outputs[0]
    attributes = {"axis": 0, "block_size": block}
    if spec.scale_dtype == "e8m0":
        attributes["output_dtype"] = ir.DataType.FLOAT  # else the output takes the scale's type
    dequant = ir.node("DequantizeLinear", [codes, scale], attributes=attributes,
                      name=f"{matmul.name}/weight/DequantizeLinear")
    dequant.outputs[0].name, dequant.outputs[0].dtype = f"{weight.name}_dequantized", ir.DataType.FLOAT
    dequant.outputs[0].shape = ir.Shape([k, n])
    nodes.append(dequant)
    graph.insert_before(matmul, nodes)
    matmul.replace_input_with(1, dequant.outputs[0])
    drop_if_unused(graph, weight)
