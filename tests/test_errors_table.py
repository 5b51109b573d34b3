"""The README's Errors table, rows not covered elsewhere: one `error:` line, exit 2, nothing written."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from onnxquant.cli import quantize as quantize_cli
from onnxquant.checkpoint import embedded_gguf_path
from onnxquant.errors import UserError

from conftest import assert_user_error, run_module


@pytest.fixture(scope="module")
def source(tiny_models):
    return tiny_models.onnx("tiny-llama-96")


def _quantize(source, out, *flags):
    return run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
                      "--num_calib_data", "4", "--seq_len", "128", *flags)


def _nothing_beside(out):
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_truncated_gguf(tmp_path):
    data = embedded_gguf_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])  # header intact, last tensor short
    result = run_module("onnxquant.cli.export", "--model_path", str(cut), "--output_path", str(tmp_path / "out"))
    assert_user_error(result, "GGUF", "truncated", "download it again")
    assert _nothing_beside(tmp_path / "out")


def test_corrupt_model_onnx(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    assert_user_error(_quantize(broken, tmp_path / "out"), "not a readable ONNX model")
    assert _nothing_beside(tmp_path / "out")


@pytest.mark.parametrize("content, needle", [(b"", "is empty"), (b"\x00\x01\x02text\x00" * 50, "NUL bytes"),
                                             (b"\xff\xfe\xfa" * 50, "not UTF-8")])
def test_unusable_calibration_text(source, tmp_path, content, needle):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    assert_user_error(_quantize(source, tmp_path / "out", "--calib_data", str(text)), needle)
    assert not (tmp_path / "out").exists()


def test_output_inside_input(source, tmp_path):
    copy = tmp_path / "in"
    shutil.copytree(source, copy)
    before = sorted(p.name for p in copy.iterdir())
    assert_user_error(_quantize(copy, copy / "q"), "overlaps the input")
    assert sorted(p.name for p in copy.iterdir()) == before


def test_rotation_config_that_is_not_json(source, tmp_path):
    config = tmp_path / "r.json"
    config.write_text("{not json")
    assert_user_error(_quantize(source, tmp_path / "out", "--include_rotation", "--r_config_path", str(config)),
                      "is not valid JSON")


def test_missing_rotation_config(source, tmp_path):
    assert_user_error(_quantize(source, tmp_path / "out", "--include_rotation", "--r_config_path", str(tmp_path / "no.json")),
                      "does not exist")


def test_bad_collapse_ratio(source, tmp_path):
    assert_user_error(_quantize(source, tmp_path / "out", "--collapse_ratio", "0.5"), "--collapse_ratio must be above 1")


def test_bad_segment_size(source, tmp_path):
    assert_user_error(_quantize(source, tmp_path / "out", "--segment_mb", "0"), "--segment_mb must be a positive number")


@pytest.mark.parametrize("stride", ["0", "513"])
def test_bad_hessian_token_stride(source, tmp_path, stride):
    assert_user_error(_quantize(source, tmp_path / "out", "--algo", "gptq", "--hessian_token_stride", stride),
                      "--hessian_token_stride must be between 1 and --seq_len")


@pytest.mark.parametrize("flags, message", [(["--include_sq", "--sq_num_calib_data", "0"], "between 1 and --num_calib_data (4)"),
                                           (["--include_sq", "--sq_num_calib_data", "5"], "between 1 and --num_calib_data (4)"),
                                           (["--sq_num_calib_data", "2"], "add --include_sq")])
def test_bad_sq_num_calib_data(source, tmp_path, flags, message):
    assert_user_error(_quantize(source, tmp_path / "out", *flags), "--sq_num_calib_data", message)
    assert _nothing_beside(tmp_path / "out")


def test_unwritable_output_location(source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_user_error(_quantize(source, blocker / "out"), "cannot create the output folder")


def test_disk_too_small_is_refused_before_writing(source, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(UserError, match="needs about .* GB .* free"):
        quantize_cli.main(["--input_model_path", str(source), "--output_model_path", str(tmp_path / "out")])
    assert _nothing_beside(tmp_path / "out")


def test_disk_filling_up_while_writing_leaves_nothing(source, tmp_path):
    # A child whose model writer hits ENOSPC, as a full disk would make it.
    code = ("import errno, onnx_ir, sys; from onnxquant import pipeline; from onnxquant.cli import quantize; from onnxquant.errors import run_cli\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', 'model.onnx.data')\n"
            "pipeline.ir.save = full\n"
            "run_cli(quantize.main, sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "--input_model_path", str(source), "--output_model_path",
                             str(tmp_path / "out"), "--num_calib_data", "4", "--seq_len", "128"], capture_output=True, text=True)
    assert_user_error(result, "disk filled up")
    assert _nothing_beside(tmp_path / "out")


def test_interrupted_run_leaves_no_partial_folder(source, tmp_path):
    # Calibration made slow so that Ctrl-C lands mid-run, after the staging folder exists. The signal is
    # sent once calibration has started.
    out = tmp_path / "out"
    started = tmp_path / "calibration-started"
    # A job started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child restores Python's default handler first.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import sys, time; from onnxquant import pipeline; from onnxquant.cli import quantize; from onnxquant.errors import run_cli\n"
            f"pipeline.run_calibration = lambda *a, **k: (open({str(started)!r}, 'w').close(), time.sleep(60))\n"
            "run_cli(quantize.main, sys.argv[1:])")
    child = subprocess.Popen([sys.executable, "-c", code, "--input_model_path", str(source), "--output_model_path", str(out),
                              "--num_calib_data", "4", "--seq_len", "128", "--include_sq", "--collapse_ratio", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a loaded 2-core machine starts Python and ORT slowly
    while time.time() < deadline and child.poll() is None and not started.exists():
        time.sleep(0.05)
    assert started.exists() and list(tmp_path.glob(".out.partial-*")), ("the run never started writing", child.poll())
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert _nothing_beside(out)


def test_truncated_external_data(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_user_error(run_module("onnxquant.cli.validate", "--model_name_or_path", str(broken)), "is truncated")
