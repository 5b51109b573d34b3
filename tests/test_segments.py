"""Segmented execution (onnxquant.segments): a model cut into pieces gives the whole model's results."""

import hashlib

import numpy as np
import onnx_ir as ir

from onnxquant.calibration import HessianObserver, MovingAverageMinMaxObserver, run_calibration, token_sample_reader
from onnxquant.genai_folder import open_genai_folder
from onnxquant.verification import probe

from conftest import run_module

SMALL_BUDGET = 64 << 10  # bytes: cuts tiny-llama-96 (about 1.2 MB of weights) into many pieces


def _calibrate(folder, activations, samples, budget):
    observations = [(a, HessianObserver()) for a in activations] + [(a, MovingAverageMinMaxObserver(0.01)) for a in activations]
    finished = []
    run = run_calibration(folder.model_file, token_sample_reader(folder.model_file, folder, samples), observations,
                          segment_bytes=budget, on_segment_done=lambda done, segmented: finished.extend(done))
    return observations, run, finished


def test_segmented_calibration_equals_the_whole_model(tiny_models):
    folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    activations = sorted({node.inputs[0].name for node in ir.load(folder.model_file).graph if node.op_type == "MatMul"})
    samples = np.random.default_rng(0).integers(0, 200, size=(3, 48))
    whole, whole_run, _ = _calibrate(folder, activations, samples, 1 << 40)
    pieces, pieces_run, finished = _calibrate(folder, activations, samples, SMALL_BUDGET)
    assert whole_run.segments == 1 and pieces_run.segments >= 4
    assert len(finished) == len(pieces)  # each observation reported done exactly once
    for (_, a), (_, b) in zip(whole, pieces):
        if isinstance(a, HessianObserver):
            np.testing.assert_array_equal(a.sum, b.sum)
            assert a.tokens == b.tokens == 3 * 48
        else:
            assert a.range() == b.range()


def test_segmented_probe_equals_the_whole_model(tiny_models, calib_text_path):
    folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    windows = np.random.default_rng(1).integers(0, 200, size=(2, 64))
    whole = probe(folder.model_file, folder, windows)
    pieces = probe(folder.model_file, folder, windows, segment_bytes=SMALL_BUDGET)
    np.testing.assert_allclose(pieces.nll, whole.nll, rtol=1e-6)
    for a, b in zip(whole.top1, pieces.top1):
        np.testing.assert_array_equal(a, b)


def test_quantize_in_segments_writes_the_same_model(tiny_models, calib_text_path, tmp_path):
    """GPTQ's Hessians spilled to disk per piece, the probe in pieces: the same bytes as one piece."""
    digests = []
    for segment_mb in ("1024", "0.25"):
        out = tmp_path / f"out-{segment_mb}"
        result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                            "--output_model_path", str(out), "--num_calib_data", "4", "--seq_len", "64",
                            "--calib_data", str(calib_text_path), "--config", "INT8_PER_CHANNEL", "--include_rotation",
                            "--include_sq", "--algo", "gptq", "--segment_mb", segment_mb)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("calibration_segments=" in result.stdout) == (segment_mb == "0.25"), result.stdout
        digests.append(hashlib.sha1((out / "model.onnx.data").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
