"""The resync rate controller (pure: time is passed in).

A resync must not starve the application: while the application writes, the resync
goes at most at `busy_rate`; when the application has been quiet for `quiet_after`
seconds it speeds up to `max_rate` (None: as fast as the link and the peer allow).
The controller answers one question per chunk: how long to wait before sending it.
"""

from __future__ import annotations

DEFAULT_BUSY_RATE = 32 << 20  # bytes/s while the application writes, when no max is set
BUSY_FRACTION = 0.25  # of max_rate while the application writes
QUIET_AFTER = 0.2  # seconds without an application write before speeding up


class RateController:
    def __init__(self, max_rate: int | None = None, busy_rate: int | None = None,
                 quiet_after: float = QUIET_AFTER) -> None:
        self.max_rate = max_rate
        if busy_rate is None:
            busy_rate = int(max_rate * BUSY_FRACTION) if max_rate else DEFAULT_BUSY_RATE
        self.busy_rate = max(1, busy_rate)
        self.quiet_after = quiet_after
        self._next = None  # earliest time the next chunk may go

    def rate(self, now: float, last_app_write: float | None) -> int | None:
        """The rate that applies now (None: unlimited)."""
        busy = last_app_write is not None and now - last_app_write < self.quiet_after
        return self.busy_rate if busy else self.max_rate

    def delay(self, now: float, nbytes: int, last_app_write: float | None) -> float:
        """Seconds to wait before sending `nbytes` of resync data at `now`."""
        rate = self.rate(now, last_app_write)
        if rate is None:
            self._next = None
            return 0.0
        start = now if self._next is None or self._next < now else self._next
        self._next = start + nbytes / rate
        return start - now
