"""Peak memory of this process, importable without onnxruntime or numpy (tools/peak_rss.py loads it
before the program it measures)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set in MB since it started (exec), not counting its parent.

    `getrusage(...).ru_maxrss` also keeps the high-water mark of the process image an exec
    replaced, i.e. the parent's RSS at fork: a child of a 1 GB benchmark process reports at least
    1 GB. The kernel's per-image counter (VmHWM) does not.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
