"""Perplexity of the original PyTorch model on the same windows, to check the ONNX export against.

Needs the `export` extra (torch, transformers).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from onnxquant.checkpoint import ModelSource, gguf_to_hf_folder


def load_torch_model(source: ModelSource):
    import torch
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        with tempfile.TemporaryDirectory(prefix="onnxquant-torch-ref-") as tmp:
            gguf_to_hf_folder(source.path, Path(tmp))
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    return model.eval()


def torch_block_nll(model, windows: np.ndarray) -> list[float]:
    import torch

    nlls = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.from_numpy(window.astype(np.int64)).reshape(1, -1)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
            nlls.append(float(nll))
    return nlls


def torch_perplexity(model, windows: np.ndarray) -> float:
    return math.exp(float(np.mean(torch_block_nll(model, windows))))
