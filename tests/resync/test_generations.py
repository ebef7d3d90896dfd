"""resync.generations.decide: the sync decision from two nodes' generation ids.

Every row of the decision table in decide()'s docstring has a test named after it
(test_rowNN_...), each a concrete story.  The stories build the generations with a small
model of how the daemon moves its ids (mirrord/engine.py does the same steps):

- force_primary: a new current id on a disk declared good;
- write_alone: a primary that writes while its peer cannot follow first sets
  bitmap = current and moves to a new current (only once: while it already tracks, the
  ids stay) - and its bitmap now has marks;
- resync: the target becomes inconsistent and remembers the source's current id in
  sync_source; when the resync completes the source moves its bitmap id into history
  and the target takes the source's ids.

Then the mirror property: both ends reach mirrored verdicts from the same two
generations, checked with hypothesis over a small pool of ids so that collisions happen.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from resync.generations import NO_ID, Decision, Generation, Kind, Verdict, decide, mirrored

SOURCE, TARGET = Decision.SOURCE, Decision.TARGET
BITMAP, FULL, NONE = Kind.BITMAP, Kind.FULL, Kind.NONE

# Generation ids are random 64-bit numbers in the daemon; readable ones here.
X, Y, Z, W, V = 0x1111_1111_1111_1111, 0x2222_2222_2222_2222, 0xFFFF_FFFF_FFFF_FFFF, 0x4444, 0x5555

FRESH = Generation(NO_ID, consistent=False)


# --- how the daemon moves the ids (a model for telling the stories) ---------------


def force_primary(g: Generation, new_id: int) -> Generation:
    return Generation(new_id, NO_ID, (), consistent=True)


def write_alone(g: Generation, new_id: int) -> Generation:
    if g.bitmap == NO_ID:
        g = replace(g, bitmap=g.current, current=new_id)
    return replace(g, dirty=True)


def start_resync(source: Generation, target: Generation) -> Generation:
    """The target's generation once a resync from `source` has started."""
    return replace(target, consistent=False, sync_source=source.current)


def finish_resync(source: Generation, target: Generation) -> tuple[Generation, Generation]:
    history = ((source.bitmap,) + source.history)[:4] if source.bitmap != NO_ID else source.history
    done = replace(source, bitmap=NO_ID, history=history, dirty=False, crashed_primary=False)
    return done, Generation(done.current, NO_ID, done.history, consistent=True)


def crash(g: Generation) -> Generation:
    """What a node that was primary reports after it comes back from a crash."""
    return replace(g, crashed_primary=True)


def both(a: Generation, b: Generation) -> tuple[Verdict, Verdict]:
    return decide(a, b), decide(b, a)


def connected_pair() -> tuple[Generation, Generation]:
    """A primary and a secondary, in sync at generation X."""
    a = force_primary(FRESH, X)
    b = start_resync(a, FRESH)
    return finish_resync(a, b)


# --- the table, row by row ------------------------------------------------------


def test_row01_fresh_pair_neither_disk_consistent__both_inconsistent():
    # Two boxes just created their metadata: nobody has good data; an operator must
    # force one primary.
    assert both(FRESH, FRESH) == (Verdict(Decision.BOTH_INCONSISTENT, NONE, 1),) * 2
    # Two resync targets of different sources: still nobody to copy from.
    a = Generation(X, consistent=False, sync_source=Y)
    b = Generation(Y, consistent=False, sync_source=X)
    assert both(a, b) == (Verdict(Decision.BOTH_INCONSISTENT, NONE, 1),) * 2


def test_row02_resync_interrupted_then_resumed__source_bitmap():
    # A copies to B; the link drops half way; at reconnect B still names A's current id
    # as its sync source: A resumes from its bitmap instead of starting over.
    a, b = connected_pair()
    a = write_alone(a, Y)  # link cut, A wrote: bitmap resync A -> B starts
    b = start_resync(a, b)
    assert b.sync_source == a.current == Y and not b.consistent
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 2)


def test_row02_resync_interrupted_source_moved_on__source_bitmap():
    # As above, but while they were apart the source (primary) wrote again: the first
    # write without the peer moved its current on, its bitmap id is the old current -
    # which is the target's sync_source.  Its bitmap still marks what the resync had not
    # copied, plus the new writes: a bitmap resync still suffices.
    a = force_primary(FRESH, X)
    b = start_resync(a, FRESH)  # initial full sync, interrupted
    assert b.sync_source == X
    a = write_alone(a, Y)
    assert (a.current, a.bitmap) == (Y, X)
    assert b.sync_source == a.bitmap != a.current
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 2)


def test_row03_first_forced_primary__source_full():
    # Fresh pair; the operator forces A primary: A's disk becomes the truth (new id X);
    # B has nothing: everything must be copied.
    a = force_primary(FRESH, X)
    assert decide(a, FRESH) == Verdict(SOURCE, FULL, 3)


def test_row03_resync_target_whose_source_moved_twice__source_full():
    # B's interrupted resync came from A's generation X; since then A completed a resync
    # with another peer and moved on twice: X is only history now, A's bitmap no longer
    # tells what B lacks.
    a = Generation(Z, bitmap=Y, history=(X,))
    b = Generation(W, consistent=False, sync_source=X)
    assert decide(a, b) == Verdict(SOURCE, FULL, 3)
    # a target that never recorded its source (invalidated by the operator) too
    assert decide(a, Generation(Z, consistent=False)) == Verdict(SOURCE, FULL, 3)


def test_row04_mine_inconsistent__target_bitmap_or_full():
    # Row 4 is rows 2 and 3 seen from the target.
    a, b = connected_pair()
    a = write_alone(a, Y)
    b = start_resync(a, b)  # interrupted resync, resumable
    assert decide(b, a) == Verdict(TARGET, BITMAP, 4)
    a2 = write_alone(a, Z)  # A keeps writing: it still tracks since X, ids unchanged
    assert decide(b, a2) == Verdict(TARGET, BITMAP, 4)
    # a fresh disk meets the first forced primary: full
    assert decide(FRESH, force_primary(FRESH, X)) == Verdict(TARGET, FULL, 4)
    assert decide(Generation(W, consistent=False, sync_source=X),
                  Generation(Z, bitmap=Y, history=(X,))) == Verdict(TARGET, FULL, 4)


def test_row05_both_crashed_as_primary_at_the_same_generation__split_brain():
    # A site-wide power cut: both boxes had been primary at generation X (a failover
    # promoted B, which crashed too before writing anything).  Each may hold writes the
    # other never saw, in extents only its own activity log knows: nobody is the truth.
    a, b = connected_pair()
    a, b = crash(a), crash(b)
    assert both(a, b) == (Verdict(Decision.SPLIT_BRAIN, NONE, 5),) * 2


def test_row06_primary_crashed_survivor_not_promoted__crashed_primary_is_source_bitmap():
    # A was primary at X and crashed with writes in flight; the cluster did not promote B
    # (it stayed at X).  A comes back: its activity-log extents are marked in its bitmap,
    # and they must go to B (B may lack them): A is the source of a bitmap resync.
    a, b = connected_pair()
    a = crash(a)
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 6)
    assert decide(b, a) == Verdict(TARGET, BITMAP, 6)  # the peer: mirrored


def test_row06_crash_flag_outranks_marks():
    # The survivor has marks as well (it was a resync source once); the crash still wins
    # (the union of both sides' marks is copied).
    a, b = connected_pair()
    a, b = crash(a), replace(b, dirty=True)
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 6)


def test_row07_equal_currents_one_side_has_marks__it_is_the_source():
    # A's writes in flight when the link dropped were marked; the link came back before
    # the next write (no new generation yet): A sends the marked blocks.
    a, b = connected_pair()
    a = replace(a, dirty=True)
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 7)
    assert decide(b, a) == Verdict(TARGET, BITMAP, 7)


def test_row07_equal_currents_both_have_marks__split_brain():
    a, b = connected_pair()
    a, b = replace(a, dirty=True), replace(b, dirty=True)
    assert both(a, b) == (Verdict(Decision.SPLIT_BRAIN, NONE, 7),) * 2


def test_row08_clean_reconnect__in_sync():
    # The link dropped while nobody wrote, or both were cleanly shut down: nothing to do.
    a, b = connected_pair()
    assert both(a, b) == (Verdict(Decision.IN_SYNC, NONE, 8),) * 2
    # the same after both went through more resyncs together
    a2 = write_alone(a, Y)
    a3, b3 = finish_resync(a2, start_resync(a2, b))
    assert (a3.current, a3.history) == (Y, (X,))
    assert both(a3, b3) == (Verdict(Decision.IN_SYNC, NONE, 8),) * 2


def test_row09_primary_wrote_alone_after_link_cut__source_bitmap():
    # The link was cut; primary A went on writing: bitmap = X (B's current), current Y,
    # and its bitmap marks every block it changed.  At reconnect A sends just those.
    a, b = connected_pair()
    a = write_alone(a, Y)
    a = write_alone(a, Z)  # more writes: A already tracks, the ids stay
    assert (a.current, a.bitmap) == (Y, X)
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 9)


def test_row10_secondary_meets_the_primary_that_wrote_alone__target_bitmap():
    a, b = connected_pair()
    a = write_alone(a, Y)
    assert decide(b, a) == Verdict(TARGET, BITMAP, 10)


def test_row10_crashed_primary_returns_after_survivor_was_promoted__target_bitmap():
    # A crashed as primary at X; Pacemaker promoted B, which wrote alone (bitmap X,
    # current Y).  A comes back: its crash flag does not matter, B's data is the truth;
    # the bitmap resync copies the union of marks, so A's in-flight writes are overwritten.
    a, b = connected_pair()
    a = crash(a)
    b = write_alone(b, Y)
    assert decide(a, b) == Verdict(TARGET, BITMAP, 10)
    assert decide(b, a) == Verdict(SOURCE, BITMAP, 9)


def test_row11_both_wrote_alone_after_link_cut__split_brain():
    # The link was cut but both boxes kept running; B was promoted by mistake (no
    # fencing), and both wrote: both moved on from X.  Refuse.
    a, b = connected_pair()
    a, b = write_alone(a, Y), write_alone(b, Z)
    assert a.bitmap == b.bitmap == X
    assert both(a, b) == (Verdict(Decision.SPLIT_BRAIN, NONE, 11),) * 2


def test_row12_node_far_behind_recognised_through_history__source_full():
    # B was unplugged for months at generation X.  Meanwhile A wrote alone (X -> Y) and
    # then completed a resync with a stand-in box, which moved X into A's history.  B comes
    # back: A recognises X, but its bitmap no longer covers what B lacks: full sync.
    a, b = connected_pair()
    a = write_alone(a, Y)
    a, _stand_in = finish_resync(a, start_resync(a, FRESH))
    assert (a.current, a.bitmap, a.history) == (Y, NO_ID, (X,))
    assert decide(a, b) == Verdict(SOURCE, FULL, 12)
    # deeper in history works as well
    a = write_alone(a, Z)
    a, _stand_in = finish_resync(a, start_resync(a, FRESH))
    assert a.history == (Y, X)
    assert decide(a, b) == Verdict(SOURCE, FULL, 12)


def test_row13_my_current_is_in_the_peers_history__target_full():
    a, b = connected_pair()
    a = write_alone(a, Y)
    a, _ = finish_resync(a, start_resync(a, FRESH))
    assert decide(b, a) == Verdict(TARGET, FULL, 13)


def test_row14_unrelated_disks__unrelated():
    # Two boxes each forced primary on their own: no common generation.  Refuse.
    a, b = force_primary(FRESH, X), force_primary(FRESH, Y)
    assert both(a, b) == (Verdict(Decision.UNRELATED, NONE, 14),) * 2
    # also when both wrote alone since
    a, b = write_alone(a, Z), write_alone(b, W)
    assert both(a, b) == (Verdict(Decision.UNRELATED, NONE, 14),) * 2
    # a NO_ID in the other's history is not a relation
    assert decide(Generation(X, history=(NO_ID,)), Generation(Y, history=(NO_ID,))).rule == 14


# --- first match wins ---------------------------------------------------------------


def test_an_inconsistent_peer_is_decided_before_the_ids_are_compared():
    # equal currents, but B is inconsistent (an interrupted resync of A's X): rule 2,
    # not IN_SYNC, whatever the crash flags say
    a, b = connected_pair()
    b = start_resync(a, b)
    assert decide(crash(a), crash(b)) == Verdict(SOURCE, BITMAP, 2)
    assert decide(replace(a, dirty=True), b) == Verdict(SOURCE, BITMAP, 2)


def test_bitmap_relation_is_preferred_to_history():
    # B's current is both A's bitmap id and in A's history: bitmap resync (cheaper, and
    # A's bitmap covers it)
    a = Generation(Y, bitmap=X, history=(X, W))
    b = Generation(X)
    assert decide(a, b) == Verdict(SOURCE, BITMAP, 9)


def test_no_id_never_counts_as_a_match():
    # Two consistent disks without any ids (should not exist, but must not look related)
    assert decide(Generation(NO_ID), Generation(X)).decision is Decision.UNRELATED
    assert decide(Generation(X, bitmap=NO_ID), Generation(Y, bitmap=NO_ID)).rule == 14
    # an inconsistent target whose sync_source is NO_ID does not match a source without
    # bitmap id
    assert decide(Generation(X), Generation(W, consistent=False)) == Verdict(SOURCE, FULL, 3)


def test_mirrored():
    assert mirrored(Verdict(SOURCE, BITMAP, 9)).decision is TARGET
    assert mirrored(Verdict(TARGET, FULL, 13)).decision is SOURCE
    for d in (Decision.IN_SYNC, Decision.SPLIT_BRAIN, Decision.UNRELATED, Decision.BOTH_INCONSISTENT):
        assert mirrored(Verdict(d, NONE, 1)) == Verdict(d, NONE, 1)
    assert mirrored(mirrored(Verdict(SOURCE, FULL, 3))) == Verdict(SOURCE, FULL, 3)


# --- the mirror property ------------------------------------------------------------

POOL = st.sampled_from([NO_ID, 1, 2, 3])
generations = st.builds(
    Generation,
    current=POOL,
    bitmap=POOL,
    history=st.lists(POOL, max_size=3).map(tuple),
    consistent=st.sampled_from([True, True, True, False]),
    crashed_primary=st.booleans(),
    sync_source=POOL,
    dirty=st.booleans(),
)

# The row the peer's table reports for the same case.
MIRROR_RULE = {9: 10, 10: 9, 12: 13, 13: 12, 2: 4, 3: 4}


@settings(max_examples=600, deadline=None)
@example(Generation(2, history=(1,)), Generation(1, history=(2,)))  # rows 12/13 both hold
@example(Generation(2, bitmap=1), Generation(1, bitmap=2))  # rows 9/10 both hold
@given(generations, generations)
def test_both_ends_reach_mirrored_decisions(a, b):
    """decide(b, a) is mirrored(decide(a, b)) in decision and kind; the rule number is
    each side's own row (2/3 <-> 4, 9 <-> 10, 12 <-> 13, the others their own mirror)."""
    mine, theirs = decide(a, b), decide(b, a)
    expected = mirrored(mine)
    assert (theirs.decision, theirs.kind) == (expected.decision, expected.kind)
    if mine.rule == 4:
        assert theirs.rule == (2 if mine.kind is BITMAP else 3)
    else:
        assert theirs.rule == MIRROR_RULE.get(mine.rule, mine.rule)
    # the kind goes with the decision
    assert (mine.kind is NONE) == (mine.decision not in (SOURCE, TARGET))


@settings(max_examples=300, deadline=None)
@given(generations, generations)
def test_decide_does_not_depend_on_anything_else(a, b):
    # Same inputs, same answer; and the verdict names the row that decided.
    assert decide(a, b) == decide(a, b)
    assert 1 <= decide(a, b).rule <= 14


def test_row14_each_current_in_the_others_history__unrelated():
    # Ids that each side once had (e.g. metadata restored from an old backup on one box):
    # A is at Y and remembers X, B is at X and remembers Y.  Rows 12 and 13 would both
    # hold; neither may win on its own (both ends would want to be the source): refuse.
    a = Generation(Y, history=(X,))
    b = Generation(X, history=(Y,))
    assert both(a, b) == (Verdict(Decision.UNRELATED, NONE, 14),) * 2
