"""The interface's MTU changes under a running session (Connection.mtu_changed).

Lowered below the session's MTU, every DATA frame would be refused by the kernel (or
dropped by the peer's NIC) and retransmitted forever while small pings kept the session
alive: the session must end and a new one be agreed at the new MTU.
"""

from __future__ import annotations

from harness import Sender, connected_pair, payloads
from protocol import ConnState
from protocol.frames import HEADER_SIZE, MIN_MTU


def reconnected(*endpoints, times: int = 2):
    return lambda: all(len(e.connected) >= times and e.conn.state is ConnState.ESTABLISHED
                       for e in endpoints)


def test_a_lowered_mtu_ends_the_session_and_the_next_one_uses_it():
    net, a, b = connected_pair(mtu=9000)
    assert a.conn.max_payload == 9000 - HEADER_SIZE
    first = a.conn.session_id
    # Both ends of the cable lowered (b's NIC now drops anything over 1500 bytes).
    b.conn.mtu_changed(1500, now=net.now)
    a.conn.mtu_changed(1500, now=net.now)
    net.run_until(reconnected(a, b), timeout=1.0, what="a new session")
    assert "MTU lowered to 1500" in a.lost[0].reason
    assert a.connected[-1].mtu == b.connected[-1].mtu == 1500
    assert a.conn.session_id != first
    assert a.conn.max_payload == 1500 - HEADER_SIZE
    oversize_before = len(net.oversize)
    messages = payloads(20, [50_000, 1, 9000])
    sender = Sender(a, messages)
    net.hooks.append(sender)
    net.run_until(lambda: b.messages == messages, timeout=5.0, what="delivery at 1500")
    assert len(net.oversize) == oversize_before  # nothing too large went out since


def test_one_side_lowered_is_enough_for_the_new_session_to_fit_it():
    net, a, b = connected_pair(mtu=9000)
    a.conn.mtu_changed(2000, now=net.now)
    net.run_until(reconnected(a, b), timeout=1.0, what="a new session")
    assert a.connected[-1].mtu == b.connected[-1].mtu == 2000
    assert len(b.lost) == 1  # the peer saw the old session end too


def test_a_raised_or_unchanged_mtu_keeps_the_session():
    net, a, b = connected_pair(mtu=(1500, 9000))
    session = a.conn.session_id
    a.conn.mtu_changed(9000, now=net.now)  # its frames still fit: nothing to do now
    a.conn.mtu_changed(1500, now=net.now)  # the session's own MTU: still fits
    net.run_for(0.5)
    assert a.conn.session_id == session and not a.lost and not b.lost
    assert a.conn.config.mtu == 1500


def test_an_mtu_below_the_protocol_minimum_ends_the_session_and_offers_the_minimum():
    net, a, b = connected_pair(mtu=9000)
    a.conn.mtu_changed(1000, now=net.now)
    a.drain()
    assert a.lost and "MTU lowered to 1000" in a.lost[0].reason
    assert a.conn.config.mtu == MIN_MTU  # a HELLO must fit MIN_MTU; the link counts the rest
