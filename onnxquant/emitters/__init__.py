"""Emitters write one planned node in one format; the plan (onnxquant.plan) says which.

`EMITTERS[(op, format)]` maps a planned op ("MatMul", "Gather") and the format its grid calls for
to the function that rewrites the node:

- ("MatMul", "qdq"): int8 weight + DequantizeLinear (per tensor or per output channel; symmetric
  per-channel scales by default multiply the MatMul's output instead), with the activation's Q/DQ
  pair written once per activation group (`emit_activation_qdq`).
- ("MatMul", "blocked"): com.microsoft MatMulNBits, 4 or 8 bits per block of K.
- ("Gather", "rows"): int8 embedding rows gathered first and scaled after.
- ("Gather", "blocked"): com.microsoft GatherBlockQuantized, 4-bit blocks along the hidden axis.
- ("Gather", "shared"): GatherBlockQuantized over the tied lm_head's MatMulNBits table (written first).
- ("MatMul", "microscaling"): float element codes (FP8 / FP4) and block scales with a blocked
  DequantizeLinear (MXFP8, MXFP4, NVFP4), standard ONNX.

Weights are rounded by a `WeightRounder` (round to nearest, or GPTQ from onnxquant.algorithms)
when the model is written; `RoundingAhead` rounds the next few on worker threads meanwhile.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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


class RoundingAhead:
    """Rounds the weights that come next on worker threads while the writer writes the current one.

    onnx_ir writes initializers in declaration order, the order in which the emitters created their
    `LazyQuantized`; when the writer first reads weight i, weights i+1 ... i+workers-1 start rounding
    on the pool. Rounding is a pure function of the weight and its statistics, so the bytes written
    are the same as one at a time (workers=1 rounds each weight on the writer's thread when it is
    read). Memory stays that of one at a time: a weight starts ahead only while the weights in
    flight, with it, hold no more bytes than the largest one (lm_head, the embedding) does alone.
    Reading a source tensor (an mmap, or a chain of lazy transforms) is serialized by one lock: two
    weights may share one (an untied embedding and lm_head) and onnx_ir's tensors are not
    thread-safe; rounding itself runs in parallel.
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self.queue: list[LazyQuantized] = []
        self.lock = threading.Lock()
        self.source_lock = threading.Lock()
        self.executor: ThreadPoolExecutor | None = None
        self.in_flight_bytes = 0
        self.budget_bytes: int | None = None

    def add(self, lazy: LazyQuantized) -> int:
        self.queue.append(lazy)
        return len(self.queue) - 1

    def reached(self, position: int) -> None:
        """The writer needs weight `position` now: start it and, within the budget, the next workers-1."""
        if self.workers == 1:
            return
        with self.lock:
            if self.budget_bytes is None:
                self.budget_bytes = max(lazy.nbytes for lazy in self.queue)
            if self.executor is None:
                self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="rounding")
            self.queue[position].start(self.executor)
            for lazy in self.queue[position + 1: position + self.workers]:
                if lazy.future is None and self.in_flight_bytes + lazy.nbytes > self.budget_bytes:
                    break
                lazy.start(self.executor)
            if position + self.workers >= len(self.queue):
                self.executor.shutdown(wait=False)  # the last weights are under way; running ones finish
                self.executor = None

    def finished(self, nbytes: int) -> None:
        with self.lock:
            self.in_flight_bytes -= nbytes


@dataclass
class EmitContext:
    graph: ir.Graph
    rounder: WeightRounder = nearest_rounder
    column_scales: str = "after_matmul"  # schemes.COLUMN_SCALE_PLACEMENTS
    ahead: RoundingAhead = field(default_factory=RoundingAhead)
    emitted: dict[str, ir.Node] = field(default_factory=dict)  # planned node name -> the node that replaced it


class LazyQuantized:
    """The rounded form of one weight, computed when the first of its `parts` initializers is
    written (or earlier, by `ahead`'s workers) and dropped once all of them have been."""

    def __init__(self, source: ir.Value, compute: Callable[[np.ndarray], dict[str, np.ndarray]], parts: int,
                 ahead: RoundingAhead | None = None):
        self.tensor = source.const_value
        self.compute = compute
        self.remaining = parts
        self.ahead = ahead or RoundingAhead()
        self.position = self.ahead.add(self)
        self.future: Future | None = None
        self.cache: dict[str, np.ndarray] | None = None
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def start(self, executor: ThreadPoolExecutor) -> None:
        """Submit the rounding (under the owner's lock)."""
        if self.future is None and self.cache is None and self.remaining > 0:
            self.ahead.in_flight_bytes += self.nbytes
            self.future = executor.submit(self._rounded, True)

    def _rounded(self, counted: bool = False) -> dict[str, np.ndarray]:
        try:
            with self.ahead.source_lock:
                array = self.tensor.numpy()
            result = self.compute(array)
            del array
            with self.ahead.source_lock:
                release_tensor(self.tensor)
            return result
        finally:
            if counted:
                self.ahead.finished(self.nbytes)

    def part(self, key: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            with self.lock:
                if self.cache is None:
                    self.ahead.reached(self.position)
                    self.cache = self.future.result() if self.future is not None else self._rounded()
                    self.future = None
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
    if planned.op == "Gather" and planned.shares is not None:
        return "shared"
    if planned.op == "Gather":
        return "blocked" if planned.weights.granularity == "per_block" else "rows"
    if planned.weights.granularity != "per_block":
        return "qdq"
    return "microscaling" if planned.weights.is_float else "blocked"


Emitter = Callable[[EmitContext, ir.Node, PlannedNode], None]


def _registry() -> dict[tuple[str, str], Emitter]:
    from onnxquant.emitters.gather import emit_gather_block_quantized, emit_int8_rows, emit_shared_gather
    from onnxquant.emitters.matmul_nbits import emit_matmul_nbits
    from onnxquant.emitters.microscaling import emit_microscaling_weight
    from onnxquant.emitters.qdq import emit_qdq_weight

    return {("MatMul", "qdq"): emit_qdq_weight, ("MatMul", "blocked"): emit_matmul_nbits,
            ("MatMul", "microscaling"): emit_microscaling_weight,
            ("Gather", "rows"): emit_int8_rows, ("Gather", "blocked"): emit_gather_block_quantized,
            ("Gather", "shared"): emit_shared_gather}


EMITTERS = _registry()
