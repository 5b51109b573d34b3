"""What gets quantized and how: the one place that reads the scheme against the graph.

Every MatMul with a constant 2-D float weight is planned with the scheme's weight grid after the
per-node overrides (an override to None keeps it in float). Readers of one activation form one
`ActivationGroup` (the fused q/k/v projection; gate and up share the norm output), which shares a
Q/DQ pair, one SmoothQuant/AWQ scale and one Hessian. The token embedding Gather is planned with
the scheme's embedding grid (the MatMul R1 puts before a tied lm_head: 8-bit blocks in a 4-bit scheme); when it is tied to lm_head (the builder's Gather over lm_head's transposed
weight) and both get the same 4-bit block grid, it reads lm_head's table (`shares`) unless the scheme's
`tied_embedding` is "separate". Emitters (onnxquant.emitters) then write what the plan says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxquant.algorithms.registry import get_algorithm
from onnxquant.patterns import TIED_INPUT_METADATA_KEY, is_const_matmul, is_embedding_gather
from onnxquant.schemes import QuantScheme, uint8_blocks
from onnxquant.spec import QuantSpec


@dataclass(frozen=True)
class PlannedNode:
    name: str
    op: str  # "MatMul" or "Gather"
    weights: QuantSpec
    algo: str = "rtn"  # the weight algorithm that rounds it (onnxquant.algorithms.registry)
    accuracy_level: int = 0  # MatMulNBits only
    shares: str | None = None  # Gather only: the MatMul whose quantized table it reads (a tied embedding)


@dataclass
class QuantPlan:
    """Planned nodes, and the MatMuls grouped by the activation they read."""

    nodes: dict[str, PlannedNode] = field(default_factory=dict)
    activations: dict[str, list[str]] = field(default_factory=dict)  # activation name -> reader MatMul names
    activation_spec: QuantSpec | None = None
    embedding: str | None = None  # name of the embedding Gather

    @property
    def matmuls(self) -> list[PlannedNode]:
        return [node for node in self.nodes.values() if node.op == "MatMul"]

    def without(self, names: list[str]) -> "QuantPlan":
        """This plan with the MatMuls `names` left in float (an activation none of whose readers is
        left quantized loses its Q/DQ too)."""
        dropped = set(names)
        nodes = {name: dataclasses.replace(node, shares=None) if node.shares in dropped else node
                 for name, node in self.nodes.items() if name not in dropped}
        activations = {activation: [r for r in readers if r not in dropped] for activation, readers in self.activations.items()}
        return QuantPlan(nodes,
                         {activation: readers for activation, readers in activations.items() if readers},
                         self.activation_spec, self.embedding)


def plan_quantization(graph: ir.Graph, scheme: QuantScheme, include_embedding: bool = True,
                      tied_lm_head: str | None = None) -> QuantPlan:
    """The plan of `graph` under `scheme`; `tied_lm_head` names the MatMul whose weight the embedding
    table is the transpose of (its tie found before untying), for a shared table."""
    plan = QuantPlan(activation_spec=scheme.activations)
    for node in graph:
        if is_const_matmul(node):
            chosen = scheme.node_format(node.name)
            if chosen.weights is None:
                continue
            if TIED_INPUT_METADATA_KEY in node.metadata_props and not any(o.matches(node.name) for o in scheme.overrides):
                chosen = dataclasses.replace(chosen, weights=tied_input_weights(chosen.weights))
            plan.nodes[node.name] = PlannedNode(node.name, "MatMul", chosen.weights, chosen.algo, chosen.accuracy_level)
            plan.activations.setdefault(node.inputs[0].name, []).append(node.name)
        elif include_embedding and plan.embedding is None and is_embedding_gather(node) and scheme.embedding is not None:
            spec = embedding_weights(scheme, node.name)
            if spec is None:
                continue
            # The embedding has no input to take a Hessian of: a Hessian algorithm rounds it to nearest.
            algo = scheme.algo if not get_algorithm(scheme.algo).needs_hessians else "rtn"
            plan.nodes[node.name] = PlannedNode(node.name, "Gather", spec, algo)
            plan.embedding = node.name
    if tied_lm_head is not None and scheme.tied_embedding != "separate" and tie_refusal(plan, tied_lm_head) is None:
        embedding = plan.nodes[plan.embedding]
        plan.nodes[plan.embedding] = dataclasses.replace(embedding, shares=tied_lm_head)
    return plan


def tied_input_weights(spec: QuantSpec) -> QuantSpec:
    """The grid of the MatMul R1 leaves before a tied lm_head: 8-bit blocks where the scheme gives 4-bit ones. At 4
    bits it costs SmolLM2 w4a16 + R1 +0.44 perplexity (23.9845 against 23.5476 with it in float, 16 test blocks)
    for 0.2 MB; an override that matches it decides instead."""
    if spec.granularity == "per_block" and spec.bits == 4 and not spec.is_float:
        return uint8_blocks(spec.block_size)
    return spec


def tie_refusal(plan: QuantPlan, tied_lm_head: str | None) -> str | None:
    """Why the plan's embedding cannot read lm_head's quantized table (None: it can). GatherBlockQuantized
    reads MatMulNBits' 4-bit layout: rows of the table are lm_head's output columns, blocks run along hidden."""
    if tied_lm_head is None:
        return "the embedding is not tied to lm_head (it has its own table, or a rotation or smoothing stage untied them)"
    embedding = plan.nodes.get(plan.embedding) if plan.embedding is not None else None
    lm_head = plan.nodes.get(tied_lm_head)
    if embedding is None or lm_head is None:
        return "the embedding and lm_head are not both quantized"
    if lm_head.weights.granularity != "per_block" or lm_head.weights.bits != 4 or lm_head.weights.is_float:
        return f"lm_head is not on a 4-bit integer block grid ({lm_head.weights.dtype} {lm_head.weights.granularity})"
    if dataclasses.replace(embedding.weights, pair_safe=False) != dataclasses.replace(lm_head.weights, pair_safe=False):
        return "the embedding's grid differs from lm_head's (an override sets one of them)"
    return None


def embedding_weights(scheme: QuantScheme, name: str) -> QuantSpec | None:
    """The embedding `name`'s grid after the overrides that set weights or keep it float (None: float)."""
    spec = scheme.embedding
    for override in scheme.overrides:
        if override.matches(name) and (override.keep_float or override.weights is not None):
            spec = None if override.keep_float else embedding_spec(override.weights)
    return spec


def embedding_spec(matmul_spec: QuantSpec) -> QuantSpec:
    """An override written for MatMuls applied to the embedding: 8 bits become int8 rows, 4-bit
    blocks stay blocks along the hidden axis."""
    if matmul_spec.bits == 8:
        return QuantSpec("int8", "per_channel")
    return matmul_spec


def unmatched_patterns(graph: ir.Graph, scheme: QuantScheme) -> list[str]:
    """Override patterns that match no quantizable node (a typo would otherwise pass silently)."""
    names = [node.name for node in graph if is_const_matmul(node) or is_embedding_gather(node)]
    return [o.pattern for o in scheme.overrides if not any(o.matches(name) for name in names)]
