"""The per-volume metadata record and its on-disk encoding (pure: bytes in, bytes out).

    magic "MIRRMETA" | format u32 | body length u32 | msgpack body | xxh64(everything before)

The body is a map so later formats can add fields (the dirty bitmap comes next); a
reader refuses a newer format rather than guess.  The daemon writes the record with an
atomic replace (mirrord/metafile.py), so a crash leaves either the old or the new one.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, replace

import msgpack
import xxhash

from .generations import NO_ID, Generation

MAGIC = b"MIRRMETA"
FORMAT = 1
_PREFIX = struct.Struct(">8sII")
_DIGEST = struct.Struct(">Q")
MAX_BODY = 1 << 20


class MetadataError(Exception):
    """The metadata bytes are not a record this version can read."""


@dataclass(frozen=True)
class Metadata:
    size: int  # bytes of the volume this record describes
    node: str  # the node that owns this disk
    current: int = NO_ID  # generation id of the data on this disk
    previous: int = NO_ID  # the generation id before the last change of history
    consistent: bool = False  # the disk holds a whole version of the data
    primary: bool = False  # set while primary; still set after a crash
    peer_behind: bool = False  # this node wrote what the peer does not have

    @property
    def generation(self) -> Generation:
        return Generation(self.current, self.previous, self.consistent, self.primary)

    def with_(self, **changes) -> "Metadata":
        return replace(self, **changes)


def fresh(size: int, node: str) -> Metadata:
    """The record of a disk that never held mirrored data: inconsistent, no generation."""
    return Metadata(size=size, node=node)


def encode(meta: Metadata) -> bytes:
    body = msgpack.packb(asdict(meta), use_bin_type=True)
    head = _PREFIX.pack(MAGIC, FORMAT, len(body)) + body
    return head + _DIGEST.pack(xxhash.xxh64_intdigest(head))


def decode(data: bytes) -> Metadata:
    if len(data) < _PREFIX.size + _DIGEST.size:
        raise MetadataError(f"only {len(data)} bytes: not a mirrord metadata file")
    magic, fmt, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MetadataError("bad magic: not a mirrord metadata file")
    if fmt != FORMAT:
        raise MetadataError(f"format {fmt}, this version reads format {FORMAT}")
    end = _PREFIX.size + length
    if length > MAX_BODY or len(data) != end + _DIGEST.size:
        raise MetadataError("truncated or oversized record")
    if _DIGEST.unpack_from(data, end)[0] != xxhash.xxh64_intdigest(data[:end]):
        raise MetadataError("checksum mismatch: the record is damaged")
    try:
        body = msgpack.unpackb(data[_PREFIX.size:end], raw=False)
        return Metadata(**body)
    except Exception as exc:  # unknown or missing fields, wrong types
        raise MetadataError(f"unreadable record: {exc}") from None
