"""The out-of-sync bitmap: one bit per block (default 4 KiB) of the volume.

A set bit means "this block may differ from the peer's".  Bits are set for any write the
peer may not have, and cleared only when the peer confirmed the block (resync copied
it) - never for a block a write covered only in part, since the rest of it may differ.

The bits are kept in pages (resync/metadata.py gives each page a checksum on disk), and
the bitmap remembers which pages changed since they were last written out, so the daemon
writes only those.
"""

from __future__ import annotations

from typing import Iterator

DEFAULT_BLOCK = 4096


class Bitmap:
    def __init__(self, size: int, block: int = DEFAULT_BLOCK, page_bits: int = 4080 * 8,
                 bits: bytes | None = None) -> None:
        if block <= 0 or block & (block - 1):
            raise ValueError("block size must be a power of two")
        self.size = size
        self.block = block
        self.nbits = (size + block - 1) // block
        self.page_bits = page_bits
        self.npages = max(1, (self.nbits + page_bits - 1) // page_bits)
        length = (self.nbits + 7) // 8
        if bits is None:
            self.bits = bytearray(length)
        else:
            if len(bits) < length:
                raise ValueError(f"{len(bits)} bytes of bits, need {length}")
            self.bits = bytearray(bits[:length])
        self.dirty_pages: set[int] = set()

    # --- block arithmetic ---------------------------------------------------------

    def blocks_touched(self, offset: int, length: int) -> tuple[int, int]:
        """[first, end) blocks that any byte of the range falls in."""
        return offset // self.block, min(self.nbits, (offset + length + self.block - 1) // self.block)

    def blocks_covered(self, offset: int, length: int) -> tuple[int, int]:
        """[first, end) blocks that the range covers whole (the volume's tail counts whole)."""
        first = (offset + self.block - 1) // self.block
        end_byte = offset + length
        end = self.nbits if end_byte >= self.size else end_byte // self.block
        return first, max(first, end)

    # --- changes ------------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> None:
        """Mark every block the byte range touches."""
        if length > 0:
            self._assign(*self.blocks_touched(offset, length), True)

    def clear_range(self, offset: int, length: int) -> None:
        """Clear only the blocks the byte range covers whole."""
        if length > 0:
            self._assign(*self.blocks_covered(offset, length), False)

    def set_all(self) -> None:
        self._assign(0, self.nbits, True)

    def clear_all(self) -> None:
        self._assign(0, self.nbits, False)

    def merge(self, other: bytes) -> None:
        """OR another bitmap of the same geometry into this one."""
        if len(other) != len(self.bits):
            raise ValueError("bitmaps of different geometry")
        merged = (int.from_bytes(self.bits, "little") | int.from_bytes(other, "little"))
        new = merged.to_bytes(len(self.bits), "little")
        if new != self.bits:
            self.bits[:] = new
            self.dirty_pages.update(range(self.npages))

    def _assign(self, first: int, end: int, value: bool) -> None:
        if end <= first:
            return
        bits = self.bits
        fill = 0xFF if value else 0x00
        head_byte, tail_byte = first // 8, end // 8
        if head_byte == tail_byte:
            mask = ((1 << (end - first)) - 1) << (first % 8)
            bits[head_byte] = (bits[head_byte] | mask) if value else (bits[head_byte] & ~mask)
        else:
            if first % 8:
                mask = (0xFF << (first % 8)) & 0xFF
                bits[head_byte] = (bits[head_byte] | mask) if value else (bits[head_byte] & ~mask)
                head_byte += 1
            bits[head_byte:tail_byte] = bytes([fill]) * (tail_byte - head_byte)
            if end % 8:
                mask = (1 << (end % 8)) - 1
                bits[tail_byte] = (bits[tail_byte] | mask) if value else (bits[tail_byte] & ~mask)
        self.dirty_pages.update(range(first // self.page_bits, (end - 1) // self.page_bits + 1))

    # --- questions ----------------------------------------------------------------

    def test(self, block: int) -> bool:
        return bool(self.bits[block // 8] >> (block % 8) & 1)

    def count(self) -> int:
        """Blocks marked."""
        return int.from_bytes(self.bits, "little").bit_count()

    def dirty_bytes(self) -> int:
        """Bytes of the volume the marked blocks cover (the tail block counts its real size)."""
        n = self.count()
        if n and self.test(self.nbits - 1):
            return (n - 1) * self.block + (self.size - (self.nbits - 1) * self.block)
        return n * self.block

    def runs(self, start_block: int = 0, max_bytes: int | None = None) -> Iterator[tuple[int, int]]:
        """Byte ranges (offset, length) of consecutive marked blocks, from `start_block`,
        each at most `max_bytes` long.  Reads the bits as it goes, so bits cleared or set
        behind the cursor do not disturb it."""
        bits, nbits = self.bits, self.nbits
        block = start_block
        limit = (max_bytes // self.block) if max_bytes else nbits
        limit = max(1, limit)
        while block < nbits:
            byte = bits[block // 8]
            if byte == 0 and block % 8 == 0:
                # Skip clear bytes quickly.
                index = block // 8
                while index < len(bits) and bits[index] == 0:
                    index += 1
                block = index * 8
                continue
            if not byte >> (block % 8) & 1:
                block += 1
                continue
            first = block
            while block < nbits and block - first < limit and bits[block // 8] >> (block % 8) & 1:
                block += 1
            offset = first * self.block
            yield offset, min(block * self.block, self.size) - offset

    def page_bytes(self, page: int) -> bytes:
        """The bits of one page (zero-padded to the page's full size)."""
        start = page * self.page_bits // 8
        chunk = bytes(self.bits[start:start + self.page_bits // 8])
        return chunk + bytes(self.page_bits // 8 - len(chunk))

    def load_page(self, page: int, data: bytes | None) -> None:
        """Put one page read from disk in place; None (a torn page) marks its whole range."""
        start = page * self.page_bits // 8
        end = min(len(self.bits), start + self.page_bits // 8)
        if data is None:
            self.bits[start:end] = b"\xff" * (end - start)
            extra = self.nbits % 8
            if end == len(self.bits) and extra:
                self.bits[-1] &= (1 << extra) - 1
            self.dirty_pages.add(page)
        else:
            self.bits[start:end] = data[:end - start]
