"""The sync-direction decision (generation ids, as DRBD decides at connect)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resync.generations import NO_ID, Decision, Generation, decide, mirrored

A, B, C = 0xA, 0xB, 0xC


def gen(current, previous=NO_ID, consistent=True, crashed=False):
    return Generation(current, previous, consistent, crashed)


def test_equal_generations_are_in_sync():
    assert decide(gen(A), gen(A)) is Decision.IN_SYNC


def test_the_node_that_moved_on_is_the_source():
    primary, secondary = gen(B, previous=A), gen(A)
    assert decide(primary, secondary) is Decision.SOURCE
    assert decide(secondary, primary) is Decision.TARGET


def test_both_moved_on_from_the_same_point_is_split_brain():
    assert decide(gen(B, A), gen(C, A)) is Decision.SPLIT_BRAIN


def test_no_common_history_is_unrelated():
    assert decide(gen(B), gen(C)) is Decision.UNRELATED


def test_inconsistent_disks():
    assert decide(gen(NO_ID, consistent=False), gen(NO_ID, consistent=False)) \
        is Decision.BOTH_INCONSISTENT
    assert decide(gen(A), gen(B, A, consistent=False)) is Decision.SOURCE
    assert decide(gen(B, A, consistent=False), gen(A)) is Decision.TARGET


def test_a_crashed_primary_is_the_source_even_with_equal_ids():
    # It may hold writes it never sent: they must reach the peer, not be lost.
    assert decide(gen(A, crashed=True), gen(A)) is Decision.SOURCE
    assert decide(gen(A), gen(A, crashed=True)) is Decision.TARGET
    assert decide(gen(A, crashed=True), gen(A, crashed=True)) is Decision.SPLIT_BRAIN


def test_a_promoted_survivor_wins_over_the_crashed_primary():
    # The old primary crashed at generation A; the survivor was promoted (A -> B).
    assert decide(gen(A, crashed=True), gen(B, A)) is Decision.TARGET


ids = st.sampled_from([NO_ID, A, B, C])


@given(ids, ids, st.booleans(), st.booleans(), ids, ids, st.booleans(), st.booleans())
def test_both_ends_reach_mirrored_decisions(c1, p1, k1, x1, c2, p2, k2, x2):
    one, two = Generation(c1, p1, k1, x1), Generation(c2, p2, k2, x2)
    assert decide(two, one) is mirrored(decide(one, two))
