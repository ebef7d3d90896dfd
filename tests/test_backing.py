"""BackingStore.write: one pwritev per request, and the loop for a short write.

A pwritev to a file may write less than asked (a signal, a filesystem's limit); the store
must then go on from exactly where it stopped, across the boundaries of the parts.
"""

from __future__ import annotations

import errno
import os

import pytest

from mirrord import backing
from mirrord.backing import BackingError, BackingStore


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    s = BackingStore(str(path))
    yield s
    s.close()


def parts_of(data: bytes, sizes: list[int]) -> list[memoryview]:
    out, at = [], 0
    for n in sizes:
        out.append(memoryview(data)[at:at + n])
        at += n
    assert at == len(data)
    return out


def test_a_whole_write_takes_one_pwritev(store, monkeypatch):
    calls = []
    real = os.pwritev

    def counting(fd, buffers, offset):
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(backing.os, "pwritev", counting)
    data = os.urandom(9000 * 3 + 100)
    store.write(4096, parts_of(data, [9000, 9000, 9000, 100]))
    assert calls == [4096]
    assert store.read(4096, len(data)) == data


@pytest.mark.parametrize("limit", [1, 700, 9000, 9001])
def test_short_writes_go_on_from_where_they_stopped(store, monkeypatch, limit):
    real = os.pwritev

    def short(fd, buffers, offset):
        # write at most `limit` bytes of what was asked, as a short pwritev would
        joined = b"".join(bytes(b) for b in buffers)[:limit]
        return real(fd, [joined], offset)

    monkeypatch.setattr(backing.os, "pwritev", short)
    data = os.urandom(9000 * 2 + 4000)
    store.write(100, parts_of(data, [9000, 4000, 9000]))
    assert store.read(100, len(data)) == data
    assert store.read(0, 100) == bytes(100)
    assert store.read(100 + len(data), 64) == bytes(64)


def test_a_write_that_writes_nothing_is_an_error_naming_disk_and_offset(store, monkeypatch):
    monkeypatch.setattr(backing.os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(BackingError) as info:
        store.write(8192, [b"x" * 512])
    assert info.value.errno == errno.EIO
    assert store.path in str(info.value) and "offset 8192" in str(info.value)
