"""Quantize the KV cache inside com.microsoft.GroupQueryAttention, in the graph form the ORT-GenAI builder
writes for `kv_cache_quant_scheme` (builders/base.py: make_kv_cache_init, make_group_query_attention)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir

from onnxquant.errors import fail

KV_CACHE_METADATA_KEY = "onnxquant.kv_cache"
CACHE_TYPES = {"int8": ir.DataType.INT8, "int4": ir.DataType.UINT8, "fp8": ir.DataType.FLOAT8E4M3FN}
QUANT_TYPES = {"per_tensor": "PER_TENSOR", "per_channel": "PER_CHANNEL"}
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13  # GroupQueryAttention's optional inputs, in schema order
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def scale_name(present: str, side: str) -> str:
    """The builder's initializer name (model.layers.N.attn.k_scale) for a cache output named present.N.*."""
    match = re.fullmatch(r"present\.(\d+)\.(key|value)", present)
    return f"model.layers.{match.group(1)}.attn.{side}_scale" if match else f"{present}.{side}_scale"


class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Rewrite each GroupQueryAttention that reads past_k, past_v and writes present_k, present_v as graph
    inputs and outputs:

        GQA(q, k, v, past_k, past_v, ..., [12: none, 13: none]) -> (out, present_k, present_v), float caches
        ->  GQA(..., 12: k_scale, 13: v_scale; k_quant_type = v_quant_type = PER_TENSOR | PER_CHANNEL,
                kv_cache_bit_width = 4 | 8) with past_* and present_* typed INT8 (int8), UINT8 of
                ceil(head_size / 2) bytes (int4, two values per byte) or FLOAT8E4M3FN (fp8)

    k_scale and v_scale are float32 initializers of shape [1] (per tensor) or [kv_heads * head_size] (per
    channel, the flat vector the builder gives GQA), taken from `scales` by the present output's name; the
    kernel stores round(x / scale) clamped to the cache type and attends over the dequantized cache, in
    prefill too. Inputs after 13 (fused Q/K norm weights) keep their places.
    """

    def __init__(self, scales: dict[str, np.ndarray], dtype: str, granularity: str, head_size: int):
        super().__init__()
        self.scales = scales
        self.dtype, self.granularity, self.head_size = dtype, granularity, head_size

    def _attention(self, graph: ir.Graph) -> list[ir.Node]:
        return [node for node in graph if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"]

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        attention = self._attention(graph)
        if not attention:
            fail("the model has no com.microsoft GroupQueryAttention, the only attention that quantizes a KV cache; "
                 "export the model with the ORT-GenAI builder (onnxquant export)")
        inputs, outputs = set(graph.inputs), set(graph.outputs)
        for node in attention:
            caches = [node.inputs[3] if len(node.inputs) > 4 else None, node.inputs[4] if len(node.inputs) > 4 else None,
                      *(node.outputs[1:3] if len(node.outputs) >= 3 else (None, None))]
            if any(value is None for value in caches) or not (set(caches[:2]) <= inputs and set(caches[2:]) <= outputs):
                fail(f"{node.name} keeps no KV cache in graph inputs and outputs; quantize the cache of a decoder "
                     "exported with its cache")
            if any(value.dtype not in FLOAT_TYPES for value in caches):
                fail(f"{node.name}'s KV cache is not float (it is {caches[0].dtype}); pass the float export instead")
            if len(node.inputs) > K_SCALE_INPUT and node.inputs[K_SCALE_INPUT] is not None:
                fail(f"{node.name} already reads KV cache scales; pass the float export instead")
            missing = [value.name for value in caches[2:] if value.name not in self.scales]
            if missing:
                raise ValueError(f"no KV cache scale for {missing[0]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cache_type = CACHE_TYPES[self.dtype]
        width = (self.head_size + 1) // 2 if self.dtype == "int4" else None
        for node in self._attention(graph):
            if len(node.inputs) <= V_SCALE_INPUT:
                node.resize_inputs(V_SCALE_INPUT + 1)
            for index, present, side in ((K_SCALE_INPUT, node.outputs[1], "k"), (V_SCALE_INPUT, node.outputs[2], "v")):
                scale = np.ascontiguousarray(self.scales[present.name], dtype=np.float32).reshape(-1)
                value = ir.Value(name=scale_name(present.name, side), const_value=ir.tensor(scale),
                                 type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(scale.shape))
                graph.register_initializer(value)
                node.replace_input_with(index, value)
            quant_type = QUANT_TYPES[self.granularity]
            node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", quant_type)
            node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", quant_type)
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 4 if self.dtype == "int4" else 8)
            for value in (node.inputs[3], node.inputs[4], *node.outputs[1:3]):
                value.type = ir.TensorType(cache_type)
                if width is not None and value.shape is not None:
                    value.shape = ir.Shape([*value.shape[:-1], width])
        model.metadata_props[KV_CACHE_METADATA_KEY] = json.dumps({"scheme": f"{self.dtype}_{self.granularity}"})
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        for node in self._attention(model.graph):
            if node.outputs[1].dtype != CACHE_TYPES[self.dtype] or node.inputs[K_SCALE_INPUT] is None:
                raise ValueError(f"{node.name} was left with a float KV cache")
