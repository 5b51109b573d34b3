"""Write a quantization plan into the graph through the emitters."""

from __future__ import annotations

import json

import onnx_ir as ir

from onnxquant.emitters import EMITTERS, EmitContext, RoundingAhead, WeightRounder, nearest_rounder, weight_format
from onnxquant.emitters.dynamic_microscaling import emit_activation_microscaling
from onnxquant.emitters.qdq import emit_activation_qdq
from onnxquant.patterns import QUANT_METADATA_KEY, nodes_by_name
from onnxquant.plan import QuantPlan


FLOAT_CODE_TYPES = frozenset({ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2,
                              ir.DataType.FLOAT8E5M2FNUZ, ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0})
FLOAT_CODES_OPSET = 21


class QuantizeGraphPass(ir.passes.InPlacePass):
    """Rewrite every planned node with the emitter for (its op, its grid's format).

    Activations: when the plan has an activation grid, each activation group read by MatMuls on
    the "qdq" format gets one `QuantizeLinear -> DequantizeLinear` pair with the static range of
    `ranges[activation]`, shared by all its readers; with a microscaling activation grid, readers
    on the "microscaling" format share one run-time per-block quantization subgraph. Weights are
    rounded by `rounder` when the model is written, on `rounding_workers` threads (the rounder must then
    be thread-safe). The model's metadata records the scheme.
    """

    def __init__(self, plan: QuantPlan, ranges: dict[str, tuple[float, float]], description: dict,
                 rounder: WeightRounder = nearest_rounder, column_scales: str = "after_matmul",
                 rounding_workers: int = 1):
        super().__init__()
        self.plan = plan
        self.ranges = ranges
        self.description = description
        self.rounder = rounder
        self.column_scales = column_scales
        self.rounding_workers = rounding_workers
        self.quantized_nodes = 0

    def requires(self, model: ir.Model) -> None:
        if QUANT_METADATA_KEY in model.metadata_props:
            raise ir.passes.PreconditionError("the model is already quantized")
        by_name = nodes_by_name(model.graph)
        missing = [name for name in self.plan.nodes if name not in by_name]
        if missing:
            raise ir.passes.PreconditionError(f"planned node {missing[0]} is not in the graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        ctx = EmitContext(graph, self.rounder, self.column_scales, RoundingAhead(self.rounding_workers))
        spec = self.plan.activation_spec
        if spec is not None:
            dynamic = spec.granularity == "per_block"
            for activation, reader_names in self.plan.activations.items():
                readers = [by_name[name] for name in reader_names
                           if weight_format(self.plan.nodes[name]) == ("microscaling" if dynamic else "qdq")]
                if readers and dynamic:
                    emit_activation_microscaling(graph, readers, activation, spec)
                elif readers:
                    emit_activation_qdq(graph, readers, activation, spec, self.ranges[activation])
        # A shared table is lm_head's, so lm_head is written first.
        for planned in sorted(self.plan.nodes.values(), key=lambda p: p.shares is not None):
            EMITTERS[(planned.op, weight_format(planned))](ctx, by_name[planned.name], planned)
            self.quantized_nodes += 1
        model.metadata_props[QUANT_METADATA_KEY] = json.dumps(self.description)
        if any(weight_format(p) == "blocked" for p in self.plan.nodes.values()):
            model.opset_imports.setdefault("com.microsoft", 1)
        if any(value.dtype in FLOAT_CODE_TYPES for value in graph.initializers.values()):
            # DequantizeLinear reads float8 codes from opset 19 and blocks from 21; optimum exports opset 18.
            model.opset_imports[""] = max(model.opset_imports.get("", 0), FLOAT_CODES_OPSET)
        return ir.passes.PassResult(model, modified=self.quantized_nodes > 0)
