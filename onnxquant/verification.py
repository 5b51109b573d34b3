"""Built-in checks of a quantize run against the float model it started from.

A probe runs a model over a few held-out windows of the calibration text in plain ONNX Runtime
and keeps, per window, the mean NLL, the top-1 token at every position and the full logits at a
few sampled positions. Comparing probes gives:
- exactness of the float graph passes (rotation, smoothing, Hadamard groups): max |delta logit| / max |logit| at the
  sampled positions, which must stay below EXACT_TOLERANCE;
- for the quantized model: top-1 agreement with the float model and a quick perplexity, which the
  collapse guard compares with the float model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxquant.errors import UserError, fail
from onnxquant.calibration import graph_input_specs
from onnxquant.genai_folder import GenAIFolder
from onnxquant.runtime import prefill_feeds, session_options
from onnxquant.segments import DEFAULT_SEGMENT_MB, SegmentedModel
from onnxquant.evaluation import OrtBackend, exp_or_inf, window_nll

# Float32 rotations and smoothing measured 3e-6 (R1) to 2e-5 (R1 + SmoothQuant) on SmolLM2; an
# inexact pass (a wrong pair, a missed reader) moves logits by whole units.
EXACT_TOLERANCE = 1e-3
# Quick-perplexity ratio (quantized / float) above which the result counts as collapsed. Measured on SmolLM2
# (4 held-out windows of 512): worst README recipe INT8_SYMMETRIC_ACT 2.22, R1 + SmoothQuant alpha 0.8 3.05,
# SmoothQuant alpha 0.8 without R1 19.5, alpha 0.9 153 (README, Verification).
DEFAULT_COLLAPSE_RATIO = 2.5
SAMPLED_POSITIONS = 32


class CollapsedModelError(UserError):
    """The quantized model's quick perplexity is far above the float model's; nothing was written."""

    exit_code = 3


@dataclass(frozen=True)
class Probe:
    nll: tuple[float, ...]
    top1: tuple[np.ndarray, ...]
    sampled_logits: tuple[np.ndarray, ...]

    @property
    def perplexity(self) -> float:
        return exp_or_inf(float(np.mean(self.nll)))


def held_out_windows(ids: np.ndarray, used: int, seq_len: int, count: int) -> tuple[np.ndarray, bool]:
    """`count` windows of `seq_len` tokens after the first `used` ones; (windows, held_out).

    When the text has no room after the calibration samples, its last windows are used instead and
    `held_out` is False (they were also calibrated on).
    """
    available = len(ids) // seq_len
    if available == 0:
        fail(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len} to verify on; "
             "give more text or pass --collapse_ratio 0 without --verify")
    start = min(used, max(available - count, 0))
    stop = min(start + count, available)
    return ids[start * seq_len: stop * seq_len].reshape(-1, seq_len), start >= used


def probe(model_file: Path, folder: GenAIFolder, windows: np.ndarray, segment_bytes: int = DEFAULT_SEGMENT_MB << 20) -> Probe:
    """The probe of `model_file` on `windows`; a model with more than `segment_bytes` of weights runs in
    segments (onnxquant.segments), so the float input of a large model is never loaded whole."""
    positions = np.unique(np.linspace(0, windows.shape[1] - 2, SAMPLED_POSITIONS).astype(int))
    nll, top1, sampled = [], [], []

    def record(window: np.ndarray, logits: np.ndarray) -> None:
        top1.append(logits[:-1].argmax(axis=-1))
        sampled.append(logits[positions].copy())
        nll.append(window_nll(logits, window))

    model = onnx.load(str(model_file), load_external_data=False)
    logits_output = [output for output in model.graph.output if output.name == "logits"]
    del model.graph.output[:]
    model.graph.output.extend(logits_output)
    segmented = SegmentedModel(model, model_file.parent, segment_bytes)
    if len(segmented.segments) == 1:
        backend = OrtBackend(folder, model_file)
        for window in windows:
            record(window, backend.logits(window))
        del backend
    else:
        specs = graph_input_specs(model_file)
        feeds = [prefill_feeds(specs, folder, window.reshape(1, -1)) for window in windows]
        segmented.run(feeds, session_options(), lambda number, outputs: record(windows[number], outputs["logits"][0]),
                      desc="verify", total=len(windows))
    return Probe(tuple(nll), tuple(top1), tuple(sampled))


def relative_error(reference: Probe, candidate: Probe) -> float:
    peak = max(float(np.abs(a).max()) for a in reference.sampled_logits)
    return max(float(np.abs(a - b).max()) for a, b in zip(reference.sampled_logits, candidate.sampled_logits)) / peak


def top1_agreement(reference: Probe, candidate: Probe) -> float:
    matches = sum(int((a == b).sum()) for a, b in zip(reference.top1, candidate.top1))
    return matches / sum(len(a) for a in reference.top1)


class Int8ActivationError(UserError):
    """The result's int8 activations (accuracy_level 4) change its tokens beyond the recipe's bound; nothing was written."""

    exit_code = 3


def int8_activation_message(report: Int8ActivationReport, min_agreement: float, max_kl: float, windows: int) -> str:
    return (f"accuracy_level 4 (int8 activations at run time, {report.nodes} MatMulNBits) changes the model's tokens: "
            f"top-1 agreement {report.agreement:.3f} with the same weights at level 0 (bound {min_agreement:g}), mean KL "
            f"{report.kl_mean:.4f} (bound {max_kl:g}) on {windows} verification windows; quantize with accuracy_level 0 "
            "(--accuracy_level 0), or an override with accuracy_level: 0 for the layers with outlier activations; "
            "nothing was written (verify.allow_degraded keeps it)")


class InexactPassError(UserError):
    """A float graph pass changed the model's logits; nothing was written. A bug, not a user mistake."""

    exit_code = 4


def check_exact(stage: str, reference: Probe, candidate: Probe) -> float:
    error = relative_error(reference, candidate)
    if not error <= EXACT_TOLERANCE:
        raise InexactPassError(f"the {stage} stage changed the float model's logits by {error:.2e} (relative, limit "
                               f"{EXACT_TOLERANCE:g}), so it is not exact; nothing was written; please report this "
                               "with the command line")
    return error


def mean_kl_divergence(reference: Probe, candidate: Probe) -> float:
    """Mean KL(reference || candidate) of the token distributions at the sampled positions (nats)."""
    total, count = 0.0, 0
    for a, b in zip(reference.sampled_logits, candidate.sampled_logits):
        log_p = a - np.logaddexp.reduce(a.astype(np.float64), axis=-1, keepdims=True)
        log_q = b - np.logaddexp.reduce(b.astype(np.float64), axis=-1, keepdims=True)
        total += float((np.exp(log_p) * (log_p - log_q)).sum())
        count += len(a)
    return total / count


INT8_ACTIVATIONS_LEVEL = 4  # MatMulNBits' accuracy_level that quantizes its input to int8 per block at run time


def at_level_zero(model_file: Path) -> Path:
    """A copy of `model_file`'s graph beside it (the same external data) with every MatMulNBits at accuracy_level 0:
    the same weights with float activations."""
    model = onnx.load(str(model_file), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
    twin = model_file.with_name(f"{model_file.stem}.level0{model_file.suffix}")
    onnx.save(model, str(twin))
    return twin


def int8_activation_nodes(model_file: Path) -> int:
    """How many MatMulNBits of the model quantize their activations (accuracy_level 4)."""
    model = onnx.load(str(model_file), load_external_data=False)
    return sum(1 for node in model.graph.node if node.op_type == "MatMulNBits" and any(
        a.name == "accuracy_level" and a.i == INT8_ACTIVATIONS_LEVEL for a in node.attribute))


@dataclass(frozen=True)
class Int8ActivationReport:
    """The result against the same weights with float activations, on the verification windows."""

    nodes: int  # MatMulNBits at accuracy_level 4
    agreement: float  # top-1 agreement
    kl_mean: float  # mean KL divergence at the sampled positions (nats)

    def summary(self) -> str:
        return f"int8_activations: {self.nodes} nodes, top1_agreement={self.agreement:.3f} kl_mean={self.kl_mean:.4f} vs level 0"


@dataclass(frozen=True)
class QualityReport:
    float_ppl: float
    quant_ppl: float
    agreement: float
    held_out: bool

    @property
    def ratio(self) -> float:
        return self.quant_ppl / self.float_ppl

    def summary(self) -> str:
        where = "held-out" if self.held_out else "calibration"
        return (f"verify_ppl={self.quant_ppl:.3f} float_ppl={self.float_ppl:.3f} ratio={self.ratio:.3f} "
                f"top1_agreement={self.agreement:.3f} ({where} windows)")


def collapse_message(report: QualityReport, limit: float, scheme_name: str, smoothing: bool) -> str:
    hints = []
    if smoothing:
        hints.append("a smaller --sq_alpha (0.5)")
    if "SYMMETRIC_ACT" in scheme_name or scheme_name == "INT8_TRANSFORMER_DEFAULT":
        hints.append("--include_rotation --include_sq, or INT8_PER_CHANNEL")
    hints.append("--exclude for the most sensitive layers (e.g. lm_head, down_proj)")
    if not math.isfinite(report.ratio):
        return (f"the quantized model collapsed: its quick perplexity is {report.quant_ppl} (its logits are not finite) "
                f"against the float model's {report.float_ppl:.2f}; try {', or '.join(hints)}; nothing was written")
    return (f"the quantized model collapsed: quick perplexity {report.quant_ppl:.2f} is {report.ratio:.1f}x the float "
            f"model's {report.float_ppl:.2f} (limit {limit:g}x); try {', or '.join(hints)}; nothing was written "
            f"(--allow_degraded keeps it, --collapse_ratio changes the limit)")


class RunVerifier:
    """Probes the float input once, then checks each float checkpoint (--verify) and the result."""

    def __init__(self, folder: GenAIFolder, windows: np.ndarray, held_out: bool, exact_checks: bool,
                 segment_bytes: int = DEFAULT_SEGMENT_MB << 20):
        self.folder = folder
        self.windows = windows
        self.held_out = held_out
        self.exact_checks = exact_checks
        self.segment_bytes = segment_bytes
        self.reference = self._probe(folder.model_file)
        self.exact_errors: dict[str, float] = {}
        self.last_probe: tuple[Path, Probe] | None = None

    def after_stage(self, stage: str, model_file: Path) -> None:
        if self.exact_checks:
            self.exact_errors[stage] = check_exact(stage, self.reference, self._probe(model_file))

    def quality(self, model_file: Path) -> QualityReport:
        result = self._probe(model_file)
        self.last_probe = (model_file, result)
        return QualityReport(self.reference.perplexity, result.perplexity, top1_agreement(self.reference, result),
                             self.held_out)

    def int8_activations(self, model_file: Path) -> Int8ActivationReport | None:
        """`model_file` (its MatMulNBits at accuracy_level 4) against itself at level 0; None when no node is at 4.
        ORT's level-4 kernels quantize each block of the input to int8 at run time, which a large activation
        outlier turns into wrong tokens (onnxruntime #29849)."""
        nodes = int8_activation_nodes(model_file)
        if not nodes:
            return None
        last = self.last_probe
        result = last[1] if last is not None and last[0] == model_file else self._probe(model_file)
        twin = at_level_zero(model_file)
        try:
            float_activations = self._probe(twin)
        finally:
            twin.unlink()
        return Int8ActivationReport(nodes, top1_agreement(float_activations, result),
                                    mean_kl_divergence(float_activations, result))

    def _probe(self, model_file: Path) -> Probe:
        return probe(model_file, self.folder, self.windows, self.segment_bytes)

    def summary(self) -> str:
        return " ".join(f"exact_{stage}={error:.1e}" for stage, error in self.exact_errors.items())
