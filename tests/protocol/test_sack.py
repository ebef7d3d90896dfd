"""The ACK payload (selective-ack ranges): round trip and noise."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from protocol import FrameError
from protocol.receiver import MAX_SACK_RANGES, decode_sack, encode_sack

RANGES = st.lists(
    st.tuples(st.integers(0, 2**64 - 2), st.integers(1, 2**20)).map(
        lambda r: (r[0], min(r[0] + r[1], 2**64 - 1))),
    max_size=MAX_SACK_RANGES,
)


@settings(max_examples=200, deadline=None)
@given(RANGES)
def test_round_trip(ranges):
    payload = encode_sack(ranges)
    assert len(payload) == 2 + 16 * len(ranges)
    for buffer in (payload, bytearray(payload), memoryview(payload)):
        assert decode_sack(buffer) == ranges


def test_empty_ack():
    assert decode_sack(encode_sack([])) == []


@pytest.mark.parametrize("payload", [
    b"", b"\x00", struct.pack(">H", 1), struct.pack(">HQQ", 1, 5, 5), struct.pack(">HQQ", 1, 6, 5),
    struct.pack(">HQQ", 2, 1, 2), struct.pack(">HQQ", 0, 1, 2), struct.pack(">HQQ", 1, 1, 2) + b"x",
    struct.pack(">H", MAX_SACK_RANGES + 1) + struct.pack(">QQ", 1, 2) * (MAX_SACK_RANGES + 1),
], ids=repr)
def test_inconsistent_payloads_are_malformed(payload):
    with pytest.raises(FrameError) as info:
        decode_sack(payload)
    assert info.value.reason == "malformed"


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=100),
                 st.tuples(st.integers(0, 70), st.binary(max_size=200)).map(
                     lambda t: struct.pack(">H", t[0]) + t[1][: 16 * t[0]])))
def test_random_bytes_decode_or_raise_frame_error(data):
    try:
        ranges = decode_sack(data)
    except FrameError as err:
        assert err.reason == "malformed"
    else:
        assert all(start < end for start, end in ranges)
        assert len(ranges) <= MAX_SACK_RANGES
