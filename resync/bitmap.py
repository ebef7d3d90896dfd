"""The out-of-sync bitmap: one bit per block (default 4 KiB) of the volume.

A set bit means "this block may differ from the peer's".  Bits are set for any write the
peer may not have, and cleared only when the peer confirmed the block (resync copied
it) - never for a block a write covered only in part, since the rest of it may differ.

The bits are kept in pages (resync/metadata.py gives each page a checksum on disk), and
the bitmap remembers which pages changed since they were last written out, so the daemon
writes only those.

How many bits are set is kept as the bits change, in total and per segment (at most
MAX_SEGMENTS equal runs of bytes), so that `count()` and `out_of_sync_map()` cost the
same on a 16 TiB volume (a 512 MiB bitmap) as on a small one: the daemon answers
`status`, `watch` and metrics scrapes under the lock its writes take, and counting the
whole bitmap there took 0.2 s per TiB of volume.  A change pays for the bytes it
touches, nothing more.
"""

from __future__ import annotations

from typing import Iterator

DEFAULT_BLOCK = 4096
# Segments the set-bit counts are kept for: on volumes of 128 MiB and more each of the
# status map's 64 cells spans 32 to 64 of them (its slices equal to within a segment).
MAX_SEGMENTS = 4096


def _popcount(data) -> int:
    return int.from_bytes(data, "little").bit_count()


class Bitmap:
    def __init__(self, size: int, block: int = DEFAULT_BLOCK, page_bits: int = 4080 * 8,
                 bits: bytes | None = None, max_segments: int = MAX_SEGMENTS) -> None:
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
        # Segment: seg_bytes bytes of bits (a power of two).  seg_counts[i] is how many
        # bits of segment i are set; marked their sum.
        self.seg_bytes = 1
        while length > self.seg_bytes * max_segments:
            self.seg_bytes *= 2
        self.seg_counts: list[int] = []
        self.marked = 0
        self._recount_all()

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
            self._recount_all()

    # --- keeping the counts -------------------------------------------------------

    def _recount_all(self) -> None:
        bits, step = self.bits, self.seg_bytes
        self.seg_counts = [_popcount(bits[i:i + step]) for i in range(0, len(bits), step)]
        self.marked = sum(self.seg_counts)

    def _pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(segment, start, end) byte runs of [lo, hi) cut at segment boundaries."""
        step = self.seg_bytes
        return [(seg, max(lo, seg * step), min(hi, (seg + 1) * step))
                for seg in range(lo // step, (hi - 1) // step + 1)]

    def _counting(self, lo: int, hi: int, change) -> None:
        """Run change(), which alters only bytes [lo, hi) of the bits, keeping the counts:
        the bytes of the range are counted before and after (cost: the bytes touched)."""
        bits = self.bits
        pieces = self._pieces(lo, hi) if hi > lo else []
        before = [_popcount(bits[a:b]) for _, a, b in pieces]
        change()
        counts = self.seg_counts
        for (seg, a, b), was in zip(pieces, before):
            delta = _popcount(bits[a:b]) - was
            counts[seg] += delta
            self.marked += delta

    def _assign(self, first: int, end: int, value: bool) -> None:
        if end <= first:
            return
        lo = first // 8
        if lo == (end - 1) // 8:
            # Within one byte (a 4 KiB write: one block): the common case, kept short.
            bits = self.bits
            was = bits[lo].bit_count()
            self._write_bits(first, end, value)
            delta = bits[lo].bit_count() - was
            self.seg_counts[lo // self.seg_bytes] += delta
            self.marked += delta
        else:
            self._counting(lo, (end + 7) // 8, lambda: self._write_bits(first, end, value))
        self.dirty_pages.update(range(first // self.page_bits, (end - 1) // self.page_bits + 1))

    def _write_bits(self, first: int, end: int, value: bool) -> None:
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

    # --- questions ----------------------------------------------------------------

    def test(self, block: int) -> bool:
        return bool(self.bits[block // 8] >> (block % 8) & 1)

    def count(self) -> int:
        """Blocks marked."""
        return self.marked

    def out_of_sync_map(self, cells: int = 64) -> list[int]:
        """Percent of blocks marked in each of `cells` slices of the volume, equal to
        within a segment (their edges fall on segment boundaries); 0 for a slice that
        holds no segment (a volume of fewer than `cells` segments)."""
        counts, step, nbits = self.seg_counts, self.seg_bytes * 8, self.nbits
        nseg = len(counts)
        out = []
        for i in range(cells):
            first, end = nseg * i // cells, nseg * (i + 1) // cells
            span = min(end * step, nbits) - first * step
            out.append(round(100 * sum(counts[first:end]) / span) if span > 0 else 0)
        return out

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

        def put() -> None:
            self.bits[start:end] = (b"\xff" * (end - start) if data is None
                                    else data[:end - start])
            extra = self.nbits % 8
            if end == len(self.bits) and extra and end > start:
                self.bits[-1] &= (1 << extra) - 1  # no marks beyond the last block

        self._counting(start, end, put)
        if data is None:
            self.dirty_pages.add(page)
