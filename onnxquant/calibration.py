"""Calibration through ONNX Runtime, streaming one sample at a time.

The model is run from disk with ORT. Before it runs, the graph is cut down to what the observed
tensors need: its outputs are replaced by reductions of those tensors (ReduceMin/ReduceMax per
tensor, or per channel), and every node that feeds none of them is removed, so the logits and
everything else after the last observed tensor never run, and each sample returns a few numbers
per tensor instead of whole activations. Observers fold each sample into running statistics, so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from onnxquant.genai_folder import GenAIFolder
from onnxquant.runtime import make_session, prefill_feeds, session_options
from onnxquant.schemes import Calibration


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


class RangeObserver(Protocol):
    def update(self, sample: dict[str, np.ndarray]) -> None: ...
    def range(self) -> tuple[float, float]: ...


class MinMaxObserver:
    """Smallest minimum and largest maximum over all samples."""

    needs = "minmax"

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf

    def update(self, sample: dict[str, np.ndarray]) -> None:
        self.min = min(self.min, float(sample["min"]))
        self.max = max(self.max, float(sample["max"]))

    def range(self) -> tuple[float, float]:
        return self.min, self.max


class MovingAverageMinMaxObserver:
    """Exponential moving average of each sample's min and max: m <- m + c * (sample - m).

    The first sample initialises the averages (as in AMD Quark and PyTorch's observer).
    """

    needs = "minmax"

    def __init__(self, averaging_constant: float) -> None:
        self.constant = averaging_constant
        self.min: float | None = None
        self.max: float | None = None

    def update(self, sample: dict[str, np.ndarray]) -> None:
        smin, smax = float(sample["min"]), float(sample["max"])
        if self.min is None:
            self.min, self.max = smin, smax
        else:
            self.min += self.constant * (smin - self.min)
            self.max += self.constant * (smax - self.max)

    def range(self) -> tuple[float, float]:
        return self.min, self.max


class PercentileObserver:
    """Clip the range at a percentile of |x|, from a histogram that widens as larger values arrive."""

    needs = "raw"

    def __init__(self, percentile: float, bins: int = 4096) -> None:
        self.percentile = percentile
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.top = 0.0
        self.min = math.inf
        self.max = -math.inf

    def _widen(self, top: float) -> None:
        new_top = max(top, self.top * 2, 1e-12)
        if self.top > 0:
            # Move each old bin's count to the new bin holding its centre.
            centres = (np.arange(self.bins) + 0.5) * (self.top / self.bins)
            target = np.minimum((centres / new_top * self.bins).astype(np.int64), self.bins - 1)
            widened = np.zeros_like(self.hist)
            np.add.at(widened, target, self.hist)
            self.hist = widened
        self.top = new_top

    def update(self, sample: dict[str, np.ndarray]) -> None:
        x = sample["raw"]
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        magnitude = np.abs(x).ravel()
        peak = float(magnitude.max())
        if peak > self.top:
            self._widen(peak)
        counts, _ = np.histogram(magnitude, bins=self.bins, range=(0.0, self.top))
        self.hist += counts

    def range(self) -> tuple[float, float]:
        cumulative = np.cumsum(self.hist)
        index = int(np.searchsorted(cumulative, cumulative[-1] * self.percentile / 100.0))
        threshold = (index + 1) * self.top / self.bins
        return max(self.min, -threshold), min(self.max, threshold)


def make_observer(calibration: Calibration) -> RangeObserver:
    if calibration.method == "percentile":
        return PercentileObserver(calibration.percentile)
    if calibration.moving_average:
        return MovingAverageMinMaxObserver(calibration.averaging_constant)
    return MinMaxObserver()


class ChannelAbsMaxObserver:
    """Largest |x| of each channel (last axis) over all samples, for SmoothQuant."""

    needs = "absmax"

    def __init__(self) -> None:
        self.absmax: np.ndarray | None = None

    def update(self, sample: dict[str, np.ndarray]) -> None:
        value = sample["absmax"]
        self.absmax = value.copy() if self.absmax is None else np.maximum(self.absmax, value)


class ChannelExtremaRecorder:
    """Each sample's per-channel (last axis) min and max, kept so ranges can be derived later.

    SmoothQuant divides an activation by a per-channel s that is only known once every sample has
    been seen; the per-tensor range of x / s in each sample is then min_c(min_c / s_c) and
    max_c(max_c / s_c), exactly what a second calibration pass over the smoothed model would
    observe. One pass thus serves both SmoothQuant and the quantizer, for 8 bytes per channel per
    sample (64 samples of SmolLM2: about 60 MB), instead of the activations themselves.
    """

    needs = "channel_minmax"

    def __init__(self) -> None:
        self.mins: list[np.ndarray] = []
        self.maxs: list[np.ndarray] = []

    def update(self, sample: dict[str, np.ndarray]) -> None:
        self.mins.append(np.asarray(sample["cmin"], dtype=np.float32))
        self.maxs.append(np.asarray(sample["cmax"], dtype=np.float32))

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(np.min(self.mins, axis=0)), np.abs(np.max(self.maxs, axis=0)))

    def replay(self, observer: RangeObserver, divisor: np.ndarray | None = None) -> RangeObserver:
        """Feed `observer` each sample's per-tensor min/max of x / divisor, in sample order."""
        mins, maxs = np.stack(self.mins).astype(np.float64), np.stack(self.maxs).astype(np.float64)
        if divisor is not None:
            mins, maxs = mins / divisor, maxs / divisor  # divisor > 0 keeps min below max
        for low, high in zip(mins.min(axis=1), maxs.max(axis=1)):
            observer.update({"min": low, "max": high})
        return observer


@dataclass(frozen=True)
class CalibrationRun:
    seconds: float


def _reduction_outputs(graph: ir.Graph, value: ir.Value, needs: str) -> dict[str, ir.Value]:
    """Add the reductions observer kind `needs` reads from `value`; returns stat name -> output value."""
    tag = value.name
    if needs == "raw":
        return {"raw": value}
    if needs == "minmax":
        low = ir.node("ReduceMin", [value], attributes={"keepdims": 0}, name=f"{tag}/calib/min")
        high = ir.node("ReduceMax", [value], attributes={"keepdims": 0}, name=f"{tag}/calib/max")
        graph.extend([low, high])
        low.outputs[0].name, high.outputs[0].name = f"{tag}::min", f"{tag}::max"
        return {"min": low.outputs[0], "max": high.outputs[0]}
    rank = len(value.shape) if value.shape is not None else 3
    axes = ir.Value(name=f"{tag}::calib_axes", const_value=ir.tensor(np.arange(rank - 1, dtype=np.int64)))
    axes.type, axes.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([rank - 1])
    graph.register_initializer(axes)
    if needs == "channel_minmax":
        low = ir.node("ReduceMin", [value, axes], attributes={"keepdims": 0}, name=f"{tag}/calib/cmin")
        high = ir.node("ReduceMax", [value, axes], attributes={"keepdims": 0}, name=f"{tag}/calib/cmax")
        graph.extend([low, high])
        low.outputs[0].name, high.outputs[0].name = f"{tag}::cmin", f"{tag}::cmax"
        return {"cmin": low.outputs[0], "cmax": high.outputs[0]}
    if needs == "absmax":
        magnitude = ir.node("Abs", [value], name=f"{tag}/calib/abs")
        high = ir.node("ReduceMax", [magnitude.outputs[0], axes], attributes={"keepdims": 0}, name=f"{tag}/calib/absmax")
        graph.extend([magnitude, high])
        high.outputs[0].name = f"{tag}::absmax"
        return {"absmax": high.outputs[0]}
    raise ValueError(needs)


def build_calibration_model(model_path: Path, observed: Iterable[tuple[str, str]]) -> bytes:
    """The model at `model_path`, outputs replaced by the reductions that (tensor name, kind) pairs need."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = ir.load(model_path)
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    graph.outputs.clear()
    for tensor_name, needs in observed:
        for stat_value in _reduction_outputs(graph, values[tensor_name], needs).values():
            stat_value.type = ir.TensorType(ir.DataType.FLOAT)
            graph.outputs.append(stat_value)
    RemoveUnusedNodesPass()(model)
    return ir.to_proto(model).SerializeToString()


def graph_input_specs(model_path: Path) -> list[tuple[str, type]]:
    """(name, numpy dtype) of each graph input, read without loading weights."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).type) for i in graph.input]


def token_sample_reader(model_path: Path, folder: GenAIFolder, samples: np.ndarray) -> TokenSampleReader:
    return TokenSampleReader(folder, samples, graph_input_specs(model_path))


def run_calibration(
    model_path: Path,
    reader: CalibrationDataReader,
    observers: dict[str, object],
    desc: str = "calibration",
) -> CalibrationRun:
    """Run every sample of `reader` through ORT and feed each observer the statistics of its tensor."""
    import time

    start = time.perf_counter()
    observed = [(name, obs.needs) for name, obs in observers.items()]
    options = session_options()
    # The cut-down graph is passed as bytes; its weights stay in the model's external data file.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    session = make_session(build_calibration_model(model_path, observed), options)
    output_names = [o.name for o in session.get_outputs()]
    try:
        total = len(reader)
    except (TypeError, NotImplementedError):  # ORT's base reader declares __len__ but need not implement it
        total = None
    for feeds in tqdm(iter(reader.get_next, None), total=total, desc=desc, unit="sample"):
        results = dict(zip(output_names, session.run(output_names, feeds)))
        for name, observer in observers.items():
            if observer.needs == "raw":
                observer.update({"raw": results[name]})
            else:
                prefix = f"{name}::"
                observer.update({k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)})
    return CalibrationRun(time.perf_counter() - start)
