"""RangeSet against a plain Python set of integers (the reference model)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from protocol.ranges import RangeSet

VALUES = st.integers(0, 200)  # small, so that operations collide and ranges touch

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), VALUES),
        st.tuples(st.just("add_range"), VALUES, st.integers(-5, 40)),  # width may be <= 0
        st.tuples(st.just("discard_below"), VALUES),
    ),
    max_size=60,
)


def runs(values: set[int]) -> list[tuple[int, int]]:
    """The maximal runs of consecutive integers, as half-open ranges, lowest first."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return [tuple(r) for r in out]


def expand(ranges) -> list[int]:
    return [v for start, end in ranges for v in range(start, end)]


def check_invariants(rs: RangeSet, ref: set[int]) -> None:
    ranges = rs.ranges()
    for start, end in ranges:
        assert start < end, f"empty range in {ranges}"
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end < start, f"ranges overlap or touch: {ranges}"  # sorted, disjoint, apart
    assert ranges == runs(ref)
    assert len(rs) == len(ranges)
    assert bool(rs) == bool(ref)
    assert rs.max() == (max(ref) if ref else None)


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(VALUES, max_size=20), st.integers(0, 10))
def test_rangeset_behaves_like_a_set(ops, probes, count):
    rs, ref = RangeSet(), set()
    for op in ops:
        if op[0] == "add":
            value = op[1]
            assert rs.add(value) is (value not in ref)
            ref.add(value)
        elif op[0] == "add_range":
            start, end = op[1], op[1] + op[2]
            new = rs.add_range(start, end)
            expected = sorted(set(range(start, end)) - ref)
            # Exactly the integers that were not there, as sorted, disjoint, maximal runs.
            assert expand(new) == expected
            assert new == runs(set(expected)), new
            ref.update(range(start, end))
        else:
            rs.discard_below(op[1])
            ref = {v for v in ref if v >= op[1]}
        check_invariants(rs, ref)
    for value in probes + sorted(ref) + [v + 1 for v in ref] + [v - 1 for v in ref]:
        assert (value in rs) is (value in ref)
    assert rs.highest(count) == list(reversed(runs(ref)))[:count]


def test_add_extends_the_top_range_and_merges_neighbours():
    rs = RangeSet()
    assert rs.add(5) and rs.add(6) and rs.add(8)
    assert rs.ranges() == [(5, 7), (8, 9)]
    assert rs.add(7)  # fills the hole: the two ranges become one
    assert rs.ranges() == [(5, 9)]
    assert not rs.add(6)


def test_add_range_reports_only_the_holes_it_fills():
    rs = RangeSet()
    rs.add_range(10, 20)
    rs.add_range(30, 40)
    assert rs.add_range(5, 45) == [(5, 10), (20, 30), (40, 45)]
    assert rs.ranges() == [(5, 45)]
    assert rs.add_range(7, 9) == []
    assert rs.add_range(9, 9) == []  # empty
    assert rs.add_range(9, 3) == []  # inverted


def test_discard_below_cuts_into_a_range():
    rs = RangeSet()
    rs.add_range(1, 5)
    rs.add_range(7, 10)
    rs.discard_below(8)
    assert rs.ranges() == [(8, 10)]
    rs.discard_below(100)
    assert rs.ranges() == [] and rs.max() is None and not rs
