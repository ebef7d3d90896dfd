"""ha/outdate.py: two daemons' PeerGroups back to back on a simulated process group.

The simulated group does what CPG promises: a configuration change lists the members
before any message of a new member, and every message reaches every member (the sender
too) in one order.
"""

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ha.outdate import (
    MAX_MESSAGE, Outcome, OutdateRequested, OutdateResolved, PeerGroup, PeerPresence,
)

ALPHA, BETA = (1, 100), (2, 200)


class SimulatedGroup:
    """Members join, leave and multicast; events each member's PeerGroup produced are
    collected per member."""

    def __init__(self) -> None:
        self.groups: dict = {}
        self.events: dict = {}

    def join(self, process, group: PeerGroup) -> None:
        joined = [process]
        self.groups[process] = group
        self.events[process] = []
        hello = group.joined(process)
        self._confchg(joined=joined, left=[])
        self.send(process, hello)

    def leave(self, process) -> None:
        del self.groups[process]
        self._confchg(joined=[], left=[process])

    def _confchg(self, joined, left) -> None:
        members = list(self.groups)
        for process, group in list(self.groups.items()):
            out, events = group.on_membership(members, left, joined)
            self.events[process] += events
            for data in out:
                self.send(process, data)

    def send(self, sender, data: bytes) -> None:
        for process, group in list(self.groups.items()):
            self.events[process] += group.on_message(sender, data)

    def take(self, process) -> list:
        events, self.events[process] = self.events[process], []
        return events


def pair():
    group = SimulatedGroup()
    alpha = PeerGroup("r0", "alpha", "beta")
    beta = PeerGroup("r0", "beta", "alpha")
    group.join(ALPHA, alpha)
    group.join(BETA, beta)
    return group, alpha, beta


def test_members_learn_each_other_by_hello():
    group, alpha, beta = pair()
    assert alpha.peer_present and beta.peer_present
    assert group.take(ALPHA) == [PeerPresence(True)]
    assert group.take(BETA) == [PeerPresence(True)]


def test_outdate_request_reaches_the_peer_and_its_answer_resolves_it():
    group, alpha, beta = pair()
    group.take(ALPHA), group.take(BETA)
    request_id, data, resolved = alpha.request_outdate()
    assert resolved is None and data is not None
    group.send(ALPHA, data)
    assert group.take(ALPHA) == []  # our own request, delivered back to us, is ignored
    (asked,) = group.take(BETA)
    assert asked == OutdateRequested("alpha", request_id)
    group.send(BETA, beta.answer(asked.request_id, True, "disk marked outdated"))
    assert group.take(ALPHA) == [OutdateResolved(request_id, Outcome.OUTDATED,
                                                 "disk marked outdated")]
    assert group.take(BETA) == []


def test_a_refusal_resolves_as_refused():
    group, alpha, beta = pair()
    request_id, data, _ = alpha.request_outdate()
    group.send(ALPHA, data)
    group.take(ALPHA)
    group.send(BETA, beta.answer(request_id, False, "beta is primary"))
    assert group.take(ALPHA)[-1] == OutdateResolved(request_id, Outcome.REFUSED,
                                                    "beta is primary")


def test_the_peer_leaving_resolves_pending_requests_as_gone():
    group, alpha, _ = pair()
    group.take(ALPHA)
    request_id, data, _ = alpha.request_outdate()
    group.send(ALPHA, data)
    group.leave(BETA)
    events = group.take(ALPHA)
    assert PeerPresence(False) in events
    assert OutdateResolved(request_id, Outcome.PEER_GONE, "beta left the cluster group") in events
    assert not alpha.peer_present


def test_without_the_peer_in_the_group_a_request_resolves_at_once():
    group = SimulatedGroup()
    alpha = PeerGroup("r0", "alpha", "beta")
    group.join(ALPHA, alpha)
    request_id, data, resolved = alpha.request_outdate()
    assert data is None
    assert resolved.outcome is Outcome.PEER_GONE


def test_an_answer_after_the_caller_gave_up_is_ignored():
    group, alpha, beta = pair()
    group.take(ALPHA)
    request_id, data, _ = alpha.request_outdate()
    group.send(ALPHA, data)
    alpha.forget(request_id)
    group.send(BETA, beta.answer(request_id, True, "late"))
    assert group.take(ALPHA) == []


def test_messages_for_another_node_or_resource_are_ignored():
    group, alpha, beta = pair()
    group.take(ALPHA), group.take(BETA)
    gamma = PeerGroup("r1", "gamma", "alpha")  # another resource's daemon, wrongly here
    group.join((3, 300), gamma)
    assert not any(isinstance(e, PeerPresence) and not e.present for e in group.take(ALPHA))
    assert alpha.peer_present
    # An outdate aimed at somebody else is not a request to alpha.
    other = msgpack.packb({"v": 1, "t": "outdate", "node": "beta", "target": "zeta", "id": 1})
    group.send(BETA, other)
    assert group.take(ALPHA) == []
    # An outdate "from" a node that is not alpha's peer is not obeyed.
    forged = msgpack.packb({"v": 1, "t": "outdate", "node": "gamma", "target": "alpha", "id": 1})
    group.send((3, 300), forged)
    assert group.take(ALPHA) == []


def test_a_rejoined_peer_is_known_again():
    group, alpha, beta = pair()
    group.leave(BETA)
    assert not alpha.peer_present
    beta2 = PeerGroup("r0", "beta", "alpha")
    group.join((2, 201), beta2)  # the daemon restarted: a new pid
    assert alpha.peer_present and beta2.peer_present


def test_leaving_the_group_ends_every_request():
    group, alpha, _ = pair()
    request_id, data, _ = alpha.request_outdate()
    events = alpha.left_group()
    assert PeerPresence(False) in events
    assert OutdateResolved(request_id, Outcome.PEER_GONE, "this node left the cluster group") in events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_MESSAGE + 10))
def test_any_bytes_are_a_message_or_dropped_and_counted(data):
    _, alpha, _ = pair()
    before = alpha.dropped
    events = alpha.on_message(BETA, data)
    assert all(isinstance(e, (PeerPresence, OutdateRequested, OutdateResolved)) for e in events)
    assert alpha.dropped in (before, before + 1)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "t", "node", "target", "to", "id", "ok",
                                        "reason", "resource"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=70), st.booleans(),
                                 st.none(), st.binary(max_size=8),
                                 st.sampled_from(["hello", "outdate", "outdated", "alpha",
                                                  "beta", "r0", 1]))))
def test_any_msgpack_map_is_handled_without_raising(fields):
    _, alpha, _ = pair()
    alpha.request_outdate()
    events = alpha.on_message(BETA, msgpack.packb(fields))
    for event in events:
        if isinstance(event, OutdateRequested):
            assert event.requester == "beta" and isinstance(event.request_id, int)
