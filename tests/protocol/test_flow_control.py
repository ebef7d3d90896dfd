"""Flow control: a receiver whose upper layer stops reading is never overrun, and the
stream resumes as soon as it reads again."""

from __future__ import annotations

import pytest

from harness import Sender, connected_pair, header, pair
from protocol import ConnState
from protocol.frames import HEADER_SIZE, FrameType

PAYLOAD = 1500 - HEADER_SIZE  # 1456
# (max_message, receive_buffer) -> receive window in frames = receive_buffer // 1456.
BUFFERS = {
    "90-frames": (64 << 10, 128 << 10),
    "11-frames": (8 << 10, 16 << 10),
    "2-frames": (PAYLOAD, 2 * PAYLOAD),  # the smallest buffer the config accepts for it
}


class WindowWatch:
    """Taps the wire: the right edge (ack + window) B advertised and A has heard, and
    every first transmission of a DATA frame by A, checked against it."""

    def __init__(self, net):
        self.edge_heard_by_a = None
        self.sent = set()
        self.violations = []  # (seq, edge) of new DATA frames beyond what A had heard
        self.before_any_window = 0  # new DATA frames sent before A heard any window
        self.max_seq_at_b = 0
        net.taps.append(self)

    def __call__(self, kind, src, dst, data, now):
        h = header(data)
        if h["type"] == FrameType.HELLO:
            return
        if kind == "deliver" and src == "B" and dst == "A":
            edge = h["ack"] + h["window"]
            if self.edge_heard_by_a is None or edge > self.edge_heard_by_a:
                self.edge_heard_by_a = edge
        elif kind == "send" and src == "A" and h["type"] == FrameType.DATA:
            if h["seq"] in self.sent:
                return  # a retransmission: it was within the window when first sent
            self.sent.add(h["seq"])
            if self.edge_heard_by_a is None:
                self.before_any_window += 1
            elif h["seq"] >= self.edge_heard_by_a:
                self.violations.append((h["seq"], self.edge_heard_by_a))
        elif kind == "deliver" and dst == "B" and h["type"] == FrameType.DATA:
            self.max_seq_at_b = max(self.max_seq_at_b, h["seq"])


def stall_then_drain(net, a, b, watch, messages, capacity):
    """B's upper layer stops reading while A has `messages` to send; then reads again."""
    b.draining = False  # nobody calls next_event() on B
    net.run_for(3.0)  # longer than the dead-peer timeout: the stall must not kill the session
    assert b.conn.state is a.conn.state is ConnState.ESTABLISHED
    assert not a.lost and not b.lost
    assert b.messages == []
    assert b.conn.counters.out_of_window == 0
    assert watch.violations == []
    assert watch.max_seq_at_b <= capacity
    b.draining = True  # the upper layer reads again: everything flows, in order
    net.run_until(lambda: len(b.messages) == len(messages), timeout=3.0,
                  what="all messages after the receiver drained")
    assert b.messages == messages
    assert b.conn.counters.out_of_window == 0 and watch.violations == []


@pytest.mark.parametrize("buffers", list(BUFFERS), ids=list(BUFFERS))
def test_a_receiver_that_stops_reading_is_never_overrun(buffers):
    max_message, receive_buffer = BUFFERS[buffers]
    net, a, b = connected_pair(max_message=max_message, receive_buffer=receive_buffer)
    net.run_for(0.01)  # the window each side announced at the handshake has arrived
    watch = WindowWatch(net)
    messages = [bytes([i % 251]) * 1000 for i in range(300)]  # one frame each
    b.draining = False
    net.hooks.append(Sender(a, messages))
    stall_then_drain(net, a, b, watch, messages, receive_buffer // PAYLOAD)


@pytest.mark.parametrize("buffers", list(BUFFERS), ids=list(BUFFERS))
@pytest.mark.parametrize("first", ["together", "A-first"])
def test_sending_as_soon_as_connected_does_not_overrun_the_window(buffers, first):
    """The upper layer sends the moment it sees Connected, before the peer's window has
    arrived: the sender must not assume more room than the receiver can have."""
    max_message, receive_buffer = BUFFERS[buffers]
    net, a, b = pair(max_message=max_message, receive_buffer=receive_buffer,
                     connect=first == "together")
    watch = WindowWatch(net)
    messages = [bytes([i % 251]) * 1000 for i in range(300)]
    b.draining = False
    net.hooks.append(Sender(a, messages))  # sends in the step A is connected
    if first == "A-first":
        a.conn.connect(now=net.now)  # A completes its handshake first
        net.run_for(0.01)
        b.conn.connect(now=net.now)
    stall_then_drain(net, a, b, watch, messages, receive_buffer // PAYLOAD)


@pytest.mark.parametrize("buffers", list(BUFFERS), ids=list(BUFFERS))
def test_window_reopens_at_once_when_the_receiver_reads(buffers):
    """When the upper layer takes messages and the window grows back, the receiver says
    so at once (spec: an ACK when the window grows back past a quarter), rather than
    leaving the sender to find out from the next keepalive."""
    max_message, receive_buffer = BUFFERS[buffers]
    net, a, b = connected_pair(max_message=max_message, receive_buffer=receive_buffer)
    net.run_for(0.01)  # the windows announced at the handshake have arrived
    watch = WindowWatch(net)
    b.draining = False
    messages = [bytes([i % 251]) * 1000 for i in range(200)]
    net.hooks.append(Sender(a, messages))
    net.run_for(1.0)
    stalled_at = watch.max_seq_at_b
    assert 0 < stalled_at < len(messages)
    b.draining = True
    start = net.now
    net.run_until(lambda: watch.max_seq_at_b > stalled_at, timeout=1.0,
                  what="the first new DATA frame after the receiver read")
    assert net.now - start < 0.005, f"sender resumed {net.now - start:.3f} s after the read"


def test_reading_slowly_still_gets_everything():
    """The upper layer reads one message every 20 ms while the sender has 400 queued."""
    net, a, b = connected_pair(max_message=8 << 10, receive_buffer=64 << 10)
    net.run_for(0.01)  # the windows announced at the handshake have arrived
    b.draining = False
    messages = [bytes([i % 251]) * 3000 for i in range(400)]
    net.hooks.append(Sender(a, messages))
    state = {"next": net.now}

    def slow_reader(net):
        if net.now >= state["next"]:
            event = b.conn.next_event()
            if event is not None:
                b.events.append(event)
                if hasattr(event, "parts"):
                    b.messages.append(event.data)
            state["next"] = net.now + 0.02

    net.hooks.append(slow_reader)
    # run_for() ends each call with a step at the given time: the reader's own clock.
    while len(b.messages) < len(messages):
        net.run_for(0.02)
        assert net.now < 20.0, f"only {len(b.messages)} messages after {net.now:.1f} s"
    assert b.messages == messages
    assert b.conn.counters.out_of_window == 0
    assert not a.lost and not b.lost
