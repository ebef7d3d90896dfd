"""Resync progress: bytes done of a total, a smoothed rate and an ETA."""

from __future__ import annotations

import time
from typing import Callable

RATE_WINDOW = 2.0  # seconds the rate estimate averages over


class SyncProgress:
    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.clock = clock
        self.started = clock()
        self._mark_time = self.started
        self._mark_done = 0
        self.rate = 0.0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        elapsed = now - self._mark_time
        if elapsed >= 0.25:
            sample = (self.done - self._mark_done) / elapsed
            weight = min(1.0, elapsed / RATE_WINDOW)
            self.rate = sample if self.rate == 0 else self.rate + weight * (sample - self.rate)
            self._mark_time, self._mark_done = now, self.done

    @property
    def left(self) -> int:
        return max(0, self.total - self.done)

    def as_dict(self) -> dict:
        rate = self.rate
        if rate == 0 and self.done:
            elapsed = self.clock() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.left / rate if rate > 0 else None
        return {"percent": round(percent, 1), "bytes_per_s": int(rate),
                "eta_s": round(eta, 1) if eta is not None else None,
                "done_bytes": self.done, "total_bytes": self.total}
