"""Microscaling activations (MXFP8, MXFP4, NVFP4), quantized per block of K at run time in the graph.

Each block of `B` consecutive input channels gets its scale from its own max |x| while the model
runs, so there is nothing to calibrate. The subgraph uses only ops ONNX Runtime's CPU provider runs
(no FLOAT4E2M1 or FLOAT8E8M0 kernels exist there), so one graph serves both written forms:

    blocks = Reshape(X, [-1, B]);  amax = ReduceMax(|blocks|, last axis)
    MX:    scale = 2^(floor(log2 amax) - emax)        (OCP E8M0, exact: log2 corrected by Pow)
           rceil: times 2 where amax / scale > qmax  (the smallest power of two that does not saturate)
    NVFP4: g = max|X| / (448 * 6);  scale = E4M3(amax / 6 / g) * g
    codes = round(blocks / scale) on the element grid (E4M3: Cast to float8e4m3fn and back, saturating;
            E2M1: |y| clipped to 6, rounded half-to-even on steps of 0.5 / 1 / 2 below 2 / 4 / 6)
    X_q = Reshape(codes * scale, Shape(X))

The numbers equal `onnxquant.spec.round_to_nearest` applied to the activation's blocks (tested).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxquant.graph_utils import add_initializer
from onnxquant.spec import QuantSpec


class _Subgraph:
    """Nodes of one activation's subgraph, named under `prefix`, constants as initializers."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []

    def const(self, name: str, array) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}/{name}", np.asarray(array))

    def op(self, op_type: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes or None, name=f"{self.prefix}/{name}")
        node.outputs[0].name = f"{self.prefix}/{name}_out"
        self.nodes.append(node)
        return node.outputs[0]


def emit_activation_microscaling(graph: ir.Graph, readers: list[ir.Node], name: str, spec: QuantSpec) -> None:
    """Replace the readers' input X by its per-block dynamically quantized value."""
    x = readers[0].inputs[0]
    s = _Subgraph(graph, f"{name}/mx_act")
    shape = s.op("Shape", [x], "Shape")
    blocks = s.op("Reshape", [x, s.const("block_shape", np.array([-1, spec.block_size], np.int64))], "Reshape")
    magnitude = s.op("Abs", [blocks], "Abs")
    last = s.const("last_axis", np.array([-1], np.int64))
    amax = s.op("ReduceMax", [magnitude, last], "ReduceMax", keepdims=1)
    tiny = s.const("tiny", np.float32(np.finfo(np.float32).tiny))
    amax = s.op("Max", [amax, tiny], "ClampTiny")
    tensor_scale = None
    if spec.scale_dtype == "e8m0":
        scale = block = _power_of_two_scale(s, amax, spec.element.max_exponent)
        if spec.scale_rounding == "rceil":  # the next power of two where the OCP one would saturate amax
            over = s.op("Greater", [amax, s.op("Mul", [scale, s.const("qmax", np.float32(spec.qmax))], "ScaledMax")], "Saturates")
            doubling = s.op("Add", [s.op("Cast", [over], "SaturatesFloat", to=ir.DataType.FLOAT), s.const("one_scale", np.float32(1.0))], "Doubling")
            scale = block = s.op("Mul", [scale, doubling], "ScaleNoSaturation")
    else:  # NVFP4: E4M3 block scales under a per-tensor float32 scale, both from this run's values
        peak = s.op("ReduceMax", [amax], "TensorMax", keepdims=0)
        tensor_scale = s.op("Div", [peak, s.const("fp8_fp4_max", np.float32(448.0 * spec.qmax))], "TensorScale")
        block = s.op("Div", [s.op("Div", [amax, s.const("fp4_max", np.float32(spec.qmax))], "PerCode"), tensor_scale], "BlockScale")
        block = s.op("Max", [block, s.const("fp8_min_scale", np.float32(2.0 ** -9))], "ClampScale")
        block = s.op("Cast", [s.op("Cast", [block], "ToE4M3", to=ir.DataType.FLOAT8E4M3FN)], "FromE4M3", to=ir.DataType.FLOAT)
        scale = s.op("Mul", [block, tensor_scale], "Scale")
    y = s.op("Div", [blocks, scale], "Scaled")
    codes = _round_e4m3(s, y) if spec.element.ir_dtype == ir.DataType.FLOAT8E4M3FN else _round_e2m1(s, y)
    dequantized = s.op("Mul", [codes, block], "Dequantized")
    if tensor_scale is not None:  # (codes * block) * tensor scale, the order the weights dequantize in
        dequantized = s.op("Mul", [dequantized, tensor_scale], "TensorDequantized")
    restored = s.op("Reshape", [dequantized, shape], "Reshape_back")
    restored.dtype, restored.shape = x.dtype or ir.DataType.FLOAT, x.shape
    graph.insert_before(readers[0], s.nodes)
    for reader in readers:
        reader.replace_input_with(0, restored)


def _power_of_two_scale(s: _Subgraph, amax: ir.Value, emax: int) -> ir.Value:
    """2^(floor(log2 amax) - emax); Log's rounding near powers of two is corrected by comparing with Pow."""
    two = s.const("two", np.float32(2.0))
    estimate = s.op("Floor", [s.op("Mul", [s.op("Log", [amax], "Log"), s.const("inv_ln2", np.float32(1 / np.log(2)))], "Log2")],
                    "Floor")
    power = s.op("Pow", [two, estimate], "Power")
    up = s.op("Cast", [s.op("GreaterOrEqual", [amax, s.op("Mul", [power, two], "NextPower")], "TooLow")], "Up", to=ir.DataType.FLOAT)
    down = s.op("Cast", [s.op("Less", [amax, power], "TooHigh")], "Down", to=ir.DataType.FLOAT)
    exponent = s.op("Sub", [s.op("Add", [estimate, up], "Raise"), down], "Exponent")
    return s.op("Pow", [two, s.op("Sub", [exponent, s.const("emax", np.float32(emax))], "ScaleExponent")], "Scale")


def _round_e4m3(s: _Subgraph, y: ir.Value) -> ir.Value:
    fp8 = s.op("Cast", [y], "ToE4M3", to=ir.DataType.FLOAT8E4M3FN)  # saturates to ±448, rounds to nearest even
    return s.op("Cast", [fp8], "FromE4M3", to=ir.DataType.FLOAT)


def _round_e2m1(s: _Subgraph, y: ir.Value) -> ir.Value:
    magnitude = s.op("Min", [s.op("Abs", [y], "CodeAbs"), s.const("fp4_max_value", np.float32(6.0))], "Saturate")
    step = s.op("Where", [s.op("Less", [magnitude, s.const("two_value", np.float32(2.0))], "BelowTwo"), s.const("half", np.float32(0.5)),
                          s.op("Where", [s.op("Less", [magnitude, s.const("four", np.float32(4.0))], "BelowFour"),
                                         s.const("one", np.float32(1.0)), s.const("two_step", np.float32(2.0))], "UpperStep")], "Step")
    rounded = s.op("Mul", [s.op("Round", [s.op("Div", [magnitude, step], "Steps")], "Round"), step], "OnGrid")
    return s.op("Mul", [rounded, s.op("Sign", [y], "Sign")], "Signed")
