"""How long an actor worked (roles that overlap in wall time report their own busy seconds),
and the most memory it held."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class BusyClock:
    """Mixin: `with self.busy():` around work; `take_busy_seconds()` returns the seconds
    since the last call and starts again from zero."""

    _busy_seconds = 0.0

    @contextmanager
    def busy(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._busy_seconds += time.perf_counter() - start

    def take_busy_seconds(self) -> float:
        seconds, self._busy_seconds = self._busy_seconds, 0.0
        return seconds

    def peak_memory_gb(self) -> dict[str, float]:
        """The process's peak resident memory and, on a GPU, torch's peak allocation."""
        import resource
        import sys

        import torch

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
        peak = {"rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}
        if torch.cuda.is_available():
            peak["gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return peak
