"""Messages given as parts (send_message([header, data])), frames handed out unencoded
(frames_to_send(in_place=True)) for the link to build in place, and the receiver's fast
path for DATA frames: each must behave exactly like the plain path."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from harness import VOLUME, Sender, connected_pair, header
from protocol import FrameType, LocalProtocolError
from protocol.frames import (
    BEGIN, END, HEADER_SIZE, DataFrames, decode_frame, encode_frame, encode_frame_into,
)


def settled(**kwargs):
    """A connected pair whose windows are known to both sides, and a quiet network: the
    test then drives the connections by hand."""
    net, a, b = connected_pair(**kwargs)
    net.run_for(0.01)
    return net, a, b


def data_frames(frames) -> list:
    return [f for f, _ in frames if decode_frame(f).type == FrameType.DATA]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.lists(st.integers(0, 5000), min_size=1, max_size=4), min_size=1,
                      max_size=6),
       kinds=st.sampled_from(["list", "tuple"]))
def test_a_message_in_parts_arrives_as_their_concatenation(sizes, kinds):
    net, a, b = connected_pair()
    rnd = os.urandom
    messages = [[rnd(n) for n in parts] for parts in sizes]
    given_parts = [m if kinds == "list" else tuple(m) for m in messages]
    net.hooks.append(Sender(a, given_parts))
    net.run_until(lambda: len(b.messages) == len(messages), timeout=5.0)
    assert b.messages == [b"".join(m) for m in messages]
    net.run_for(0.05)
    assert a.acked[-1] == len(messages)


def test_frames_are_cut_across_part_boundaries_not_per_part():
    net, a, b = settled(mtu=1500)
    per_frame = a.conn.max_payload
    parts = [os.urandom(24), os.urandom(5000), b"", memoryview(os.urandom(3 * per_frame))]
    total = sum(len(p) for p in parts)
    a.conn.send_message(parts, now=net.now)
    frames = data_frames(a.conn.frames_to_send(now=net.now))
    assert len(frames) == math.ceil(total / per_frame)
    payloads = [bytes(decode_frame(f).payload) for f in frames]
    assert all(len(p) == per_frame for p in payloads[:-1])
    assert b"".join(payloads) == b"".join(bytes(p) for p in parts)
    flags = [decode_frame(f).flags for f in frames]
    assert flags[0] == BEGIN and flags[-1] == END and not any(flags[1:-1])
    for frame in frames:
        b.conn.receive_frame(bytearray(frame), "A", now=net.now)
    b.drain()
    assert b.messages == [b"".join(bytes(p) for p in parts)]


def test_the_size_limit_applies_to_the_parts_together():
    net, a, b = connected_pair(max_message=10_000, receive_buffer=1 << 20)
    with pytest.raises(LocalProtocolError):
        a.conn.send_message([bytes(6000), bytes(4001)], now=net.now)
    assert a.conn.counters.messages_sent == 0
    a.conn.send_message([bytes(6000), bytes(4000)], now=net.now)
    assert a.conn.send_message([], now=net.now) == 2  # an empty message, as with b""


@pytest.mark.parametrize("secret", [None, b"parts secret"], ids=["plain", "sealed"])
def test_frames_to_send_in_place_builds_the_same_frames(secret):
    """Two identical pairs send the same messages, one encoded, one built in place."""
    results = []
    for in_place in (False, True):
        net, a, b = settled(secret=secret)
        a.conn.send_message([os.urandom(0) + b"h" * 24, bytes(range(256)) * 20], now=net.now)
        a.conn.send_message(bytes(3000), now=net.now)
        frames = a.conn.frames_to_send(now=net.now, in_place=in_place)
        built = []
        for frame, dest in frames:
            assert dest == "B"
            if in_place and isinstance(frame, DataFrames):
                for item in frame.items:
                    buf = memoryview(bytearray(2000))
                    built.append(bytes(buf[:frame.build(buf, 0, 1500, item)]))
                continue
            built.append(bytes(frame))
        results.append(built)
        for frame in built:
            b.conn.receive_frame(bytearray(frame), "A", now=net.now)
        b.drain()
        assert b.messages == [b"h" * 24 + bytes(range(256)) * 20, bytes(3000)]
        assert a.conn.counters.bytes_sent == 24 + 256 * 20 + 3000
    # Same seeds, same clock: byte for byte the same frames (the MAC counters too).
    assert results[0] == results[1]


def test_in_place_data_frames_are_one_described_batch_and_the_rest_is_bytes():
    net, a, b = settled()
    a.conn.send_message(bytes(100), now=net.now)
    a.conn.send_message(bytes(3000), now=net.now)  # more than one frame
    sent_before = a.conn.counters.frames_sent
    frames = a.conn.frames_to_send(now=net.now, in_place=True)
    assert [type(f) for f, _ in frames] == [DataFrames]
    batch = frames[0][0]
    assert len(batch) >= 3 and bytes(batch.items[0][1]) == bytes(100)
    assert a.conn.counters.frames_sent - sent_before == len(batch)  # frames, not entries
    buf = memoryview(bytearray(1500))
    first = decode_frame(bytes(buf[:batch.build(buf, 0, 1500, batch.items[0])]))
    assert first.type == FrameType.DATA and bytes(first.payload) == bytes(100)
    with pytest.raises(ValueError):
        batch.build(buf, 0, 100, batch.items[0])  # longer than the limit: nothing written
    a.conn.receive_frame(bytearray(encode_frame(FrameType.PING, 0, VOLUME, a.conn.session_id, 0,
                                                1, 64)), "B", now=net.now)  # asks for an ACK
    frames = a.conn.frames_to_send(now=net.now, in_place=True)
    assert [type(f) for f, _ in frames] == [bytes]
    assert header(frames[0][0])["type"] == FrameType.ACK
