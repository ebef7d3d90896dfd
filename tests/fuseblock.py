"""An NBD export as a real block device in the root namespace, for filesystem tests.

There is no kernel nbd module here (../shared/NBD-TESTING.md): nbdfuse exposes the export
as a file on a FUSE mount, and a loop device on that file is the block device.

    with nbd_block_device(pair.uri("alpha"), workdir) as dev:      # /dev/loopN
        run(["mkfs.ext4", "-q", "-F", dev])
        with mounted(dev, fsdir):
            ...write files...; run(["sync", "-f", fsdir])
    # unmounted, loop detached, nbdfuse unmounted and gone: the export has no client

    with loop_device(backing_file, read_only=True) as dev, mounted(dev, d, "ro,noload"):
        ...read files...

Teardown always runs, in order (umount, `losetup -d`, `fusermount3 -u`), also when the
body fails.  Every wait is bounded: a command still running at its deadline is stuck on
a hung FUSE server, so the FUSE connections are aborted through fusectl (which fails
its blocked requests) before it is killed.  Nothing here stats a FUSE mount point.

Mount points are removed once unmounted.  Mounts here are private, so a process that
made its own mount namespace while ours were up (any `ip netns exec`: another test's
daemon starting meanwhile) holds copies of them that our umount does not reach; the
ext4 copy keeps the loop device busy, and the loop device the FUSE file.  Deleting the
mount point detaches the copies in every other namespace.

Only 8 loop devices exist here: tests that use these must not run in parallel.
`mounts_under` / `loops_backed_by` let a test check that nothing was left behind.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

READY_TIMEOUT_S = 10.0     # nbdfuse writes its pidfile within milliseconds when healthy
COMMAND_TIMEOUT_S = 60.0   # mkfs/mount/umount of a few hundred MiB: seconds at most
UMOUNT_TIMEOUT_S = 30.0
DETACH_TIMEOUT_S = 10.0    # `losetup -d` of a busy device completes when its user goes
EXIT_TIMEOUT_S = 10.0      # nbdfuse exits right after its unmount
FUSECTL = "/sys/fs/fuse/connections"


class FuseBlockError(RuntimeError):
    """A step of building or tearing down the stack failed; the message says which."""


# The FUSE mounts nbd_file() has up: a command stuck on one of them (its server hangs)
# is unblocked by aborting these connections.
_live_fuse_dirs: set[str] = set()


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command; past `timeout`, abort our FUSE connections (a process stuck on a
    hung FUSE server is in D state and cannot even be killed until then), kill it, and
    raise.  Never waits unbounded."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for mount_dir in list(_live_fuse_dirs):
            abort_fuse(mount_dir)
        proc.kill()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # still stuck: leave it rather than hang the test run
        raise FuseBlockError(f"{' '.join(argv)}: timed out after {timeout:g} s "
                             f"(FUSE connections aborted)") from None
    if proc.returncode != 0:
        raise FuseBlockError(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()}")
    return out


def _real(path: str) -> str:
    """realpath of the parent only: resolving `path` itself would stat it, which hangs
    when it is the root of a FUSE mount whose server hangs."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# --- what is attached / mounted --------------------------------------------------------

def mounts_under(directory: str) -> list[str]:
    """Mount points at or below `directory` (from /proc/mounts), deepest first."""
    prefix = _real(directory.rstrip("/") or "/").rstrip("/") + "/"
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if (point + "/").startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def loops_backed_by(prefix: str) -> list[str]:
    """Loop devices whose backing file's path starts with `prefix` (never stats it)."""
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, timeout=10).stdout
    loops = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(prefix):
            loops.append(parts[0])
    return loops


def _loop_attached(device: str) -> bool:
    name = os.path.basename(device)
    return os.path.exists(f"/sys/block/{name}/loop/backing_file")


# --- teardown pieces -------------------------------------------------------------------

def is_mounted(path: str) -> bool:
    """Whether `path` is a mount point, from /proc/mounts (os.path.ismount stats the
    path, which hangs on a FUSE mount whose server hangs)."""
    path = _real(path)
    return path in mounts_under(os.path.dirname(path))


def fuse_connection(mount_dir: str) -> int | None:
    """The number of the FUSE connection mounted at `mount_dir` (its name under
    /sys/fs/fuse/connections), from mountinfo; None if no FUSE mount is there."""
    target = _real(mount_dir)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") != target:
                continue
            fstype = fields[fields.index("-", 6) + 1]  # after the optional fields
            if fstype == "fuse" or fstype.startswith("fuse."):
                major, minor = (int(n) for n in fields[2].split(":"))
                return (major << 20) | minor
    return None


def abort_fuse(mount_dir: str) -> None:
    """Abort the FUSE connection of `mount_dir` (its server hangs or is gone): blocked
    requests then fail at once instead of leaving their callers in D state."""
    conn = fuse_connection(mount_dir)
    if conn is None:
        return
    if FUSECTL not in mounts_under(os.path.dirname(FUSECTL)):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL],
                       capture_output=True, timeout=10)
    try:
        with open(os.path.join(FUSECTL, str(conn), "abort"), "w") as f:
            f.write("1")
    except OSError:
        pass


def umount(mountpoint: str, timeout: float = UMOUNT_TIMEOUT_S) -> None:
    """umount; if that fails or hangs, detach lazily (and say so)."""
    try:
        _run(["umount", mountpoint], timeout=timeout)
    except FuseBlockError as exc:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=10)
        raise FuseBlockError(f"{exc} (detached lazily)") from None


def detach_loop(device: str, timeout: float = DETACH_TIMEOUT_S) -> None:
    """`losetup -d`, then wait until the kernel has really let go of the device."""
    try:
        _run(["losetup", "-d", device], timeout=timeout)
    except FuseBlockError:
        pass  # the wait below says whether it is gone
    deadline = time.monotonic() + timeout
    while _loop_attached(device):
        if time.monotonic() > deadline:
            raise FuseBlockError(f"{device} still attached {timeout:g} s after losetup -d")
        time.sleep(0.05)


def remove_mountpoint(path: str) -> None:
    """rmdir an unmounted mount point: detaches copies held by other mount namespaces."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FuseBlockError(f"rmdir {path}: {exc.strerror}") from None


def unmount_fuse(mount_dir: str, proc: subprocess.Popen | None,
                 timeout: float = EXIT_TIMEOUT_S) -> None:
    """fusermount3 -u (aborting the connection if that fails), remove the mount point
    (see the module doc), then reap nbdfuse."""
    problems = []
    if is_mounted(mount_dir):
        try:
            _run(["fusermount3", "-u", mount_dir], timeout=timeout)
        except FuseBlockError as exc:
            problems.append(str(exc))
            abort_fuse(mount_dir)
            try:
                _run(["fusermount3", "-u", mount_dir], timeout=timeout)
            except FuseBlockError:
                subprocess.run(["umount", "-l", mount_dir], capture_output=True, timeout=10)
    try:
        remove_mountpoint(mount_dir)
    except FuseBlockError as exc:
        problems.append(str(exc))
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"nbdfuse (pid {proc.pid}) still running after its unmount")
            proc.kill()
            proc.wait(timeout=timeout)
    if problems:
        raise FuseBlockError("; ".join(problems))


# --- the context managers --------------------------------------------------------------

@contextmanager
def nbd_file(uri: str, workdir: str, *, read_only: bool = False) -> Iterator[str]:
    """The export as a file (nbdfuse): yields its path; unmounted on exit."""
    fuse_dir = tempfile.mkdtemp(prefix="nbdfuse-", dir=workdir)
    pidfile = fuse_dir + ".pid"
    log_path = fuse_dir + ".log"
    argv = ["nbdfuse", "-P", pidfile, *(["-r"] if read_only else []),
            os.path.join(fuse_dir, "disk"), uri]
    with open(log_path, "w") as log:
        # Own session: a Ctrl-C meant for the test run does not kill the FUSE server
        # under a mounted filesystem before the teardown below unmounts it.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _live_fuse_dirs.add(fuse_dir)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
            if proc.poll() is not None:
                raise FuseBlockError(f"nbdfuse exited {proc.returncode}: {_read(log_path)}")
            if time.monotonic() > deadline:
                raise FuseBlockError(f"nbdfuse not ready after {READY_TIMEOUT_S:g} s: "
                                     f"{_read(log_path)}")
            time.sleep(0.02)
        yield os.path.join(fuse_dir, "disk")
    finally:
        try:
            unmount_fuse(fuse_dir, proc)
        finally:
            _live_fuse_dirs.discard(fuse_dir)
            _unlink(pidfile)  # the log stays in workdir, for a failing test to show


@contextmanager
def loop_device(path: str, *, read_only: bool = False) -> Iterator[str]:
    """A loop device on `path`: yields /dev/loopN; detached on exit."""
    device = _run(["losetup", "-f", "--show", *(["-r"] if read_only else []), path]).strip()
    try:
        yield device
    finally:
        detach_loop(device)


@contextmanager
def nbd_block_device(uri: str, workdir: str, *, read_only: bool = False) -> Iterator[str]:
    """The export as a block device (nbdfuse + loop): yields /dev/loopN."""
    with nbd_file(uri, workdir, read_only=read_only) as path:
        with loop_device(path, read_only=read_only) as device:
            yield device


@contextmanager
def mounted(device: str, mountpoint: str, options: str | None = None) -> Iterator[str]:
    """`mount [-o OPTIONS] DEVICE MOUNTPOINT`; MOUNTPOINT must not exist: it is made
    here, and removed after the unmount (see the module doc)."""
    os.mkdir(mountpoint)
    try:
        _run(["mount", *(["-o", options] if options else []), device, mountpoint])
        try:
            yield mountpoint
        finally:
            umount(mountpoint)
    finally:
        remove_mountpoint(mountpoint)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
