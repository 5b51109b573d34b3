"""Run a Python module or script and write its peak RSS in MB (its own children included) to a file.

    python -m onnxquant.benchmark.peak_rss REPORT -m MODULE ARGS...
    python -m onnxquant.benchmark.peak_rss REPORT SCRIPT ARGS...

onnxquant.benchmark.run runs every child through this: the ru_maxrss that os.wait4 gives for a child
includes the parent's RSS at fork (Linux keeps the high-water mark of the image exec replaced), so
every child of the benchmark process looked at least as big as the benchmark process itself.
"""

from __future__ import annotations

import atexit
import resource
import runpy
import sys
from pathlib import Path

from onnxquant.memory import peak_rss_mb


def main() -> None:
    report, target, *rest = sys.argv[1:]

    def write_report() -> None:
        # Children forked from this small process inherit only its small RSS, so their maxima are true.
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        Path(report).write_text(f"{max(peak_rss_mb(), children):.1f}\n")

    atexit.register(write_report)
    if target == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        sys.path.insert(0, str(Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
