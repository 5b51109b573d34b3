"""Block-diagonal Hadamard groups on the inputs of quantized MatMuls (online, weight folded)."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxquant.errors import fail
from onnxquant.graph_utils import add_initializer, shared_initializer, transform_initializer
from onnxquant.hadamard import hadamard_matrix
from onnxquant.patterns import HADAMARD_GROUPS_METADATA_KEY, ONLINE_ROTATION_KEY, constant_weight, nodes_by_name
from onnxquant.scale_folding import classify, transform_producer_columns


def group_rotation(group_size: int) -> np.ndarray:
    """The normalized Hadamard H of one group (float64, H Hᵀ = I)."""
    hadamard = hadamard_matrix(group_size)
    if hadamard is None:
        raise ValueError(f"no Hadamard matrix of order {group_size}")
    return hadamard / np.sqrt(group_size)


class HadamardGroupsPass(ir.passes.InPlacePass):
    """For each activation X read by the MatMuls `readers` (weights W, K x N) and a group size g
    dividing K: X <- X·B and W <- Bᵀ·W with B = diag(H, …, H), H the normalized g x g Hadamard.

    B is orthogonal, so every reader computes X·B·Bᵀ·W = X·W: the float model is unchanged. The
    product X·B runs in the graph as Reshape(X, [-1, g]) · H → Reshape to X's shape, once per
    activation (readers that share X share it); readers outside `readers` keep reading X. The
    H MatMul carries node metadata marking it an online rotation, so the planner never quantizes it.
    Where X is the attention output and g divides the head size, X·B is folded offline instead
    (QuaRot's R2): attention output head j is a mix of the rows of its kv head's V, so multiplying
    V's columns by B (the v columns of the q/k/v projection, and their bias) gives X·B exactly.
    Spreading each group's outliers over the whole group is what lets a block of 16 or 32 weights
    share one microscaling exponent (the FP-quantization harness's `hadamard_group_size`).
    """

    def __init__(self, activations: dict[str, list[str]], group_size: int):
        super().__init__()
        self.activations = activations
        self.group_size = group_size

    def requires(self, model: ir.Model) -> None:
        by_name = nodes_by_name(model.graph)
        group = self.group_size
        for readers in self.activations.values():
            for name in readers:
                rows = constant_weight(by_name[name]).shape[0]
                if rows % group:
                    fail(f"--hadamard_group_size {group} does not divide K={rows} of MatMul '{name}'; "
                         f"choose a group size that divides it or pass --exclude {name}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = nodes_by_name(graph)
        g = self.group_size
        h = group_rotation(g)
        matrix = add_initializer(graph, f"hadamard_group_{g}", h.astype(np.float32))
        self.folded, self.online = 0, 0
        for activation, names in self.activations.items():
            readers = [by_name[name] for name in names]
            x = readers[0].inputs[0]
            target = classify(x, readers)
            if target.kind == "v" and target.head_size % g == 0:
                # V has one head per kv group: the readers' K (all query heads) over the group size.
                v_width = constant_weight(readers[0]).shape[0] // target.kv_groups
                transform_producer_columns(by_name[target.producer], lambda v, h=h: _rotate_column_groups(v, h), last=v_width)
                for reader in readers:
                    transform_initializer(constant_weight(reader), lambda w, h=h: _rotate_row_groups(w, h), blocks_along=1)
                self.folded += 1
                continue
            self.online += 1
            prefix = f"{activation}/hadamard_group"
            k = constant_weight(readers[0]).shape[0]

            def rotate(groups: ir.Value, prefix=prefix) -> list[ir.Node]:
                product = ir.node("MatMul", [groups, matrix], name=f"{prefix}/MatMul")
                product.outputs[0].name = f"{prefix}/rotated_groups"
                return [product]

            insert_online_rotation(graph, x, readers, prefix, (k // g, g), "groups", rotate, f"hadamard_group_{g}")
            for reader in readers:
                transform_initializer(constant_weight(reader), lambda w, h=h: _rotate_row_groups(w, h), blocks_along=1)
        model.metadata_props[HADAMARD_GROUPS_METADATA_KEY] = json.dumps({"group_size": g, "online": self.online,
                                                                         "folded_into_v": self.folded})
        return ir.passes.PassResult(model, modified=bool(self.activations))


def insert_online_rotation(graph: ir.Graph, x: ir.Value, readers: list[ir.Node], prefix: str, grid_dims: tuple[int, ...],
                           grid_name: str, rotate: Callable[[ir.Value], list[ir.Node]], tag: str) -> None:
    """Make `readers` read x rotated in the graph: Reshape(x, [..., *grid_dims]) -> the nodes `rotate`
    builds on that grid (the last one's output is the rotated grid) -> Reshape back to x's shape.
    The nodes' MatMuls carry ONLINE_ROTATION_KEY = `tag`, so the planner never quantizes them.

    A [batch, sequence, K] activation (every decoder's) keeps its leading dims through Reshape's 0s,
    so the way back is a constant too; otherwise x's shape is read at run time by a Shape node,
    one more node per token for the executor."""
    if x.shape is not None and len(x.shape) == 3:
        grid_shape = _shape_constant(graph, (0, 0, *grid_dims))
        back_shape = _shape_constant(graph, (0, 0, int(np.prod(grid_dims))))
        leading: list[ir.Node] = []
    else:
        grid_shape = _shape_constant(graph, (-1, *grid_dims))
        shape = ir.node("Shape", [x], name=f"{prefix}/Shape")
        shape.outputs[0].name = f"{prefix}/shape"
        back_shape, leading = shape.outputs[0], [shape]
    grid = ir.node("Reshape", [x, grid_shape], name=f"{prefix}/Reshape")
    grid.outputs[0].name = f"{prefix}/{grid_name}"
    middle = rotate(grid.outputs[0])
    for node in middle:
        if node.op_type == "MatMul":
            node.metadata_props[ONLINE_ROTATION_KEY] = tag
    back = ir.node("Reshape", [middle[-1].outputs[0], back_shape], name=f"{prefix}/Reshape_back")
    back.outputs[0].name = f"{prefix}/rotated"
    back.outputs[0].dtype, back.outputs[0].shape = x.dtype or ir.DataType.FLOAT, x.shape
    graph.insert_before(readers[0], [*leading, grid, *middle, back])
    for reader in readers:
        reader.replace_input_with(0, back.outputs[0])


def _shape_constant(graph: ir.Graph, dims: tuple[int, ...]) -> ir.Value:
    name = "online_rotation/shape_" + "_".join(str(d).replace("-", "m") for d in dims)
    return shared_initializer(graph, name, np.array(dims, dtype=np.int64))


def _rotate_row_groups(weight: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Bᵀ·W for B = diag(H, …, H): each group of g rows is multiplied by Hᵀ."""
    g = h.shape[0]
    rows, cols = weight.shape
    grouped = weight.astype(np.float64).reshape(rows // g, g, cols)
    return np.einsum("ji,bjn->bin", h, grouped).reshape(rows, cols)


def _rotate_column_groups(v: np.ndarray, h: np.ndarray) -> np.ndarray:
    """V·B for B = diag(H, …, H): each group of g columns is multiplied by H."""
    g = h.shape[0]
    return np.einsum("...bj,ji->...bi", v.reshape(*v.shape[:-1], v.shape[-1] // g, g), h).reshape(v.shape)
