"""Process-wide settings the daemon and the link tool make once at startup."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading

log = logging.getLogger(__name__)

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Keep this much freed heap instead of returning it to the kernel.  Received jumbo frames
# are ~9 KB buffers freed in batches; with glibc's default (128 KiB, adapted upward only
# by mmap'd blocks) each batch was given back and page-faulted in again: 9.0 µs per frame
# received at MTU 9000, 3.8 µs with this setting (measured, mirrord/packet_socket.py).
TRIM_THRESHOLD = 256 << 20
# Serve buffers up to this size from the heap, never from a fresh mmap (which is zeroed
# and unmapped on free: the same page-fault cost for large messages).
MMAP_THRESHOLD = 32 << 20
# Allocations of container objects between young-generation collections (Python's
# default is 700).
YOUNG_GENERATION = 20_000


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse.  False (and a debug log) if not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt: allocator left as it is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its Python name) in the kernel too, for
    top -H, perf and /proc/PID/task.

    Python's thread names live only in the interpreter; with this an operator - or a
    profile - can tell the link thread from the applier.  The kernel keeps 15 bytes.
    """
    if name is None:
        name = threading.current_thread().name
    try:
        with open("/proc/thread-self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass  # no /proc (or not Linux): the name is a convenience


def tune_collector() -> None:
    """Keep the garbage collector off the data path's back (call once, after startup).

    Everything imported and built at startup lives as long as the process; freezing it
    takes it out of every later collection, which otherwise walks it all again on each
    full pass.  The data path allocates short-lived tuples and lists per frame, nearly
    all freed by reference counting: a larger young generation collects less often.
    MIRRORD_GC=default keeps Python's defaults (for A/B runs).
    """
    if os.environ.get("MIRRORD_GC") == "default":
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, 20, 20)
