"""Timers: dead-peer timeout, keepalive, carrier events, retransmission timeout."""

from __future__ import annotations

import pytest

from harness import Faults, connected_pair, frame_type, header, pair
from protocol import ConnectionLost, ConnState
from protocol.config import (
    DEFAULT_DEAD_PEER_TIMEOUT, DEFAULT_HELLO_INTERVAL, DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_RTO_INITIAL, DEFAULT_RTO_MAX, DEFAULT_RTO_MIN,
)
from protocol.frames import FrameType


def last_heard(net, dst: str, src: str) -> list:
    """A one-element list holding when `dst` last had a frame from `src` delivered."""
    when = [None]

    def tap(kind, s, d, data, now):
        if kind == "deliver" and s == src and d == dst:
            when[0] = now
    net.taps.append(tap)
    return when


def sent_log(net) -> list:
    log = []
    net.taps.append(lambda kind, src, dst, data, now: kind == "send" and log.append(
        (now, src, frame_type(data), header(data))))
    return log


def net_start(endpoint) -> float:
    """When the endpoint's session started (its Connected event)."""
    return event_time(endpoint, endpoint.connected[0])


def event_time(endpoint, event) -> float:
    return endpoint.event_times[endpoint.events.index(event)]


# --- dead peer ------------------------------------------------------------------------


def test_dead_peer_timeout_fires_after_exactly_that_much_silence():
    net, a, b = connected_pair()
    heard = last_heard(net, "A", "B")
    net.run_for(0.7)  # a little keepalive traffic first
    net.remove("B")  # B loses power: not another frame from it
    silent_since = heard[0]
    net.run_until(lambda: bool(a.lost), timeout=5.0)
    lost = a.lost[0]
    assert event_time(a, lost) == pytest.approx(silent_since + DEFAULT_DEAD_PEER_TIMEOUT,
                                                abs=1e-6)
    assert "dead-peer" in lost.reason
    assert a.conn.state is ConnState.CONNECTING  # and it looks for the peer again
    net.run_for(2 * DEFAULT_HELLO_INTERVAL)
    assert a.conn.counters.sessions_lost == 1


def test_dead_peer_timeout_does_not_fire_a_moment_early():
    net, a, b = connected_pair()
    heard = last_heard(net, "A", "B")
    net.run_for(0.3)
    net.remove("B")
    deadline = heard[0] + DEFAULT_DEAD_PEER_TIMEOUT
    net.run_for(deadline - 1e-4 - net.now)
    assert not a.lost and a.conn.state is ConnState.ESTABLISHED
    # Even when the caller asks at exactly that moment, as an event loop might.
    a.conn.handle_timer(now=deadline - 1e-4)
    assert a.conn.next_event() is None
    net.run_for(2e-4)
    assert a.lost


def test_silence_in_one_direction_is_a_dead_peer_too():
    net, a, b = connected_pair()
    net.fault = Faults(only=lambda src, dst, data: src == "B", loss=1.0)
    net.run_until(lambda: bool(a.lost), timeout=3.0)
    assert "dead-peer" in a.lost[0].reason


# --- keepalive ------------------------------------------------------------------------


def test_keepalives_keep_an_idle_session_alive_for_a_minute():
    net, a, b = connected_pair()
    net.run_for(0.01)  # the handshake's last HELLOs
    sid = a.conn.session_id
    log = sent_log(net)
    gaps = {"A": [net.now, 0.0], "B": [net.now, 0.0]}  # last heard, longest silence

    def tap(kind, src, dst, data, now):
        if kind == "deliver":
            last, longest = gaps[dst]
            gaps[dst] = [now, max(longest, now - last)]
    net.taps.append(tap)
    net.run_for(60.0, max_steps=20_000)
    assert a.conn.state is b.conn.state is ConnState.ESTABLISHED
    assert not a.lost and not b.lost
    assert a.conn.session_id == b.conn.session_id == sid
    pings = [e for e in log if e[2] == FrameType.PING]
    assert len(pings) >= 60 / (2 * DEFAULT_KEEPALIVE_INTERVAL)
    assert a.conn.counters.pings_sent + b.conn.counters.pings_sent == len(pings)
    for side, (_, longest) in gaps.items():
        assert longest < DEFAULT_DEAD_PEER_TIMEOUT / 2, (side, longest)
    # And no more than needed: per interval at most a PING and an ACK each way.
    assert len(log) <= 4 * 60 / DEFAULT_KEEPALIVE_INTERVAL + 10
    assert {e[2] for e in log} <= {FrameType.PING, FrameType.ACK}, {e[2] for e in log}


def test_a_ping_goes_out_after_keepalive_interval_of_silence():
    """Spec: "With nothing received for keepalive_interval, a node sends PING"."""
    net, a, b = connected_pair()
    log = sent_log(net)
    net.run_for(1.0)
    first_ping = next(e[0] for e in log if e[1] == "A" and e[2] == FrameType.PING)
    # A last heard B (a session frame) right after the handshake.
    assert first_ping <= net_start(a) + DEFAULT_KEEPALIVE_INTERVAL + 0.001, first_ping
    pings = [e[0] for e in log if e[1] == "A" and e[2] == FrameType.PING]
    gaps = [t2 - t1 for t1, t2 in zip(pings, pings[1:])]
    assert all(g <= DEFAULT_KEEPALIVE_INTERVAL + 0.001 for g in gaps), gaps


def test_an_idle_session_survives_a_dead_peer_timeout_close_to_the_keepalive():
    """The config accepts any dead_peer_timeout above keepalive_interval; an idle, healthy
    link must then stay up (here: 0.4 s against a 0.25 s keepalive)."""
    net, a, b = connected_pair(keepalive_interval=0.25, dead_peer_timeout=0.4)
    net.run_for(10.0)
    assert not a.lost and not b.lost, (a.lost + b.lost)[:1]


def test_no_pings_while_data_flows():
    net, a, b = connected_pair()
    log = sent_log(net)
    # A message every 100 ms for 2 s: both sides hear from each other all the time.
    for _ in range(20):
        a.conn.send_message(b"x" * 100, now=net.now)
        net.run_for(0.1)
    assert not [e for e in log if e[2] == FrameType.PING]


# --- carrier ----------------------------------------------------------------------------


def test_carrier_loss_ends_the_session_at_once():
    net, a, b = connected_pair()
    sid = a.conn.session_id
    a.conn.carrier_changed(False, now=net.now)
    event = a.conn.next_event()  # no step needed: at once
    assert isinstance(event, ConnectionLost)
    assert event.session_id == sid and "carrier" in event.reason
    assert a.conn.state is ConnState.CONNECTING and a.conn.session_id is None


def test_no_frames_while_the_carrier_is_down():
    net, a, b = connected_pair()
    log = sent_log(net)
    a.conn.carrier_changed(False, now=net.now)
    net.run_for(1.5)
    assert not [e for e in log if e[1] == "A"]
    assert a.conn.get_timer() is None  # nothing to wake up for while the link is down


def test_carrier_return_says_hello_at_once_and_reconnects():
    net, a, b = connected_pair()
    old = a.conn.session_id
    a.conn.carrier_changed(False, now=net.now)
    net.run_for(0.537)  # not a multiple of the hello interval
    a.conn.carrier_changed(True, now=net.now)
    frames = net.flush("A")
    assert FrameType.HELLO in [frame_type(f) for f, _ in frames]
    took = net.run_until(lambda: a.conn.state is ConnState.ESTABLISHED
                         and a.conn.session_id == b.conn.session_id, timeout=1.0)
    assert took < 0.01
    assert a.conn.session_id != old
    # B never saw the carrier go: to it, A restarted.
    assert [type(e).__name__ for e in b.events[-2:]] == ["ConnectionLost", "Connected"]


def test_carrier_events_while_connecting_or_idle():
    net, a, b = pair(connect=False)
    a.conn.carrier_changed(False, now=net.now)
    a.conn.carrier_changed(True, now=net.now)
    assert a.conn.state is ConnState.IDLE and not a.conn.frames_to_send(now=net.now)
    a.conn.connect(now=net.now)
    a.conn.carrier_changed(False, now=net.now)
    assert a.conn.frames_to_send(now=net.now) == []  # connecting, silently
    net.run_for(0.35)
    a.conn.carrier_changed(True, now=net.now)
    assert [frame_type(f) for f, _ in net.flush("A")] == [FrameType.HELLO]
    assert a.conn.state is ConnState.CONNECTING


# --- retransmission timeout -------------------------------------------------------------


def data_from_a(src, dst, data):
    return src == "A" and data[1] == FrameType.DATA


def transmissions(net, log) -> list[float]:
    return [e[0] for e in log if e[1] == "A" and e[2] == FrameType.DATA]


def expected_gaps(base: float, count: int) -> list[float]:
    return [min(base * 2**k, DEFAULT_RTO_MAX) for k in range(count)]


def test_rto_resends_a_lost_tail_frame_with_exponential_backoff():
    """A lone frame (nothing after it to reveal the loss) is lost 7 times in a row."""
    net, a, b = connected_pair()
    log = sent_log(net)
    net.fault = Faults(script=("drop",) * 7, only=data_from_a)
    a.conn.send_message(b"the tail", now=net.now)
    net.run_until(lambda: b.messages == [b"the tail"], timeout=10.0)
    times = transmissions(net, log)
    gaps = [t2 - t1 for t1, t2 in zip(times, times[1:])]
    # No RTT sample yet: the initial RTO, doubled per expiry, capped at rto_max.
    assert gaps == pytest.approx(expected_gaps(DEFAULT_RTO_INITIAL, 7), abs=1e-6)
    assert gaps[-1] == pytest.approx(DEFAULT_RTO_MAX)
    assert a.conn.counters.retransmits == 7
    assert a.conn.counters.rto_expirations == 7
    assert not a.lost  # keepalives kept the session up meanwhile


def test_backoff_starts_from_rto_min_once_the_rtt_is_known_and_resets_after_progress():
    net, a, b = connected_pair()
    for i in range(20):  # RTT samples of ~0.1 ms: the RTO is at its floor
        a.conn.send_message(b"sample %d" % i, now=net.now)
        net.run_for(0.002)
    assert a.conn.rtt() is not None and a.conn.rtt() < DEFAULT_RTO_MIN
    log = sent_log(net)
    net.fault = Faults(script=("drop",) * 4, only=data_from_a)
    a.conn.send_message(b"lost four times", now=net.now)
    net.run_until(lambda: len(b.messages) == 21, timeout=5.0)
    times = transmissions(net, log)
    gaps = [t2 - t1 for t1, t2 in zip(times, times[1:])]
    assert gaps == pytest.approx(expected_gaps(DEFAULT_RTO_MIN, 4), abs=1e-6)
    # Progress resets the backoff: the next lost tail waits one plain RTO again.
    net.run_for(0.01)
    log.clear()
    net.fault = Faults(script=("drop",), only=data_from_a)
    a.conn.send_message(b"lost once", now=net.now)
    net.run_until(lambda: len(b.messages) == 22, timeout=5.0)
    times = transmissions(net, log)
    assert len(times) == 2
    assert times[1] - times[0] == pytest.approx(DEFAULT_RTO_MIN, abs=1e-6)
    assert a.conn.counters.rto_expirations == 5


def test_a_lost_ack_is_repaired_by_the_rto_probe():
    net, a, b = connected_pair()
    net.fault = Faults(script=("drop",) * 2,
                       only=lambda src, dst, data: src == "B" and data[1] == FrameType.ACK)
    a.conn.send_message(b"x", now=net.now)
    net.run_until(lambda: a.acked == [1], timeout=2.0)
    assert b.messages == [b"x"]  # once: the probe was a duplicate
    assert b.conn.counters.duplicates >= 1
    assert a.conn.counters.rto_expirations >= 1
