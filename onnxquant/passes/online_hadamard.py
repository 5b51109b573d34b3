"""QuaRot's R4: a full online Hadamard on each down_proj input, its inverse folded into the weight."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import scipy.linalg

from onnxquant.errors import fail
from onnxquant.graph_utils import add_initializer, transform_initializer
from onnxquant.hadamard import hadamard_factors
from onnxquant.passes.hadamard_groups import insert_online_rotation
from onnxquant.patterns import R4_METADATA_KEY, constant_weight, nodes_by_name

R4_READER = "/mlp/down_proj/MatMul"  # the builder's name for every family's down projection


def r4_activations(activations: dict[str, list[str]]) -> dict[str, list[str]]:
    """The planned activations that down_proj reads (each read by down_proj alone)."""
    return {x: readers for x, readers in activations.items() if all(R4_READER in r for r in readers)}


class OnlineHadamardPass(ir.passes.InPlacePass):
    """For each down_proj input X (K channels) and its weight W: X <- X·M and W <- Mᵀ·W with
    M = (A ⊗ B) / sqrt(K), A a Paley (or 1 x 1) Hadamard of order a and B the Sylvester one of
    order p = K / a (1536 = 12·128, 8960 = 140·64).

    M is orthogonal, so down_proj computes X·M·Mᵀ·W = X·W: the float model is unchanged. X·M runs
    in the graph in its factored form, Aᵀ·X·B on X reshaped to [..., a, p]: two small MatMuls costing
    K·(a + p) multiply-adds per token instead of the K² of the dense M (1536: 215k against 2.4M).
    Unlike Hadamard groups, which mix channels within blocks, M spreads one channel's outlier over
    all K channels, which is what a per-tensor activation grid needs most at down_proj, whose input
    (the gated MLP product) carries the model's largest outliers.
    """

    def __init__(self, activations: dict[str, list[str]]):
        super().__init__()
        self.activations = activations

    def requires(self, model: ir.Model) -> None:
        if not self.activations:
            fail("--include_r4: no quantized down_proj MatMul reads its own input in this graph "
                 f"(looked for nodes named *{R4_READER}); drop --include_r4")
        by_name = nodes_by_name(model.graph)
        for readers in self.activations.values():
            k = constant_weight(by_name[readers[0]]).shape[0]
            if hadamard_factors(k) is None:
                fail(f"--include_r4: no Hadamard matrix of order K={k} (down_proj '{readers[0]}') is known here, "
                     "so R4 cannot be exact; drop --include_r4")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        orders, constants = {}, {}
        for activation, names in self.activations.items():
            readers = [by_name[name] for name in names]
            x = readers[0].inputs[0]
            k = constant_weight(readers[0]).shape[0]
            if k not in constants:
                left, right = _factors(k)
                a, p = len(left), len(right)
                constants[k] = (left, right, add_initializer(graph, f"r4_{k}/left_transposed", left.T.astype(np.float32)),
                                add_initializer(graph, f"r4_{k}/right", right.astype(np.float32)))
                orders[k] = f"{a}x{p}"
            left, right, left_t, right_v = constants[k]
            prefix = f"{activation}/r4"

            def rotate(grid: ir.Value, prefix=prefix, left_t=left_t, right_v=right_v) -> list[ir.Node]:
                times_right = ir.node("MatMul", [grid, right_v], name=f"{prefix}/MatMul_right")
                times_left = ir.node("MatMul", [left_t, times_right.outputs[0]], name=f"{prefix}/MatMul_left")
                times_right.outputs[0].name, times_left.outputs[0].name = f"{prefix}/right", f"{prefix}/left"
                return [times_right, times_left]

            insert_online_rotation(graph, x, readers, prefix, (len(left), len(right)), "grid", rotate, f"r4_{k}")
            for reader in readers:
                reader.metadata_props[R4_METADATA_KEY] = orders[k]
                transform_initializer(constant_weight(reader), lambda w, l=left, r=right: kronecker_rows(w, l, r), blocks_along=1)
        model.metadata_props[R4_METADATA_KEY] = json.dumps({"down_proj": len(self.activations), "factors": orders})
        return ir.passes.PassResult(model, modified=bool(self.activations))


def _factors(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized (A, B) with A ⊗ B the Hadamard of order k, B no larger than needed."""
    left, right = hadamard_factors(k)
    if len(left) == 1 and len(right) > 2:
        # A power of two: Sylvester's H_(2^(s+t)) = H_(2^s) ⊗ H_(2^t), split near the square root.
        half = 2 ** (int(np.log2(len(right))) // 2)
        left, right = scipy.linalg.hadamard(len(right) // half), scipy.linalg.hadamard(half)
    left, right = np.asarray(left, np.float64), np.asarray(right, np.float64)
    return left / np.sqrt(len(left)), right / np.sqrt(len(right))


def kronecker_rows(weight: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Mᵀ·W for M = left ⊗ right, without forming M: W's rows indexed (k, l) become
    sum_{k,l} left[k, i] right[l, j] W[(k, l), :]."""
    a, p = len(left), len(right)
    rows, cols = weight.shape
    grid = weight.astype(np.float64).reshape(a, p, cols)
    return np.einsum("ki,lj,kln->ijn", left, right, grid, optimize=True).reshape(rows, cols)
