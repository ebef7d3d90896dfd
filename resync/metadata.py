"""The per-volume metadata file: its records and their layout (pure: bytes in, bytes out).

    offset 0        superblock slot 0 (4 KiB)    \\ written alternately, each with a
    offset 4 KiB    superblock slot 1 (4 KiB)    / sequence number: a torn write leaves
                                                   the other slot valid
    offset 8 KiB    activity-log ring, AL_SLOTS records of 4 KiB (newest valid one wins)
    then            the bitmap, one 4 KiB page per 32,640 blocks

Every record ends with (or starts with) an xxh64 checksum, so a torn or damaged record is
detected: two bad superblocks refuse the start; a bad activity-log record is skipped for
an older one, and a bad bitmap page marks its whole range out of sync (safe: resync
copies too much, never too little).

Superblock body (msgpack map): size, block (bitmap block), extent (activity-log
extent), node, volume_id, current, bitmap, history (generation ids, see
resync/generations.py), consistent, primary (set while primary: still set after a
crash), sync_source (a resync target remembers its source's generation, to resume),
outdated and outdated_by (a primary that went on without this node said so through the
cluster: this disk must not be promoted until a resync brings it up to date),
peer_fenced (this node ran the fence-peer handler: it runs unfence-peer once the peer
is up to date again).  Fields added later have defaults, so older files still read.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field, replace

import msgpack
import xxhash

from .generations import NO_ID, Generation

MAGIC = b"MIRRMETA"
AL_MAGIC = b"MIRRAL02"
FORMAT = 2
RECORD = 4096
SUPER_SLOTS = 2
AL_SLOTS = 8
PAGE_HEADER = struct.Struct(">IIQ")  # page index, reserved, xxh64
PAGE_BITS = (RECORD - PAGE_HEADER.size) * 8
_SUPER_HEAD = struct.Struct(">8sIQI")  # magic, format, sequence, body length
_AL_HEAD = struct.Struct(">8sQI")  # magic, sequence, count
_DIGEST = struct.Struct(">Q")
HISTORY = 4


class MetadataError(Exception):
    """Bytes that are not a valid record of this format."""


@dataclass(frozen=True)
class Metadata:
    size: int
    node: str
    volume_id: int = 0
    block: int = 4096
    extent: int = 4 << 20
    current: int = NO_ID
    bitmap: int = NO_ID
    history: tuple = ()
    consistent: bool = False
    primary: bool = False
    sync_source: int = NO_ID
    outdated: bool = False
    outdated_by: str = ""
    peer_fenced: bool = False

    def generation(self, crashed_primary: bool, dirty: bool = False) -> Generation:
        return Generation(self.current, self.bitmap, tuple(self.history), self.consistent,
                          crashed_primary, self.sync_source, dirty)

    def with_(self, **changes) -> "Metadata":
        return replace(self, **changes)


@dataclass(frozen=True)
class Layout:
    """Where each record of a volume's metadata lives."""

    size: int
    block: int = 4096
    al_offset: int = field(init=False)
    bitmap_offset: int = field(init=False)
    pages: int = field(init=False)
    file_size: int = field(init=False)

    def __post_init__(self) -> None:
        nbits = (self.size + self.block - 1) // self.block
        object.__setattr__(self, "al_offset", SUPER_SLOTS * RECORD)
        object.__setattr__(self, "bitmap_offset", self.al_offset + AL_SLOTS * RECORD)
        object.__setattr__(self, "pages", max(1, (nbits + PAGE_BITS - 1) // PAGE_BITS))
        object.__setattr__(self, "file_size", self.bitmap_offset + self.pages * RECORD)

    def super_offset(self, slot: int) -> int:
        return slot * RECORD

    def al_slot_offset(self, sequence: int) -> int:
        return self.al_offset + (sequence % AL_SLOTS) * RECORD

    def page_offset(self, page: int) -> int:
        return self.bitmap_offset + page * RECORD


def _pad(data: bytes) -> bytes:
    if len(data) > RECORD:
        raise ValueError(f"record of {len(data)} bytes exceeds {RECORD}")
    return data + bytes(RECORD - len(data))


def encode_super(meta: Metadata, sequence: int) -> bytes:
    body = asdict(meta)
    body["history"] = list(meta.history)
    packed = msgpack.packb(body, use_bin_type=True)
    head = _SUPER_HEAD.pack(MAGIC, FORMAT, sequence, len(packed)) + packed
    return _pad(head + _DIGEST.pack(xxhash.xxh64_intdigest(head)))


def decode_super(data: bytes) -> tuple[int, Metadata]:
    """(sequence, record); MetadataError when the bytes are not a valid superblock."""
    if len(data) < _SUPER_HEAD.size + _DIGEST.size:
        raise MetadataError("too short for a superblock")
    magic, fmt, sequence, length = _SUPER_HEAD.unpack_from(data)
    if magic != MAGIC:
        raise MetadataError("no mirrord metadata magic")
    if fmt != FORMAT:
        raise MetadataError(f"metadata format {fmt}; this version reads format {FORMAT}")
    end = _SUPER_HEAD.size + length
    if end + _DIGEST.size > len(data):
        raise MetadataError("superblock body overruns its record")
    if _DIGEST.unpack_from(data, end)[0] != xxhash.xxh64_intdigest(bytes(data[:end])):
        raise MetadataError("superblock checksum mismatch")
    try:
        body = msgpack.unpackb(bytes(data[_SUPER_HEAD.size:end]), raw=False)
        body["history"] = tuple(body.get("history", ()))
        return sequence, Metadata(**body)
    except Exception as exc:  # unknown or missing fields, wrong types
        raise MetadataError(f"unreadable superblock: {exc}") from None


def encode_al(sequence: int, extents: list[int]) -> bytes:
    body = _AL_HEAD.pack(AL_MAGIC, sequence, len(extents)) + struct.pack(
        f">{len(extents)}I", *extents)
    return _pad(body + _DIGEST.pack(xxhash.xxh64_intdigest(body)))


def decode_al(data: bytes) -> tuple[int, list[int]]:
    if len(data) < _AL_HEAD.size + _DIGEST.size:
        raise MetadataError("too short for an activity-log record")
    magic, sequence, count = _AL_HEAD.unpack_from(data)
    if magic != AL_MAGIC:
        raise MetadataError("no activity-log magic")
    end = _AL_HEAD.size + 4 * count
    if end + _DIGEST.size > len(data):
        raise MetadataError("activity-log record overruns")
    if _DIGEST.unpack_from(data, end)[0] != xxhash.xxh64_intdigest(bytes(data[:end])):
        raise MetadataError("activity-log checksum mismatch")
    return sequence, list(struct.unpack_from(f">{count}I", data, _AL_HEAD.size))


def max_al_extents() -> int:
    return (RECORD - _AL_HEAD.size - _DIGEST.size) // 4


def encode_page(index: int, bits: bytes) -> bytes:
    if len(bits) != PAGE_BITS // 8:
        raise ValueError("a bitmap page holds exactly PAGE_BITS bits")
    digest = xxhash.xxh64_intdigest(struct.pack(">I", index) + bits)
    return PAGE_HEADER.pack(index, 0, digest) + bits


def decode_page(index: int, data: bytes) -> bytes | None:
    """The page's bits, or None when the page is torn, damaged or someone else's."""
    if len(data) != RECORD:
        return None
    got_index, _reserved, digest = PAGE_HEADER.unpack_from(data)
    bits = bytes(data[PAGE_HEADER.size:])
    if got_index != index or digest != xxhash.xxh64_intdigest(struct.pack(">I", index) + bits):
        return None
    return bits
