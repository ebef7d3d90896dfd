"""PID 1 of one cluster node built by tests/cluster.py (the "holder").

Started by Cluster as ``ip netns exec NS unshare --kill-child=KILL --pid
--mount-proc --mount --uts --propagation private python3 -S -E cluster_init.py
SPEC.json``, so it runs as PID 1 of a fresh PID namespace, in a private mount
namespace and UTS namespace, inside the node's network namespace.  It:

1. sets the hostname (the node name: corosync and Pacemaker go by it);
2. mounts a tmpfs on /run (pid files, /run/crm, agents' state) and on
   /dev/shm (libqb's IPC shared memory: clients must see the daemons' files);
3. bind-mounts the node's own directories over /etc/corosync,
   /var/lib/corosync, /var/lib/pacemaker, /var/log/corosync and
   /var/log/pacemaker, then the caller's extra binds (a missing target is
   created on an overlay, inside the node only, never on the host);
4. creates /run/crm, /run/lock, /run/resource-agents with their owners;
5. writes "ready" on stdout, and from then on only reaps the orphans that are
   re-parented to it (commands started by nsenter outlive their nsenter).

Everything it mounts exists only in the node's mount namespace and goes away
with it.  It exits by itself after the spec's ``lifetime`` seconds, a safety
net should its parent's death signal ever be missed.  Standard library only
(it runs with -S -E: no site packages, no PYTHON* variables).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import socket
import sys
import time

# <sys/mount.h>
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
# Longest single sleep of the reaping loop; it wakes earlier on SIGCHLD.
REAP_WAKE_S = 60.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _enc(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    """mount(2); OSError naming source and target on failure."""
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags),
                   _enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def make_target(target: str, overlay_dir: str, writable: set[str]) -> None:
    """Make sure directory ``target`` exists, modifying the node's view only.

    ``writable`` holds the trees where creating directories is private to the
    node already (our tmpfs mounts, and overlays made here).  Elsewhere the
    nearest existing ancestor gets an overlay whose upper layer is in the
    node's state directory, and is then added to ``writable``.
    """
    if os.path.isdir(target):
        return
    parent = os.path.dirname(target)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not any(parent == t or parent.startswith(t.rstrip("/") + "/") for t in writable):
        layer = os.path.join(overlay_dir, parent.strip("/").replace("/", "_") or "root")
        upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
        os.makedirs(upper, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        mount("overlay", parent, "overlay", 0,
              f"lowerdir={parent},upperdir={upper},workdir={work}")
        writable.add(parent)
    os.makedirs(target, exist_ok=True)


def set_up(spec: dict) -> None:
    """Steps 1-4 of the module docstring."""
    socket.sethostname(spec["hostname"])
    writable: set[str] = set()
    for path, mode in spec["tmpfs"]:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
        writable.add(path)
    for source, target in spec["mounts"]:
        mount(source, target, None, MS_BIND | MS_REC, None)
    for source, target in spec["binds"]:
        make_target(target, spec["overlay_dir"], writable)
        mount(source, target, None, MS_BIND | MS_REC, None)
    for path, uid, gid, mode in spec["dirs"]:
        os.makedirs(path, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def reap_until(deadline: float) -> None:
    """Reap every child as it exits, until ``deadline`` (monotonic)."""
    # SIGCHLD blocked and waited for: the loop sleeps until there is a child
    # to reap (PID 1 gets no default signal actions, so nothing else wakes it).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while (remaining := deadline - time.monotonic()) > 0:
        signal.sigtimedwait({signal.SIGCHLD}, min(remaining, REAP_WAKE_S))
        while True:  # bounded by the number of exited children
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    set_up(spec)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    # Close the pipe to Cluster (it waits for EOF-free "ready" only), and keep
    # fd 1 valid for anything that might write to it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    reap_until(time.monotonic() + spec["lifetime"])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: cluster_init.py SPEC.json   (started by tests/cluster.py, not by hand)")
    main(sys.argv[1])
