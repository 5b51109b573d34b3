"""Running a model in consecutive pieces, so ONNX Runtime holds one piece's weights at a time.

A model whose weights exceed a budget is cut, in node order, into pieces of about equal weight;
each cut goes where the fewest (and narrowest) activations cross it. Every sample runs through
piece 1, whose crossing activations are kept (a few MB per sample: the residual stream and the
attention bookkeeping), then through piece 2, and so on; a piece's session is released before the
next is built. The results are those of the whole model: the same kernels run on the same inputs.
Calibration (all observers of a piece are complete when it ends, so their statistics can leave
memory before the next piece runs) and the verification probe use it; a model within the budget
runs as one piece, exactly as before.

Sequential calibration (`run(..., recompute_outputs=True)`): a piece's weights may change once its pass
has ended (GPTQ rounds the weights whose Hessians it completed, `substitutes` then holds them); the
piece then runs again, pruned to the activations later pieces read, so that those see the outputs of
the rounded weights. Later pieces are built with the substituted weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
from tqdm import tqdm

from onnxquant.runtime import make_session

DEFAULT_SEGMENT_MB = 1024


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in entries:
            return int(entries["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def schedule_added_nodes(nodes: list[onnx.NodeProto], first_added: int) -> list[onnx.NodeProto]:
    """The nodes with each one from `first_added` on (reductions appended after the model's own
    nodes) moved to just after the last node it reads, so a cut never separates a watched activation
    from its reduction; the model's own nodes keep their order."""
    produced_at: dict[str, tuple[int, int, int]] = {}
    keys = []
    for index, node in enumerate(nodes):
        if index < first_added:
            key = (index, 0, 0)
        else:
            key = (max((produced_at[name][0] for name in node.input if name in produced_at), default=-1), 1, index)
        keys.append(key)
        for name in node.output:
            produced_at[name] = key
    return [nodes[i] for i in sorted(range(len(nodes)), key=keys.__getitem__)]


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int
    inputs: tuple[str, ...]  # graph inputs and values of earlier segments that this one reads
    outputs: tuple[str, ...]  # graph outputs made here, then values later segments read
    weight_bytes: int


def _static_width(info: onnx.ValueInfoProto | None) -> int:
    """Elements per token of a value: the product of its fixed dimensions (1 when unknown)."""
    if info is None or not info.type.tensor_type.HasField("shape"):
        return 1
    return int(np.prod([d.dim_value for d in info.type.tensor_type.shape.dim if d.dim_value > 0] or [1]))


class SegmentedModel:
    """`model` (weights in external files under `weights_folder`) cut into segments of at most
    about `budget_bytes` of weights."""

    def __init__(self, model: onnx.ModelProto, weights_folder: Path, budget_bytes: int, first_added: int | None = None):
        self.model = model
        self.weights_folder = Path(weights_folder)
        graph = model.graph
        self.nodes = list(graph.node) if first_added is None else schedule_added_nodes(list(graph.node), first_added)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name: i for i in graph.input}
        self.graph_outputs = [o.name for o in graph.output]
        self.substitutes: dict[str, np.ndarray] = {}  # initializer name -> the array later pieces read instead
        nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in self.nodes for a in n.attribute)
        total = sum(tensor_bytes(t) for t in self.initializers.values())
        count = 1 if nested or total <= budget_bytes else math.ceil(total / budget_bytes)
        self.segments = self._split(count)

    def _split(self, count: int) -> list[Segment]:
        nodes, n = self.nodes, len(self.nodes)
        if count == 1:
            return [Segment(0, n, tuple(self.graph_inputs), tuple(self.graph_outputs),
                            sum(tensor_bytes(t) for t in self.initializers.values()))]
        infos = {v.name: v for v in [*self.model.graph.value_info, *self.model.graph.input, *self.model.graph.output]}
        first_use: dict[str, int] = {}
        last_use: dict[str, int] = {}
        produced: dict[str, int] = {name: -1 for name in self.graph_inputs}
        weight_at = np.zeros(n, dtype=np.int64)
        for position, node in enumerate(nodes):
            for name in node.input:
                if name in self.initializers and name not in first_use:
                    first_use[name] = position
                    weight_at[position] += tensor_bytes(self.initializers[name])
                last_use[name] = position
            for name in node.output:
                produced[name] = position
        for name in self.graph_outputs:
            last_use[name] = n
        # crossing[p]: the activation elements per token that cross a cut just before node p.
        crossing = np.zeros(n + 1, dtype=np.int64)
        for name, made in produced.items():
            end = last_use.get(name, made)
            if name and name not in self.initializers and end > made:
                crossing[made + 1:end + 1] += _static_width(infos.get(name))
        before = np.concatenate([[0], np.cumsum(weight_at)])  # weight bytes of nodes before p
        total = int(before[-1])
        cuts = [0]
        for j in range(1, count):
            target, slack = total * j / count, total / count / 4
            window = [p for p in range(cuts[-1] + 1, n) if abs(before[p] - target) <= slack]
            if window:
                cuts.append(min(window, key=lambda p: (crossing[p], abs(before[p] - target))))
        cuts.append(n)
        segments = []
        for start, stop in zip(cuts, cuts[1:]):
            inside = set()
            reads = []
            for node in nodes[start:stop]:
                reads += [name for name in node.input if name and name not in inside and name not in self.initializers]
                inside.update(node.output)
            inputs = tuple(dict.fromkeys(name for name in reads if produced.get(name, -1) < start))
            outputs = [name for name in self.graph_outputs if name in inside]
            outputs += [name for name in inside if name and last_use.get(name, -1) >= stop]
            segments.append(Segment(start, stop, inputs, tuple(dict.fromkeys(outputs)), int(before[stop] - before[start])))
        return segments

    def _initializer(self, name: str) -> onnx.TensorProto:
        if name in self.substitutes:
            return numpy_helper.from_array(self.substitutes[name], name)
        return self.initializers[name]

    def segment_model(self, segment: Segment, dtypes: dict[str, np.dtype], outputs: tuple[str, ...] | None = None) -> bytes:
        """The serialized piece; an input that is no graph input is declared with the dtype of the array fed to it.
        With `outputs`, only the nodes those outputs need (and the inputs they read)."""
        if len(self.segments) == 1 and not self.substitutes and outputs is None:
            return self.model.SerializeToString()
        nodes = self.nodes[segment.start:segment.stop]
        inputs_read = segment.inputs
        if outputs is not None:
            nodes = _needed_for(nodes, outputs)
            read = {name for node in nodes for name in node.input}
            inputs_read = tuple(name for name in segment.inputs if name in read)
        used = dict.fromkeys(name for node in nodes for name in node.input if name in self.initializers)
        inputs = [self.graph_inputs[name] if name in self.graph_inputs else
                  onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(dtypes[name]), None)
                  for name in inputs_read]
        outputs = [onnx.ValueInfoProto(name=name) for name in (segment.outputs if outputs is None else outputs)]
        graph = onnx.helper.make_graph(nodes, f"{self.model.graph.name}-{segment.start}", inputs, outputs,
                                       initializer=[self._initializer(name) for name in used])
        piece = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        piece.functions.extend(self.model.functions)
        return piece.SerializeToString()

    def run(self, feeds: Iterable[dict[str, np.ndarray]], options: ort.SessionOptions,
            on_outputs: Callable[[int, dict[str, np.ndarray]], None],
            bind_fixed: Callable[[Segment, ort.IOBinding], set[str]] | None = None,
            on_segment_done: Callable[[Segment], None] | None = None, desc: str = "run", total: int | None = None,
            recompute_outputs: bool = False) -> None:
        """Run every sample through every segment. `on_outputs(sample, {graph output: array})` gets
        the graph outputs (copies) of each segment that makes any; `bind_fixed(segment, binding)` may bind buffers of its
        own and returns the names it bound, which are then neither fetched nor passed on. With
        `recompute_outputs`, the activations later segments read come from a second run of each segment
        after `on_segment_done`, with the `substitutes` it left."""
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.weights_folder))
        samples: list[dict[str, np.ndarray]] | Iterable[dict[str, np.ndarray]] = feeds
        later_reads = [set().union(*(s.inputs for s in self.segments[k + 1:])) for k in range(len(self.segments))]
        last_reader = {name: index for index, segment in enumerate(self.segments)
                       for node in self.nodes[segment.start:segment.stop] for name in node.input if name in self.initializers}
        if len(self.segments) > 1:
            samples = list(feeds)
            total = len(samples)
        passes = [2 if recompute_outputs and later_reads[k] else 1 for k in range(len(self.segments))]
        progress = tqdm(total=None if total is None else total * sum(passes), desc=desc, unit="sample")
        for index, segment in enumerate(self.segments):
            recompute = passes[index] == 2
            self._run_segment(segment, samples, options, on_outputs, bind_fixed, later_reads[index],
                              carry=not recompute, progress=progress)
            if on_segment_done is not None:
                on_segment_done(segment)
            if recompute:
                crossing = tuple(name for name in segment.outputs if name in later_reads[index])
                self._run_segment(segment, samples, options, None, None, later_reads[index], carry=True,
                                  progress=progress, outputs=crossing)
            for name in [name for name in self.substitutes if last_reader.get(name, -1) <= index]:
                del self.substitutes[name]
        progress.close()

    def _run_segment(self, segment: Segment, samples, options: ort.SessionOptions,
                     on_outputs: Callable[[int, dict[str, np.ndarray]], None] | None,
                     bind_fixed: Callable[[Segment, ort.IOBinding], set[str]] | None, later_reads: set[str],
                     carry: bool, progress: tqdm, outputs: tuple[str, ...] | None = None) -> None:
        """One pass of every sample through `segment` (only to `outputs`, when given); with `carry`, each
        sample's values become what later segments read."""
        session = None
        fed: list[str] = []
        fetched: list[str] = []
        binding = None
        skipped = 0
        graph_outputs = set(self.graph_outputs)
        for number, values in enumerate(samples):
            if session is None:
                piece = self.segment_model(segment, {k: v.dtype for k, v in values.items()}, outputs)
                session = make_session(piece, options)
                binding = session.io_binding()
                fixed = bind_fixed(segment, binding) if bind_fixed else set()
                fed = [i.name for i in session.get_inputs() if i.name not in fixed]
                fetched = [name for name in (segment.outputs if outputs is None else outputs) if name not in fixed]
                skipped = len(segment.outputs) - len(fetched) if outputs is None else 0  # bind_fixed bound its outputs first
                for name in fetched:
                    binding.bind_output(name, "cpu")
            for name in fed:
                binding.bind_cpu_input(name, values[name])
            session.run_with_iobinding(binding)
            # Copies: ORT writes the next sample's results into the same output buffers.
            results = {name: np.array(value.numpy(), copy=True)
                       for name, value in zip(fetched, binding.get_outputs()[skipped:])}
            if carry and len(self.segments) > 1:
                for name in list(values):
                    if name not in later_reads:
                        del values[name]
                values.update({name: array for name, array in results.items() if name in later_reads})
            made = {name: array for name, array in results.items() if name in graph_outputs}
            if made and on_outputs is not None:
                on_outputs(number, made)
            progress.update()
        del binding, session


def _needed_for(nodes: list[onnx.NodeProto], outputs: tuple[str, ...]) -> list[onnx.NodeProto]:
    """The nodes (in order) that `outputs` depend on."""
    wanted = set(outputs)
    kept = []
    for node in reversed(nodes):
        if wanted.intersection(node.output):
            kept.append(node)
            wanted.update(node.input)
    return kept[::-1]
