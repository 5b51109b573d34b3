"""Write an output folder all at once: build it beside the target, rename it into place at the end.

A failed or interrupted run leaves no half-written folder, and the input is never the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from onnxquant.errors import fail


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output_dir(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that is (or holds, or lies inside) an input, or that already has files."""
    for source in inputs:
        if _same_or_inside(output, source) or _same_or_inside(source, output):
            fail(f"output path {output} overlaps the input {source}; choose a new folder for the output")
    if output.exists() and not output.is_dir():
        fail(f"output path {output} exists and is not a folder; choose a new folder for the output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        fail(f"output folder {output} exists and is not empty; choose a new folder or pass --overwrite")


def require_free_space(output: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start when the output's file system has less room than the run will write."""
    parent = Path(output).absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        fail(f"{what} needs about {needed_bytes / 1e9:.1f} GB in {parent} but only {free / 1e9:.1f} GB are free; "
             "free some space or choose another output location")


@contextlib.contextmanager
def staged_output_dir(output: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `output`; on success it replaces `output`, on failure it is removed."""
    output = Path(output).absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as exc:
        fail(f"cannot create the output folder in {output.parent} ({exc.strerror}); choose a writable location")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if output.exists():
        backup = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        output.rename(backup)
    staging.rename(output)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
