"""Emitters write one planned node in one format; the plan (onnxquant.plan) says which.

`EMITTERS[(op, format)]` maps a planned op ("MatMul", "Gather") and the format its grid calls for
to the function that rewrites the node:

- ("MatMul", "qdq"): int8 weight + DequantizeLinear (per tensor or per output channel; symmetric
  per-channel scales by default multiply the MatMul's output instead), with the activation's Q/DQ
  pair written once per activation group (`emit_activation_qdq`).
- ("MatMul", "blocked"): com.microsoft MatMulNBits, 4 or 8 bits per block of K.
- ("Gather", "rows"): int8 embedding rows gathered first and scaled after.
- ("Gather", "blocked"): com.microsoft GatherBlockQuantized, 4-bit blocks along the hidden axis.
- ("MatMul", "microscaling"): float element codes (FP8 / FP4) and block scales with a blocked
  DequantizeLinear (MXFP8, MXFP4, NVFP4), standard ONNX.

Weights are rounded by a `WeightRounder` (round to nearest, or GPTQ from onnxquant.algorithms)
when the model is written, one weight at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import release_tensor
from onnxquant.plan import PlannedNode
from onnxquant.spec import QuantizedWeight, QuantSpec, round_to_nearest


class WeightRounder(Protocol):
    def __call__(self, node_name: str, weight: np.ndarray, spec: QuantSpec) -> QuantizedWeight: ...


def nearest_rounder(node_name: str, weight: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    return round_to_nearest(weight, spec)


@dataclass
class EmitContext:
    graph: ir.Graph
    rounder: WeightRounder = nearest_rounder
    accuracy_level: int = 0
    column_scales: str = "after_matmul"  # schemes.COLUMN_SCALE_PLACEMENTS


class LazyQuantized:
    """The rounded form of one weight, computed when the first of its `parts` initializers is
    written and dropped once all of them have been, so only one weight is held at a time."""

    def __init__(self, source: ir.Value, compute: Callable[[np.ndarray], dict[str, np.ndarray]], parts: int):
        self.tensor = source.const_value
        self.compute = compute
        self.remaining = parts
        self.cache: dict[str, np.ndarray] | None = None

    def part(self, key: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if self.cache is None:
                array = self.tensor.numpy()
                self.cache = self.compute(array)
                del array
                release_tensor(self.tensor)
            result = self.cache[key]
            self.remaining -= 1
            if self.remaining == 0:
                self.cache = None
            return result

        return read


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not list(value.uses()) and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def weight_format(planned: PlannedNode) -> str:
    if planned.op == "Gather":
        return "blocked" if planned.weights.granularity == "per_block" else "rows"
    if planned.weights.granularity != "per_block":
        return "qdq"
    return "microscaling" if planned.weights.is_float else "blocked"


Emitter = Callable[[EmitContext, ir.Node, PlannedNode], None]


def _registry() -> dict[tuple[str, str], Emitter]:
    from onnxquant.emitters.gather import emit_gather_block_quantized, emit_int8_rows
    from onnxquant.emitters.matmul_nbits import emit_matmul_nbits
    from onnxquant.emitters.microscaling import emit_microscaling_weight
    from onnxquant.emitters.qdq import emit_qdq_weight

    return {("MatMul", "qdq"): emit_qdq_weight, ("MatMul", "blocked"): emit_matmul_nbits,
            ("MatMul", "microscaling"): emit_microscaling_weight,
            ("Gather", "rows"): emit_int8_rows, ("Gather", "blocked"): emit_gather_block_quantized}


EMITTERS = _registry()
