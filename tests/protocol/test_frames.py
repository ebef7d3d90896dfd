"""The frame codec at the byte level: whole frames, every prefix, every bit, padding, noise."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol import FrameError
from protocol import auth
from protocol.frames import (
    AUTHENTICATED, BEGIN, CHECKSUM_OFFSET, END, HEADER, HEADER_SIZE, MAX_PAYLOAD,
    TRAILER_SIZE, VERSION, FrameType, decode_frame, encode_frame, encode_frame_into,
    frame_checksum, peek_version,
)

KEY = auth.stretch_secret(b"correct horse battery")
NONCE_A, NONCE_B = bytes(range(16)), bytes(range(16, 32))
PAD_TO = 60


def keys():
    """A sealer for one direction and the matching opener."""
    key = auth.direction_key(KEY, NONCE_A, NONCE_B)
    return auth.FrameSealer(key), auth.FrameOpener(key)


def mac_ok(opener, frame) -> bool:
    return opener.verify(frame.fields, frame.payload, frame.trailer)


def with_checksum(data: bytearray) -> bytearray:
    """Recompute the checksum as someone who knows the format would."""
    length = struct.unpack_from(">H", data, 32)[0]
    fields = bytes(data[:CHECKSUM_OFFSET])
    payload = bytes(data[HEADER_SIZE:HEADER_SIZE + length])
    struct.pack_into(">Q", data, CHECKSUM_OFFSET, frame_checksum(fields, payload))
    return data


def as_kind(data, kind: str):
    """The same frame as each kind of buffer the link layer might hand over."""
    if kind == "bytes":
        return bytes(data)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "readonly-memoryview":
        return memoryview(bytes(data))
    if kind == "slice-of-larger-buffer":  # e.g. the Ethernet header still in front
        return memoryview(bytearray(14) + bytes(data) + bytearray(7))[14:14 + len(data)]
    raise AssertionError(kind)


KINDS = ["bytes", "bytearray", "memoryview", "readonly-memoryview", "slice-of-larger-buffer"]

FIELDS = dict(
    ftype=st.sampled_from(list(FrameType)),
    flags=st.sampled_from([0, BEGIN, END, BEGIN | END]),
    volume=st.integers(0, 2**32 - 1),
    session=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1),
    ack=st.integers(0, 2**64 - 1),
    window=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=1500),
)


def sample_frames(sealed: bool):
    """One frame of each type, with payloads of the sizes each type really carries."""
    sealer = keys()[0] if sealed else None
    payloads = {FrameType.HELLO: os.urandom(120), FrameType.DATA: os.urandom(300),
                FrameType.ACK: struct.pack(">HQQ", 1, 5, 9), FrameType.PING: b"",
                FrameType.CLOSE: b"bye"}
    return [(t, encode_frame(t, BEGIN | END if t == FrameType.DATA else 0, 7, 0xDEADBEEF,
                             42 if t == FrameType.DATA else 0, 17, 1000, payloads[t], sealer))
            for t in FrameType]


def check_fields(frame, ftype, flags, volume, session, seq, ack, window, payload, sealed):
    assert frame.type == ftype
    assert frame.flags == (flags | AUTHENTICATED if sealed else flags)
    assert (frame.volume, frame.session, frame.seq, frame.ack, frame.window) == (
        volume, session, seq, ack, window)
    assert bytes(frame.payload) == bytes(payload)


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_every_type_round_trips(ftype, sealed, kind):
    sealer, opener = keys()
    payload = os.urandom(100)
    data = encode_frame(ftype, END, 9, 0x01020304, 5, 6, 77, payload, sealer if sealed else None)
    assert len(data) == HEADER_SIZE + len(payload) + (TRAILER_SIZE if sealed else 0)
    frame = decode_frame(as_kind(data, kind))
    check_fields(frame, ftype, END, 9, 0x01020304, 5, 6, 77, payload, sealed)
    if sealed:
        assert mac_ok(opener, frame)
    else:
        assert frame.trailer is None


@settings(max_examples=300, deadline=None)
@given(**FIELDS, sealed=st.booleans(), kind=st.sampled_from(KINDS), pad=st.integers(0, 80))
def test_round_trip_any_field_values(ftype, flags, volume, session, seq, ack, window, payload,
                                     sealed, kind, pad):
    sealer, opener = keys()
    data = encode_frame(ftype, flags, volume, session, seq, ack, window, payload,
                        sealer if sealed else None)
    padded = bytes(data) + os.urandom(pad)  # whatever the NIC appended
    frame = decode_frame(as_kind(padded, kind))
    check_fields(frame, ftype, flags, volume, session, seq, ack, window, payload, sealed)
    if sealed:
        assert mac_ok(opener, frame)


def test_decoding_does_not_modify_the_buffer():
    data = bytearray(encode_frame(FrameType.DATA, BEGIN, 1, 2, 3, 4, 5, b"payload"))
    before = bytes(data)
    decode_frame(data)
    decode_frame(memoryview(data))
    assert data == before
    decode_frame(data)  # and it still decodes: nothing was zeroed in place


def test_payload_is_a_view_of_the_received_buffer():
    data = bytearray(encode_frame(FrameType.DATA, BEGIN | END, 1, 2, 3, 4, 5, b"abcdef"))
    frame = decode_frame(data)
    assert isinstance(frame.payload, memoryview)
    assert bytes(frame.payload) == b"abcdef"


def test_largest_payload_round_trips_and_one_more_byte_is_refused():
    payload = os.urandom(MAX_PAYLOAD)
    frame = decode_frame(encode_frame(FrameType.DATA, BEGIN | END, 1, 2, 3, 4, 5, payload))
    assert bytes(frame.payload) == payload
    with pytest.raises(ValueError):
        encode_frame(FrameType.DATA, 0, 1, 2, 3, 4, 5, bytes(MAX_PAYLOAD + 1))


def test_header_layout_matches_the_spec():
    data = encode_frame(FrameType.ACK, END, 0x0A0B0C0D, 0x11223344, 0x55, 0x66, 0x77, b"xy")
    assert HEADER_SIZE == 44 and TRAILER_SIZE == 24 and CHECKSUM_OFFSET == 36
    assert data[0] == VERSION == peek_version(data)
    assert data[1] == FrameType.ACK
    assert data[2:4] == END.to_bytes(2, "big")
    assert data[4:8] == bytes.fromhex("0A0B0C0D")
    assert data[8:12] == bytes.fromhex("11223344")
    assert int.from_bytes(data[12:20], "big") == 0x55
    assert int.from_bytes(data[20:28], "big") == 0x66
    assert int.from_bytes(data[28:32], "big") == 0x77
    assert data[32:34] == (2).to_bytes(2, "big") and data[34:36] == bytes(2)
    assert data[HEADER_SIZE:] == b"xy"
    assert peek_version(b"") is None


# --- padding --------------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("filler", [b"\0", b"\xff", None], ids=["zeros", "ones", "random"])
def test_trailing_padding_is_ignored(sealed, filler):
    sealer, opener = keys()
    for ftype, data in sample_frames(sealed):
        extra = max(PAD_TO - len(data), 0) + 16
        pad = os.urandom(extra) if filler is None else filler * extra
        frame = decode_frame(bytes(data) + pad)
        reference = decode_frame(data)
        assert frame.type == ftype
        assert bytes(frame.payload) == bytes(reference.payload)
        if sealed:
            assert mac_ok(opener, frame)


# --- truncation -----------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_every_truncation_is_refused(sealed):
    for ftype, data in sample_frames(sealed):
        for cut in range(len(data)):
            with pytest.raises(FrameError) as info:
                decode_frame(data[:cut])
            assert info.value.reason == "malformed", (ftype, cut, info.value)
        decode_frame(data)  # and the whole frame is fine


def test_frames_fed_byte_by_byte_only_decode_when_complete():
    """As a stream would deliver them: each growing prefix is refused until the last."""
    for sealed in (False, True):
        for ftype, data in sample_frames(sealed):
            buf = bytearray()
            for i, byte in enumerate(data):
                buf.append(byte)
                if i < len(data) - 1:
                    with pytest.raises(FrameError):
                        decode_frame(buf)
            assert decode_frame(buf).type == ftype


# --- corruption -----------------------------------------------------------------------


def flipped(data, bit: int) -> bytearray:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return out


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_every_single_bit_flip_in_header_or_payload_is_detected(sealed):
    for ftype, data in sample_frames(sealed):
        covered = len(data) - (TRAILER_SIZE if sealed else 0)
        for bit in range(covered * 8):
            with pytest.raises(FrameError) as info:
                decode_frame(flipped(data, bit))
            assert info.value.reason in ("corrupt", "malformed", "bad_version"), (ftype, bit)
            if bit < 8:
                assert info.value.reason == "bad_version"  # the version byte is read first


def test_every_single_bit_flip_in_the_mac_trailer_is_detected():
    for ftype, data in sample_frames(True):
        opener = keys()[1]
        start = len(data) - TRAILER_SIZE
        for bit in range(start * 8, len(data) * 8):
            frame = decode_frame(flipped(data, bit))  # the checksum does not cover it...
            assert not mac_ok(opener, frame), (ftype, bit)  # ...the MAC does


def test_bit_flips_in_padding_are_harmless():
    for sealed in (False, True):
        for ftype, data in sample_frames(sealed):
            padded = bytes(data) + bytes(32)
            for bit in range(len(data) * 8, len(padded) * 8):
                assert decode_frame(flipped(padded, bit)).type == ftype


def test_the_mac_covers_every_header_field_even_with_a_recomputed_checksum():
    """An attacker can recompute the checksum; the MAC must still catch the change."""
    for ftype, data in sample_frames(True):
        opener = keys()[1]
        covered = len(data) - TRAILER_SIZE
        for bit in range(covered * 8):
            if CHECKSUM_OFFSET * 8 <= bit < HEADER_SIZE * 8:
                continue  # the checksum itself is what the attacker rewrites
            forged = with_checksum(flipped(data, bit))
            try:
                frame = decode_frame(forged)
            except FrameError:
                continue  # refused outright (version, unknown flag, length...)
            if frame.flags & AUTHENTICATED:
                assert not mac_ok(opener, frame), (ftype, bit)


def test_a_mac_from_another_key_or_direction_fails():
    _, opener = keys()
    other_direction = auth.FrameSealer(auth.direction_key(KEY, NONCE_B, NONCE_A))
    other_secret = auth.FrameSealer(auth.direction_key(auth.stretch_secret(b"another secret"),
                                                       NONCE_A, NONCE_B))
    for sealer in (other_direction, other_secret):
        frame = decode_frame(encode_frame(FrameType.DATA, BEGIN | END, 1, 2, 3, 4, 5, b"x", sealer))
        assert not mac_ok(opener, frame)


def test_each_sealed_frame_gets_a_new_counter():
    sealer, opener = keys()
    trailers = []
    for _ in range(5):
        frame = decode_frame(encode_frame(FrameType.PING, 0, 1, 2, 0, 4, 5, b"", sealer))
        assert mac_ok(opener, frame)
        trailers.append(bytes(frame.trailer))
    counters = [int.from_bytes(t[:8], "big") for t in trailers]
    assert counters == [1, 2, 3, 4, 5]


def test_header_checks_after_the_checksum():
    good = encode_frame(FrameType.PING, 0, 1, 2, 0, 4, 5, b"")
    for offset, value, reason in [(1, 0, "malformed"), (1, 6, "malformed"), (1, 255, "malformed"),
                                  (3, 0x04, "malformed"), (35, 1, "malformed")]:
        data = bytearray(good)
        data[offset] = value
        with pytest.raises(FrameError) as info:
            decode_frame(data)
        assert info.value.reason == "corrupt"  # line noise: the checksum catches it first
        with pytest.raises(FrameError) as info:
            decode_frame(with_checksum(data))
        assert info.value.reason == reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_versions_are_refused_as_such(version):
    data = bytearray(encode_frame(FrameType.PING, 0, 1, 2, 0, 4, 5, b""))
    data[0] = version
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert info.value.reason == "bad_version"


# --- noise ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_frame_error(data):
    try:
        decode_frame(data)
    except FrameError as err:
        assert err.reason in ("malformed", "bad_version", "corrupt")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ftype=st.integers(0, 255), flags=st.integers(0, 0xFFFF), reserved=st.integers(0, 0xFFFF),
    length=st.integers(0, 0xFFFF), body=st.binary(max_size=120), fix_checksum=st.booleans(),
    version=st.sampled_from([VERSION, VERSION, 0, 2]),
)
def test_garbage_with_a_valid_checksum_decodes_or_raises_frame_error(
        ftype, flags, reserved, length, body, fix_checksum, version):
    """Headers that pass the checksum but say anything at all."""
    data = bytearray(HEADER.pack(version, ftype, flags, 1, 2, 3, 4, 5, length, reserved, 0)) + body
    if fix_checksum and length <= len(body):
        data = with_checksum(data)
    try:
        frame = decode_frame(data)
    except FrameError as err:
        assert err.reason in ("malformed", "bad_version", "corrupt")
    else:
        assert frame.type in set(FrameType)
        assert reserved == 0 and not frame.flags & ~(BEGIN | END | AUTHENTICATED)
        assert len(frame.payload) == length


# --- building in place (the link's TX-ring slots) -------------------------------------


def split(payload: bytes, cuts: list[int]) -> tuple:
    """`payload` as a tuple of memoryview pieces cut at `cuts` (a fragment across parts)."""
    view = memoryview(payload)
    edges = [0, *sorted(c % (len(payload) + 1) for c in cuts), len(payload)]
    return tuple(view[a:b] for a, b in zip(edges, edges[1:]))


@settings(max_examples=200, deadline=None)
@given(**FIELDS, sealed=st.booleans(), cuts=st.lists(st.integers(0, 1 << 16), max_size=3),
       offset=st.integers(0, 50), as_pieces=st.booleans())
def test_encode_frame_into_builds_what_encode_frame_returns(
        ftype, flags, volume, session, seq, ack, window, payload, sealed, cuts, offset,
        as_pieces):
    body = split(payload, cuts) if as_pieces else memoryview(payload)
    (sealer_1, _), (sealer_2, opener) = keys(), keys()
    expected = encode_frame(ftype, flags, volume, session, seq, ack, window, body,
                            sealer_1 if sealed else None)
    buf = memoryview(bytearray(b"\xee" * (offset + len(expected) + 30)))
    spec = (ftype, flags, volume, session, seq, ack, window, body, sealer_2 if sealed else None)
    n = encode_frame_into(buf, offset, len(expected), spec)
    assert n == len(expected)
    assert bytes(buf[offset:offset + n]) == bytes(expected)
    assert bytes(buf[:offset]) == b"\xee" * offset  # nothing written outside the frame
    assert bytes(buf[offset + n:]) == b"\xee" * 30
    frame = decode_frame(buf[offset:offset + n])
    check_fields(frame, ftype, flags, volume, session, seq, ack, window, payload, sealed)
    if sealed:
        assert mac_ok(opener, frame)


def test_a_payload_in_pieces_encodes_as_the_joined_payload():
    payload = os.urandom(1000)
    whole = encode_frame(FrameType.DATA, BEGIN, 1, 2, 3, 4, 5, payload)
    assert encode_frame(FrameType.DATA, BEGIN, 1, 2, 3, 4, 5, split(payload, [24, 500])) == whole


def test_encode_frame_into_refuses_a_frame_over_the_limit_and_writes_nothing():
    buf = memoryview(bytearray(200))
    spec = (FrameType.DATA, 0, 1, 2, 3, 4, 5, bytes(100), None)
    with pytest.raises(ValueError):
        encode_frame_into(buf, 10, HEADER_SIZE + 99, spec)
    sealed = (FrameType.DATA, 0, 1, 2, 3, 4, 5, bytes(100), keys()[0])
    with pytest.raises(ValueError):
        encode_frame_into(buf, 10, HEADER_SIZE + 100 + TRAILER_SIZE - 1, sealed)
    with pytest.raises(ValueError):
        encode_frame_into(memoryview(bytearray(MAX_PAYLOAD + 100)), 0, MAX_PAYLOAD + 100,
                          (FrameType.DATA, 0, 1, 2, 3, 4, 5, bytes(MAX_PAYLOAD + 1), None))
    assert bytes(buf) == bytes(200)
    assert encode_frame_into(buf, 10, HEADER_SIZE + 100, spec) == HEADER_SIZE + 100
