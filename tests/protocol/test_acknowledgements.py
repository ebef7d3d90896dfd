"""MessagesAcknowledged: numbered as send_message numbered them, only ever increasing,
and never ahead of what the peer has actually received."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings, strategies as st

from harness import Faults, Sender, connected_pair
from protocol import ConnState, MessageReceived, MessagesAcknowledged


def check_acks(sender: Sender, sender_ep, receiver_ep):
    ups = sender_ep.acked
    assert sender.numbers == list(range(1, len(sender.messages) + 1))
    assert ups, "no MessagesAcknowledged at all"
    assert all(x < y for x, y in zip(ups, ups[1:])), ups  # strictly increasing
    assert set(ups) <= set(sender.numbers)
    assert ups[-1] == sender.numbers[-1]
    # Never ahead of the peer: when "up to k" was reported, k messages had arrived.
    received_at = [t for e, t in zip(receiver_ep.events, receiver_ep.event_times)
                   if isinstance(e, MessageReceived)]
    for event, t in zip(sender_ep.events, sender_ep.event_times):
        if isinstance(event, MessagesAcknowledged):
            assert received_at[event.up_to - 1] <= t


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 6000), min_size=1, max_size=40),
       loss=st.sampled_from([0.0, 0.05, 0.2]), reorder=st.sampled_from([0.0, 0.2]),
       batch=st.sampled_from([1, 3, None]), seed=st.integers(0, 1000))
def test_acknowledgements_match_send_message_numbers(sizes, loss, reorder, batch, seed):
    net, a, b = connected_pair()
    net.fault = Faults(loss=loss, reorder=reorder, seed=seed)
    rnd = random.Random(seed)
    sender = Sender(a, [rnd.randbytes(n) for n in sizes], batch=batch)
    net.hooks.append(sender)
    net.run_until(lambda: sender.done and a.acked[-1:] == [len(sizes)], timeout=20.0)
    assert b.messages == sender.messages
    check_acks(sender, a, b)


def test_both_directions_are_numbered_independently():
    net, a, b = connected_pair()
    to_b = Sender(a, [b"a%d" % i for i in range(30)], batch=2)
    to_a = Sender(b, [b"b%d" % i for i in range(12)], batch=1)
    net.hooks += [to_b, to_a]
    net.run_until(lambda: a.acked[-1:] == [30] and b.acked[-1:] == [12], timeout=2.0)
    check_acks(to_b, a, b)
    check_acks(to_a, b, a)


def test_numbering_starts_again_in_a_new_session():
    net, a, b = connected_pair()
    assert [a.conn.send_message(b"x", now=net.now) for _ in range(3)] == [1, 2, 3]
    net.run_until(lambda: a.acked[-1:] == [3], timeout=1.0)
    a.conn.carrier_changed(False, now=net.now)
    a.conn.carrier_changed(True, now=net.now)
    net.run_until(lambda: a.conn.state is ConnState.ESTABLISHED, timeout=1.0)
    assert a.conn.send_message(b"y", now=net.now) == 1
    net.run_until(lambda: a.acked[-1:] == [1], timeout=1.0)
    cut = a.events.index(a.lost[0])
    first = [e.up_to for e in a.events[:cut] if isinstance(e, MessagesAcknowledged)]
    second = [e.up_to for e in a.events[cut:] if isinstance(e, MessagesAcknowledged)]
    assert first[-1] == 3 and second == [1]
