"""Running an ORT-GenAI decoder graph directly in ONNX Runtime (prefill from an empty KV cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxquant.genai_folder import GenAIFolder

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                 "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or usable_cores()
    return options


def make_session(model: str | Path | bytes, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options or session_options(), providers=["CPUExecutionProvider"])


def input_specs(session: ort.InferenceSession) -> list[tuple[str, type]]:
    """(name, numpy dtype) of each graph input."""
    return [(arg.name, _ORT_TO_NUMPY[arg.type]) for arg in session.get_inputs()]


def prefill_feeds(specs: list[tuple[str, type]], folder: GenAIFolder, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one prefill of `ids` [batch, seq]: the graph's real inputs with an empty past.

    Past key/values have the shapes genai_config.json gives, with a past length of zero; a model
    with a sliding window gets a zero-filled static cache of `kv_capacity` instead (ORT's
    GroupQueryAttention requires one at least as long as the window).
    """
    batch, seq = ids.shape
    past = set(folder.past_names())
    feeds = {}
    for name, dtype in specs:
        if name == "input_ids":
            feeds[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif name in past:
            capacity = folder.kv_capacity(seq) if folder.sliding_window else 0
            # A quantized int4 cache (uint8) packs two values per byte (onnxquant.passes.quantize_kv_cache).
            width = (folder.head_size + 1) // 2 if dtype == np.uint8 else folder.head_size
            feeds[name] = np.zeros((batch, folder.num_kv_heads, capacity, width), dtype=dtype)
        else:
            raise ValueError(f"unexpected graph input {name!r}; the folder is not an ORT-GenAI decoder")
    return feeds
