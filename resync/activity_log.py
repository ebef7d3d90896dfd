"""The activity log: which coarse extents of the volume may have writes in flight.

Before a primary writes to an extent that is not already active, the extent is recorded
as active on disk (a synchronous metadata write); while an extent stays active, further
writes to it cost nothing extra.  After a crash, every extent the log names is treated
as out of sync, so writes that were in flight - on the local disk but perhaps not on the
peer's - are resynced (invariant 1).  This is DRBD's activity log / HAST's activemap.

An extent may leave the log only when no write to it is in flight any more; before it
leaves, the bitmap pages covering it must be on disk (the daemon does that), so its
marked blocks stay known after the log forgets it.  The log holds at most `capacity`
extents and evicts the least recently used idle one.

Pure bookkeeping: the daemon writes the records (resync/metadata.py encodes them).
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_EXTENT = 4 << 20
DEFAULT_CAPACITY = 900  # extents per on-disk record (4 KiB): 3.5 GiB of hot data


class ActivityLogFull(Exception):
    """Every extent in the log has writes in flight: the caller must wait."""


class ActivityLog:
    def __init__(self, extent: int = DEFAULT_EXTENT, capacity: int = DEFAULT_CAPACITY,
                 active: list[int] | None = None) -> None:
        if extent <= 0 or extent & (extent - 1):
            raise ValueError("extent size must be a power of two")
        self.extent = extent
        self.capacity = capacity
        self._lru: OrderedDict[int, int] = OrderedDict()  # extent -> writes in flight
        for number in active or ():
            self._lru[number] = 0

    def extents_of(self, offset: int, length: int) -> range:
        return range(offset // self.extent, (offset + max(length, 1) - 1) // self.extent + 1)

    @property
    def active(self) -> list[int]:
        return list(self._lru)

    def begin(self, offset: int, length: int) -> tuple[list[int], list[int]]:
        """Account a write starting on the range.

        Returns (added, evicted): the extents that became active and those that left to
        make room.  When `added` is not empty, the caller must write the new log record
        (after writing out the bitmap pages of `evicted`) before the write goes to disk.
        Raises ActivityLogFull (and changes nothing) when no room can be made.
        """
        mine = self.extents_of(offset, length)
        wanted = [e for e in mine if e not in self._lru]
        room = self.capacity - len(self._lru)
        evicted: list[int] = []
        if len(wanted) > room:
            # Never evict an extent of this very write: it would come straight back.
            idle = [e for e, busy in self._lru.items() if busy == 0 and e not in mine]
            need = len(wanted) - room
            if len(idle) < need:
                raise ActivityLogFull(f"{len(self._lru)} extents busy")
            evicted = idle[:need]
        for e in evicted:
            del self._lru[e]
        for e in mine:
            self._lru[e] = self._lru.get(e, 0) + 1
            self._lru.move_to_end(e)
        return wanted, evicted

    def end(self, offset: int, length: int) -> None:
        """A write on the range is complete everywhere it has to be."""
        for e in self.extents_of(offset, length):
            busy = self._lru.get(e)
            if busy:
                self._lru[e] = busy - 1

    def busy(self) -> int:
        return sum(self._lru.values())

    def reset(self) -> None:
        """Forget every extent (after their blocks were marked in a bitmap on disk)."""
        self._lru.clear()
