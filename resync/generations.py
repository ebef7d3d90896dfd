"""Which way data must flow when two nodes meet: generation ids, the DRBD scheme.

Every node keeps a `current` generation id naming the version of the data on its disk,
and `previous`, the id it had before its last change of history.  A primary that writes
while its peer cannot follow ("the peer is behind") first moves on to a new current id
and keeps the old one as previous.  When two nodes connect, comparing the ids says
whether they hold the same data and, if not, who has the newer:

- equal current ids: the same data (unless one of them crashed as primary: it may hold
  writes its peer never saw, so it is the source);
- my previous is the peer's current: I moved on from where the peer stopped, I am the
  sync source (and symmetrically, target);
- both moved on from the same previous: both wrote alone - split brain, refuse;
- nothing in common: unrelated data, refuse.

An inconsistent disk (a fresh one, or one a resync did not finish) never counts as a
source; a consistent one always wins over it.

Pure logic: the daemon persists the ids (resync/metadata.py) and acts on the decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_ID = 0  # a disk that never held consistent data


class Decision(enum.Enum):
    IN_SYNC = "in-sync"  # nothing to copy
    SOURCE = "source"  # this node copies its disk to the peer
    TARGET = "target"  # the peer copies its disk to this node
    BOTH_INCONSISTENT = "both-inconsistent"  # nobody has good data: wait for primary --force
    SPLIT_BRAIN = "split-brain"  # both wrote alone since they last agreed
    UNRELATED = "unrelated"  # the disks share no history


@dataclass(frozen=True)
class Generation:
    """What a node says about its data in the connection's state exchange."""

    current: int
    previous: int
    consistent: bool
    crashed_primary: bool  # was primary when it last stopped without a clean demote


def decide(mine: Generation, peer: Generation) -> Decision:
    """The sync direction seen from `mine`.  decide(a, b) mirrors decide(b, a)."""
    if not mine.consistent and not peer.consistent:
        return Decision.BOTH_INCONSISTENT
    if not peer.consistent:
        return Decision.SOURCE
    if not mine.consistent:
        return Decision.TARGET
    if mine.current == peer.current:
        if mine.crashed_primary and peer.crashed_primary:
            return Decision.SPLIT_BRAIN  # both may hold writes the other never saw
        if mine.crashed_primary:
            return Decision.SOURCE
        if peer.crashed_primary:
            return Decision.TARGET
        return Decision.IN_SYNC
    mine_ahead = mine.previous != NO_ID and mine.previous == peer.current
    peer_ahead = peer.previous != NO_ID and peer.previous == mine.current
    if mine_ahead and not peer_ahead:
        return Decision.SOURCE
    if peer_ahead and not mine_ahead:
        return Decision.TARGET
    if mine.previous != NO_ID and mine.previous == peer.previous:
        return Decision.SPLIT_BRAIN
    return Decision.UNRELATED


def mirrored(decision: Decision) -> Decision:
    """The decision the peer reaches from the same two generations."""
    return {Decision.SOURCE: Decision.TARGET, Decision.TARGET: Decision.SOURCE}.get(
        decision, decision)
