"""A set of integers kept as sorted, disjoint, non-touching half-open ranges.

Both ends of the reliable stream need it: the receiver records which out-of-order
sequence numbers it holds (and reports them as selective-ack ranges), the sender records
which it has seen selectively acknowledged, so that each ack costs work only for what is
new in it.  Ranges are few (one per hole in the window), so two sorted lists and bisect
beat any tree; the common case, a sequence number that extends the highest range, is a
fast path.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class RangeSet:
    """Disjoint half-open ranges [start, end), sorted, never touching each other."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        """Number of ranges (not of integers)."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._ends[i]

    def ranges(self) -> list[tuple[int, int]]:
        """All ranges, lowest first."""
        return list(zip(self._starts, self._ends))

    def highest(self, count: int) -> list[tuple[int, int]]:
        """The `count` highest ranges, highest first (what an ack reports)."""
        starts, ends = self._starts, self._ends
        n = len(starts)
        return [(starts[i], ends[i]) for i in range(n - 1, max(n - count, 0) - 1, -1)]

    def max(self) -> int | None:
        """The largest integer in the set."""
        return self._ends[-1] - 1 if self._ends else None

    def add(self, value: int) -> bool:
        """Add one integer; True if it was new."""
        ends = self._ends
        if ends and ends[-1] == value:  # fast path: extends the top range
            ends[-1] = value + 1
            return True
        return bool(self.add_range(value, value + 1))

    def add_range(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add [start, end); return the sub-ranges that were not in the set before."""
        if start >= end:
            return []
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, start)  # first range that ends at or after `start`
        j = bisect_right(starts, end)  # ranges before j start at or before `end`
        if i == j:  # touches nothing: insert as is
            starts.insert(i, start)
            ends.insert(i, end)
            return [(start, end)]
        new: list[tuple[int, int]] = []
        cursor = start
        for k in range(i, j):
            if starts[k] > cursor:
                new.append((cursor, min(starts[k], end)))
            cursor = max(cursor, ends[k])
        if cursor < end:
            new.append((cursor, end))
        merged_start = min(start, starts[i])
        merged_end = max(end, ends[j - 1])
        starts[i:j] = [merged_start]
        ends[i:j] = [merged_end]
        return new

    def discard_below(self, value: int) -> None:
        """Forget every integer below `value` (the cumulative ack moved past them)."""
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, value)  # ranges before i end at or below `value`
        if i:
            del starts[:i]
            del ends[:i]
        if starts and starts[0] < value:
            starts[0] = value
