"""Graph patterns the passes match: norms, constant-weight MatMuls, their biases, the tied embedding,
and the producers a per-channel scale can be folded into. Passes import these; they never import
each other, the rotation-config loader or the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

NORM_OPS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"})
QUANT_METADATA_KEY = "onnxquant.quantization"
ROTATION_METADATA_KEY = "onnxquant.rotation"
HADAMARD_GROUPS_METADATA_KEY = "onnxquant.hadamard_groups"
# Node metadata on a MatMul that applies an online rotation (its constant is not a weight to quantize).
ONLINE_ROTATION_KEY = "onnxquant.online_rotation"
R4_METADATA_KEY = "onnxquant.r4"
# On the hidden x hidden MatMul RetieEmbeddingsPass puts before a tied lm_head after R1.
TIED_INPUT_METADATA_KEY = "onnxquant.tied_input"
# On a MatMul reading the residual stream: R1's rotation already holds Hadamard groups of this size.
GROUPS_IN_R1_KEY = "onnxquant.hadamard_groups_in_r1"


@dataclass(frozen=True)
class ResolvedPair:
    """One R1 pair as graph nodes: the writers of a residual stream, the RMSNorm between, its readers."""

    prev_nodes: tuple[ir.Node, ...]
    norm_node: ir.Node
    next_nodes: tuple[ir.Node, ...]


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def norm_weight_index(norm: ir.Node) -> int:
    return 2 if norm.op_type == "SkipSimplifiedLayerNormalization" else 1


def norm_weight(norm: ir.Node) -> ir.Value:
    return norm.inputs[norm_weight_index(norm)]


def constant_weight(node: ir.Node, index: int = 1) -> ir.Value | None:
    """The initializer at input `index` of `node`, if that input is one."""
    if len(node.inputs) <= index:
        return None
    value = node.inputs[index]
    return value if is_initializer(value) else None


def is_const_matmul(node: ir.Node | None) -> bool:
    """A standard MatMul whose second input is a constant 2-D float weight (not an online rotation)."""
    if node is None or node.op_type != "MatMul" or node.domain != "" or ONLINE_ROTATION_KEY in node.metadata_props:
        return False
    weight = constant_weight(node)
    return weight is not None and weight.dtype == ir.DataType.FLOAT and weight.shape is not None and len(weight.shape) == 2


def is_embedding_gather(node: ir.Node) -> bool:
    """A Gather from a constant 2-D float table (the token embedding)."""
    if node.op_type != "Gather" or node.domain != "" or not is_initializer(node.inputs[0]):
        return False
    table = node.inputs[0]
    return table.dtype == ir.DataType.FLOAT and table.shape is not None and len(table.shape) == 2


def matmul_bias(matmul: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The `Add(matmul_out, bias)` right after a MatMul, when its other input is a constant vector."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "":
        return None
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    if is_initializer(other) and other.shape is not None and len(other.shape) == 1:
        return add, other
    return None


def linear_producer(value: ir.Value) -> ir.Node | None:
    """The constant-weight MatMul producing `value`, directly or through its bias Add."""
    node = value.producer()
    if is_const_matmul(node):
        return node
    if node is not None and node.op_type == "Add":
        for candidate in (v.producer() for v in node.inputs if v is not None):
            if is_const_matmul(candidate):
                bias = matmul_bias(candidate)
                if bias is not None and bias[0] is node:
                    return candidate
    return None


def consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph}


def find_tied_embedding(graph: ir.Graph) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """(Gather, Transpose, lm_head weight) when the embedding Gather reads Transpose(an initializer)."""
    for node in graph:
        if node.op_type != "Gather" or node.domain != "":
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        if producer is not None and producer.op_type == "Transpose" and is_initializer(producer.inputs[0]):
            return node, producer, producer.inputs[0]
    return None


def residual_inputs(norm: ir.Node) -> list[ir.Value]:
    """The residual-stream inputs of a norm (one for RMSNorm, two for the Skip variant)."""
    return list(norm.inputs[:2] if norm.op_type == "SkipSimplifiedLayerNormalization" else norm.inputs[:1])


def unscaled(value: ir.Value) -> ir.Value:
    """The input of a `Mul` by a constant scalar that produces `value` (Gemma scales its embeddings
    by sqrt(hidden) so), else `value`: a scalar commutes with every rotation and channel scale."""
    producer = value.producer()
    if producer is None or producer.op_type != "Mul" or producer.domain != "":
        return value
    for source, factor in (producer.inputs, tuple(reversed(producer.inputs))):
        constant = ir.convenience.get_const_tensor(factor) if factor is not None else None
        if constant is not None and constant.size == 1:
            return source
    return value


def writes_into(node: ir.Node, value: ir.Value) -> bool:
    """`node` produces `value`, directly, through the bias Add that follows it, or through a scalar Mul."""
    value = unscaled(value)
    producer = value.producer()
    if producer is node:
        return True
    if node.op_type == "MatMul" and producer is not None:
        bias = matmul_bias(node)
        return bias is not None and bias[0] is producer
    return False
