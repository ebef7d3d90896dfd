"""The metadata record's encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resync.metadata import Metadata, MetadataError, decode, encode, fresh


def test_round_trip():
    meta = Metadata(size=1 << 30, node="alpha", current=5, previous=4, consistent=True,
                    primary=True, peer_behind=True)
    assert decode(encode(meta)) == meta


def test_fresh_is_inconsistent_without_generation():
    meta = fresh(4096, "beta")
    assert not meta.consistent and meta.current == 0 and decode(encode(meta)) == meta


@pytest.mark.parametrize("damage", [
    lambda b: b[:-1],
    lambda b: b"X" + b[1:],
    lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],
    lambda b: b[:8] + (2).to_bytes(4, "big") + b[12:],
])
def test_damaged_records_are_refused(damage):
    with pytest.raises(MetadataError):
        decode(damage(encode(fresh(4096, "alpha"))))


@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_metadata_error(data):
    try:
        decode(data)
    except MetadataError:
        pass
