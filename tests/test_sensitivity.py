import numpy as np
import pytest

from onnxquant.algorithms.sensitivity import matmul_sensitivity
from onnxquant.schemes import SCHEMES
from onnxquant.spec import dequantize_array, quant_params, quantize_array, round_to_nearest


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, 64)).astype(np.float32) * rng.uniform(0.5, 2.0, 64).astype(np.float32)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    return x, w, (x.T @ x).astype(np.float32)


def _relative_error(clean, noisy):
    return float(((noisy - clean) ** 2).sum() / (clean ** 2).sum())


def test_weight_term_equals_the_measured_output_error():
    x, w, h = _layer()
    spec = SCHEMES["INT8_PER_CHANNEL"].weights
    measured = _relative_error(x @ w, x @ round_to_nearest(w, spec).dequantize())
    assert matmul_sensitivity(w, h, len(x), spec, None, None) == pytest.approx(measured, rel=1e-3)


def test_activation_term_models_the_measured_output_error():
    x, w, h = _layer()
    activation_spec = SCHEMES["INT8_PER_CHANNEL"].activations
    value_range = (float(x.min()), float(x.max()))
    scale, zero_point = quant_params(*value_range, activation_spec)
    x_q = dequantize_array(quantize_array(x, scale, zero_point, activation_spec), scale, zero_point)
    weight_spec = SCHEMES["INT8_PER_CHANNEL"].weights
    w_q = round_to_nearest(w, weight_spec).dequantize()
    measured = _relative_error(x @ w, x_q @ w_q)
    # Rounding noise is uniform and independent of x only on average: within 15%.
    assert matmul_sensitivity(w, h, len(x), weight_spec, activation_spec, value_range) == pytest.approx(measured, rel=0.15)
