"""Calibration through ONNX Runtime, streaming one sample at a time.

Each observer declares the in-graph reductions it needs of the tensor it watches (`reductions`)
and folds each sample's results into its own statistics (`update`). Before the model runs, its
outputs are replaced by those reductions and every node that feeds none of them is removed, so
the logits and everything after the last observed tensor never run, and each sample returns a few
numbers (or a K x K Hessian) per tensor instead of whole activations. Memory does not grow with
the number of samples, except for the per-sample recorders that say so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from onnxquant.genai_folder import GenAIFolder
from onnxquant.patterns import constant_weight
from onnxquant.runtime import prefill_feeds, session_options
from onnxquant.segments import DEFAULT_SEGMENT_MB, Segment, SegmentedModel
from onnxquant.algorithms.range_search import mse_range
from onnxquant.schemes import Calibration
from onnxquant.spec import QuantSpec


class TokenSampleReader(CalibrationDataReader):
    """Feeds for one prefill per calibration sample: the graph's real inputs with an empty KV cache."""

    def __init__(self, folder: GenAIFolder, samples: np.ndarray, specs: list[tuple[str, type]]):
        self.folder = folder
        self.samples = samples
        self.specs = specs
        self._next = 0

    def __len__(self) -> int:
        return len(self.samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.samples):
            return None
        sample = self.samples[self._next].reshape(1, -1)
        self._next += 1
        return prefill_feeds(self.specs, self.folder, sample)


def _node(graph: ir.Graph, op: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes, name=name)
    graph.append(node)
    node.outputs[0].name = name
    return node.outputs[0]


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.type, value.shape = ir.TensorType(ir.DataType.from_numpy(array.dtype)), ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _leading_axes(graph: ir.Graph, value: ir.Value, tag: str) -> ir.Value:
    """All axes but the last (the channel axis) of `value`."""
    rank = len(value.shape) if value.shape is not None else 3
    return _constant(graph, f"{tag}/axes", np.arange(rank - 1, dtype=np.int64))


class Observer:
    """Watches one tensor: declares in-graph reductions, consumes their per-sample results.

    Reductions named in `summed` are not returned per sample: ORT adds each sample's result into a
    running total, `self.sums[name]`, in place (the graph reads the total as an input and writes
    the new total over it), so a K x K statistic costs one K x K buffer however many samples run.
    """

    summed: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}

    def reductions(self, graph: ir.Graph, value: ir.Value, tag: str) -> dict[str, ir.Value]:
        raise NotImplementedError

    def update(self, stats: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


class _TensorMinMax(Observer):
    def reductions(self, graph, value, tag):
        return {"min": _node(graph, "ReduceMin", [value], f"{tag}/min", keepdims=0),
                "max": _node(graph, "ReduceMax", [value], f"{tag}/max", keepdims=0)}


class MinMaxObserver(_TensorMinMax):
    """Smallest minimum and largest maximum over all samples."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf

    def update(self, stats) -> None:
        self.min = min(self.min, float(stats["min"]))
        self.max = max(self.max, float(stats["max"]))

    def range(self) -> tuple[float, float]:
        return self.min, self.max


class MovingAverageMinMaxObserver(_TensorMinMax):
    """Exponential moving average of each sample's min and max: m <- m + c * (sample - m).

    The first sample initialises the averages (as in AMD Quark and PyTorch's observer).
    """

    def __init__(self, averaging_constant: float) -> None:
        self.constant = averaging_constant
        self.min: float | None = None
        self.max: float | None = None

    def update(self, stats) -> None:
        smin, smax = float(stats["min"]), float(stats["max"])
        if self.min is None:
            self.min, self.max = smin, smax
        else:
            self.min += self.constant * (smin - self.min)
            self.max += self.constant * (smax - self.max)

    def range(self) -> tuple[float, float]:
        return self.min, self.max


class GrowingHistogram:
    """Counts of values in `bins` equal bins over [-top, top] (`signed`) or [0, top], the top
    doubling (at least) whenever a larger value arrives, so no range is needed in advance."""

    def __init__(self, bins: int, signed: bool) -> None:
        self.bins = bins
        self.signed = signed
        self.counts = np.zeros(bins, dtype=np.int64)
        self.top = 0.0

    def _edges(self, top: float) -> tuple[float, float]:
        return (-top if self.signed else 0.0), top

    def centres(self) -> np.ndarray:
        low, high = self._edges(self.top)
        return low + (np.arange(self.bins) + 0.5) * ((high - low) / self.bins)

    def _widen(self, top: float) -> None:
        new_top = max(top, self.top * 2, 1e-12)
        if self.top > 0:
            # Move each old bin's count to the new bin holding its centre.
            low, high = self._edges(new_top)
            target = np.minimum(((self.centres() - low) / (high - low) * self.bins).astype(np.int64), self.bins - 1)
            widened = np.zeros_like(self.counts)
            np.add.at(widened, target, self.counts)
            self.counts = widened
        self.top = new_top

    def add(self, values: np.ndarray) -> None:
        peak = float(np.abs(values).max())
        if peak > self.top:
            self._widen(peak)
        counts, _ = np.histogram(values, bins=self.bins, range=self._edges(self.top))
        self.counts += counts


class _HistogramObserver(Observer):
    """Tracks min and max and a histogram of each sample's whole tensor (one activation at a time,
    never stored); subclasses say what is histogrammed and how a range comes out of it."""

    def __init__(self, hist: GrowingHistogram) -> None:
        self.hist = hist
        self.min = math.inf
        self.max = -math.inf

    def reductions(self, graph, value, tag):
        return {"values": _node(graph, "Identity", [value], f"{tag}/values")}

    def _histogrammed(self, x: np.ndarray) -> np.ndarray:
        return x

    def update(self, stats) -> None:
        x = stats["values"]
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.hist.add(self._histogrammed(x).ravel())


class PercentileObserver(_HistogramObserver):
    """Clip the range at a percentile of |x|, from a histogram that widens as larger values arrive."""

    def __init__(self, percentile: float, bins: int = 4096) -> None:
        super().__init__(GrowingHistogram(bins, signed=False))
        self.percentile = percentile

    def _histogrammed(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x)

    def range(self) -> tuple[float, float]:
        cumulative = np.cumsum(self.hist.counts)
        index = int(np.searchsorted(cumulative, cumulative[-1] * self.percentile / 100.0))
        threshold = (index + 1) * self.hist.top / self.hist.bins
        return max(self.min, -threshold), min(self.max, threshold)


class MseRangeObserver(_HistogramObserver):
    """The range minimizing the activation grid's quantize-dequantize error over every calibration
    value (algorithms.range_search), from a signed histogram fine enough that a grid step spans
    many bins."""

    def __init__(self, spec: QuantSpec, bins: int = 16384) -> None:
        super().__init__(GrowingHistogram(bins, signed=True))
        self.spec = spec

    def range(self) -> tuple[float, float]:
        return mse_range(self.hist.centres(), self.hist.counts, (min(self.min, 0.0), max(self.max, 0.0)), self.spec)


def make_range_observer(calibration: Calibration, spec: QuantSpec) -> Observer:
    """The observer of one activation's static range on grid `spec`."""
    if calibration.method == "mse":
        return MseRangeObserver(spec)
    if calibration.method == "percentile":
        return PercentileObserver(calibration.percentile)
    if calibration.moving_average:
        return MovingAverageMinMaxObserver(calibration.averaging_constant)
    return MinMaxObserver()


class ChannelAbsMaxObserver(Observer):
    """Largest |x| of each channel (last axis) over all samples, for SmoothQuant."""

    def __init__(self) -> None:
        self.absmax: np.ndarray | None = None

    def reductions(self, graph, value, tag):
        magnitude = _node(graph, "Abs", [value], f"{tag}/abs")
        return {"absmax": _node(graph, "ReduceMax", [magnitude, _leading_axes(graph, value, tag)], f"{tag}/absmax", keepdims=0)}

    def update(self, stats) -> None:
        value = stats["absmax"]
        self.absmax = value.copy() if self.absmax is None else np.maximum(self.absmax, value)


class ChannelMeanAbsObserver(Observer):
    """Mean |x| of each channel over all tokens of all samples (AWQ's activation statistic)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.samples = 0

    def reductions(self, graph, value, tag):
        magnitude = _node(graph, "Abs", [value], f"{tag}/abs")
        return {"meanabs": _node(graph, "ReduceMean", [magnitude, _leading_axes(graph, value, tag)], f"{tag}/meanabs", keepdims=0)}

    def update(self, stats) -> None:
        value = stats["meanabs"].astype(np.float64)
        self.total = value if self.total is None else self.total + value
        self.samples += 1

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.samples, 1)


def _reader_width(value: ir.Value) -> int:
    """The last dimension of an activation without a stored shape (optimum stores none), read off a
    MatMul that multiplies it by a constant 2-D weight; -1 if none does. With it the statistic has a
    static shape and is summed inside ORT: the per-sample K x K Hessians of SmolLM2's optimum graph,
    summed on the host instead, cost 5 s a sample and a 4.7 GB peak."""
    for use in value.uses():
        weight = constant_weight(use.node) if use.node.op_type == "MatMul" and use.idx == 0 else None
        if weight is not None and len(weight.const_value.shape) == 2:
            return int(weight.const_value.shape[0])
    return -1


class _TokenRowsObserver(Observer):
    """A statistic summed in the graph over the rows of the activation flattened to [tokens, K],
    with the token count; subclasses name the statistic (`summed`) and build it from the rows."""

    def __init__(self, token_stride: int = 1) -> None:
        super().__init__()
        self.tokens = 0
        self.token_stride = token_stride  # the statistic reads every token_stride-th row only

    def _statistic(self, graph, rows: ir.Value, width: int, tag: str) -> ir.Value:
        raise NotImplementedError

    def reductions(self, graph, value, tag):
        width = value.shape[-1] if value.shape is not None and isinstance(value.shape[-1], int) else _reader_width(value)
        if width > 0:
            rows = _node(graph, "Reshape", [value, _constant(graph, f"{tag}/shape", np.array([-1, width], dtype=np.int64))],
                         f"{tag}/rows")
        else:  # a width only known at run time (plain decoders reshape heads back by computed shapes)
            rows = _node(graph, "Flatten", [value], f"{tag}/rows", axis=-1)
        if self.token_stride > 1:
            rows = _node(graph, "Slice", [rows, *(_constant(graph, f"{tag}/{name}", np.array([v], dtype=np.int64)) for name, v in
                                                 (("start", 0), ("end", np.iinfo(np.int64).max), ("axis", 0), ("step", self.token_stride)))],
                         f"{tag}/strided_rows")
        count = _node(graph, "Shape", [rows], f"{tag}/count", start=0, end=1)
        return {self.summed[0]: self._statistic(graph, rows, width, tag), "count": count}

    def update(self, stats) -> None:
        self.tokens += int(np.asarray(stats["count"]).reshape(-1)[0])

    @property
    def sum(self) -> np.ndarray | None:
        return self.sums.get(self.summed[0])


class ChannelSquareSumObserver(_TokenRowsObserver):
    """sum over tokens of x_k² per channel: the diagonal of HessianObserver's H, in K numbers instead
    of K² (SmoothQuant's alpha search; Qwen2.5-1.5B's down_proj input alone has K = 8960)."""

    summed = ("x2",)

    def _statistic(self, graph, rows, width, tag):
        squares = _node(graph, "Mul", [rows, rows], f"{tag}/squares")
        x2 = _node(graph, "ReduceSum", [squares, _constant(graph, f"{tag}/rows_axis", np.array([0], dtype=np.int64))],
                   f"{tag}/x2", keepdims=0)
        x2.shape = ir.Shape([width]) if width > 0 else None
        return x2


class HessianObserver(_TokenRowsObserver):
    """H = sum over tokens of x xᵀ (GPTQ's Hessian up to a factor; AWQ's output-error metric).

    The product runs in the graph (Gemm of the flattened activation with itself, transA=1) and is
    summed there in float32, so no activation and no per-sample K x K product leaves ORT.
    """

    summed = ("xtx",)

    def _statistic(self, graph, rows, width, tag):
        xtx = _node(graph, "Gemm", [rows, rows], f"{tag}/xtx", transA=1)
        xtx.shape = ir.Shape([width, width]) if width > 0 else None
        return xtx


class ChannelExtremaRecorder(Observer):
    """Each sample's per-channel (last axis) min and max, kept so ranges can be derived later.

    SmoothQuant divides an activation by a per-channel s that is only known once every sample has
    been seen; the per-tensor range of x / s in each sample is then min_c(min_c / s_c) and
    max_c(max_c / s_c), exactly what a second calibration pass over the smoothed model would
    observe. One pass thus serves both SmoothQuant and the quantizer, for 8 bytes per channel per
    sample (64 samples of SmolLM2: about 60 MB), instead of the activations themselves.
    """

    def __init__(self) -> None:
        self.mins: list[np.ndarray] = []
        self.maxs: list[np.ndarray] = []

    def reductions(self, graph, value, tag):
        axes = _leading_axes(graph, value, tag)
        return {"cmin": _node(graph, "ReduceMin", [value, axes], f"{tag}/cmin", keepdims=0),
                "cmax": _node(graph, "ReduceMax", [value, axes], f"{tag}/cmax", keepdims=0)}

    def update(self, stats) -> None:
        self.mins.append(np.asarray(stats["cmin"], dtype=np.float32))
        self.maxs.append(np.asarray(stats["cmax"], dtype=np.float32))

    def absmax_over(self, samples: int | None = None) -> np.ndarray:
        """max |x| per channel over the first `samples` samples (None: all)."""
        mins, maxs = self.mins[:samples], self.maxs[:samples]
        return np.maximum(np.abs(np.min(mins, axis=0)), np.abs(np.max(maxs, axis=0)))

    def replay(self, observer: Observer, divisor: np.ndarray | None = None) -> Observer:
        """Feed `observer` each sample's per-tensor min/max of x / divisor, in sample order."""
        mins, maxs = np.stack(self.mins).astype(np.float64), np.stack(self.maxs).astype(np.float64)
        if divisor is not None:
            mins, maxs = mins / divisor, maxs / divisor  # divisor > 0 keeps min below max
        for low, high in zip(mins.min(axis=1), maxs.max(axis=1)):
            observer.update({"min": low, "max": high})
        return observer


Observation = tuple[str, Observer]  # (tensor name, observer)


class SpillingStore:
    """Named arrays (statistics such as Hessians) held in memory, or, when put with `spill`, in .npy
    files under `folder`, read back when asked for, so that memory holds one of them at a time. The
    last file read is kept until another is read: the readers of one activation (gate_proj and
    up_proj) ask for its Hessian in turn, and read the file once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, Path] = {}
        self._written = 0
        self._last_read: tuple[str, np.ndarray] | None = None

    def put(self, name: str, array: np.ndarray, spill: bool) -> None:
        if name in self:
            del self[name]
        if not spill:
            self.arrays[name] = array
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.files[name] = self.folder / f"{self._written}.npy"
        self._written += 1
        np.save(path, array)

    def replace(self, name: str, array: np.ndarray) -> None:
        self.put(name, array, spill=name in self.files)

    def rename(self, old: str, new: str) -> None:
        if old in self.arrays:
            self.arrays[new] = self.arrays.pop(old)
        else:
            self.files[new] = self.files.pop(old)
        if self._last_read is not None and self._last_read[0] == old:
            self._last_read = (new, self._last_read[1])

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.arrays:
            return self.arrays[name]
        # A local copy: another thread may replace _last_read between reading the file and returning it.
        last = self._last_read
        if last is None or last[0] != name:
            self._last_read = None  # drop the previous array before reading the next
            last = self._last_read = (name, np.load(self.files[name]))
        return last[1]

    def get(self, name: str, default: np.ndarray | None = None) -> np.ndarray | None:
        return self[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        return name in self.arrays or name in self.files

    def __iter__(self):
        return iter([*self.arrays, *self.files])

    def __delitem__(self, name: str) -> None:
        if self._last_read is not None and self._last_read[0] == name:
            self._last_read = None
        if name in self.arrays:
            del self.arrays[name]
        else:
            self.files.pop(name).unlink()


@dataclass(frozen=True)
class CalibrationRun:
    seconds: float
    segments: int = 1


@dataclass(frozen=True)
class RunningSum:
    """A reduction ORT sums in place: graph input `total_in` + the sample's value -> output `total_out`."""
    observation: int
    stat: str
    total_in: str
    total_out: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationGraph:
    model: onnx.ModelProto  # weights stay in the external data files
    outputs: list[dict[str, str]]  # per observation: statistic name -> graph output name (per-sample stats)
    running_sums: list[RunningSum]
    first_reduction: int  # nodes from here on are the observers' reductions


def build_calibration_model(model_path: Path, observations: list[Observation]) -> CalibrationGraph:
    """The model at `model_path` with its outputs replaced by the observers' reductions.

    The model keeps its weights in the external data file. A summed reduction with a
    static shape becomes a running total (see `Observer`); one with a dynamic shape stays a
    per-sample output that `run_calibration` adds up on the host.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = ir.load(model_path)
    graph = model.graph
    own_nodes = {id(node) for node in graph}
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    graph.outputs.clear()
    outputs: list[dict[str, str]] = []
    running_sums: list[RunningSum] = []
    for index, (tensor_name, observer) in enumerate(observations):
        tag = f"{tensor_name}/calib{index}"
        stats = observer.reductions(graph, values[tensor_name], tag)
        per_sample = {}
        for stat, stat_value in stats.items():
            if stat_value.type is None:
                stat_value.type = ir.TensorType(ir.DataType.INT64 if stat == "count" else ir.DataType.FLOAT)
            shape = stat_value.shape
            if stat in observer.summed and shape is not None and all(isinstance(d, int) for d in shape):
                total_in = ir.Value(name=f"{tag}/{stat}/total_in", type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
                graph.inputs.append(total_in)
                total_out = _node(graph, "Add", [total_in, stat_value], f"{tag}/{stat}/total_out")
                total_out.type = ir.TensorType(ir.DataType.FLOAT)
                graph.outputs.append(total_out)
                running_sums.append(RunningSum(index, stat, total_in.name, total_out.name, tuple(shape)))
            else:
                graph.outputs.append(stat_value)
                per_sample[stat] = stat_value.name
        outputs.append(per_sample)
    RemoveUnusedNodesPass()(model)
    first_reduction = sum(1 for node in graph if id(node) in own_nodes)  # onnx_ir keeps appended nodes last
    return CalibrationGraph(ir.to_proto(model), outputs, running_sums, first_reduction)


def graph_input_specs(model_path: Path) -> list[tuple[str, type]]:
    """(name, numpy dtype) of each graph input, read without loading weights."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).type) for i in graph.input]


def token_sample_reader(model_path: Path, folder: GenAIFolder, samples: np.ndarray) -> TokenSampleReader:
    return TokenSampleReader(folder, samples, graph_input_specs(model_path))


def run_calibration(model_path: Path, reader: CalibrationDataReader, observations: list[Observation] | dict[str, Observer],
                    desc: str = "calibration", segment_bytes: int = DEFAULT_SEGMENT_MB << 20,
                    on_segment_done: Callable[[list[Observation], bool], dict[str, np.ndarray] | None] | None = None,
                    sequential: bool = False) -> CalibrationRun:
    """Run every sample of `reader` through ORT and feed each observer the statistics of its tensor.

    A model with more than `segment_bytes` of weights runs in segments (onnxquant.segments);
    `on_segment_done(observations, segmented)` is called with the observations each segment
    completed (segmented: whether the model was cut). `sequential`: what it returns (initializer name ->
    new weight) replaces those weights from then on, and the segment runs again with them, so later
    segments are observed on the outputs of the new weights.
    """
    if isinstance(observations, dict):
        observations = list(observations.items())
    start = time.perf_counter()
    calib = build_calibration_model(model_path, observations)
    segmented = SegmentedModel(calib.model, model_path.parent, segment_bytes, calib.first_reduction)
    options = session_options()
    # Peak memory of a 512-token SmolLM2 sample, measured: ORT's default order runs the reductions
    # after the last layer, so every watched activation stays alive (+200 MB); priority-based
    # order runs them as soon as their input exists. The memory pattern pre-plans one block for
    # all intermediates after the first run (+240 MB) and is no faster here.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_mem_pattern = False
    owner = {name: index for index, names in enumerate(calib.outputs) for name in names.values()}
    owner.update({total.total_out: total.observation for total in calib.running_sums})

    def bind_running_sums(segment: Segment, binding: ort.IOBinding) -> set[str]:
        bound = set()
        for total in calib.running_sums:
            if total.total_out not in segment.outputs:
                continue
            # Input and output bound to one buffer: ORT's elementwise Add writes the new total over the old.
            buffer = np.zeros(total.shape, dtype=np.float32)
            observations[total.observation][1].sums[total.stat] = buffer
            binding.bind_input(total.total_in, "cpu", 0, np.float32, list(total.shape), buffer.ctypes.data)
            binding.bind_output(total.total_out, "cpu", 0, np.float32, list(total.shape), buffer.ctypes.data)
            bound |= {total.total_in, total.total_out}
        return bound

    def update(_sample: int, results: dict[str, np.ndarray]) -> None:
        for index in sorted({owner[name] for name in results}):
            observer = observations[index][1]
            stats = {stat: results[name] for stat, name in calib.outputs[index].items()}
            for stat in [s for s in observer.summed if s in stats]:  # dynamic shape: summed here instead
                value = stats.pop(stat).astype(np.float32)
                if stat in observer.sums:
                    observer.sums[stat] += value
                else:
                    observer.sums[stat] = value
            observer.update(stats)

    def segment_done(segment: Segment) -> None:
        if on_segment_done is not None:
            done = {owner[name] for name in segment.outputs if name in owner}
            changed = on_segment_done([observations[index] for index in sorted(done)], len(segmented.segments) > 1)
            if changed:
                segmented.substitutes.update(changed)

    try:
        total_samples = len(reader)
    except (TypeError, NotImplementedError):  # ORT's base reader declares __len__ but need not implement it
        total_samples = None
    segmented.run(iter(reader.get_next, None), options, update, bind_running_sums, segment_done, desc, total_samples,
                  recompute_outputs=sequential)
    return CalibrationRun(time.perf_counter() - start, len(segmented.segments))
