"""Loading the corosync client libraries and the ctypes pieces they share.

There is no maintained Python binding for libcpg/libquorum on PyPI, and the C
API is small and stable (the sonames have not changed since corosync 2), so
the bindings declare it with ctypes: no compiler, no -dev package at install
or test time.  This module finds a library by its exact soname first (the ABI
the declarations were checked against, corosync 3.1 headers) and only then
by ``ctypes.util.find_library``; a missing library is
:class:`~ha.errors.CorosyncUnavailable`, naming the Debian package to install.

Types shared by cpg and quorum live here: the uint64 handle, cs_error_t as a
plain int, the dispatch and track flags.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from .errors import CS_ERR_LIBRARY, CS_OK, CorosyncUnavailable, error_for

# corosync/corotypes.h: cs_dispatch_flags_t and the track flags.
CS_DISPATCH_ONE = 1
CS_DISPATCH_ALL = 2
CS_DISPATCH_BLOCKING = 3
CS_DISPATCH_ONE_NONBLOCKING = 4
CS_TRACK_CURRENT = 0x01
CS_TRACK_CHANGES = 0x02
CS_TRACK_CHANGES_ONLY = 0x04

# cpg_handle_t / quorum_handle_t are uint64_t; cs_error_t is an enum (int).
handle_t = ctypes.c_uint64
cs_error_t = ctypes.c_int

_cache: dict[str, ctypes.CDLL] = {}
_cache_lock = threading.Lock()


def load(soname: str, short_name: str, package: str) -> ctypes.CDLL:
    """The shared library ``soname`` (e.g. "libcpg.so.4"), loaded once per process.

    ``short_name`` is what find_library looks for ("cpg"); ``package`` goes
    into the error message so an operator knows what to install.
    """
    with _cache_lock:
        lib = _cache.get(soname)
        if lib is not None:
            return lib
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as exact_error:
            found = ctypes.util.find_library(short_name)
            try:
                if found is None:
                    raise exact_error
                lib = ctypes.CDLL(found, use_errno=True)
            except OSError as exc:
                raise CorosyncUnavailable(
                    f"load {soname}", CS_ERR_LIBRARY,
                    f"{exc}; install the Debian package {package} (comes with corosync)",
                ) from exc
        _cache[soname] = lib
        return lib


def declare(lib: ctypes.CDLL, name: str, *argtypes) -> None:
    """Set the prototype of ``lib.name``: returns cs_error_t, takes ``argtypes``.

    Declaring every argument matters for the uint64 handles: without argtypes
    ctypes would pass a Python int as a C int and truncate it.
    """
    func = getattr(lib, name)
    func.argtypes = list(argtypes)
    func.restype = cs_error_t


def check(call: str, code: int, *, initializing: bool = False) -> None:
    """Raise the matching CorosyncError unless ``code`` is CS_OK."""
    if code != CS_OK:
        raise error_for(call, code, initializing=initializing)
