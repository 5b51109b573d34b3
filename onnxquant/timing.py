"""Where a quantize run's wall time went, phase by phase (printed as one `time:` line)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class PhaseTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        return phase_summary(self.seconds)


def phase_summary(seconds: dict[str, float]) -> str:
    """`time: phase=seconds ...`, phases under 1% of the total left out."""
    floor = 0.01 * sum(seconds.values())
    return "time: " + " ".join(f"{name}={value:.2g}s" if value < 1 else f"{name}={value:.1f}s"
                               for name, value in seconds.items() if value >= floor)
