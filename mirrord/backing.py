"""The backing store: a regular file or a block device, read and written at offsets.

Every failure becomes a BackingError that names the disk, the operation and the offset,
so the log line an operator reads says where the disk broke.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from .exclusive import lock_exclusively

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_BLKDISCARD = 0x1277  # _IO(0x12, 119)
_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)

_libc_fallocate = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    global _libc_fallocate
    if _libc_fallocate is None:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        func = libc.fallocate
        func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        func.restype = ctypes.c_int
        _libc_fallocate = (func, ctypes)
    func, ctypes = _libc_fallocate
    if func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BackingError(OSError):
    """A read, write or sync of the backing store failed."""

    def __init__(self, path: str, what: str, offset: int | None, exc: OSError) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(exc.errno or errno.EIO,
                         f"disk {path}: {what}{where} failed: {exc.strerror or exc}")
        self.path = path
        self.offset = offset


class BackingStore:
    """One disk, opened read-write (and locked: mirrord/exclusive.py) for the life of
    the daemon.  Raises OSError if it cannot be opened, InUseError if another daemon has it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            lock_exclusively(self.fd, path, "disk")
        except BaseException:
            os.close(self.fd)
            raise
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        self._can_punch = not self.is_block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _fail(self, what: str, offset: int | None, exc: OSError) -> BackingError:
        return BackingError(self.path, what, offset, exc)

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise self._fail(f"read of {length} bytes", offset, exc) from None
        if len(data) != length:
            raise self._fail(f"read of {length} bytes", offset,
                             OSError(errno.EIO, f"short read ({len(data)} bytes)"))
        return data

    def write(self, offset: int, parts) -> None:
        """Write the buffers in `parts` contiguously at `offset` (one pwritev)."""
        total = sum(map(len, parts))
        remaining, pos, left = parts, offset, total
        try:
            while left:
                n = os.pwritev(self.fd, remaining, pos)
                if n == 0:
                    raise OSError(errno.EIO, "wrote nothing")
                pos += n
                left -= n
                if left:  # a short write (rare): only then cut the written bytes off
                    remaining = _skip(remaining, n)
        except OSError as exc:
            raise self._fail(f"write of {total} bytes", pos, exc) from None

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read as zeros (punching a hole when allowed and possible)."""
        if may_trim and self._can_punch:
            try:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise self._fail(f"hole punch of {length} bytes", offset, exc) from None
                self._can_punch = False
        if self.is_block:
            try:
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass  # fall back to writing zeros
        pos, end = offset, offset + length
        while pos < end:
            n = min(_ZERO_CHUNK, end - pos)
            self.write(pos, [memoryview(_ZEROS)[:n]])
            pos += n

    def sync(self) -> None:
        """Make every completed write durable (the disk's cache flushed)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._fail("flush (fdatasync)", None, exc) from None


def _skip(parts, count: int) -> list:
    """`parts` without their first `count` bytes (after a short pwritev)."""
    out = []
    for p in parts:
        p = memoryview(p)
        if count >= len(p):
            count -= len(p)
            continue
        out.append(p[count:])
        count = 0
    return out
