"""The replication messages: round trips, and garbage never raises anything but MessageError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.replication import (
    FUA, HEADER_SIZE, MAY_TRIM, MessageError, MessageType, decode_message, encode_control,
    encode_flush, encode_reply, encode_sync_end, encode_write, encode_zeroes,
)


def fragments(data: bytes, size: int) -> list[memoryview]:
    """Cut a message as the link does: consecutive views of at most `size` bytes."""
    view = memoryview(data)
    return [view[i:i + size] for i in range(0, len(data), size)] or [view]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=5000),
       st.booleans(), st.booleans(), st.integers(1236, 9000))
def test_write_round_trips_across_fragments(ident, offset, data, fua, sync, frag):
    message = decode_message(fragments(encode_write(ident, offset, data, fua=fua, sync=sync), frag))
    assert message.type is (MessageType.SYNC_DATA if sync else MessageType.WRITE)
    assert (message.id, message.offset, message.length) == (ident, offset, len(data))
    assert bool(message.flags & FUA) == fua
    assert b"".join(message.data) == data


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=3000),
       st.booleans(), st.booleans())
def test_write_as_parts_is_the_same_message_without_copying_the_data(ident, offset, data, fua,
                                                                     sync):
    buffer = bytearray(data)
    parts = encode_write(ident, offset, memoryview(buffer), fua=fua, sync=sync, parts=True)
    assert type(parts) is tuple and len(parts) == 2 and len(parts[0]) == HEADER_SIZE
    assert parts[0] + bytes(parts[1]) == encode_write(ident, offset, data, fua=fua, sync=sync)
    buffer[0] ^= 0xFF  # the data part is the caller's buffer itself, not a copy
    assert bytes(parts[1][:1]) == bytes(buffer[:1])


def test_small_messages_round_trip():
    zero = decode_message([encode_zeroes(5, 4096, 1 << 20, fua=True, may_trim=True)])
    assert (zero.type, zero.id, zero.offset, zero.length) == (MessageType.ZEROES, 5, 4096, 1 << 20)
    assert zero.flags == FUA | MAY_TRIM
    assert decode_message([encode_flush(9)]).type is MessageType.FLUSH
    assert decode_message([encode_sync_end(10)]).type is MessageType.SYNC_END
    reply = decode_message([encode_reply(11, 28)])
    assert (reply.type, reply.id, reply.errno) == (MessageType.REPLY, 11, 28)


def test_control_round_trip():
    body = {"role": "primary", "current": 2**63 + 5, "consistent": True}
    message = decode_message(fragments(encode_control(MessageType.STATE, body), 1300))
    assert message.type is MessageType.STATE and message.body == body


@pytest.mark.parametrize("data, why", [
    (b"", "no header"),
    (bytes([99]) + bytes(HEADER_SIZE - 1), "unknown type"),
    (bytes([MessageType.WRITE, 0x80]) + bytes(HEADER_SIZE - 2), "unknown flags"),
    (encode_write(1, 0, b"abc")[:-1], "short data"),
    (encode_write(1, 0, b"abc") + b"x", "long data"),
    (encode_flush(1) + b"x", "trailing bytes"),
    (encode_zeroes(1, 0, 0), "empty zeroes"),
    (bytes([MessageType.STATE]) + bytes(3) + (3).to_bytes(4, "big") + bytes(16) + b"\xc1\xc1\xc1",
     "bad msgpack"),
    (bytes([MessageType.STATE]) + bytes(3) + (1).to_bytes(4, "big") + bytes(16) + b"\x05",
     "not a map"),
])
def test_malformed_messages_are_refused(data, why):
    with pytest.raises(MessageError):
        decode_message([data] if data else [])


@given(st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_decode_or_raise_message_error(parts):
    try:
        decode_message(parts)
    except MessageError:
        pass


def test_control_encoder_refuses_data_types():
    with pytest.raises(ValueError):
        encode_control(MessageType.WRITE, {})
