"""MatMul with a constant weight -> com.microsoft MatMulNBits (weight-only, blocks along K)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.emitters import EmitContext, LazyQuantized, drop_if_unused
from onnxquant.graph_utils import add_initializer
from onnxquant.patterns import constant_weight
from onnxquant.plan import PlannedNode
from onnxquant.spec import QuantSpec


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values along the last axis, two per byte, the first in the low nibble."""
    values = codes.astype(np.uint8) & 0x0F
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unsigned_codes(codes: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """MatMulNBits stores unsigned values; a signed grid is shifted by its implicit zero point
    (8 for 4 bits, 128 for 8 bits), which the kernel assumes when no zero points are given."""
    return (codes.astype(np.int16) - spec.qmin).astype(np.uint8) if spec.signed else codes.astype(np.uint8)


def nbits_parts(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> dict[str, np.ndarray]:
    """B [N, blocks, blob], scales [N, blocks], zero points (asymmetric only) as MatMulNBits wants them."""
    stored = unsigned_codes(codes, spec)
    parts = {"scale": np.ascontiguousarray(scale, dtype=np.float32)}
    if spec.bits == 4:
        parts["data"] = pack_nibbles(stored)
        if not spec.symmetric:
            parts["zero_point"] = pack_nibbles(zero_point.astype(np.uint8))
    else:
        parts["data"] = stored
        if not spec.symmetric:
            parts["zero_point"] = zero_point.astype(np.uint8)
    return parts


def emit_matmul_nbits(ctx: EmitContext, matmul: ir.Node, planned: PlannedNode) -> None:
    """`MatMul(X, W)` -> `MatMulNBits(X, B, scales[, zero_points])`; K is padded to whole blocks
    with zeros. 8-bit blocks get accuracy_level 4, the only level whose CPU kernel keeps them
    packed (the others dequantize the whole weight to fp32 on every call)."""
    graph, spec = ctx.graph, planned.weights
    weight = constant_weight(matmul)
    k, n = weight.shape
    blocks = -(-k // spec.block_size)
    blob = spec.block_size * spec.bits // 8

    def compute(array: np.ndarray) -> dict[str, np.ndarray]:
        rounded = ctx.rounder(matmul.name, array, spec)
        return nbits_parts(rounded.codes, rounded.scale, rounded.zero_point, spec)

    parts = 2 if spec.symmetric else 3
    lazy = LazyQuantized(weight, compute, parts, ctx.ahead)
    inputs = [matmul.inputs[0],
              add_initializer(graph, f"{weight.name}_Q{spec.bits}", lazy.part("data"), dtype=ir.DataType.UINT8,
                              shape=(n, blocks, blob)),
              add_initializer(graph, f"{weight.name}_scales", lazy.part("scale"), dtype=ir.DataType.FLOAT,
                              shape=(n, blocks))]
    if not spec.symmetric:
        zp_shape = (n, -(-blocks // 2)) if spec.bits == 4 else (n, blocks)
        inputs.append(add_initializer(graph, f"{weight.name}_zero_points", lazy.part("zero_point"),
                                      dtype=ir.DataType.UINT8, shape=zp_shape))
    accuracy_level = 4 if spec.bits == 8 else planned.accuracy_level
    attributes = {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    node = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft", name=f"{matmul.name}_Q{spec.bits}")
    graph.insert_before(matmul, node)
    ctx.emitted[matmul.name] = node
    output = matmul.outputs[0]
    node.outputs[0].type, node.outputs[0].shape = output.type, output.shape
    output.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    old_name = output.name
    graph.remove(matmul, safe=True)
    node.outputs[0].name = old_name
    drop_if_unused(graph, weight)
