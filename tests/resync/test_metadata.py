"""resync.metadata: the on-disk records (superblock, activity-log record, bitmap page) and
their layout in the metadata file.

Round trips over random field values; every single-bit flip and every truncation of a
record's meaningful bytes is detected; arbitrary bytes either decode or raise
MetadataError (pages: None), never anything else.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from resync import metadata
from resync.activity_log import DEFAULT_CAPACITY
from resync.bitmap import Bitmap
from resync.generations import NO_ID, Generation
from resync.metadata import (
    AL_MAGIC, AL_SLOTS, FORMAT, MAGIC, PAGE_BITS, PAGE_HEADER, RECORD, SUPER_SLOTS, Layout,
    Metadata, MetadataError, decode_al, decode_page, decode_super, encode_al, encode_page,
    encode_super, max_al_extents)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
PAGE_BYTES = PAGE_BITS // 8

# The record headers, as the format defines them (big-endian):
SUPER_HEAD = struct.Struct(">8sIQI")  # magic, format, sequence, body length; then body, xxh64
AL_HEAD = struct.Struct(">8sQI")  # magic, sequence, count; then count u32, xxh64

metas = st.builds(
    Metadata,
    size=st.integers(0, 2**63),
    node=st.text(max_size=40),
    volume_id=U64,
    block=st.sampled_from([512, 4096, 65536]),
    extent=st.sampled_from([1 << 20, 4 << 20, 64 << 20]),
    current=U64,
    bitmap=U64,
    history=st.lists(U64, max_size=6).map(tuple),
    consistent=st.booleans(),
    primary=st.booleans(),
    sync_source=U64,
)

EXAMPLE = Metadata(size=(1 << 40) + 512, node="box-a", volume_id=0xDEADBEEFCAFEF00D,
                   block=4096, extent=4 << 20, current=0xFFFFFFFFFFFFFFFF,
                   bitmap=0x8000000000000000, history=(3, 2**64 - 2, 1), consistent=True,
                   primary=True, sync_source=0x0123456789ABCDEF)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def super_meaningful(record: bytes) -> int:
    """Bytes of a superblock record that carry information: header, body, checksum."""
    return SUPER_HEAD.size + SUPER_HEAD.unpack_from(record)[3] + 8


def al_meaningful(record: bytes) -> int:
    return AL_HEAD.size + 4 * AL_HEAD.unpack_from(record)[2] + 8


def checksummed_super(body: bytes, sequence: int = 1, fmt: int = FORMAT, magic: bytes = MAGIC) -> bytes:
    """A superblock with a valid checksum around an arbitrary body."""
    head = SUPER_HEAD.pack(magic, fmt, sequence, len(body)) + body
    return (head + struct.pack(">Q", xxhash.xxh64_intdigest(head))).ljust(RECORD, b"\0")


# --- superblock -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(metas, U64)
def test_superblock_round_trip(meta, sequence):
    record = encode_super(meta, sequence)
    assert len(record) == RECORD
    got_sequence, got = decode_super(record)
    assert got_sequence == sequence
    assert got == meta
    assert isinstance(got.history, tuple)
    assert decode_super(bytearray(record)) == (sequence, meta)
    assert decode_super(memoryview(record)) == (sequence, meta)


def test_superblock_format_matches_the_documented_header():
    record = encode_super(EXAMPLE, 7)
    magic, fmt, sequence, length = SUPER_HEAD.unpack_from(record)
    assert (magic, fmt, sequence) == (MAGIC, FORMAT, 7)
    end = SUPER_HEAD.size + length
    assert struct.unpack_from(">Q", record, end)[0] == xxhash.xxh64_intdigest(record[:end])
    body = msgpack.unpackb(record[SUPER_HEAD.size:end], raw=False)
    assert body["history"] == list(EXAMPLE.history)
    assert body["current"] == EXAMPLE.current and body["node"] == "box-a"
    assert record[end + 8:] == bytes(RECORD - end - 8)


def test_every_single_bit_flip_of_a_superblock_is_detected():
    record = encode_super(EXAMPLE, 2**64 - 1)
    meaningful = super_meaningful(record)
    for bit in range(RECORD * 8):
        damaged = flip(record, bit)
        if bit // 8 < meaningful:
            with pytest.raises(MetadataError):
                decode_super(damaged)
        else:
            # padding after the checksum carries nothing: a flip there must not change
            # what is read
            try:
                assert decode_super(damaged) == (2**64 - 1, EXAMPLE)
            except MetadataError:
                pass


@settings(max_examples=100, deadline=None)
@given(metas, U64, st.data())
def test_random_bit_flips_of_a_superblock_are_detected(meta, sequence, data):
    record = encode_super(meta, sequence)
    meaningful = super_meaningful(record)
    bit = data.draw(st.integers(0, meaningful * 8 - 1), label="bit")
    with pytest.raises(MetadataError):
        decode_super(flip(record, bit))


def test_every_truncation_of_a_superblock_is_detected():
    record = encode_super(EXAMPLE, 5)
    meaningful = super_meaningful(record)
    for n in range(RECORD):
        if n < meaningful:
            with pytest.raises(MetadataError):
                decode_super(record[:n])
        else:
            assert decode_super(record[:n]) == (5, EXAMPLE)


def test_superblock_rejections():
    good = encode_super(EXAMPLE, 1)
    with pytest.raises(MetadataError):
        decode_super(bytes(RECORD))  # never written
    with pytest.raises(MetadataError):
        decode_super(encode_al(1, [1, 2]))  # another record type
    body = good[SUPER_HEAD.size:super_meaningful(good) - 8]
    with pytest.raises(MetadataError, match="format"):
        decode_super(checksummed_super(body, fmt=FORMAT + 1))  # a valid record of another format
    with pytest.raises(MetadataError):
        decode_super(checksummed_super(body, magic=b"DRBDMETA"))
    assert decode_super(checksummed_super(body, sequence=9)) == (9, EXAMPLE)
    fields = msgpack.unpackb(body, raw=False)
    with pytest.raises(MetadataError):  # a field this version does not know
        decode_super(checksummed_super(msgpack.packb({**fields, "colour": "blue"})))
    del fields["node"]
    with pytest.raises(MetadataError):  # a required field missing
        decode_super(checksummed_super(msgpack.packb(fields)))
    for junk in (b"", b"\xc1", msgpack.packb(5), msgpack.packb([1, 2]), msgpack.packb({1: 2}),
                 msgpack.packb({"size": 1, "node": "x", "history": 5}), body + b"\x00"):
        with pytest.raises(MetadataError):
            decode_super(checksummed_super(junk))
    with pytest.raises(MetadataError):  # a body length that overruns the record
        decode_super(SUPER_HEAD.pack(MAGIC, FORMAT, 1, RECORD) + bytes(RECORD - SUPER_HEAD.size))


def test_a_superblock_too_large_for_its_record_is_refused_on_encode():
    with pytest.raises(ValueError):
        encode_super(EXAMPLE.with_(node="x" * RECORD), 1)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=RECORD + 64),
    st.binary(max_size=RECORD).map(lambda b: MAGIC + struct.pack(">I", FORMAT) + b),
    st.binary(max_size=RECORD - 64).map(checksummed_super),
    st.dictionaries(st.sampled_from(["size", "node", "history", "current", "bogus"]),
                    st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(),
                              st.lists(st.integers(0, 3), max_size=3))).map(
        lambda fields: checksummed_super(msgpack.packb(fields))),
))
def test_arbitrary_bytes_decode_or_raise_metadata_error(data):
    try:
        sequence, meta = decode_super(data)
    except MetadataError:
        return
    assert isinstance(sequence, int) and isinstance(meta, Metadata)


# --- activity-log record -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(U64, st.lists(U32, max_size=max_al_extents()))
def test_activity_log_round_trip(sequence, extents):
    record = encode_al(sequence, extents)
    assert len(record) == RECORD
    assert decode_al(record) == (sequence, extents)
    assert decode_al(bytearray(record)) == (sequence, extents)


def test_max_al_extents_fits_one_record_and_one_more_does_not():
    n = max_al_extents()
    assert n >= DEFAULT_CAPACITY
    assert AL_HEAD.size + 4 * n + 8 <= RECORD < AL_HEAD.size + 4 * (n + 1) + 8
    full = [2**32 - 1 - i for i in range(n)]
    record = encode_al(2**64 - 1, full)
    assert len(record) == RECORD
    assert decode_al(record) == (2**64 - 1, full)
    with pytest.raises(ValueError):
        encode_al(1, full + [0])


def test_every_single_bit_flip_of_an_al_record_is_detected():
    extents = [0, 1, 900, 2**32 - 1, 77]
    record = encode_al(12345, extents)
    meaningful = al_meaningful(record)
    for bit in range(RECORD * 8):
        damaged = flip(record, bit)
        if bit // 8 < meaningful:
            with pytest.raises(MetadataError):
                decode_al(damaged)
        else:
            try:
                assert decode_al(damaged) == (12345, extents)
            except MetadataError:
                pass


@settings(max_examples=100, deadline=None)
@given(U64, st.lists(U32, max_size=50), st.data())
def test_random_bit_flips_and_truncations_of_al_records_are_detected(sequence, extents, data):
    record = encode_al(sequence, extents)
    meaningful = al_meaningful(record)
    bit = data.draw(st.integers(0, meaningful * 8 - 1), label="bit")
    with pytest.raises(MetadataError):
        decode_al(flip(record, bit))
    cut = data.draw(st.integers(0, meaningful - 1), label="cut")
    with pytest.raises(MetadataError):
        decode_al(record[:cut])


def test_every_truncation_of_an_al_record_is_detected():
    record = encode_al(3, [5, 6, 7])
    meaningful = al_meaningful(record)
    for n in range(RECORD):
        if n < meaningful:
            with pytest.raises(MetadataError):
                decode_al(record[:n])
        else:
            assert decode_al(record[:n]) == (3, [5, 6, 7])


def test_al_record_rejections():
    with pytest.raises(MetadataError):
        decode_al(bytes(RECORD))
    with pytest.raises(MetadataError):
        decode_al(encode_super(EXAMPLE, 1))
    with pytest.raises(MetadataError):  # a count that overruns the record
        decode_al(AL_HEAD.pack(AL_MAGIC, 1, 2000).ljust(RECORD, b"\0"))
    assert AL_MAGIC != MAGIC


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=RECORD + 64),
    st.binary(max_size=RECORD).map(lambda b: AL_MAGIC + b),
))
def test_arbitrary_bytes_decode_as_al_or_raise_metadata_error(data):
    try:
        sequence, extents = decode_al(data)
    except MetadataError:
        return
    assert isinstance(sequence, int) and isinstance(extents, list)


# --- bitmap pages -------------------------------------------------------------------

page_bits = st.one_of(
    st.binary(min_size=PAGE_BYTES, max_size=PAGE_BYTES),
    st.sampled_from([bytes(PAGE_BYTES), b"\xff" * PAGE_BYTES]),
)


@settings(max_examples=100, deadline=None)
@given(U32, page_bits)
def test_page_round_trip(index, bits):
    record = encode_page(index, bits)
    assert len(record) == RECORD == PAGE_HEADER.size + PAGE_BYTES
    assert decode_page(index, record) == bits
    assert decode_page(index, bytearray(record)) == bits


@settings(max_examples=100, deadline=None)
@given(U32, U32, page_bits)
def test_a_page_read_as_another_index_is_rejected(index, other, bits):
    if other == index:
        other = (index + 1) % 2**32
    record = encode_page(index, bits)
    assert decode_page(other, record) is None
    # nor does rewriting the index field make it pass: the checksum binds the index
    moved = struct.pack(">I", other) + record[4:]
    assert decode_page(other, moved) is None


def test_every_single_bit_flip_of_a_page_is_detected():
    bits = bytes((i * 37) & 0xFF for i in range(PAGE_BYTES))
    record = encode_page(3, bits)
    reserved = range(4, 8)  # page index (4), reserved (4), xxh64 (8)
    for bit in range(RECORD * 8):
        got = decode_page(3, flip(record, bit))
        if bit // 8 in reserved:
            assert got in (None, bits)  # unused: a flip there must not change the bits read
        else:
            assert got is None, bit


def test_truncated_or_extended_pages_are_rejected():
    record = encode_page(0, b"\x5a" * PAGE_BYTES)
    for n in (0, 1, PAGE_HEADER.size, RECORD - 1):
        assert decode_page(0, record[:n]) is None
    assert decode_page(0, record + b"\0") is None
    assert decode_page(0, bytes(RECORD)) is None  # a page never written
    with pytest.raises(ValueError):
        encode_page(0, b"\0" * (PAGE_BYTES - 1))
    with pytest.raises(ValueError):
        encode_page(0, b"\0" * (PAGE_BYTES + 1))


@settings(max_examples=200, deadline=None)
@given(U32, st.binary(max_size=RECORD + 16))
def test_arbitrary_bytes_as_a_page_give_bits_or_none(index, data):
    got = decode_page(index, data)
    assert got is None or (isinstance(got, bytes) and len(got) == PAGE_BYTES)


def test_a_bitmap_survives_its_pages_on_disk():
    size = 3 * PAGE_BITS * 4096 + 12345  # four pages, the last one partial
    bm = Bitmap(size, 4096, PAGE_BITS)
    for offset in (0, 4096 * (PAGE_BITS - 1), 4096 * PAGE_BITS * 2 + 5, size - 1):
        bm.set_range(offset, 3 * 4096)
    layout = Layout(size, 4096)
    assert layout.pages == bm.npages == 4
    disk = {p: encode_page(p, bm.page_bytes(p)) for p in range(layout.pages)}
    back = Bitmap(size, 4096, PAGE_BITS)
    for p, record in disk.items():
        back.load_page(p, decode_page(p, record))
    assert back.bits == bm.bits
    # a torn page 1 comes back as "everything in it is out of sync"
    torn = Bitmap(size, 4096, PAGE_BITS)
    for p, record in disk.items():
        torn.load_page(p, decode_page(p, flip(record, 8 * 100) if p == 1 else record))
    assert torn.count() == bm.count() - sum(bm.test(b) for b in range(PAGE_BITS, 2 * PAGE_BITS)) + PAGE_BITS
    assert all(torn.test(b) for b in range(PAGE_BITS, 2 * PAGE_BITS))


# --- layout -------------------------------------------------------------------------


def regions(layout: Layout, pages) -> list[tuple[int, int, str]]:
    out = [(layout.super_offset(s), RECORD, f"super{s}") for s in range(SUPER_SLOTS)]
    out += [(layout.al_slot_offset(s), RECORD, f"al{s}") for s in range(AL_SLOTS)]
    out += [(layout.page_offset(p), RECORD, f"page{p}") for p in pages]
    return sorted(out)


def check_layout(layout: Layout, all_pages: bool) -> None:
    nbits = -(-layout.size // layout.block)
    assert layout.pages >= 1
    assert layout.pages * PAGE_BITS >= nbits, "the pages hold every bit"
    assert layout.pages == 1 or (layout.pages - 1) * PAGE_BITS < nbits, "and no page more"
    pages = range(layout.pages) if all_pages else sorted(
        {p for p in (0, 1, layout.pages - 2, layout.pages - 1) if 0 <= p < layout.pages})
    spans = regions(layout, pages)
    for (o1, n1, a), (o2, _n2, b) in zip(spans, spans[1:]):
        assert o1 + n1 <= o2, f"{a} overlaps {b}"
    assert spans[0][0] >= 0
    assert all(o % RECORD == 0 for o, _, _ in spans)
    last = layout.page_offset(layout.pages - 1) + RECORD
    assert layout.file_size == last, "file_size covers the last page exactly"
    assert all(o + n <= layout.file_size for o, n, _ in spans)
    # AL slots live between the superblocks and the bitmap, cycling with the sequence
    for seq in (0, 1, AL_SLOTS - 1, AL_SLOTS, 2**64 - 1):
        off = layout.al_slot_offset(seq)
        assert SUPER_SLOTS * RECORD <= layout.al_offset <= off < layout.bitmap_offset
        assert off == layout.al_slot_offset(seq + AL_SLOTS)
    assert layout.page_offset(0) == layout.bitmap_offset


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**52), st.sampled_from([512, 4096, 65536]))
def test_layout_regions_do_not_overlap_and_file_size_covers_all_pages(size, block):
    layout = Layout(size, block)
    check_layout(layout, all_pages=False)
    if size <= 2**34:  # small enough to build the bitmap itself
        assert layout.pages == Bitmap(size, block, PAGE_BITS).npages


@pytest.mark.parametrize("size", [0, 1, 4096, PAGE_BITS * 4096 - 1, PAGE_BITS * 4096,
                                  PAGE_BITS * 4096 + 1, 10 * PAGE_BITS * 4096 + 7])
def test_layout_small_volumes_all_regions(size):
    layout = Layout(size)
    check_layout(layout, all_pages=True)
    assert layout.pages == Bitmap(size).npages
    assert len({layout.al_slot_offset(s) for s in range(AL_SLOTS)}) == AL_SLOTS
    assert layout.super_offset(0) != layout.super_offset(1)


def test_bitmap_pages_match_the_on_disk_page_size():
    assert Bitmap(1).page_bits == PAGE_BITS  # the default geometry is the disk's
    assert len(Bitmap(1).page_bytes(0)) == PAGE_BYTES == RECORD - PAGE_HEADER.size
    assert metadata.HISTORY >= 1


# --- Metadata helpers ---------------------------------------------------------------


def test_metadata_generation_and_with():
    gen = EXAMPLE.generation(crashed_primary=True, dirty=True)
    assert gen == Generation(EXAMPLE.current, EXAMPLE.bitmap, EXAMPLE.history, True, True,
                             EXAMPLE.sync_source, True)
    assert EXAMPLE.generation(False).crashed_primary is False
    assert EXAMPLE.generation(False).dirty is False
    assert Metadata(size=1, node="n").generation(False).history == ()
    fresh = Metadata(size=1, node="n")
    assert (fresh.current, fresh.bitmap, fresh.sync_source, fresh.consistent) == (NO_ID, NO_ID, NO_ID, False)
    changed = EXAMPLE.with_(current=5, consistent=False)
    assert changed.current == 5 and not changed.consistent and EXAMPLE.current != 5
    assert changed.with_(current=EXAMPLE.current, consistent=True) == EXAMPLE
