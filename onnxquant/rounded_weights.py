"""Rounded weights kept on disk, keyed by (node, grid): rounded once, read back when asked for again."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np

from onnxquant.spec import QuantizedWeight, QuantSpec


class CachedRounder:
    """A weight rounder that keeps every rounded weight (pickled under `folder`), so a node asked for in a
    format it had before is read back instead of rounded again (GPTQ included): a mixed-precision search's
    later points, and the write after sequential calibration rounded every weight (`put`). Misses go to
    `inner`."""

    def __init__(self, folder: Path, inner=None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[tuple[str, QuantSpec], Path] = {}
        self.inner = inner
        self.lock = threading.Lock()  # weights are rounded on several threads (emitters.RoundingAhead)

    def __contains__(self, key: tuple[str, QuantSpec]) -> bool:
        return key in self.files

    def put(self, node_name: str, spec: QuantSpec, rounded: QuantizedWeight) -> None:
        with self.lock:
            path = self.folder / f"{len(self.files)}.pkl"
            self.files[(node_name, spec)] = path
        with path.open("wb") as handle:
            pickle.dump(rounded, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def __call__(self, node_name: str, weight: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        path = self.files.get((node_name, spec))
        if path is not None:
            with path.open("rb") as handle:
                return pickle.load(handle)
        rounded = self.inner(node_name, weight, spec)
        self.put(node_name, spec, rounded)
        return rounded
