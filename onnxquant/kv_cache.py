"""A quantized KV cache, as the ORT-GenAI builder's `kv_cache_quant_scheme` makes it: the calibration of
post-RoPE K and V from the model's present.* outputs, their scales, the checks that a folder can take such
a cache, and the genai_config.json the builder writes beside it.

The builder's calibrator (onnxruntime_genai/models/quantization/kv_cache_calibration.py) is followed:
thresholds per channel (channel = kv_head * head_size + d, the order GroupQueryAttention reads per-channel
scales in), a per-tensor threshold the largest channel's, scale = max(threshold, 1e-6) / qmax with qmax 128
(int8), 8 (int4), 448 (fp8) while the kernel clamps integers to [-qmax, qmax - 1]. With the rotary
envelope K's thresholds bound K at every position of the context, not only those of the calibration window
(the low-frequency pairs barely turn within 512 tokens): the builder takes each RoPE pair's norm, which a
rotation leaves unchanged; `pair_envelope` takes the largest value each pair reaches over the angles it turns
through within the context, the same norm for the fast pairs and tighter for the slow ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxquant.calibration import Observer, _node
from onnxquant.errors import fail
from onnxquant.genai_folder import GenAIFolder

log = logging.getLogger(__name__)

GQA = "GroupQueryAttention"
QMAX = {"int8": 128.0, "int4": 8.0, "fp8": 448.0}
# Bytes one cached element takes (int4: two per byte).
ELEMENT_BYTES = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "int4": 0.5, "fp8": 1.0}
# Token rows of each cache tensor kept for percentile and mse thresholds, strided over all samples (the
# builder's sample_budget): 64 samples of SmolLM2 then keep 192 rows of each sample, 283 MB in float16.
SAMPLE_ROWS = 12288
# Providers whose GroupQueryAttention takes a quantized cache (the builder allows these two), and the
# cache dtypes each implements (ORT 1.32's CPU kernel has no FP8 path).
KERNEL_DTYPES = {"cpu": ("int8", "int4"), "cuda": ("int8", "int4", "fp8")}


def target_provider(folder: GenAIFolder) -> str:
    """The execution provider the folder was exported for: the first of genai_config.json's provider_options
    (the builder writes one for every provider but the CPU), "cpu" when there is none."""
    options = folder.decoder.get("session_options", {}).get("provider_options") or []
    names = [name for entry in options if isinstance(entry, dict) for name in entry]
    return names[0].lower() if names else "cpu"


def present_names(folder: GenAIFolder) -> list[tuple[str, str]]:
    """(present key, present value) output names of each layer, by genai_config.json's patterns."""
    outputs = folder.decoder.get("outputs", {})
    key, value = outputs.get("present_key_names"), outputs.get("present_value_names")
    if key is None or value is None:
        return []
    return [(key % layer, value % layer) for layer in range(folder.num_layers)]


def check_kv_cache_target(folder: GenAIFolder, dtype: str) -> str:
    """Refuse, before any work, a folder whose attention cannot hold a `dtype` cache; returns the provider."""
    import onnx

    provider = target_provider(folder)
    if provider not in KERNEL_DTYPES:
        fail(f"{folder.path} is exported for the {provider} provider, whose GroupQueryAttention takes no quantized "
             "KV cache (the CPU's and CUDA's do); export the model for cpu or cuda, or drop the kv_cache stage")
    if dtype not in KERNEL_DTYPES[provider]:
        fail(f"a {dtype} KV cache needs a provider that implements GroupQueryAttention on {dtype} caches (CUDA), "
             f"and {folder.path} targets {provider}, which has none; export the model for cuda "
             "(onnxquant export --execution_provider cuda) or choose int8 or int4")
    graph = onnx.load(str(folder.model_file), load_external_data=False).graph
    names = present_names(folder)
    outputs = {value.name for value in graph.output}
    if not names or not all(k in outputs and v in outputs for k, v in names):
        fail(f"{folder.model_file} has no KV cache (no present key and value outputs for each layer in "
             "genai_config.json); quantize the KV cache of a decoder exported with its cache")
    attention = {node.output[1]: node for node in graph.node if node.op_type == GQA and len(node.output) >= 3}
    if not all(k in attention for k, _ in names):
        fail(f"{folder.model_file} concatenates its KV cache outside attention (a plain decoder, no "
             f"{GQA}), and only {GQA} quantizes a cache; export the model with the ORT-GenAI builder "
             "(onnxquant export) for a quantized KV cache")
    for key, _ in names:
        node = attention[key]
        sliding = any(a.name == "sliding_window_cache" and a.i for a in node.attribute)
        if sliding and dtype == "int4" and folder.head_size % 32 and provider == "cpu":
            fail(f"{node.name} keeps a sliding-window cache (sliding_window_cache, as Gemma 2 and 3 do), which "
                 f"ORT's CPU GroupQueryAttention takes in 4 bits only for a head size that is a multiple of 32, not "
                 f"{folder.head_size}; choose int8")
        if len(node.input) > 12 and node.input[12]:
            fail(f"{folder.model_file} already has a quantized KV cache ({node.name} reads {node.input[12]}); "
                 "pass the float export instead")
    return provider


def rotary_layout(attention_attributes: dict) -> str:
    """How GroupQueryAttention pairs K's channels for RoPE: "interleaved" (2i, 2i+1) or "half" (d, d + D/2)."""
    return "interleaved" if attention_attributes.get("rotary_interleaved", 0) else "half"


def _pairs(rows: np.ndarray, heads: int, head_size: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """The two members (a, b) of every RoPE pair, each [tokens, heads, head_size // 2]."""
    if layout == "interleaved":
        x = rows.reshape(len(rows), heads, head_size // 2, 2)
        return x[..., 0], x[..., 1]
    x = rows.reshape(len(rows), heads, 2, head_size // 2)
    return x[:, :, 0], x[:, :, 1]


def _unpairs(a: np.ndarray, b: np.ndarray, layout: str) -> np.ndarray:
    return (np.stack([a, b], axis=-1) if layout == "interleaved" else np.stack([a, b], axis=2)).reshape(len(a), -1)


def rope_frequencies(cos_cache: np.ndarray, sin_cache: np.ndarray) -> np.ndarray | None:
    """Each RoPE pair's angle per position, theta_i, from GroupQueryAttention's cos/sin caches (row p holds
    cos(p theta_i)); None when the caches are not one rotation per position (LongRoPE's switched tables)."""
    theta = np.arctan2(sin_cache[1], cos_cache[1]).astype(np.float64)
    last = len(cos_cache) - 1
    if not np.allclose(cos_cache[last], np.cos(last * theta), atol=1e-3) or not np.allclose(
            sin_cache[last], np.sin(last * theta), atol=1e-3):
        return None
    return theta


def _largest_cosine(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """max |cos φ| over φ in [low, high]: 1 when the interval holds a multiple of π, else the ends' larger."""
    holds_peak = np.floor(high / np.pi) * np.pi >= low
    return np.where(holds_peak, 1.0, np.maximum(np.abs(np.cos(low)), np.abs(np.cos(high))))


def pair_envelope(rows: np.ndarray, heads: int, head_size: int, layout: str, theta: np.ndarray | None = None,
                  context: int = 0) -> np.ndarray:
    """A bound on each channel of `rows` [tokens at positions 0.., heads * head_size] at every position the
    cache can hold it in. RoPE turns pair (a, b) of token p, seen at angle p theta, into r cos(φ + α) and
    r sin(φ + α) at position q (r = |(a, b)|, α = atan2(b, a), φ = (q - p) theta). Without `theta` the bound
    is r, for every position (the builder's envelope); with each pair's theta and the model's `context`, the
    largest |cos| (|sin|) over q in [0, context): the same r for pairs that turn half a circle within the
    context, tighter for the slow ones, whose worst position the calibration window never reaches. Pairs past
    theta's (partial rotary) do not turn: |x|. An odd head size has no pairs: |rows|."""
    if head_size % 2:
        return np.abs(rows)
    a, b = (m.astype(np.float32) for m in _pairs(rows, heads, head_size, layout))
    radius = np.sqrt(np.square(a) + np.square(b))
    if theta is None:
        return _unpairs(radius, radius, layout)
    turning = min(len(theta), head_size // 2)
    position = np.arange(len(rows), dtype=np.float64)[:, None, None]
    angle = np.arctan2(b[..., :turning], a[..., :turning]).astype(np.float64)
    low, high = -position * theta[:turning], (context - 1 - position) * theta[:turning]
    bound_a, bound_b = np.abs(a), np.abs(b)
    bound_a[..., :turning] = radius[..., :turning] * _largest_cosine(angle + low, angle + high)
    bound_b[..., :turning] = radius[..., :turning] * _largest_cosine(angle - np.pi / 2 + low, angle - np.pi / 2 + high)
    return _unpairs(bound_a, bound_b, layout)


class KVCacheObserver(Observer):
    """One cache tensor (present.N.key or .value, [batch, kv_heads, tokens, head_size]) as token rows of
    kv_heads * head_size channels: their absolute maximum per channel, and, for percentile and mse, up to
    `rows_per_sample` rows of each sample, evenly strided, in float16 (as the builder's calibrator keeps them).
    With `envelope` (K), the rows are RoPE pair norms (`pair_envelope`)."""

    def __init__(self, heads: int, head_size: int, rows_per_sample: int = 0, envelope: str | None = None,
                 theta: np.ndarray | None = None, context: int = 0) -> None:
        super().__init__()
        self.heads, self.head_size = heads, head_size
        self.rows_per_sample = rows_per_sample
        self.envelope, self.theta, self.context = envelope, theta, context
        self.absmax = np.zeros(heads * head_size, dtype=np.float32)
        self.rows: list[np.ndarray] = []

    def reductions(self, graph, value, tag):
        return {"values": _node(graph, "Identity", [value], f"{tag}/values")}

    def update(self, stats) -> None:
        x = np.asarray(stats["values"], dtype=np.float32)
        rows = x.transpose(0, 2, 1, 3).reshape(-1, self.heads * self.head_size)
        if self.envelope is not None:
            rows = pair_envelope(rows, self.heads, self.head_size, self.envelope, self.theta, self.context)
        magnitude = np.abs(rows)
        if not np.isfinite(magnitude).all():
            fail("the float model produced a KV cache value that is not finite on the calibration text; "
                 "re-export the model or calibrate on other text")
        np.maximum(self.absmax, magnitude.max(axis=0), out=self.absmax)
        if self.rows_per_sample:
            picked = np.linspace(0, len(rows) - 1, min(self.rows_per_sample, len(rows))).astype(np.int64)
            self.rows.append(rows[picked].astype(np.float16))


def mse_threshold(samples: np.ndarray, absmax: np.ndarray, qmax: float, candidates: int = 24) -> np.ndarray:
    """Per channel, the clip in [0.2, 1] * absmax whose symmetric round trip (integers clamped to
    [-qmax, qmax - 1]) has the least squared error over `samples` [rows, channels] (the builder's search)."""
    best, best_error = absmax.copy(), np.full(absmax.shape, np.inf, dtype=np.float32)
    for ratio in np.linspace(0.2, 1.0, candidates, dtype=np.float32):
        threshold = np.maximum(absmax * ratio, 1e-6)
        scale = threshold / qmax
        error = np.mean(np.square(np.clip(np.rint(samples / scale), -qmax, qmax - 1) * scale - samples), axis=0)
        better = error < best_error
        best_error, best = np.where(better, error, best_error), np.where(better, threshold, best)
    return best


def cache_scale(observer: KVCacheObserver, dtype: str, granularity: str, method: str, percentile: float) -> np.ndarray:
    """The float32 scale vector of one cache tensor: [1] per tensor, [kv_heads * head_size] per channel."""
    qmax = QMAX[dtype]
    threshold = observer.absmax
    if method != "minmax":
        samples = np.concatenate(observer.rows).astype(np.float32)
        threshold = (np.percentile(np.abs(samples), percentile, axis=0).astype(np.float32) if method == "percentile"
                     else mse_threshold(samples, observer.absmax, qmax))
    if granularity == "per_tensor":
        threshold = threshold.max(keepdims=True)
    return (np.maximum(threshold, 1e-6) / qmax).astype(np.float32)


def write_kv_cache_config(config_path: Path, provider: str) -> None:
    """genai_config.json as the builder writes it for a quantized cache: past and present share one buffer
    on CUDA only (its `past_present_share_buffer = ep == "cuda"`); the cache's dtype and width ORT-GenAI
    reads from the model's inputs. A model with a sliding-window cache (Gemma 2, 3) keeps the shared buffer:
    its GroupQueryAttention refuses an unshared one ("KV cache capacity (0) must be at least
    local_window_size"); shared, tiny Gemma 2 with an int8 cache measured 66640 against float's 66239
    (2 windows of 256, a random model)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    sliding = bool(config["model"]["decoder"].get("sliding_window", {}).get("window_size", 0))
    if provider != "cuda" and not sliding:
        config["search"]["past_present_share_buffer"] = False
    config_path.write_text(json.dumps(config, indent=4), encoding="utf-8")


@dataclass(frozen=True)
class CacheSize:
    bytes_per_token: float  # over all layers, K and V, one sequence
    float_bytes_per_token: float

    def summary(self) -> str:
        return (f"kv_cache_bytes_per_token={self.bytes_per_token:.0f} "
                f"(float32 {self.float_bytes_per_token:.0f}, {self.float_bytes_per_token / self.bytes_per_token:.0f}x smaller)")


def stored_cache_size(folder: GenAIFolder) -> CacheSize:
    """The cache size of a finished folder, from the element type of its first past key input."""
    import onnx

    from onnxquant.passes.quantize_kv_cache import CACHE_TYPES

    graph = onnx.load(str(folder.model_file), load_external_data=False).graph
    past = {value.name: value for value in graph.input}.get(folder.past_names()[0])
    stored = {int(data_type): dtype for dtype, data_type in CACHE_TYPES.items()} | {onnx.TensorProto.FLOAT16: "float16"}
    return cache_size(folder, "float32" if past is None else stored.get(past.type.tensor_type.elem_type, "float32"))


def cache_size(folder: GenAIFolder, dtype: str) -> CacheSize:
    """Bytes of KV cache per token (the scales are per layer, not per token)."""
    width = (folder.head_size + 1) // 2 if dtype == "int4" else folder.head_size
    elements = 2 * folder.num_layers * folder.num_kv_heads
    return CacheSize(elements * width * (1.0 if dtype == "int4" else ELEMENT_BYTES[dtype]),
                     elements * folder.head_size * ELEMENT_BYTES["float32"])
