"""The token embedding Gather with a quantized table."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.emitters import EmitContext, LazyQuantized, drop_if_unused
from onnxquant.emitters.matmul_nbits import pack_nibbles, unsigned_codes
from onnxquant.graph_utils import add_initializer, map_blocks
from onnxquant.plan import PlannedNode
from onnxquant.spec import block_grid, padded_blocks, quant_params, quantize_array


def _replace_output(graph: ir.Graph, gather: ir.Node, new_nodes: list[ir.Node]) -> None:
    graph.insert_before(gather, new_nodes)
    last = new_nodes[-1].outputs[0]
    output = gather.outputs[0]
    output.replace_all_uses_with(last, replace_graph_outputs=True)
    last.type, last.shape = output.type, output.shape
    old_name = output.name
    graph.remove(gather, safe=True)
    last.name = old_name


def emit_int8_rows(ctx: EmitContext, gather: ir.Node, planned: PlannedNode) -> None:
    """Table E [vocab, hidden] -> int8 rows with one scale per row, gathered first and scaled after
    (`Cast(Gather(E_q, ids)) * Gather(scale, ids)`), so only the looked-up rows are dequantized."""
    graph, spec = ctx.graph, planned.weights
    table = gather.inputs[0]
    vocab, hidden = table.shape

    def compute(array: np.ndarray) -> dict[str, np.ndarray]:
        bound = np.abs(array).max(axis=1)
        scale, zero_point = quant_params(-bound, bound, spec)
        codes = map_blocks(array, lambda rows, span: quantize_array(rows, scale[span, None], zero_point[span, None], spec),
                           0, spec.numpy_dtype)
        return {"codes": codes, "scale": scale}

    lazy = LazyQuantized(table, compute, parts=2, ahead=ctx.ahead)
    codes = add_initializer(graph, f"{table.name}_quantized", lazy.part("codes"), dtype=spec.element.ir_dtype,
                            shape=(vocab, hidden))
    scale = add_initializer(graph, f"{table.name}_row_scale", lazy.part("scale"), dtype=ir.DataType.FLOAT, shape=(vocab,))
    ids = gather.inputs[1]
    rows = ir.node("Gather", [codes, ids], name=f"{gather.name}/quantized_rows")
    as_float = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{gather.name}/Cast")
    row_scale = ir.node("Gather", [scale, ids], name=f"{gather.name}/row_scale")
    axes = add_initializer(graph, f"{gather.name}/unsqueeze_axes", np.array([-1], dtype=np.int64))
    unsqueeze = ir.node("Unsqueeze", [row_scale.outputs[0], axes], name=f"{gather.name}/row_scale_unsqueeze")
    mul = ir.node("Mul", [as_float.outputs[0], unsqueeze.outputs[0]], name=f"{gather.name}/dequantize_rows")
    _replace_output(graph, gather, [rows, as_float, row_scale, unsqueeze, mul])
    drop_if_unused(graph, table)


def emit_gather_block_quantized(ctx: EmitContext, gather: ir.Node, planned: PlannedNode) -> None:
    """Table E [vocab, hidden] -> com.microsoft GatherBlockQuantized over 4-bit blocks of each row
    (MatMulNBits' layout: two codes per byte, zero point 8 when none is given), hidden padded to
    whole blocks and the padding sliced off after the gather."""
    graph, spec = ctx.graph, planned.weights
    table = gather.inputs[0]
    vocab, hidden = table.shape
    blocks = -(-hidden // spec.block_size)
    padded = blocks * spec.block_size

    def compute(array: np.ndarray) -> dict[str, np.ndarray]:
        # Rows are the quantized vectors: the blocks of E's rows are the blocks of Eᵀ's columns.
        grid = padded_blocks(array.T, spec.block_size)  # [vocab, blocks, block]
        scale, zero_point = block_grid(grid, spec)
        codes = quantize_array(grid, scale[..., None], zero_point[..., None], spec)
        parts = {"data": pack_nibbles(unsigned_codes(codes, spec)).reshape(vocab, padded // 2), "scale": scale}
        if not spec.symmetric:
            parts["zero_point"] = pack_nibbles(zero_point.astype(np.uint8))
        return parts

    lazy = LazyQuantized(table, compute, parts=2 if spec.symmetric else 3, ahead=ctx.ahead)
    inputs = [add_initializer(graph, f"{table.name}_Q4", lazy.part("data"), dtype=ir.DataType.UINT8, shape=(vocab, padded // 2)),
              gather.inputs[1],
              add_initializer(graph, f"{table.name}_scales", lazy.part("scale"), dtype=ir.DataType.FLOAT, shape=(vocab, blocks))]
    if not spec.symmetric:
        inputs.append(add_initializer(graph, f"{table.name}_zero_points", lazy.part("zero_point"), dtype=ir.DataType.UINT8,
                                      shape=(vocab, -(-blocks // 2))))
    node = ir.node("GatherBlockQuantized", inputs, domain="com.microsoft", name=f"{gather.name}/GatherBlockQuantized",
                   attributes={"bits": 4, "block_size": spec.block_size, "gather_axis": 0, "quantize_axis": 1})
    _replace_output(graph, gather, [node, *_sliced_to(graph, gather, node, hidden, padded)])
    drop_if_unused(graph, table)


def _sliced_to(graph: ir.Graph, gather: ir.Node, lookup: ir.Node, hidden: int, padded: int) -> list[ir.Node]:
    """The Slice that drops the block padding of the looked-up rows (none when hidden fills whole blocks)."""
    if padded == hidden:
        return []
    starts = add_initializer(graph, f"{gather.name}/slice_starts", np.array([0], np.int64))
    ends = add_initializer(graph, f"{gather.name}/slice_ends", np.array([hidden], np.int64))
    axes = add_initializer(graph, f"{gather.name}/slice_axes", np.array([-1], np.int64))
    return [ir.node("Slice", [lookup.outputs[0], starts, ends, axes], name=f"{gather.name}/Slice")]


def emit_shared_gather(ctx: EmitContext, gather: ir.Node, planned: PlannedNode) -> None:
    """A tied table E = Wᵀ -> GatherBlockQuantized over lm_head's MatMulNBits inputs: its B [vocab, blocks,
    blob] reshaped to [vocab, blocks * blob] (the same bytes: row v holds E[v]'s blocks), its scales and zero
    points as they are. Nothing of the embedding's own is written; it is rounded as lm_head is."""
    graph, spec = ctx.graph, planned.weights
    nbits = ctx.emitted[planned.shares]
    data, scales = nbits.inputs[1], nbits.inputs[2]
    vocab, blocks, blob = data.shape
    hidden = gather.inputs[0].shape[1]
    shape = add_initializer(graph, f"{gather.name}/shared_table_shape", np.array([vocab, blocks * blob], np.int64))
    reshape = ir.node("Reshape", [data, shape], name=f"{gather.name}/shared_table")
    inputs = [reshape.outputs[0], gather.inputs[1], scales, *nbits.inputs[3:4]]
    node = ir.node("GatherBlockQuantized", inputs, domain="com.microsoft", name=f"{gather.name}/GatherBlockQuantized",
                   attributes={"bits": 4, "block_size": spec.block_size, "gather_axis": 0, "quantize_axis": 1})
    table = gather.inputs[0]
    _replace_output(graph, gather, [reshape, node, *_sliced_to(graph, gather, node, hidden, blocks * spec.block_size)])
    drop_if_unused(graph, table)
