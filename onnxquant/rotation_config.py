"""Rotation configs: which nodes write the residual stream, which norm sits between, which nodes read it.

Two formats, one schema. Each entry of `R1_pairs` is `{"prev_nodes": [...], "norm_node": "...",
"next_nodes": [...]}` as in AMD Quark. An entry with a `"layers"` key ("first", "rest", "all",
"last") is a template expanded for those layers, with `{i}`, `{i-1}` and `{i+1}` replaced by layer
indices, so one family config fits any depth; an entry without it is taken literally (Quark's
per-model configs work unchanged).

`head_norms` (optional, same templating) lists norms inside attention that R1 leaves alone, such as
Qwen3's per-head q_norm / k_norm: they read the output of a rotated MatMul, which R1 does not
change, so they need no folding, but they are named so that no other norm goes unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import onnx_ir as ir

from onnxquant.errors import fail
from onnxquant.patterns import (NORM_OPS, ResolvedPair, is_const_matmul, is_embedding_gather, linear_producer, matmul_bias, nodes_by_name,
                                residual_inputs, unscaled, writes_into)
from onnxquant.resources import rotation_config_dir
LAYER_SELECTORS = ("first", "rest", "all", "last")


@dataclass(frozen=True)
class RotationPair:
    prev_nodes: tuple[str, ...]
    norm_node: str
    next_nodes: tuple[str, ...]


@dataclass(frozen=True)
class RotationConfig:
    source: str
    pairs: tuple[RotationPair, ...]
    head_norms: tuple[str, ...] = ()


def _expand(template: str, i: int) -> str:
    return template.replace("{i-1}", str(i - 1)).replace("{i+1}", str(i + 1)).replace("{i}", str(i))


def _layers(selector: str, num_layers: int) -> range:
    return {"first": range(0, 1), "rest": range(1, num_layers), "all": range(num_layers),
            "last": range(num_layers - 1, num_layers)}[selector]


def parse_rotation_config(data: dict, source: str, num_layers: int) -> RotationConfig:
    entries = data.get("R1_pairs") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        fail(f"rotation config {source} has no \"R1_pairs\" list; see rotation_configs/llama.json for the format")
    pairs = []
    for number, entry in enumerate(entries):
        try:
            prev, norm, nxt = list(entry["prev_nodes"]), str(entry["norm_node"]), list(entry["next_nodes"])
        except (KeyError, TypeError):
            fail(f"rotation config {source}: R1_pairs[{number}] needs prev_nodes, norm_node and next_nodes")
        selector = entry.get("layers")
        if selector is None:
            pairs.append(RotationPair(tuple(prev), norm, tuple(nxt)))
            continue
        if selector not in LAYER_SELECTORS:
            fail(f"rotation config {source}: R1_pairs[{number}] has layers={selector!r}; use one of {', '.join(LAYER_SELECTORS)}")
        for i in _layers(selector, num_layers):
            pairs.append(RotationPair(tuple(_expand(p, i) for p in prev), _expand(norm, i), tuple(_expand(n, i) for n in nxt)))
    head_norms = []
    for number, entry in enumerate(data.get("head_norms", [])):
        entry = entry if isinstance(entry, dict) else {}
        nodes, selector = entry.get("nodes"), entry.get("layers")
        if not isinstance(nodes, list) or selector not in LAYER_SELECTORS:
            fail(f"rotation config {source}: head_norms[{number}] needs a \"nodes\" list and \"layers\" "
                 f"({', '.join(LAYER_SELECTORS)})")
        head_norms += [_expand(node, i) for i in _layers(selector, num_layers) for node in nodes]
    return RotationConfig(source, tuple(pairs), tuple(head_norms))


def load_rotation_config(path: str | Path | None, model_type: str, num_layers: int) -> RotationConfig:
    """The config at `path`, or the family config in rotation_configs/ whose model_types has `model_type`."""
    if path is None:
        config_dir = rotation_config_dir()
        for candidate in sorted(config_dir.glob("*.json")):
            data = json.loads(candidate.read_text(encoding="utf-8"))
            if model_type in data.get("model_types", []):
                return parse_rotation_config(data, candidate.name, num_layers)
        fail(f"no rotation config for model type {model_type!r} in {config_dir}; write one and pass --r_config_path")
    path = Path(path)
    if not path.is_file():
        fail(f"rotation config {path} does not exist; pass a JSON file such as rotation_configs/llama.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"rotation config {path} is not valid JSON ({exc})")
    return parse_rotation_config(data, str(path), num_layers)


def resolve_pairs(config: RotationConfig, graph: ir.Graph) -> list[ResolvedPair]:
    """Map config names to graph nodes and check the config covers every residual writer and reader.

    A rotation is exact only if every node writing the residual stream and every node reading a
    norm's output is rotated; anything missed would silently change the model, so it is an error.
    """
    by_name = nodes_by_name(graph)

    def lookup(name: str) -> ir.Node:
        if name not in by_name:
            fail(f"rotation config {config.source}: node {name!r} is not in the graph; "
                 f"the config does not match this model (check --r_config_path)")
        return by_name[name]

    resolved = [ResolvedPair(tuple(lookup(p) for p in pair.prev_nodes), lookup(pair.norm_node),
                             tuple(lookup(n) for n in pair.next_nodes)) for pair in config.pairs]
    writers = {node.name for pair in resolved for node in pair.prev_nodes}
    covered_norms = set()
    for pair in resolved:
        norm = pair.norm_node
        if norm.op_type not in NORM_OPS:
            fail(f"rotation config {config.source}: norm_node {norm.name!r} is a {norm.op_type}, not an RMSNorm")
        covered_norms.add(norm.name)
        _check_readers(config.source, pair)
        _check_writers(config.source, pair, writers)
    rotated_readers = {node.name for pair in resolved for node in pair.next_nodes}
    for name in config.head_norms:
        _check_head_norm(config.source, lookup(name), rotated_readers)
        covered_norms.add(name)
    for node in graph:
        if node.op_type in NORM_OPS and node.name not in covered_norms:
            fail(f"rotation config {config.source}: norm {node.name!r} is not in any R1 pair; the config does not match this model")
    return resolved


def refuse_sandwich_norms(graph: ir.Graph) -> None:
    """Refuse a graph whose attention or MLP output passes through a weighted RMSNorm before the
    residual add (Gemma 2 and 3). R1 needs every residual writer to emit x Q; such a writer emits
    w * norm(y), and a per-channel w does not commute with Q, so no fold makes the rotation exact
    (only an online rotation after each of those norms would)."""
    for node in graph:
        if node.op_type != "SimplifiedLayerNormalization":
            continue
        producer = node.inputs[0].producer()
        if producer is not None and is_const_matmul(producer) and any(
                use.node.op_type == "SkipSimplifiedLayerNormalization" for use in node.outputs[0].uses()):
            fail(f"--include_rotation: {node.name!r} normalizes the output of {producer.name!r} with a weighted RMSNorm "
                 "before the residual add (sandwich norms, as in Gemma 2/3), which no fold can rotate exactly; "
                 "quantize without --include_rotation (SmoothQuant and Hadamard groups still apply)")


HEAD_RESHAPES = frozenset({"Reshape", "Split", "Transpose"})


def _producer_through_reshapes(norm: ir.Node) -> ir.Node | None:
    """What a norm reads, looking through the reshapes that split a projection into heads."""
    producer = norm.inputs[0].producer() if norm.inputs else None
    while producer is not None and producer.op_type in HEAD_RESHAPES:
        producer = producer.inputs[0].producer()
    return producer


def _check_head_norm(source: str, norm: ir.Node, rotated_readers: set[str]) -> None:
    """A head norm reads, through reshapes only, the output of a MatMul that R1 rotates on its input
    side (so that output, and the norm, are unchanged)."""
    producer = _producer_through_reshapes(norm)
    if norm.op_type not in NORM_OPS or producer is None or producer.name not in rotated_readers:
        fail(f"rotation config {source}: head norm {norm.name!r} does not read the output of a rotated MatMul "
             "through reshapes; it is on the residual stream and belongs in an R1 pair")


def _check_readers(source: str, pair: ResolvedPair) -> None:
    """next_nodes are exactly the readers of the norm's output, each a constant-weight MatMul."""
    norm = pair.norm_node
    readers = {n.name for n in pair.next_nodes}
    for use in norm.outputs[0].uses():
        if use.node.name not in readers:
            fail(f"rotation config {source}: {use.node.name!r} reads {norm.name!r} but is not in its next_nodes")
    for node in pair.next_nodes:
        if not is_const_matmul(node):
            fail(f"rotation config {source}: next node {node.name!r} is a {node.op_type}, not a MatMul with a constant weight")
        if node.inputs[0] is not norm.outputs[0]:
            fail(f"rotation config {source}: next node {node.name!r} does not read {norm.name!r}; "
                 "list only the norm's readers in its next_nodes")


def _check_writers(source: str, pair: ResolvedPair, writers: set[str]) -> None:
    """Every residual input of the norm comes from a listed writer (or an earlier norm's residual
    output), and every listed writer of this pair writes into one of them."""
    norm = pair.norm_node
    inputs = residual_inputs(norm)
    for value in inputs:
        producer = unscaled(value).producer()
        if producer is None:
            fail(f"rotation config {source}: {norm.name!r} reads a graph input, which cannot be rotated")
        if producer.op_type == "SkipSimplifiedLayerNormalization" or producer.name in writers:
            continue
        if producer.op_type == "Add":
            matmul = next((v.producer() for v in producer.inputs if v.producer() is not None
                           and v.producer().name in writers), None)
            if matmul is not None and matmul_bias(matmul) is not None:
                continue
        fail(f"rotation config {source}: {producer.name!r} writes the residual stream read by "
             f"{norm.name!r} but is not in its prev_nodes")
    for node in pair.prev_nodes:
        if not (is_embedding_gather(node) or is_const_matmul(node)):
            fail(f"rotation config {source}: prev node {node.name!r} is a {node.op_type}, not the embedding "
                 "Gather or a MatMul with a constant weight")
        if not any(writes_into(node, value) for value in inputs):
            fail(f"rotation config {source}: prev node {node.name!r} does not write the residual stream read by "
                 f"{norm.name!r}; list only that norm's writers in its prev_nodes")


# Readers of a rotated tensor that see only its shape, which R1 keeps.
SHAPE_READERS = frozenset({"Shape"})


def _is_head_norm(norm: ir.Node) -> bool:
    """A norm inside attention (Qwen3's q_norm / k_norm): it reads, through reshapes, a MatMul that
    reads another norm, so R1 leaves its input, and it, unchanged."""
    producer = _producer_through_reshapes(norm)
    if producer is None or not is_const_matmul(producer):
        return False
    source = producer.inputs[0].producer()
    return source is not None and source.op_type in NORM_OPS


def plain_decoder_pairs(graph: ir.Graph) -> list[ResolvedPair]:
    """R1 pairs found by structure, for a graph without builder node names (a plain decoder whose norms
    FuseNormOpsPass fused): for each norm, its readers and the writers of its residual inputs.

    The writers are found by walking back from each residual input through the residual Adds to
    constant MatMuls (with their bias) and the embedding Gather, stopping at an earlier norm's residual
    output. Anything else on that walk, a norm reader that is not a constant MatMul, or a residual
    tensor read by something other than a norm, a residual Add or a Shape, would leave the rotation
    inexact, so it is refused in one line.
    """
    def refuse(why: str) -> NoReturn:
        fail(f"--include_rotation: {why}, so R1 cannot be folded into this graph exactly; quantize without "
             "--include_rotation (SmoothQuant still applies)")

    def check_residual_readers(value: ir.Value) -> None:
        for use in value.uses():
            if use.node.op_type not in NORM_OPS | SHAPE_READERS | {"Add"}:
                refuse(f"{use.node.name!r} ({use.node.op_type}) reads the residual stream")

    def collect(value: ir.Value, norm: ir.Node, writers: list[ir.Node]) -> None:
        check_residual_readers(value)
        base = unscaled(value)  # a constant scalar factor (Gemma's embedding scale) commutes with R1
        if base is not value:
            scale = value.producer()
            for use in base.uses():
                if use.node is not scale and use.node.op_type not in SHAPE_READERS:
                    refuse(f"{use.node.name!r} ({use.node.op_type}) reads the residual stream")
            value = base
        producer = value.producer()
        if producer is None:
            refuse(f"{norm.name!r} reads a graph input")
        if producer.op_type == "SkipSimplifiedLayerNormalization" and value is producer.outputs[-1]:
            return
        writer = producer if (is_embedding_gather(producer) or is_const_matmul(producer)) else linear_producer(value)
        if writer is not None:
            if writer not in writers:
                writers.append(writer)
            return
        if producer.op_type != "Add" or producer.domain != "":
            refuse(f"{producer.name!r} ({producer.op_type}) writes the residual stream read by {norm.name!r}")
        for term in producer.inputs:
            collect(term, norm, writers)

    norms = [node for node in graph if node.op_type in NORM_OPS and not _is_head_norm(node)]
    if not norms:
        refuse("the graph has no RMSNorm the builder's or onnxscript's fusions recognise")
    pairs = []
    for norm in norms:
        readers = [use.node for use in norm.outputs[0].uses()]
        matmuls = tuple(node for node in readers if is_const_matmul(node) and node.inputs[0] is norm.outputs[0])
        for node in readers:
            if node not in matmuls and node.op_type not in SHAPE_READERS:
                refuse(f"{node.name!r} ({node.op_type}) reads the norm {norm.name!r} and is not a MatMul with a constant weight")
        if not matmuls:
            refuse(f"nothing but shapes read the norm {norm.name!r}")
        writers: list[ir.Node] = []
        for value in residual_inputs(norm):
            collect(value, norm, writers)
        if norm.op_type == "SkipSimplifiedLayerNormalization" and len(norm.outputs) > 3:
            check_residual_readers(norm.outputs[3])
        pairs.append(ResolvedPair(tuple(writers), norm, matmuls))
    return pairs
