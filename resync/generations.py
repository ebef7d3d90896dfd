"""Which way data must flow when two nodes meet, and how much: the DRBD scheme.

Each node keeps generation ids in its metadata:
- `current` names the version of the data on its disk;
- `bitmap` is the id the peer had when this node started to write without it (a primary
  that writes while its peer cannot follow first sets bitmap = current and moves to a
  new current): since then, its bitmap marks every block it changed.  NO_ID when not
  tracking;
- `history` holds older ids (newest first), so a node long behind is still recognised;
- a resync target remembers its source's current id in `sync_source`, so an interrupted
  resync resumes from the source's bitmap instead of starting over.

Decision table, seen from "mine" (the peer reaches the mirrored answer from the same two
generations, so no extra round trip is needed):

| # | condition (first match wins)                                  | decision            |
|---|---------------------------------------------------------------|---------------------|
| 1 | neither disk consistent                                      | BOTH_INCONSISTENT   |
| 2 | peer inconsistent, its sync_source is my current or bitmap id | SOURCE, bitmap     |
| 3 | peer inconsistent otherwise                                  | SOURCE, full        |
| 4 | mine inconsistent (mirror of 2, 3)                           | TARGET, bitmap/full |
| 5 | equal currents, both crashed as primary                      | SPLIT_BRAIN         |
| 6 | equal currents, I crashed as primary (peer: mirrored)        | SOURCE, bitmap      |
| 7 | equal currents, either has marked blocks                     | SOURCE/TARGET bitmap by who has marks; both: SPLIT_BRAIN |
| 8 | equal currents                                               | IN_SYNC             |
| 9 | my bitmap id is the peer's current (and not vice versa)      | SOURCE, bitmap      |
|10 | the peer's bitmap id is my current                           | TARGET, bitmap      |
|11 | both bitmap ids equal: both moved on from the same point     | SPLIT_BRAIN         |
|12 | the peer's current is in my history (and not vice versa)     | SOURCE, full        |
|13 | my current is in the peer's history (and not vice versa)     | TARGET, full        |
|14 | otherwise (also: each current in the other's history)        | UNRELATED           |

"bitmap" resyncs copy the union of both nodes' marked blocks; "full" copies everything.
Pure logic: the daemon persists the ids (resync/metadata.py) and acts on the decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_ID = 0  # no generation: a fresh disk, or a bitmap that tracks nothing


class Decision(enum.Enum):
    IN_SYNC = "in-sync"
    SOURCE = "source"  # this node copies (part of) its disk to the peer
    TARGET = "target"  # the peer copies (part of) its disk to this node
    BOTH_INCONSISTENT = "both-inconsistent"  # nobody has good data: primary --force
    SPLIT_BRAIN = "split-brain"  # both wrote alone since they last agreed
    UNRELATED = "unrelated"  # the disks share no history


class Kind(enum.Enum):
    NONE = "none"
    BITMAP = "bitmap"  # copy the marked blocks of both sides
    FULL = "full"  # copy the whole disk


@dataclass(frozen=True)
class Generation:
    current: int
    bitmap: int = NO_ID
    history: tuple = ()
    consistent: bool = True
    crashed_primary: bool = False  # was primary when it last stopped without a clean demote
    sync_source: int = NO_ID  # for an inconsistent resync target: its source's current id
    dirty: bool = False  # its bitmap has marked blocks


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    kind: Kind = Kind.NONE
    rule: int = 0  # the row of the table that decided (for logs and tests)


_MIRROR = {Decision.SOURCE: Decision.TARGET, Decision.TARGET: Decision.SOURCE}


def mirrored(verdict: Verdict) -> Verdict:
    """The verdict the peer reaches from the same two generations (decision and kind;
    the rule number stays this side's row, which the peer numbers as its mirror row)."""
    return Verdict(_MIRROR.get(verdict.decision, verdict.decision), verdict.kind, verdict.rule)


def decide(mine: Generation, peer: Generation) -> Verdict:
    """The sync direction and kind seen from `mine` (see the table above)."""
    if not mine.consistent and not peer.consistent:
        return Verdict(Decision.BOTH_INCONSISTENT, rule=1)
    if not peer.consistent or not mine.consistent:
        source, target = (mine, peer) if not peer.consistent else (peer, mine)
        # The source may have moved on since (its bitmap id then names the old current).
        resumable = target.sync_source != NO_ID and target.sync_source in (
            source.current, source.bitmap)
        verdict = Verdict(Decision.SOURCE, Kind.BITMAP if resumable else Kind.FULL,
                          2 if resumable else 3)
        return verdict if source is mine else Verdict(Decision.TARGET, verdict.kind, 4)
    if mine.current == peer.current:
        if mine.crashed_primary and peer.crashed_primary:
            return Verdict(Decision.SPLIT_BRAIN, rule=5)
        if mine.crashed_primary or peer.crashed_primary:
            return Verdict(Decision.SOURCE if mine.crashed_primary else Decision.TARGET,
                           Kind.BITMAP, 6)
        if mine.dirty and peer.dirty:
            return Verdict(Decision.SPLIT_BRAIN, rule=7)
        if mine.dirty or peer.dirty:
            return Verdict(Decision.SOURCE if mine.dirty else Decision.TARGET, Kind.BITMAP, 7)
        return Verdict(Decision.IN_SYNC, rule=8)
    mine_ahead = mine.bitmap != NO_ID and mine.bitmap == peer.current
    peer_ahead = peer.bitmap != NO_ID and peer.bitmap == mine.current
    if mine_ahead and not peer_ahead:
        return Verdict(Decision.SOURCE, Kind.BITMAP, 9)
    if peer_ahead and not mine_ahead:
        return Verdict(Decision.TARGET, Kind.BITMAP, 10)
    if mine.bitmap != NO_ID and mine.bitmap == peer.bitmap:
        return Verdict(Decision.SPLIT_BRAIN, rule=11)
    peer_in_mine = peer.current != NO_ID and peer.current in mine.history
    mine_in_peer = mine.current != NO_ID and mine.current in peer.history
    if peer_in_mine and not mine_in_peer:
        return Verdict(Decision.SOURCE, Kind.FULL, 12)
    if mine_in_peer and not peer_in_mine:
        return Verdict(Decision.TARGET, Kind.FULL, 13)
    return Verdict(Decision.UNRELATED, rule=14)
