"""resync.bitmap.Bitmap against a reference model: a Python set of marked block numbers.

The geometry is drawn at random (block sizes from 1 byte, so byte boundaries are crossed
all the time, up to 4 KiB; volume sizes that are and are not multiples of the block;
tiny pages so that ranges cross page boundaries) and then random sequences of
operations are applied to both the bitmap and the model, comparing them after each step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resync.bitmap import DEFAULT_BLOCK, Bitmap

# --- the reference model -------------------------------------------------------------


class Geometry:
    def __init__(self, size: int, block: int, page_bits: int, max_segments: int = 4096) -> None:
        self.size, self.block, self.page_bits = size, block, page_bits
        self.max_segments = max_segments
        self.nbits = -(-size // block)
        self.npages = max(1, -(-self.nbits // page_bits))

    def __repr__(self) -> str:
        return (f"Geometry(size={self.size}, block={self.block}, page_bits={self.page_bits}, "
                f"max_segments={self.max_segments})")

    def new(self) -> Bitmap:
        return Bitmap(self.size, self.block, self.page_bits, max_segments=self.max_segments)

    def block_bytes(self, b: int) -> int:
        """Real size of block b (the tail block may be short)."""
        return min((b + 1) * self.block, self.size) - b * self.block

    def touched(self, offset: int, length: int) -> set[int]:
        if length <= 0:
            return set()
        return {b for b in range(self.nbits)
                if b * self.block < offset + length and (b + 1) * self.block > offset}

    def covered(self, offset: int, length: int) -> set[int]:
        """Blocks whose every real byte lies inside the range."""
        if length <= 0:
            return set()
        return {b for b in range(self.nbits)
                if b * self.block >= offset and b * self.block + self.block_bytes(b) <= offset + length}

    def page_of(self, b: int) -> int:
        return b // self.page_bits

    def page_blocks(self, page: int) -> set[int]:
        return set(range(page * self.page_bits, min(self.nbits, (page + 1) * self.page_bits)))


def marked(bm: Bitmap) -> set[int]:
    return {b for b in range(bm.nbits) if bm.test(b)}


def assert_matches(bm: Bitmap, model: set[int]) -> None:
    assert marked(bm) == model
    # Every bit of the buffer counted afresh: also proves that the padding bits past
    # nbits stayed clear.
    assert int.from_bytes(bm.bits, "little").bit_count() == len(model)
    assert len(bm.bits) == (bm.nbits + 7) // 8
    assert_counts_kept(bm)


def assert_counts_kept(bm: Bitmap) -> None:
    """The counts kept as bits change equal the counts taken afresh, segment by segment."""
    step = bm.seg_bytes
    fresh = [int.from_bytes(bm.bits[i:i + step], "little").bit_count()
             for i in range(0, len(bm.bits), step)]
    assert bm.seg_counts == fresh
    assert bm.count() == bm.marked == sum(fresh)


@st.composite
def geometries(draw, max_blocks: int = 150) -> Geometry:
    block = draw(st.sampled_from([1, 2, 4, 8, 16, 512, 4096]))
    full = draw(st.integers(0, max_blocks))
    tail = draw(st.one_of(st.just(0), st.integers(0, block - 1)))
    page_bits = draw(st.sampled_from([8, 16, 24, 64, 32640]))
    # Few segments, so that they span several bytes and pages and a change cuts them.
    max_segments = draw(st.sampled_from([1, 2, 3, 7, 4096]))
    return Geometry(full * block + tail, block, page_bits, max_segments)


def byte_ranges(g: Geometry):
    """(offset, length) inside the volume, sometimes overshooting its end a little."""
    return st.integers(0, g.size).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(0, g.size - off + 2 * g.block)))


def block_aligned_ranges(g: Geometry):
    return st.integers(0, g.nbits).flatmap(
        lambda first: st.integers(first, g.nbits).map(
            lambda end: (first * g.block, end * g.block - first * g.block)))


def block_sets(g: Geometry):
    return st.sets(st.integers(0, max(0, g.nbits - 1)), max_size=g.nbits) if g.nbits else st.just(set())


def operations(g: Geometry):
    ranges = st.one_of(byte_ranges(g), block_aligned_ranges(g))
    return st.one_of(
        st.tuples(st.just("set"), ranges),
        st.tuples(st.just("clear"), ranges),
        st.tuples(st.just("set"), ranges),
        st.tuples(st.just("clear"), ranges),
        st.tuples(st.just("set_all"), st.none()),
        st.tuples(st.just("clear_all"), st.none()),
        st.tuples(st.just("merge"), block_sets(g)),
        st.tuples(st.just("torn_page"), st.integers(0, g.npages - 1)),
    )


def bitmap_with(g: Geometry, blocks: set[int]) -> Bitmap:
    bm = g.new()
    for b in blocks:
        bm.set_range(b * g.block, 1)
    bm.dirty_pages.clear()
    return bm


# --- random sequences of operations ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_operations_match_the_reference_model(data):
    g = data.draw(geometries(), label="geometry")
    ops = data.draw(st.lists(operations(g), max_size=25), label="ops")
    bm = g.new()
    model: set[int] = set()
    assert_matches(bm, model)
    assert bm.dirty_pages == set()
    for op, arg in ops:
        bm.dirty_pages.clear()
        before = set(model)
        if op == "set":
            offset, length = arg
            blocks = g.touched(offset, length)
            bm.set_range(offset, length)
            model |= blocks
            expected_dirty = {g.page_of(b) for b in blocks}
        elif op == "clear":
            offset, length = arg
            blocks = g.covered(offset, length)
            bm.clear_range(offset, length)
            model -= blocks
            expected_dirty = {g.page_of(b) for b in blocks}
        elif op == "set_all":
            bm.set_all()
            model = set(range(g.nbits))
            expected_dirty = set(range(g.npages)) if g.nbits else set()
        elif op == "clear_all":
            bm.clear_all()
            model = set()
            expected_dirty = set(range(g.npages)) if g.nbits else set()
        elif op == "merge":
            other = bitmap_with(g, arg)
            bm.merge(bytes(other.bits))
            model |= arg
            expected_dirty = None
        else:  # a torn page read back from disk
            bm.load_page(arg, None)
            model |= g.page_blocks(arg)
            expected_dirty = {arg}
        assert_matches(bm, model)
        changed_pages = {g.page_of(b) for b in before ^ model}
        if expected_dirty is None:
            # merge may rewrite more pages than changed, never fewer, and none when
            # nothing changed.
            assert changed_pages <= bm.dirty_pages
            if not changed_pages:
                assert bm.dirty_pages == set()
        else:
            assert bm.dirty_pages == expected_dirty, (op, arg)
            assert changed_pages <= bm.dirty_pages


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_questions_agree_with_the_reference_model(data):
    g = data.draw(geometries(), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    bm = bitmap_with(g, model)
    assert_matches(bm, model)
    assert bm.count() == len(model)
    assert bm.dirty_bytes() == sum(g.block_bytes(b) for b in model)
    for b in range(g.nbits):
        assert bm.test(b) == (b in model)


# --- set_range / clear_range: fixed cases ----------------------------------------


def test_set_range_marks_every_block_a_byte_falls_in():
    bm = Bitmap(10 * 4096)
    bm.set_range(4095, 2)  # last byte of block 0, first byte of block 1
    assert marked(bm) == {0, 1}
    bm.set_range(5 * 4096, 4096)  # exactly block 5
    assert marked(bm) == {0, 1, 5}
    bm.set_range(7 * 4096 + 1, 0)  # empty write: nothing
    assert marked(bm) == {0, 1, 5}


def test_ranges_crossing_byte_boundaries_in_the_bit_buffer():
    bm = Bitmap(64, block=1)
    bm.set_range(5, 14)  # bits 5..18: partial byte, full byte, partial byte
    assert marked(bm) == set(range(5, 19))
    assert bytes(bm.bits[:3]) == bytes([0b11100000, 0xFF, 0b00000111])
    bm.clear_range(7, 10)  # bits 7..16
    assert marked(bm) == {5, 6, 17, 18}
    bm.set_range(8, 8)  # exactly one byte
    assert marked(bm) == {5, 6, 17, 18} | set(range(8, 16))
    bm.set_range(2, 3)  # inside one byte
    assert marked(bm) == {2, 3, 4, 5, 6, 17, 18} | set(range(8, 16))


def test_clear_range_leaves_a_partially_covered_block_marked():
    bm = Bitmap(10 * 4096)
    bm.set_all()
    bm.clear_range(100, 4096)  # covers no block whole: block 0 and 1 only in part
    assert bm.count() == 10
    bm.clear_range(4096 + 1, 3 * 4096)  # covers block 2 and 3 whole, 1 and 4 in part
    assert marked(bm) == {0, 1, 4, 5, 6, 7, 8, 9}
    bm.clear_range(0, 4095)  # one byte short of block 0
    assert bm.test(0)
    bm.clear_range(0, 4096)
    assert not bm.test(0)


def test_the_tail_block_counts_whole_when_a_range_reaches_the_volume_end():
    size = 3 * 4096 + 100  # tail block of 100 bytes
    bm = Bitmap(size)
    assert bm.nbits == 4
    bm.set_range(size - 1, 1)
    assert marked(bm) == {3}
    assert bm.dirty_bytes() == 100
    bm.clear_range(size - 50, 50)  # half of the tail block
    assert bm.test(3)
    bm.clear_range(3 * 4096, 100)  # the whole tail block: its real size is 100
    assert not bm.test(3)
    bm.set_range(3 * 4096, 1)
    bm.clear_range(3 * 4096, 4096)  # overshooting the end is fine too
    assert not bm.test(3)
    bm.set_range(3 * 4096 + 1, 10)
    bm.clear_range(3 * 4096 + 1, 10_000)  # does not start at the tail block's start
    assert bm.test(3)


def test_a_write_past_the_volume_end_marks_nothing_beyond_nbits():
    bm = Bitmap(2 * 4096 + 1)
    bm.set_range(2 * 4096, 10 * 4096)
    assert marked(bm) == {2}
    assert bm.count() == 1
    bm.set_range(100 * 4096, 4096)
    assert bm.count() == 1


def test_geometry_and_validation():
    assert Bitmap(0).nbits == 0 and Bitmap(0).npages == 1 and Bitmap(0).count() == 0
    assert Bitmap(1).nbits == 1
    assert Bitmap(4096).nbits == 1
    assert Bitmap(4097).nbits == 2
    assert Bitmap(100, block=1, page_bits=8).npages == 13
    assert DEFAULT_BLOCK == 4096
    for bad in (0, -4096, 3, 4095, 6000):
        with pytest.raises(ValueError):
            Bitmap(1 << 20, block=bad)
    with pytest.raises(ValueError):
        Bitmap(64, block=1, bits=b"\x00" * 7)
    bm = Bitmap(20, block=1, bits=b"\x0f\x00\x08\xff\xff")  # longer than needed: cut
    assert len(bm.bits) == 3 and marked(bm) == {0, 1, 2, 3, 19}
    assert bm.dirty_pages == set()


# --- count / dirty_bytes ----------------------------------------------------------


def test_dirty_bytes_counts_the_tail_block_at_its_real_size():
    size = 5 * 4096 + 1
    bm = Bitmap(size)
    assert bm.dirty_bytes() == 0
    bm.set_range(0, 1)
    assert bm.dirty_bytes() == 4096
    bm.set_range(size - 1, 1)
    assert bm.count() == 2 and bm.dirty_bytes() == 4096 + 1
    bm.set_all()
    assert bm.count() == 6 and bm.dirty_bytes() == size
    bm.clear_range(0, 4096)
    assert bm.dirty_bytes() == size - 4096


def test_dirty_bytes_of_a_volume_that_is_a_multiple_of_the_block():
    bm = Bitmap(8 * 512, block=512)
    bm.set_all()
    assert bm.dirty_bytes() == 8 * 512
    bm.clear_range(7 * 512, 512)
    assert bm.dirty_bytes() == 7 * 512


# --- runs ---------------------------------------------------------------------------


def check_runs(g: Geometry, runs: list[tuple[int, int]], model: set[int], start_block: int,
               max_bytes: int | None) -> None:
    got: list[int] = []
    for offset, length in runs:
        assert length > 0
        assert offset % g.block == 0, "a run starts on a block boundary"
        end = offset + length
        assert end <= g.size
        assert end % g.block == 0 or end == g.size, "a run ends on a block boundary or at the volume end"
        if max_bytes is not None and max_bytes >= g.block:
            assert length <= max_bytes
        got.extend(range(offset // g.block, -(-end // g.block)))
    assert got == sorted(b for b in model if b >= start_block), "runs, concatenated, are the marked blocks in order"
    limit_blocks = max(1, max_bytes // g.block) if max_bytes else None
    for (o1, l1), (o2, _l2) in zip(runs, runs[1:]):
        assert o2 >= o1 + l1
        if o2 == o1 + l1:  # split only because the first one reached max_bytes
            assert limit_blocks is not None and l1 == limit_blocks * g.block


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_runs_cover_exactly_the_marked_blocks(data):
    g = data.draw(geometries(), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    start_block = data.draw(st.integers(0, g.nbits + 1), label="start_block")
    max_bytes = data.draw(st.one_of(st.none(), st.integers(g.block, 20 * g.block)), label="max_bytes")
    bm = bitmap_with(g, model)
    runs = list(bm.runs(start_block, max_bytes))
    check_runs(g, runs, model, start_block, max_bytes)
    assert sum(length for _, length in runs) == sum(g.block_bytes(b) for b in model if b >= start_block)
    if start_block == 0:
        assert sum(length for _, length in runs) == bm.dirty_bytes()


def test_runs_fixed_case():
    size = 20 * 4096 + 7
    bm = Bitmap(size)
    for b in (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20):
        bm.set_range(b * 4096, 1)
    assert list(bm.runs()) == [(0, 3 * 4096), (5 * 4096, 4096), (8 * 4096, 9 * 4096), (20 * 4096, 7)]
    assert list(bm.runs(max_bytes=4 * 4096)) == [
        (0, 3 * 4096), (5 * 4096, 4096), (8 * 4096, 4 * 4096), (12 * 4096, 4 * 4096),
        (16 * 4096, 4096), (20 * 4096, 7)]
    # max_bytes that is not a multiple of the block rounds down to whole blocks
    assert list(bm.runs(max_bytes=2 * 4096 + 100))[:2] == [(0, 2 * 4096), (2 * 4096, 4096)]
    assert list(bm.runs(start_block=9)) == [(9 * 4096, 8 * 4096), (20 * 4096, 7)]
    assert list(bm.runs(start_block=21)) == []
    bm.clear_all()
    assert list(bm.runs()) == []


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_runs_read_the_bits_as_they_go(data):
    # The sync source clears each run once the peer has it, and writes keep setting bits
    # behind the cursor: neither disturbs the iteration.
    g = data.draw(geometries(), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    max_bytes = data.draw(st.one_of(st.none(), st.integers(g.block, 8 * g.block)), label="max_bytes")
    bm = bitmap_with(g, model)
    expected = list(bm.runs(0, max_bytes))
    got = []
    for offset, length in bm.runs(0, max_bytes):
        got.append((offset, length))
        bm.clear_range(offset, length)
        bm.set_range(0, 1)  # a new write behind the cursor
    assert got == expected


# --- merge, set_all, clear_all ------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_merge_is_a_union(data):
    g = data.draw(geometries(), label="geometry")
    mine = data.draw(block_sets(g), label="mine")
    theirs = data.draw(block_sets(g), label="theirs")
    bm = bitmap_with(g, mine)
    other = bitmap_with(g, theirs)
    bm.merge(bytes(other.bits))
    assert_matches(bm, mine | theirs)
    assert marked(other) == theirs  # the other one is not changed
    changed = {g.page_of(b) for b in theirs - mine}
    assert changed <= bm.dirty_pages
    if not changed:
        assert bm.dirty_pages == set()
    with pytest.raises(ValueError):
        bm.merge(bytes(len(bm.bits) + 1))


def test_set_all_and_clear_all():
    g = Geometry(1000 * 512 + 3, 512, 64)
    bm = g.new()
    bm.set_all()
    assert bm.count() == g.nbits == 1001
    assert bm.dirty_bytes() == g.size
    assert bm.dirty_pages == set(range(g.npages))
    assert list(bm.runs()) == [(0, g.size)]
    bm.dirty_pages.clear()
    bm.clear_all()
    assert bm.count() == 0 and list(bm.runs()) == []
    assert bm.dirty_pages == set(range(g.npages))


# --- pages ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_page_bytes_load_page_round_trip(data):
    g = data.draw(geometries(max_blocks=300), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    bm = bitmap_with(g, model)
    copy = g.new()
    for page in range(g.npages):
        chunk = bm.page_bytes(page)
        assert len(chunk) == g.page_bits // 8
        # the page holds its own blocks and nothing else
        alone = g.new()
        alone.load_page(page, chunk)
        assert marked(alone) == model & g.page_blocks(page)
        assert alone.dirty_pages == set()
        copy.load_page(page, chunk)
    assert_matches(copy, model)
    assert bytes(copy.bits) == bytes(bm.bits)
    # the last page's padding past nbits is zero
    last = bm.page_bytes(g.npages - 1)
    used = g.nbits - (g.npages - 1) * g.page_bits
    as_int = int.from_bytes(last, "little")
    assert as_int >> used == 0


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_torn_page_marks_its_whole_range_and_nothing_beyond(data):
    g = data.draw(geometries(max_blocks=300), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    page = data.draw(st.integers(0, g.npages - 1), label="page")
    bm = bitmap_with(g, model)
    bm.load_page(page, None)
    assert_matches(bm, model | g.page_blocks(page))
    assert bm.dirty_pages == {page}, "a torn page must be rewritten"


def test_torn_last_page_does_not_mark_past_the_volume_end():
    bm = Bitmap(13 * 4096 + 5, page_bits=8)  # 14 blocks, pages of 8: the last has 6
    bm.load_page(1, None)
    assert marked(bm) == set(range(8, 14))
    assert bm.count() == 6
    assert bm.dirty_bytes() == 5 * 4096 + 5
    assert list(bm.runs()) == [(8 * 4096, 5 * 4096 + 5)]


def test_dirty_pages_are_exactly_the_pages_touched():
    bm = Bitmap(100, block=1, page_bits=16)  # 7 pages
    assert bm.dirty_pages == set()
    bm.set_range(15, 2)  # blocks 15, 16: pages 0 and 1
    assert bm.dirty_pages == {0, 1}
    bm.dirty_pages.clear()
    bm.set_range(40, 1)
    assert bm.dirty_pages == {2}
    bm.dirty_pages.clear()
    bm.clear_range(30, 40)  # blocks 30..69: pages 1..4
    assert bm.dirty_pages == {1, 2, 3, 4}
    bm.dirty_pages.clear()
    bm.set_range(99, 1)
    assert bm.dirty_pages == {6}
    bm.dirty_pages.clear()
    bm.set_range(0, 0)
    bm.clear_range(1, 0)
    bm.set_range(200, 10)  # past the end
    assert bm.dirty_pages == set()
    bm.set_range(0, 100)
    bm.dirty_pages.clear()
    bm.clear_range(1, 0)
    bm.clear_range(0, 0)
    assert bm.dirty_pages == set()
    bm.load_page(3, bm.page_bytes(3))  # read back from disk: already on disk
    assert bm.dirty_pages == set()
    bm.load_page(3, None)  # torn: to rewrite
    assert bm.dirty_pages == {3}


def test_partial_cover_clears_nothing_and_dirties_nothing():
    bm = Bitmap(10 * 4096, page_bits=8)
    bm.set_all()
    bm.dirty_pages.clear()
    bm.clear_range(1, 4096)
    assert bm.count() == 10
    assert bm.dirty_pages == set()


# --- the status map and the cost of asking ---------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_out_of_sync_map_gives_each_slice_its_share_of_marked_blocks(data):
    g = data.draw(geometries(max_blocks=3000), label="geometry")
    model = data.draw(block_sets(g), label="blocks")
    cells = data.draw(st.sampled_from([1, 4, 64]), label="cells")
    bm = bitmap_with(g, model)
    got = bm.out_of_sync_map(cells)
    assert len(got) == cells
    # The slices, from the model: `cells` runs of whole segments (of seg_bytes * 8 blocks).
    step, nseg = bm.seg_bytes * 8, len(bm.seg_counts)
    for i, percent in enumerate(got):
        first, end = nseg * i // cells * step, min(nseg * (i + 1) // cells * step, g.nbits)
        if end <= first:
            assert percent == 0
            continue
        share = len({b for b in model if first <= b < end}) / (end - first)
        assert percent == round(100 * share)


def test_out_of_sync_map_of_a_volume_with_a_marked_quarter():
    bm = Bitmap(64 << 20)  # 16,384 blocks: 2,048 one-byte segments, 32 to a cell
    bm.set_range(0, 16 << 20)
    assert bm.out_of_sync_map() == [100] * 16 + [0] * 48
    # Cells are 1 MiB (256 blocks): 64 blocks at the end of cell 32, 64 at the start of 33.
    bm.set_range((32 << 20) + 4096 * 192, 4096 * 128)
    assert bm.out_of_sync_map()[31:35] == [0, 25, 25, 0]


def test_asking_reads_no_bits_and_a_change_counts_only_what_it_touches(monkeypatch):
    """status, watch and metrics ask under the lock writes take: count(), dirty_bytes()
    and out_of_sync_map() must not scan a bitmap (32 MiB here: a 1 TiB volume), and a
    change counts the bytes it touches, not the bitmap's."""
    import resync.bitmap as module

    bm = Bitmap(1 << 40)
    bm.set_range(5 << 30, 3 << 30)
    counted = []
    real = module._popcount
    monkeypatch.setattr(module, "_popcount", lambda data: counted.append(len(data)) or real(data))
    assert bm.count() == (3 << 30) // 4096 and bm.dirty_bytes() == 3 << 30
    assert bm.out_of_sync_map() == [19] + [0] * 63  # 3 GiB of the first 16 GiB slice
    assert counted == []
    bm.set_range(700 << 30, 4096)  # one block, inside one byte: counted without _popcount
    bm.clear_range(5 << 30, 1 << 20)  # 256 blocks: 32 bytes before, 32 after
    assert counted == [32, 32]
    assert bm.count() == (3 << 30) // 4096 + 1 - 256
