"""Write an output folder all at once: build it beside the target, rename it into place at the end.

A failed or interrupted run leaves no half-written folder, and the input is never the target. A run
claims its output with a lock file before any work, so two runs never write one folder. Every folder a
run makes beside its output (staging, scratch) carries its owner's pid and start time in its name; a
run killed outright (SIGKILL, the OOM killer) cannot clean up, so the next run into the same place
removes the folders whose owner is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import psutil

from onnxquant.errors import fail

log = logging.getLogger(__name__)

# `<prefix><pid>.<start time in ms>-<random>`: the owner of a leftover folder, read back from its name.
_OWNED_NAME = re.compile(r"^\.(?:onnxquant-(?:scratch|export)-|.+\.(?:partial|replaced)-)(\d+)\.(\d+)-")


def _start_ms(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _owner_tag() -> str:
    return f"{os.getpid()}.{_start_ms(os.getpid())}"


def _owner_alive(pid: int, start_ms: int) -> bool:
    """Whether the process that made a folder or lock still runs (a reused pid has another start time)."""
    started = _start_ms(pid)
    return started is not None and abs(started - start_ms) <= 10


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def remove_stale_leftovers(parent: Path) -> int:
    """Remove the staging and scratch folders in `parent` whose owning run is gone; the bytes freed."""
    freed, count = 0, 0
    if not parent.is_dir():
        return 0
    for entry in parent.iterdir():
        match = _OWNED_NAME.match(entry.name)
        if match is None or not entry.is_dir() or _owner_alive(int(match[1]), int(match[2])):
            continue
        freed += _tree_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        count += 1
    if count:
        log.warning("removed %d folder%s left by killed onnxquant runs in %s (%.1f MB freed)",
                    count, "" if count == 1 else "s", parent, freed / 1e6)
    return freed


@contextlib.contextmanager
def owned_temp_dir(prefix: str, parent: Path) -> Iterator[Path]:
    """A scratch folder in `parent` named after this run, removed when the block ends."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{_owner_tag()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _lock_path(output: Path) -> Path:
    output = Path(output).absolute()
    return output.with_name(f".{output.name}.onnxquant-lock")


@contextlib.contextmanager
def claimed_output(output: Path) -> Iterator[None]:
    """Claim `output` for this run before any work: an exclusive lock file beside it (O_EXCL), so a second run
    into the same folder is refused naming the first; a lock whose owner is gone is taken over. On the way,
    folders left beside `output` by killed runs are removed."""
    output = Path(output).absolute()
    existing = output.parent
    while not existing.exists():
        existing = existing.parent
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the output folder in {output.parent} ({exc.strerror}); choose a writable location")
    lock = _lock_path(output)
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid, start = (int(x) for x in lock.read_text().split())
            except (OSError, ValueError):
                pid, start = 0, 0  # a lock cut short by a kill before its owner wrote it
            if pid and _owner_alive(pid, start):
                fail(f"output folder {output} is being written by another onnxquant run (pid {pid}); wait for it to "
                     "finish or choose another output folder")
            lock.unlink(missing_ok=True)
        except OSError as exc:
            fail(f"cannot create the output folder in {output.parent} ({exc.strerror}); choose a writable location")
    else:
        fail(f"output folder {output} is being claimed by another onnxquant run; choose another output folder")
    try:
        os.write(descriptor, f"{os.getpid()} {_start_ms(os.getpid())}\n".encode())
        os.close(descriptor)
        remove_stale_leftovers(output.parent)
        yield
    finally:
        lock.unlink(missing_ok=True)
        # Folders made above for a run that wrote nothing go again; ones that were there stay.
        made = output.parent
        while made != existing and made.is_dir() and not any(made.iterdir()):
            made.rmdir()
            made = made.parent


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


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), None off Linux."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def staged_output_dir(output: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `output`; on success it replaces `output`, on failure it is removed."""
    output = Path(output).absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{_owner_tag()}-", dir=output.parent))
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
        backup = output.with_name(f".{output.name}.replaced-{_owner_tag()}-0")
        output.rename(backup)
    staging.rename(output)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
