from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onnxquant.data import EMBEDDED_SPLITS, WIKITEXT_CALIB_FILE, WIKITEXT_TEST_FILE, embedded_bytes, find_local_wikitext_dir


@pytest.fixture(scope="session")
def embedded_wikitext_dir(tmp_path_factory) -> Path:
    """The package's embedded WikiText-2 files written out byte for byte, so the suite needs nothing outside the clone."""
    folder = tmp_path_factory.mktemp("wikitext-2")
    for name in EMBEDDED_SPLITS.values():
        (folder / name).write_bytes(embedded_bytes(name))
    return folder


@pytest.fixture(scope="session")
def outside_wikitext_dir() -> Path:
    """An outside copy of WikiText-2 ($ONNXQUANT_WIKITEXT_DIR or shared/data/wikitext-2 beside the checkout), for
    the byte-for-byte check of the embedded one; the tests that need it skip without it."""
    found = find_local_wikitext_dir()
    if found is None:
        pytest.skip("no outside WikiText-2 copy: set ONNXQUANT_WIKITEXT_DIR or put shared/data/wikitext-2 beside the checkout")
    return found


@pytest.fixture(scope="session")
def test_text_path(embedded_wikitext_dir) -> Path:
    return embedded_wikitext_dir / WIKITEXT_TEST_FILE


@pytest.fixture(scope="session")
def calib_text_path(embedded_wikitext_dir) -> Path:
    return embedded_wikitext_dir / WIKITEXT_CALIB_FILE


@pytest.fixture(scope="session")
def test_text(test_text_path) -> str:
    return test_text_path.read_text(encoding="utf-8")


class _TinyModels:
    """Builds each tiny recipe's HF checkpoint and ORT-GenAI export once per session."""

    def __init__(self, root: Path):
        self.root = root

    def hf(self, name: str) -> Path:
        from onnxquant.tiny_models import build_tiny_model

        path = self.root / name
        if not path.exists():
            build_tiny_model(name, path)
        return path

    def onnx(self, name: str) -> Path:
        from onnxquant.checkpoint import resolve_model_source
        from onnxquant.exporter import export_model

        path = self.root / f"{name}-onnx"
        if not path.exists():
            export_model(resolve_model_source(str(self.hf(name))), path)
        return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> _TinyModels:
    return _TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct exported once for the whole session (about 45 s)."""
    from onnxquant.checkpoint import resolve_model_source
    from onnxquant.exporter import export_model

    path = tmp_path_factory.mktemp("smollm2") / "fp32"
    export_model(resolve_model_source(None), path)
    return path


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one `error:` line naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def prefill_logits(folder_path: Path, ids):
    from onnxquant.genai_folder import open_genai_folder
    from onnxquant.runtime import input_specs, make_session, prefill_feeds

    folder = open_genai_folder(folder_path)
    session = make_session(folder.model_file)
    return session.run(["logits"], prefill_feeds(input_specs(session), folder, ids.reshape(1, -1)))[0]


def relative_logit_error(reference, candidate) -> float:
    """max |candidate - reference| / max |reference|."""
    import numpy as np

    return float(np.abs(candidate - reference).max() / np.abs(reference).max())


def float_pass_run(source: Path, out: Path, calib_text_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`quantize --skip_quantization` with `flags`, a few short calibration samples."""
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
                      "--skip_quantization", "--calib_data", str(calib_text_path), "--num_calib_data", "4",
                      "--seq_len", "128", "--overwrite", *flags)


def assert_float_pass_exact(source: Path, out: Path, calib_text_path: Path, test_text: str, *flags: str,
                            tokens: int = 256) -> subprocess.CompletedProcess:
    """`quantize --skip_quantization` with `flags` succeeds and leaves the logits of the first
    `tokens` test tokens within 1e-4 (relative) of the source model's."""
    from onnxquant.data import tokenize

    result = float_pass_run(source, out, calib_text_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = tokenize(source, test_text[:3000])[:tokens]
    assert relative_logit_error(prefill_logits(source, ids), prefill_logits(out, ids)) < 1e-4
    return result
