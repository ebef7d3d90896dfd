"""Completion of one client request that waits on several parts (local disk, peer)."""

from __future__ import annotations

import threading
from typing import Callable


class Completion:
    """Calls `done(errno)` once every part has finished; the first error wins.

    Parts are added before they can finish (add_part), so the count never reaches zero
    early; the creator holds one part of its own and finishes it last (part_done).
    """

    __slots__ = ("_done", "_parts", "_error", "_lock")

    def __init__(self, done: Callable[[int], None]) -> None:
        self._done = done
        self._parts = 1  # the creator's own part
        self._error = 0
        self._lock = threading.Lock()

    def add_part(self) -> None:
        with self._lock:
            self._parts += 1

    def part_done(self, error: int = 0) -> None:
        with self._lock:
            if error and not self._error:
                self._error = error
            self._parts -= 1
            finished = self._parts == 0
        if finished:
            self._done(self._error)

    def acked(self, _delivered: bool) -> None:
        """LinkService on_acked callback: the peer's part is in (or the peer is gone)."""
        self.part_done(0)
