"""Tensor plumbing over onnx_ir graphs: initializer access, lazily transformed weights, new initializers.

Graph patterns (which node is a norm, a constant MatMul, a bias) live in `onnxquant.patterns`."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir


def initializer_array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def release_tensor(tensor: ir.TensorProtocol) -> None:
    """Unmap a memory-mapped external tensor, so the file pages it touched leave the process's RSS.

    It maps itself again if read later. While a numpy view of it is alive the mapping cannot
    close; then it stays open and closes with its last view.
    """
    release = getattr(tensor, "release", None)
    if release is not None:
        try:
            release()
        except BufferError:
            pass


def read_initializer(value: ir.Value, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`reduce(weights)` (a statistic, not a view), unmapping the weights afterwards."""
    tensor = value.const_value
    result = reduce(tensor.numpy())
    release_tensor(tensor)
    return result


# Elements per block when a transform runs blockwise: big tensors (a 49152 x 576 embedding) are
# transformed in float64 a slice at a time instead of holding whole float64 copies.
BLOCK_ELEMENTS = 1 << 21


def map_blocks(source: np.ndarray, fn: Callable[[np.ndarray, slice], np.ndarray], axis: int, dtype) -> np.ndarray:
    """`fn(block, span)` over blocks of about BLOCK_ELEMENTS elements of `source` along `axis`
    (`span` = the block's positions on that axis), written into one array of `dtype`."""
    out = np.empty(source.shape, dtype=dtype)
    count = source.shape[axis]
    step = max(1, BLOCK_ELEMENTS * count // max(1, source.size))
    for start in range(0, count, step):
        span = slice(start, start + step)
        index = (slice(None),) * axis + (span,)
        out[index] = fn(source[index], span)
    return out


def transform_initializer(value: ir.Value, transform: Callable[[np.ndarray], np.ndarray],
                          dtype: ir.DataType | None = None, shape: tuple[int, ...] | None = None,
                          blocks_along: int | None = None) -> None:
    """Replace an initializer by `transform(old)`, computed only when the tensor is read.

    Chained transforms stack up and run one tensor at a time when the model is saved, so a pass
    never holds more than one weight in memory. The result is cast back to the stored dtype.
    `blocks_along`: the transform treats slices along this axis independently (and keeps the
    shape), so it may run on blocks of them.
    """
    previous = value.const_value
    out_dtype = dtype or previous.dtype
    out_shape = ir.Shape(shape if shape is not None else previous.shape)
    np_dtype = out_dtype.numpy()

    def compute() -> ir.TensorProtocol:
        source = previous.numpy()
        if blocks_along is None or source.size <= BLOCK_ELEMENTS:
            out = np.ascontiguousarray(transform(source), dtype=np_dtype)
        else:
            out = map_blocks(source, lambda block, _: transform(block), blocks_along, np_dtype)
        if np.may_share_memory(out, source):
            out = out.copy()
        del source
        release_tensor(previous)
        return ir.tensor(out, name=value.name)

    value.const_value = ir.LazyTensor(compute, dtype=out_dtype, shape=out_shape, name=value.name)
    value.dtype = out_dtype
    value.shape = out_shape


def add_initializer(graph: ir.Graph, name: str, array_or_lazy, dtype: ir.DataType | None = None,
                    shape: tuple[int, ...] | None = None) -> ir.Value:
    """Register a new initializer holding a numpy array, or a zero-argument function computing one."""
    if callable(array_or_lazy):
        func = array_or_lazy
        tensor = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(func()), name=name), dtype=dtype,
                               shape=ir.Shape(shape), name=name)
    else:
        tensor = ir.tensor(array_or_lazy, name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape))
    graph.register_initializer(value)
    return value


def shared_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The graph's initializer `name`, registered with `array` by the first caller; a constant every
    rewrite of one kind reads (a reshape target, a unit scale) is stored once."""
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, array)
