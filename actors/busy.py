"""How long an actor worked: roles that overlap in wall time report their own busy seconds."""

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
