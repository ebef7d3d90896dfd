"""resync.activity_log.ActivityLog: bookkeeping against a reference model.

The model is the documented behaviour: the log holds at most `capacity` extents, each
with a count of writes in flight; begin() makes every extent of the range active (and
most recently used), evicting least recently used idle extents when room is needed, and
never an extent that has a write in flight or that the write itself is about to use;
when no room can be made it raises ActivityLogFull and changes nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from resync.activity_log import DEFAULT_CAPACITY, DEFAULT_EXTENT, ActivityLog, ActivityLogFull
from resync.metadata import max_al_extents

EXT = 1 << 20  # a small extent keeps the numbers readable


def rng(first: int, count: int = 1) -> tuple[int, int]:
    """The byte range of `count` whole extents from extent `first`."""
    return first * EXT, count * EXT


class Model:
    """Reference activity log: an ordered list (least recently used first) + busy counts."""

    def __init__(self, extent: int, capacity: int, active=()) -> None:
        self.extent, self.capacity = extent, capacity
        self.order: list[int] = list(active)
        self.busy: dict[int, int] = {e: 0 for e in active}

    def extents(self, offset: int, length: int) -> list[int]:
        last = (offset + max(length, 1) - 1) // self.extent
        return list(range(offset // self.extent, last + 1))

    def plan(self, offset: int, length: int):
        """(added, evicted), or None when the log is full of busy extents."""
        touched = self.extents(offset, length)
        added = [e for e in touched if e not in self.busy]
        need = len(self.order) + len(added) - self.capacity
        if need <= 0:
            return added, []
        candidates = [e for e in self.order if self.busy[e] == 0 and e not in touched]
        if len(candidates) < need:
            return None
        return added, candidates[:need]

    def begin(self, offset: int, length: int):
        plan = self.plan(offset, length)
        if plan is None:
            return None
        added, evicted = plan
        for e in evicted:
            self.order.remove(e)
            del self.busy[e]
        for e in self.extents(offset, length):
            if e in self.busy:
                self.order.remove(e)
            self.order.append(e)
            self.busy[e] = self.busy.get(e, 0) + 1
        return added, evicted

    def end(self, offset: int, length: int) -> None:
        for e in self.extents(offset, length):
            if self.busy.get(e):
                self.busy[e] -= 1


# Operations: ("begin", first extent, byte offset inside it, length) or ("end", index of an
# in-flight write to complete, 0, 0).  Offsets and lengths are picked to land on, just
# before and just after extent boundaries.
OFFSETS = [0, 1, EXT // 2, EXT - 1]
LENGTHS = [0, 1, EXT // 2, EXT - 1, EXT, EXT + 1, 2 * EXT, 3 * EXT - 1]


def write_ops(max_extent: int = 12):
    op = st.tuples(st.sampled_from(["begin", "end"]), st.integers(0, max_extent),
                   st.sampled_from(OFFSETS), st.sampled_from(LENGTHS))
    return st.lists(op, min_size=10, max_size=40)


def snapshot(log: ActivityLog):
    return log.active, dict(log._lru), log.busy()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), write_ops())
def test_begin_and_end_match_the_reference_model(capacity, ops):
    """Every step, the log equals the model: same extents in the same LRU order, same
    (added, evicted) answers, ActivityLogFull exactly when the model is full."""
    log = ActivityLog(EXT, capacity)
    model = Model(EXT, capacity)
    in_flight: list[tuple[int, int]] = []
    for op, a, b, c in ops:
        if op == "begin":
            offset, length = a * EXT + b, c
            expected = model.begin(offset, length)
            if expected is None:
                before = snapshot(log)
                with pytest.raises(ActivityLogFull):
                    log.begin(offset, length)
                assert snapshot(log) == before, "ActivityLogFull changes nothing"
                continue
            added, evicted = log.begin(offset, length)
            assert (added, evicted) == expected
            in_flight.append((offset, length))
        elif in_flight:
            offset, length = in_flight.pop(a % len(in_flight))
            log.end(offset, length)
            model.end(offset, length)
        assert log.active == model.order
        assert {e: log._lru[e] for e in log.active} == model.busy
        assert log.busy() == len_in_flight_extents(log, in_flight)
        assert len(log.active) <= capacity


def len_in_flight_extents(log: ActivityLog, in_flight) -> int:
    return sum(len(log.extents_of(o, n)) for o, n in in_flight)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), write_ops())
def test_invariants_under_random_writes(capacity, ops):
    """Without the model: the properties that hold whatever the sequence."""
    log = ActivityLog(EXT, capacity)
    in_flight: list[tuple[int, int]] = []
    for op, a, b, c in ops:
        if op == "begin":
            offset, length = a * EXT + b, c
            before_active = log.active
            before = snapshot(log)
            busy_before = {e for e, n in log._lru.items() if n}
            try:
                added, evicted = log.begin(offset, length)
            except ActivityLogFull:
                assert snapshot(log) == before, "ActivityLogFull changes nothing"
                # full means: the new extents do not fit beside the busy ones
                touched = set(log.extents_of(offset, length))
                assert len(touched | busy_before) > capacity or len(touched) > capacity
                continue
            in_flight.append((offset, length))
            # added lists exactly the extents that were not active before, in order
            assert added == [e for e in log.extents_of(offset, length) if e not in before_active]
            assert set(added) == set(log.active) - set(before_active)
            # an extent with writes in flight is never evicted
            assert not set(evicted) & busy_before
            assert set(evicted) <= set(before_active)
            # every extent of the write is active now
            assert set(log.extents_of(offset, length)) <= set(log.active)
        elif in_flight:
            offset, length = in_flight.pop(a % len(in_flight))
            log.end(offset, length)
        # an extent with writes in flight is still in the log
        for o, n in in_flight:
            for e in log.extents_of(o, n):
                assert log._lru.get(e, 0) > 0
    assert log.busy() == len_in_flight_extents(log, in_flight)


# --- begin() never evicts an extent of the write itself ---------------------------


def test_begin_never_evicts_an_extent_of_the_write_itself():
    log = ActivityLog(EXT, capacity=2, active=[5, 7])  # full, both idle; 5 is the oldest
    added, evicted = log.begin(*rng(5, 2))  # a write across extents 5 and 6
    assert added == [6]
    assert evicted == [7], "5 is part of this write: the other idle extent must go"
    assert log.active == [5, 6]
    assert len(log.active) <= log.capacity


@settings(max_examples=100, deadline=None)
@example(2, [("begin", 0, 0, EXT), ("end", 0, 0, 0),
             ("begin", 2, 0, EXT), ("end", 0, 0, 0),
             ("begin", 0, 0, 2 * EXT)])  # extents 0 and 1: 0 is the oldest idle one
@given(st.integers(1, 6), write_ops())
def test_capacity_is_always_respected_and_evicted_extents_leave(capacity, ops):
    log = ActivityLog(EXT, capacity)
    in_flight: list[tuple[int, int]] = []
    for op, a, b, c in ops:
        if op == "begin":
            offset, length = a * EXT + b, c
            try:
                _added, evicted = log.begin(offset, length)
            except ActivityLogFull:
                continue
            in_flight.append((offset, length))
            assert not set(evicted) & set(log.active), "an evicted extent left the log"
        elif in_flight:
            log.end(*in_flight.pop(a % len(in_flight)))
        assert len(log.active) <= capacity


# --- fixed cases --------------------------------------------------------------------


def test_extents_of_ranges_crossing_extent_boundaries():
    log = ActivityLog(EXT)
    assert list(log.extents_of(0, 1)) == [0]
    assert list(log.extents_of(0, EXT)) == [0]
    assert list(log.extents_of(0, EXT + 1)) == [0, 1]
    assert list(log.extents_of(EXT - 1, 2)) == [0, 1]
    assert list(log.extents_of(EXT - 1, 1)) == [0]
    assert list(log.extents_of(EXT, EXT)) == [1]
    assert list(log.extents_of(3 * EXT + 5, 2 * EXT)) == [3, 4, 5]
    assert list(log.extents_of(7 * EXT, 0)) == [7]  # an empty range still names its extent
    assert list(log.extents_of(7 * EXT - 1, 0)) == [6]


@given(st.integers(0, 1 << 44), st.integers(1, 1 << 26), st.sampled_from([1 << 12, 1 << 20, 4 << 20]))
def test_extents_of_is_exactly_the_extents_a_byte_falls_in(offset, length, extent):
    got = list(ActivityLog(extent).extents_of(offset, length))
    assert got == list(range(offset // extent, (offset + length - 1) // extent + 1))
    assert got[0] * extent <= offset < (got[0] + 1) * extent
    assert got[-1] * extent <= offset + length - 1 < (got[-1] + 1) * extent


def test_the_first_write_to_an_extent_adds_it_later_ones_cost_nothing():
    log = ActivityLog(EXT, capacity=4)
    assert log.begin(*rng(3)) == ([3], [])
    assert log.begin(3 * EXT + 100, 10) == ([], [])  # already active: no metadata write
    assert log.begin(3 * EXT + 100, EXT) == ([4], [])  # crosses into extent 4
    assert log.active == [3, 4]
    assert log.busy() == 4
    log.end(*rng(3))
    log.end(3 * EXT + 100, 10)
    log.end(3 * EXT + 100, EXT)
    assert log.busy() == 0
    assert log.active == [3, 4]  # idle extents stay until room is needed


def test_lru_order_of_eviction():
    log = ActivityLog(EXT, capacity=3)
    for e in (1, 2, 3):
        log.begin(*rng(e))
        log.end(*rng(e))
    log.begin(*rng(1))  # 1 is now the most recently used
    log.end(*rng(1))
    assert log.begin(*rng(4)) == ([4], [2])
    log.end(*rng(4))
    assert log.begin(*rng(5)) == ([5], [3])
    log.end(*rng(5))
    assert log.active == [1, 4, 5]
    assert log.begin(*rng(6, 2)) == ([6, 7], [1, 4])
    assert log.active == [5, 6, 7]


def test_an_extent_with_writes_in_flight_is_never_evicted():
    log = ActivityLog(EXT, capacity=2)
    log.begin(*rng(1))  # in flight
    log.begin(*rng(2))
    log.end(*rng(2))
    # 1 is older than 2, but busy: 2 goes
    assert log.begin(*rng(3)) == ([3], [2])
    assert log.active == [1, 3]
    # both busy now: no room
    before = (log.active, dict(log._lru), log.busy())
    with pytest.raises(ActivityLogFull):
        log.begin(*rng(4))
    assert (log.active, dict(log._lru), log.busy()) == before
    # another write to an active extent needs no room
    assert log.begin(*rng(1)) == ([], [])
    log.end(*rng(1))
    with pytest.raises(ActivityLogFull):
        log.begin(*rng(4))  # 1 still has one write in flight
    log.end(*rng(1))
    assert log.begin(*rng(4)) == ([4], [1])
    assert log.active == [3, 4]


def test_a_write_needing_more_room_than_idle_extents_give_changes_nothing():
    log = ActivityLog(EXT, capacity=3)
    log.begin(*rng(1))
    log.begin(*rng(2))
    log.end(*rng(2))
    log.begin(*rng(3))
    before = (log.active, dict(log._lru))
    with pytest.raises(ActivityLogFull):
        log.begin(*rng(10, 2))  # needs two, only extent 2 is idle
    assert (log.active, dict(log._lru)) == before
    with pytest.raises(ActivityLogFull):
        ActivityLog(EXT, capacity=2).begin(*rng(0, 3))  # wider than the whole log


def test_end_of_an_unknown_range_is_harmless():
    log = ActivityLog(EXT, capacity=2)
    log.end(*rng(9))
    assert log.active == [] and log.busy() == 0
    log.begin(*rng(1))
    log.end(*rng(1))
    log.end(*rng(1))  # one end too many: counts never go negative
    assert log.busy() == 0 and log._lru[1] == 0


def test_restored_extents_are_active_and_idle():
    # After a crash the daemon loads the extents of the newest on-disk record.
    log = ActivityLog(EXT, capacity=3, active=[7, 2, 9])
    assert log.active == [7, 2, 9]
    assert log.busy() == 0
    assert log.begin(*rng(2)) == ([], [])
    log.end(*rng(2))
    assert log.begin(*rng(4)) == ([4], [7])  # restored order is the LRU order
    log.reset()
    assert log.active == [] and log.busy() == 0


def test_validation_and_defaults():
    for bad in (0, -1, 3, (4 << 20) + 1):
        with pytest.raises(ValueError):
            ActivityLog(bad)
    log = ActivityLog()
    assert log.extent == DEFAULT_EXTENT == 4 << 20
    assert log.capacity == DEFAULT_CAPACITY
    assert DEFAULT_CAPACITY <= max_al_extents(), "a full log must fit one on-disk record"
