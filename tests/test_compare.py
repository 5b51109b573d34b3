"""`validate --compare`: KL divergence and agreement of a model against its float model."""

import math

import numpy as np

from onnxquant.evaluation import token_divergence

from conftest import run_module


def test_token_divergence_matches_the_definition():
    reference = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    candidate = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.2, 0.7]]))
    kl, agree, delta = token_divergence(reference, candidate, np.array([0, 2]))
    expected = [sum(p * math.log(p / q) for p, q in zip(ps, qs))
                for ps, qs in ([(0.7, 0.2, 0.1), (0.5, 0.4, 0.1)], [(0.1, 0.1, 0.8), (0.1, 0.2, 0.7)])]
    assert np.allclose(kl, expected, rtol=1e-9)
    assert agree.tolist() == [True, True]
    assert np.allclose(delta, [0.5 - 0.7, 0.7 - 0.8])


def test_a_model_against_itself_has_no_divergence(tiny_models):
    import onnxquant

    folder = tiny_models.onnx("tiny-llama-96")
    result = onnxquant.compare(folder, folder, block_size=128, max_blocks=2, progress=False)
    assert result.kl_max < 1e-9 and result.top1_agreement == 1.0 and result.perplexity == result.reference_perplexity
    assert result.tokens == 2 * 127


def test_validate_compare_prints_the_statistics(tiny_models, tmp_path):
    import onnxquant
    from onnxquant.recipes import CalibrationData

    folder = tiny_models.onnx("tiny-llama-96")
    onnxquant.quantize(folder, tmp_path / "q", "w4a16", calibration=CalibrationData(samples=4, seq_len=128))
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(tmp_path / "q"), "--compare", str(folder),
                        "--block_size", "128", "--max_blocks", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    fields = dict(item.split("=") for item in result.stdout.split())
    assert float(fields["kl_mean"]) > 0 and float(fields["kl_max"]) >= float(fields["kl_p99"]) >= float(fields["kl_median"])
    assert 0 < float(fields["top1_agreement"]) < 1
