"""Sequential GPTQ: each weight's Hessian from the outputs of the weights already rounded.

One-pass GPTQ takes every Hessian from the float model, so layer i+1 is rounded for inputs it will never
see once layer i is rounded. Here calibration runs in segments of about one decoder layer
(`segment_bytes`); when a segment's pass ends, the weights whose Hessians it completed are rounded at
once, the segment runs again with their dequantized values, and the next segment is observed on those
outputs (llm-compressor's sequential pipeline, at the grain of the segments). The weights of one segment
(q, k, v, o, gate, up, down of a layer) share its float pass: o_proj's Hessian is from float q, k, v. The
rounded weights wait on disk (rounded_weights.CachedRounder) until the model is written, so nothing is
rounded twice; the embedding and any weight rounded without a Hessian stay float during calibration.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from onnxquant.calibration import SpillingStore
from onnxquant.graph_utils import release_tensor
from onnxquant.patterns import constant_weight, nodes_by_name
from onnxquant.plan import QuantPlan
from onnxquant.rounded_weights import CachedRounder
from onnxquant.runtime import usable_cores


def layer_segment_bytes(graph: ir.Graph, layers: int, limit: int) -> int:
    """A segment budget of about one decoder layer: the weights without the largest (the embedding), over
    the layers; at most `limit`."""
    sizes = [value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None]
    return max(1, min(limit, (sum(sizes) - max(sizes, default=0)) // max(1, layers)))


class SequentialRounding:
    """Rounds, as calibration completes their Hessians, the planned weights whose algorithm reads one;
    `round_ready()` returns {weight initializer: dequantized weight} for the segments that follow."""

    def __init__(self, graph: ir.Graph, plan: QuantPlan, hessians: SpillingStore, rounder, cache: CachedRounder):
        self.by_name = nodes_by_name(graph)
        self.plan = plan
        self.hessians = hessians
        self.rounder = rounder  # pipeline._WeightRounder over `hessians`
        self.cache = cache
        self.pending = {activation: [name for name in readers if name in rounder.reader_input]
                        for activation, readers in plan.activations.items()}

    def _round(self, name: str) -> tuple[str, np.ndarray]:
        value = constant_weight(self.by_name[name])
        spec = self.plan.nodes[name].weights
        tensor = value.const_value
        rounded = self.rounder(name, tensor.numpy(), spec)
        release_tensor(tensor)
        self.cache.put(name, spec, rounded)
        return value.name, np.ascontiguousarray(rounded.dequantize(), dtype=np.float32)

    def round_ready(self) -> dict[str, np.ndarray]:
        ready = [activation for activation in self.pending if activation in self.hessians]
        names = [name for activation in ready for name in self.pending.pop(activation)]
        if not names:
            return {}
        # One rounding per core, as when the model is written (emitters.RoundingAhead); BLAS threads on top only contend.
        with ThreadPoolExecutor(min(usable_cores(), len(names))) as pool, threadpool_limits(1, user_api="blas"):
            return dict(pool.map(self._round, names))
