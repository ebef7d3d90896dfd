"""Every drop reason, produced by a crafted frame, bumps exactly its own counter and
leaves the delivered stream alone; random frames never crash a connection."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from harness import VOLUME, Sender, connected_pair, frame_type, header, hello_frame
from protocol import DROP_REASONS, FrameType
from protocol import auth
from protocol.frames import AUTHENTICATED, BEGIN, CHECKSUM_OFFSET, END, HEADER_SIZE, encode_frame

SECRET = b"counters secret"


def drops(conn) -> dict:
    return {name: getattr(conn.counters, name) for name in DROP_REASONS}


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


class Wire:
    """What B has told A (its ack and window) and the DATA frames A sent, as seen on the
    wire; an attacker on the cable sees the same."""

    def __init__(self, net):
        self.data_from_a = []
        self.b_ack = self.b_window = None
        net.taps.append(self)

    def __call__(self, kind, src, dst, data, now):
        if kind != "send":
            return
        h = header(data)
        if src == "A" and h["type"] == FrameType.DATA:
            self.data_from_a.append(bytes(data))
        if src == "B" and h["type"] != FrameType.HELLO:
            self.b_ack, self.b_window = h["ack"], h["window"]


def stream(secret=None):
    """A and B connected, A streaming 60 messages to B, 20 of them already delivered."""
    net, a, b = connected_pair(secret=secret)
    wire = Wire(net)
    messages = [os.urandom(100 + 37 * i) for i in range(60)]
    sender = Sender(a, messages[:20])
    net.hooks.append(sender)
    net.run_until(lambda: len(b.messages) == 20, timeout=1.0)
    net.run_for(0.01)
    return net, a, b, wire, messages


def finish(net, a, b, messages):
    for m in messages[20:]:
        a.conn.send_message(m, now=net.now)
    net.run_until(lambda: len(b.messages) == len(messages), timeout=2.0)
    net.run_for(0.1)
    assert b.messages == messages
    assert len(a.connected) == len(b.connected) == 1 and not a.lost and not b.lost


def ping(session, *, volume=VOLUME, flags=0, sealer=None, ftype=FrameType.PING, seq=0,
         payload=b""):
    # ack 0 and window 0: nothing a receiver would act on even if it took the frame.
    return encode_frame(ftype, flags, volume, session, seq, 0, 0, payload, sealer)


def crafted_plain(a, b, wire) -> dict[str, list]:
    """frames, each meant to be dropped for one reason, as (frame, source address)."""
    sid = b.conn.session_id
    valid = ping(sid)
    corrupt = bytearray(valid)
    corrupt[HEADER_SIZE - 1] ^= 0x10  # the checksum no longer matches
    bad_version = bytearray(valid)
    bad_version[0] = 7
    seq_beyond = wire.b_ack + wire.b_window + 5
    sealer = auth.FrameSealer(os.urandom(32))
    return {
        "malformed": [(b"\x01\x02\x03", "A"), (bytes(HEADER_SIZE - 1), "A"),
                      (valid[:HEADER_SIZE - 5], "A"), (ping(sid, ftype=9), "A"),
                      (ping(sid, flags=0x0100), "A")],
        "bad_version": [(bad_version, "A")],
        "corrupt": [(corrupt, "A"), (flip_payload(wire.data_from_a[3]), "A")],
        "wrong_volume": [(ping(sid, volume=VOLUME + 1), "A")],
        "foreign_source": [(valid, "X"), (wire.data_from_a[-1], "X")],
        "stale_session": [(ping(sid ^ 0x5A5A), "A"), (ping(0), "A")],
        "unauthenticated": [(ping(sid, sealer=sealer), "A")],  # a MAC nobody agreed on
        "out_of_window": [(ping(sid, ftype=FrameType.DATA, seq=seq_beyond, flags=BEGIN | END,
                                payload=b"beyond"), "A")],
        "duplicates": [(wire.data_from_a[0], "A"), (wire.data_from_a[-1], "A")],
    }


def flip_payload(frame: bytes) -> bytearray:
    out = bytearray(frame)
    out[HEADER_SIZE + 2] ^= 0x01
    return out


# bad_mac needs a secret: see test_drop_reasons_with_a_secret.
@pytest.mark.parametrize("reason", [r for r in DROP_REASONS if r != "bad_mac"])
def test_each_drop_reason_without_a_secret(reason):
    net, a, b, wire, messages = stream()
    frames = crafted_plain(a, b, wire)[reason]
    for frame, source in frames:
        before = drops(b.conn)
        b.conn.receive_frame(bytearray(frame), source, now=net.now)
        assert delta(before, drops(b.conn)) == {reason: 1}, (reason, frame[:8])
        net.run_for(0.001)
    assert not b.events[-1:] or type(b.events[-1]).__name__ != "ConnectionLost"
    finish(net, a, b, messages)


def test_drop_reasons_with_a_secret():
    net, a, b, wire, messages = stream(SECRET)
    sid = b.conn.session_id
    stranger = auth.FrameSealer(os.urandom(32))
    captured = wire.data_from_a[2]
    tampered = bytearray(captured)
    tampered[20:28] = struct.pack(">Q", 0)  # rewrite the ack field...
    tampered[CHECKSUM_OFFSET:HEADER_SIZE] = bytes(8)
    from protocol.frames import frame_checksum  # ...and fix the checksum, as a forger can
    length = header(tampered)["length"]
    tampered[CHECKSUM_OFFSET:HEADER_SIZE] = struct.pack(
        ">Q", frame_checksum(bytes(tampered[:CHECKSUM_OFFSET]),
                             bytes(tampered[HEADER_SIZE:HEADER_SIZE + length])))
    stripped = bytearray(captured[:HEADER_SIZE + length])  # the MAC cut off...
    stripped[2:4] = struct.pack(">H", header(captured)["flags"] & ~AUTHENTICATED)
    stripped[CHECKSUM_OFFSET:HEADER_SIZE] = struct.pack(
        ">Q", frame_checksum(bytes(stripped[:CHECKSUM_OFFSET]),
                             bytes(stripped[HEADER_SIZE:])))  # ...and the rest made valid
    cases = [
        ("unauthenticated", ping(sid)),
        ("unauthenticated", stripped),
        ("bad_mac", ping(sid, sealer=stranger)),
        ("bad_mac", tampered),
        ("duplicates", captured),  # a replay of an authentic frame: a duplicate
        ("stale_session", ping(sid ^ 1, sealer=stranger)),
        ("wrong_volume", ping(sid, volume=VOLUME + 1, sealer=stranger)),
        ("corrupt", flip_payload(captured)),
    ]
    for reason, frame in cases:
        before = drops(b.conn)
        b.conn.receive_frame(bytearray(frame), "A", now=net.now)
        assert delta(before, drops(b.conn)) == {reason: 1}, reason
        net.run_for(0.001)
    finish(net, a, b, messages)


def test_a_forged_close_without_the_mac_does_not_end_the_session():
    net, a, b, wire, messages = stream(SECRET)
    b.conn.receive_frame(bytearray(ping(b.conn.session_id, ftype=FrameType.CLOSE,
                                        payload=b"forged")), "A", now=net.now)
    assert b.conn.counters.unauthenticated == 1
    finish(net, a, b, messages)


def test_hellos_that_do_not_parse_are_counted_as_malformed():
    net, a, b, wire, messages = stream()
    garbage = encode_frame(FrameType.HELLO, 0, VOLUME, 0, 0, 0, 0, b"\xc1not msgpack")
    no_nonce = hello_frame(node="a", nonce=b"short")
    for frame in (garbage, no_nonce):
        before = drops(b.conn)
        b.conn.receive_frame(bytearray(frame), "A", now=net.now)
        assert delta(before, drops(b.conn)) == {"malformed": 1}
    finish(net, a, b, messages)


def test_counters_export_every_drop_reason():
    net, a, b = connected_pair()
    exported = a.conn.counters.as_dict()
    for reason in DROP_REASONS:
        assert exported[reason] == 0
    assert a.conn.counters.dropped() == 0


# --- noise from the wire ----------------------------------------------------------------

FORGED = st.builds(
    dict,
    ftype=st.sampled_from([int(t) for t in FrameType] + [0, 6, 200]),
    flags=st.sampled_from([0, BEGIN, END, BEGIN | END, AUTHENTICATED, 0x4000]),
    same_session=st.booleans(),
    seq=st.one_of(st.integers(0, 200), st.integers(0, 2**64 - 1)),
    ack=st.one_of(st.integers(0, 200), st.integers(0, 2**64 - 1)),
    window=st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1)),
    payload=st.one_of(st.binary(max_size=64),
                      st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                               max_size=5).map(
                          lambda r: struct.pack(">H", len(r)) + b"".join(
                              struct.pack(">QQ", x, y) for x, y in r))),
    sealed=st.booleans(),
    source=st.sampled_from(["A", "A", "X"]),
    mangle=st.one_of(st.none(), st.integers(0, 10_000)),
)


def forge(spec, sid):
    sealer = auth.FrameSealer(os.urandom(32)) if spec["sealed"] else None
    frame = bytearray(encode_frame(spec["ftype"], spec["flags"] & ~AUTHENTICATED, VOLUME,
                                   sid if spec["same_session"] else sid ^ 0x77, spec["seq"],
                                   spec["ack"], spec["window"], spec["payload"], sealer))
    if spec["mangle"] is not None:
        frame[spec["mangle"] % len(frame)] ^= 0x40
    return frame


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FORGED, min_size=1, max_size=30))
def test_forged_frames_never_disturb_an_authenticated_stream(specs):
    """Without the secret nothing a forger sends is applied: the stream is untouched."""
    net, a, b, wire, messages = stream(SECRET)
    sid = b.conn.session_id
    for spec in specs:
        before = b.conn.counters.dropped()
        b.conn.receive_frame(forge(spec, sid), spec["source"], now=net.now)
        assert b.conn.counters.dropped() == before + 1  # every one dropped and counted
        net.run_for(0.0005)
    finish(net, a, b, messages)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FORGED, min_size=1, max_size=30), st.booleans())
def test_forged_frames_never_raise(specs, secret):
    """Without a secret a forger can break the session (by design), but whatever it
    sends, the connection never raises and counts at most one drop per frame."""
    net, a, b, wire, messages = stream(SECRET if secret else None)
    for spec in specs:
        sid = b.conn.session_id or 1
        before = b.conn.counters.dropped()
        b.conn.receive_frame(forge(spec, sid), spec["source"], now=net.now)
        assert b.conn.counters.dropped() <= before + 1
        net.run_for(0.0005)
    net.run_for(3.0)  # and it recovers: connected again, whatever happened
    assert b.conn.session_id is not None and a.conn.session_id == b.conn.session_id


# --- DATA frames: the receiver's fast path must drop exactly as the full checks do ------


def rewrite(frame: bytes, **fields) -> bytearray:
    """`frame` with header fields changed and the checksum made valid again."""
    from protocol.frames import HEADER, frame_checksum
    names = ["version", "type", "flags", "volume", "session", "seq", "ack", "window",
             "length", "reserved", "checksum"]
    values = dict(zip(names, HEADER.unpack_from(frame)))
    values.update(fields)
    out = bytearray(frame)
    HEADER.pack_into(out, 0, *[values[n] for n in names])
    payload = bytes(out[HEADER_SIZE:HEADER_SIZE + values["length"]])
    out[CHECKSUM_OFFSET:HEADER_SIZE] = struct.pack(
        ">Q", frame_checksum(bytes(out[:CHECKSUM_OFFSET]), payload))
    return out


def test_data_frames_that_miss_one_check_are_dropped_for_that_reason():
    net, a, b, wire, messages = stream()
    data = wire.data_from_a[5]
    sid = b.conn.session_id
    cases = [
        ("stale_session", rewrite(data, session=sid ^ 0x10)),
        ("malformed", rewrite(data, flags=header(data)["flags"] | 0x0100)),
        ("malformed", rewrite(data, reserved=1)),
        ("malformed", rewrite(data, length=header(data)["length"] + 1)[:-1]),
        ("wrong_volume", rewrite(data, volume=VOLUME + 1)),
        ("bad_version", rewrite(data, version=2)),
        ("corrupt", flip_payload(data)),
        ("unauthenticated", rewrite(data, flags=header(data)["flags"] | AUTHENTICATED)
         + bytes(24)),
        ("duplicates", bytearray(data)),
    ]
    for reason, frame in cases:
        before = drops(b.conn)
        b.conn.receive_frame(frame, "A", now=net.now)
        assert delta(before, drops(b.conn)) == {reason: 1}, reason
        net.run_for(0.001)
    before = drops(b.conn)
    b.conn.receive_frame(bytearray(data), "X", now=net.now)
    assert delta(before, drops(b.conn)) == {"foreign_source": 1}
    finish(net, a, b, messages)


def test_an_in_session_data_frame_that_breaks_the_stream_drops_the_session():
    net, a, b, wire, messages = stream()
    first = wire.data_from_a[0]
    # The next expected seq, flagged as the middle of a message that never began.
    frame = rewrite(first, seq=wire.b_ack, flags=0)
    b.conn.receive_frame(frame, "A", now=net.now)
    b.drain()
    assert b.lost and "protocol violation" in b.lost[-1].reason
