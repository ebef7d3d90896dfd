"""Block devices for the NBD server tests (the daemon has its own: mirrord/engine.py).

`FileDevice` serves a regular file with the plain system calls and calls `done`
synchronously.  It can be made read-only, made to fail with an errno on ranges that
cover a given offset, and it records what it was asked (`calls`) so a test can check
that a client's FUA or "no hole" really reached the device.

`AsyncDevice` wraps one and completes write-type requests later, from its own
threads, in random order: the way the daemon's `done` fires when the peer answers.
`hold()` parks completions until `release()`, to watch the in-flight bound.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import queue
import random
import threading
import time

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range, keeping the file size; raises OSError where unsupported."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileDevice:
    """A file as a block device; `done` is called before each call returns."""

    def __init__(self, path: str, *, writable: bool = True) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self._writable = writable
        self._failures: list[tuple[int, int]] = []  # (offset, errno)
        # (operation, offset, length, flags...) of every call, for assertions.
        self.calls: collections.deque = collections.deque(maxlen=100_000)

    # --- test controls ----------------------------------------------------------------

    def set_writable(self, writable: bool) -> None:
        self._writable = writable

    def fail_at(self, offset: int, error: int = errno.EIO) -> None:
        """Every request whose range covers `offset` fails with `error`."""
        self._failures.append((offset, error))

    def clear_failures(self) -> None:
        self._failures.clear()

    def ops(self, name: str) -> list[tuple]:
        return [c for c in list(self.calls) if c[0] == name]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _failure(self, offset: int, length: int) -> int:
        for where, error in self._failures:
            if offset <= where < offset + length:
                return error
        return 0

    # --- the device contract (mirrord/nbd_server.py BlockDevice) ----------------------

    def writable(self) -> bool:
        return self._writable

    def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        error = self._failure(offset, length)
        if error:
            raise OSError(error, os.strerror(error))
        data = os.pread(self.fd, length, offset)
        while len(data) < length:  # pread may come back short; a block device may not
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise OSError(errno.EIO, "read beyond end of file")
            data += more
        return data

    def write(self, offset: int, data, fua: bool, done) -> None:
        self.calls.append(("write", offset, len(data), fua))
        done(self._apply(offset, len(data), lambda: self._pwrite_all(offset, data), fua))

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, done) -> None:
        self.calls.append(("write_zeroes", offset, length, fua, may_trim))
        if may_trim:
            action = lambda: self._punch_or_zero(offset, length)  # noqa: E731
        else:
            action = lambda: self._write_zeros(offset, length)  # noqa: E731
        done(self._apply(offset, length, action, fua))

    def trim(self, offset: int, length: int, done) -> None:
        self.calls.append(("trim", offset, length))
        done(self._apply(offset, length, lambda: self._punch_or_zero(offset, length), False))

    def flush(self, done) -> None:
        self.calls.append(("flush",))
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            done(exc.errno or errno.EIO)
            return
        done(0)

    # --- helpers ----------------------------------------------------------------------

    def _apply(self, offset: int, length: int, action, fua: bool) -> int:
        if not self._writable:
            return errno.EPERM
        error = self._failure(offset, length)
        if error:
            return error
        try:
            action()
            if fua:
                os.fdatasync(self.fd)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _pwrite_all(self, offset: int, data) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _punch_or_zero(self, offset: int, length: int) -> None:
        try:
            punch_hole(self.fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, _ZERO_CHUNK))
        while length:
            n = min(length, len(zeros))
            self._pwrite_all(offset, zeros[:n])
            offset += n
            length -= n


class AsyncDevice:
    """Wraps a FileDevice: write-type requests complete later, on other threads.

    Each request is applied to the file and completed by one of `workers` threads
    after a random delay of up to `max_delay` seconds, so completions come back out of
    order and from threads the server did not create.  `hold()` parks the requests
    (neither applied nor completed) until `release()`.
    """

    def __init__(self, inner: FileDevice, *, workers: int = 4, max_delay: float = 0.002,
                 seed: int = 1) -> None:
        self.inner = inner
        self.size = inner.size
        self.max_delay = max_delay
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue()
        self._held = False
        self._parked: list = []
        self._lock = threading.Lock()
        self.submitted = 0  # write-type calls received
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False
            parked, self._parked = self._parked, []
        for job in parked:
            self._queue.put(job)

    @property
    def parked(self) -> int:
        with self._lock:
            return len(self._parked)

    def close(self) -> None:
        self.release()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(5)

    def writable(self) -> bool:
        return self.inner.writable()

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset, data, fua, done) -> None:
        self._submit(lambda: self.inner.write(offset, data, fua, done))

    def write_zeroes(self, offset, length, fua, may_trim, done) -> None:
        self._submit(lambda: self.inner.write_zeroes(offset, length, fua, may_trim, done))

    def trim(self, offset, length, done) -> None:
        self._submit(lambda: self.inner.trim(offset, length, done))

    def flush(self, done) -> None:
        self._submit(lambda: self.inner.flush(done))

    def _submit(self, job) -> None:
        with self._lock:
            self.submitted += 1
            if self._held:
                self._parked.append(job)
                return
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.max_delay:
                time.sleep(self._random.random() * self.max_delay)
            job()
