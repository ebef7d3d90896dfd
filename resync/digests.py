"""Block digests for checksum resync and online verify (pure).

Both sides hash each bitmap block of a range with xxh3-64 and compare: equal digests
mean the block need not be copied (checksum resync) or is in sync (verify).
"""

from __future__ import annotations

import struct

import xxhash

_DIGEST = struct.Struct(">Q")


def block_digests(data: bytes, block: int) -> bytes:
    """The concatenated 8-byte digests of each `block`-sized piece of `data`."""
    view = memoryview(data)
    return b"".join(_DIGEST.pack(xxhash.xxh3_64_intdigest(view[i:i + block]))
                    for i in range(0, len(view), block))


def differing_blocks(mine: bytes, theirs: bytes) -> list[int]:
    """Indexes (within the range) of the blocks whose digests differ."""
    if len(mine) != len(theirs):
        raise ValueError("digest lists of different lengths")
    return [i // 8 for i in range(0, len(mine), 8) if mine[i:i + 8] != theirs[i:i + 8]]
