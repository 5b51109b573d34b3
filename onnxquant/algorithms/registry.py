"""Weight algorithms by name: how a weight is rounded onto its grid, and what it needs from calibration.

A weight algorithm is registered once (`register`) and then named in recipes (`algorithm: {name: ...}`),
per node in overrides too. The quantize stage reads only this protocol:
- `prepare(hessian, settings)`: what the algorithm needs of one input's calibration Hessian, computed once
  for all the weights that read that input (None: the algorithm needs no Hessian, and none is gathered);
- `round(weight, spec, prepared, settings)`: the [K, N] weight rounded onto `spec`'s grid;
- `folds_scales`: it folds per-channel scales into each input's producer before rounding (AWQ), which
  needs each input's mean |x| as well.
A new algorithm is one module that calls `register`, and one line in `_MODULES` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from onnxquant.spec import QuantizedWeight, QuantSpec


@dataclass(frozen=True)
class WeightAlgorithm:
    name: str
    summary: str
    round: Callable[[np.ndarray, QuantSpec, Any, Any], QuantizedWeight]  # (weight, spec, prepared, settings)
    prepare: Callable[[np.ndarray, Any], Any] | None = None  # (hessian, settings) -> prepared; None: no Hessian
    folds_scales: bool = False

    @property
    def needs_hessians(self) -> bool:
        return self.prepare is not None


_REGISTRY: dict[str, WeightAlgorithm] = {}
_MODULES = ("onnxquant.algorithms.rtn", "onnxquant.algorithms.gptq", "onnxquant.algorithms.awq",
            "onnxquant.algorithms.mse")


def register(algorithm: WeightAlgorithm) -> WeightAlgorithm:
    if algorithm.name in _REGISTRY and _REGISTRY[algorithm.name] is not algorithm:
        raise ValueError(f"weight algorithm {algorithm.name!r} is registered twice")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def algorithms() -> dict[str, WeightAlgorithm]:
    """Every registered weight algorithm, by name."""
    for module in _MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def get_algorithm(name: str) -> WeightAlgorithm:
    known = algorithms()
    if name not in known:
        raise ValueError(f"unknown weight algorithm {name!r}; known: {', '.join(known)}")
    return known[name]
