"""One daemon per disk and per metadata file: an exclusive lock held while it runs.

Two `mirrord` processes on the same disk or metadata (a second start by hand next to
the systemd unit, two resource files naming one disk) would each write their own
bitmap and generation ids over the other's: the mirror would diverge with nothing said.
So the daemon takes an exclusive flock(2) on each file it writes, and a second one,
after trying for LOCK_WAIT seconds, stops at startup, naming the file.  The lock belongs to the open file, so
it goes away with the process however that ends (kill -9 included): no stale lock file
to clean up after a crash.  flock is advisory: it keeps out other mirrord processes and
`mirrorctl create-md`, not programs that ignore it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time


class InUseError(OSError):
    """Another process holds the file's lock; the message says which file and what to do."""


# How long a start waits for the lock before it refuses.  A process killed by -9 keeps
# its files until its last thread has exited, a little after it shows as gone (a zombie
# group leader): a restart right after a crash must not fail on that.
LOCK_WAIT = 3.0
_RETRY = 0.05


def lock_exclusively(fd: int, path: str, what: str, wait: float = LOCK_WAIT) -> None:
    """Take the exclusive lock on `fd` (the open file `path`), trying for up to `wait`
    seconds, or raise InUseError."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            break
        time.sleep(_RETRY)
    raise InUseError(
        errno.EBUSY,
        f"{what} {path} is in use by another mirrord (it holds the file's lock): "
        f"stop that one first (`fuser -v {path}` shows which process); two daemons "
        f"on one {what} would overwrite each other's state")


def is_locked(path: str) -> bool:
    """True if some process holds an exclusive lock on the existing file `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return False
