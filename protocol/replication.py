"""Messages the two daemons exchange over a connection, sans-IO.

The link (connection.py) carries opaque messages reliably and in order; this module says
what is inside them.  Every message starts with one fixed 24-byte big-endian header:

    type u8 | flags u8 | reserved u16 | length u32 | id u64 | offset u64

Bulk messages (WRITE, SYNC_DATA) put the data right after the header, so the receiver can
hand the received fragments to one os.pwritev without joining them.  Control messages
(STATE, REFUSE) carry a msgpack map after the header, as DESIGN.md asks.

    WRITE      id, offset, data            an application write, in issue order
    ZEROES     id, offset, length          zero a range (flag MAY_TRIM: punching is fine)
    FLUSH      id                          make every earlier write durable
    SYNC_DATA  id, offset, data            one resync chunk from the sync source
    SYNC_END   id                          the resync is complete: persist "up to date"
    REPLY      id, length = errno          the request `id` is applied (0) or failed
    STATE      msgpack                     this node's role, disk and generation state
    REFUSE     msgpack {reason}            this node will not go on with the connection
    BITMAP     msgpack {bits}              a resync target's out-of-sync bitmap, to merge
    SYNC_BEGIN msgpack {total_bytes, kind} the source starts copying this much
    DIGESTS    msgpack {offset, length, digests, purpose}
                                           xxh3-64 of each bitmap block of a range: the
                                           receiver compares with its own blocks
    DIGESTS_RESULT msgpack {offset, length, differ, purpose}
                                           which of those blocks differ (block numbers)

Every request (WRITE .. SYNC_END) gets exactly one REPLY once it is applied (durable when
FUA is set, or for FLUSH and SYNC_END), whatever the replication protocol: the primary
needs them for protocol C, for flow control, and to know what the peer holds.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import ProtocolError

HEADER = struct.Struct(">BBHIQQ")
HEADER_SIZE = HEADER.size  # 24


class MessageType(enum.IntEnum):
    WRITE = 1
    ZEROES = 2
    FLUSH = 3
    SYNC_DATA = 4
    SYNC_END = 5
    REPLY = 6
    STATE = 7
    REFUSE = 8
    BITMAP = 9
    SYNC_BEGIN = 10
    DIGESTS = 11
    DIGESTS_RESULT = 12


# Flags
FUA = 0x01  # the write must be durable before its REPLY
MAY_TRIM = 0x02  # ZEROES may punch a hole instead of writing zeros
KNOWN_FLAGS = FUA | MAY_TRIM

# Requests the receiver must answer with a REPLY.
REQUESTS = frozenset({MessageType.WRITE, MessageType.ZEROES, MessageType.FLUSH,
                      MessageType.SYNC_DATA, MessageType.SYNC_END})
_CONTROL = frozenset({MessageType.STATE, MessageType.REFUSE, MessageType.BITMAP,
                      MessageType.SYNC_BEGIN, MessageType.DIGESTS, MessageType.DIGESTS_RESULT})
_WITH_DATA = frozenset({MessageType.WRITE, MessageType.SYNC_DATA})
MAX_CONTROL_BODY = 4 << 20  # a BITMAP of a 128 TiB volume at 4 KiB blocks


class MessageError(ProtocolError):
    """A received message is malformed: the peer is broken or not ours."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message.  `data` is the write's payload as a tuple of buffers."""

    type: MessageType
    flags: int = 0
    id: int = 0
    offset: int = 0
    length: int = 0
    data: tuple = ()
    body: Any = field(default=None)

    @property
    def errno(self) -> int:
        """For a REPLY: 0 on success, else the errno the peer's disk gave."""
        return self.length


def _header(mtype: int, flags: int, length: int, ident: int, offset: int) -> bytes:
    return HEADER.pack(mtype, flags, 0, length, ident, offset)


def encode_write(ident: int, offset: int, data, *, fua: bool = False,
                 sync: bool = False, parts: bool = False):
    """A WRITE (or SYNC_DATA when `sync`): header and data in one new buffer (bytes).

    With `parts`, the same message as the tuple (header, data), without copying the
    data, for Connection.send_message (which takes a message as parts).  `data` must
    then stay unchanged until the link has delivered the message.
    """
    mtype = MessageType.SYNC_DATA if sync else MessageType.WRITE
    header = HEADER.pack(mtype, FUA if fua else 0, 0, memoryview(data).nbytes, ident, offset)
    if parts:
        return (header, data)
    return b"".join((header, data))


def encode_zeroes(ident: int, offset: int, length: int, *, fua: bool = False,
                  may_trim: bool = False) -> bytes:
    flags = (FUA if fua else 0) | (MAY_TRIM if may_trim else 0)
    return _header(MessageType.ZEROES, flags, length, ident, offset)


def encode_flush(ident: int) -> bytes:
    return _header(MessageType.FLUSH, 0, 0, ident, 0)


def encode_sync_end(ident: int) -> bytes:
    return _header(MessageType.SYNC_END, 0, 0, ident, 0)


def encode_reply(ident: int, errno: int = 0) -> bytes:
    return _header(MessageType.REPLY, 0, errno, ident, 0)


def encode_control(mtype: MessageType, body: dict) -> bytes:
    """A STATE or REFUSE message with its msgpack body."""
    if mtype not in _CONTROL:
        raise ValueError(f"{mtype!r} is not a control message")
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_CONTROL_BODY:
        raise ValueError(f"control body of {len(packed)} bytes is too large")
    return _header(mtype, 0, len(packed), 0, 0) + packed


def decode_message(parts) -> Message:
    """Decode a message from its received fragments (buffers, in order).

    Raises MessageError for anything malformed; never anything else.
    """
    if not parts:
        raise MessageError("empty message")
    first = memoryview(parts[0])
    if len(first) < HEADER_SIZE:
        # The link's smallest frame payload is far larger than a header, so a header
        # split over fragments means the sender is not ours.
        raise MessageError(f"first fragment of {len(first)} bytes holds no header")
    mtype, flags, _reserved, length, ident, offset = HEADER.unpack_from(first)
    try:
        mtype = MessageType(mtype)
    except ValueError:
        raise MessageError(f"unknown message type {mtype}") from None
    if flags & ~KNOWN_FLAGS:
        raise MessageError(f"unknown flags {flags:#x}")
    rest = [first[HEADER_SIZE:]] + [memoryview(p) for p in parts[1:]]
    size = sum(len(p) for p in rest)
    if mtype in _WITH_DATA:
        if size != length:
            raise MessageError(f"{mtype.name} says {length} bytes but carries {size}")
        if length == 0:
            raise MessageError(f"{mtype.name} of zero bytes")
        return Message(mtype, flags, ident, offset, length, tuple(p for p in rest if len(p)))
    if mtype in _CONTROL:
        if size != length or length > MAX_CONTROL_BODY:
            raise MessageError(f"{mtype.name} body: header says {length}, got {size}")
        try:
            body = msgpack.unpackb(b"".join(rest), raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MessageError(f"{mtype.name} body is not msgpack: {exc}") from None
        if not isinstance(body, dict):
            raise MessageError(f"{mtype.name} body is not a map")
        return Message(mtype, flags, ident, offset, length, body=body)
    if size:
        raise MessageError(f"{mtype.name} carries {size} unexpected bytes")
    if mtype is MessageType.ZEROES and length == 0:
        raise MessageError("ZEROES of zero bytes")
    return Message(mtype, flags, ident, offset, length)
