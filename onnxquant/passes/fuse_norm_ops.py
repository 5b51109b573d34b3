"""Fuse the RMSNorms of a plain decoder (optimum's export) into the builder's norm ops."""

from __future__ import annotations

import onnx_ir as ir

from onnxquant.patterns import NORM_OPS

# Set on a model whose norms this pass fused: R1 then finds its pairs by structure, not by a family config.
FUSED_NORMS_METADATA_KEY = "onnxquant.fused_norms"


class FuseNormOpsPass(ir.passes.InPlacePass):
    """Rewrite each RMSNorm spelled out in standard ops into one norm node, as the ORT-GenAI builder emits:

        w * (x * Reciprocal(Sqrt(ReduceMean(x^2, -1) + eps)))  ->  SimplifiedLayerNormalization(x, w)
        that norm of Add(a, b)                                   ->  SkipSimplifiedLayerNormalization(a, b, w)

    The matching is onnxscript's ORT fusion rules. Before them, onnxscript's constant folding folds
    constants and infers types (the rules check dtypes), default attributes are spelled out (the rules
    match ReduceMean's noop_with_empty_axes), and Div(1, x) becomes Reciprocal(x) (torch exports rsqrt
    so). onnxscript's whole optimizer is not run: its general rewrite rules took 38 s on SmolLM2's
    graph, the folding alone 0.5 s, and the fusions find the same 61 norms after either.
    A model that has builder norms already is left alone. Float results move by rounding only (the
    fused kernel sums in another order).
    """

    @staticmethod
    def needed(graph: ir.Graph) -> bool:
        """A graph without the builder's norm ops (a builder graph has them already)."""
        return not any(node.op_type in NORM_OPS for node in graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer
        from onnxscript.rewriter import pattern
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

        if not self.needed(model.graph):
            return ir.passes.PassResult(model, modified=False)
        onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        onnxscript.optimizer.remove_unused_nodes(model)
        ir.passes.common.AddDefaultAttributesPass()(model)
        reciprocal = pattern.RewriteRule(lambda op, x: op.Div(1.0, x), lambda op, x: op.Reciprocal(x))
        reciprocal.apply_to_model(model)
        norms = fuse_rms_normalization(model)
        skips = fuse_skip_rms_normalization(model)
        if norms:
            model.metadata_props[FUSED_NORMS_METADATA_KEY] = f"{norms} norms, {skips} with the residual add"
        return ir.passes.PassResult(model, modified=True)
