"""Cluster quorum over libquorum.so.5, with ctypes.

A box may act on cluster information (promote, outdate its peer) only while
its partition is quorate.  libquorum reports what corosync's quorum provider
(votequorum) decided: :attr:`Quorum.quorate` asks now, and the optional
``on_change(quorate)`` callback runs, inside :meth:`Quorum.dispatch`, each
time the decision or the membership changes (quorum_trackstart with
CS_TRACK_CHANGES).  As with CPG, there is no thread: poll :meth:`fileno`
for POLLIN, then dispatch in the caller's thread.

With ``two_node: 1`` (our corosync.conf) the survivor of a two-box cluster
stays quorate when its peer dies; that is votequorum's decision, reported
here as is.  :attr:`Quorum.provider` is False when corosync runs without a
quorum provider at all (then every partition counts as quorate).

Layouts checked against corosync 3.1.7's ``corosync/quorum.h``.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from . import _native
from ._native import CS_DISPATCH_ALL, CS_TRACK_CHANGES, check, declare, handle_t
from .errors import CS_ERR_TRY_AGAIN, CS_OK, error_for

__all__ = ["Quorum"]

SONAME = "libquorum.so.5"
# quorum.h: the quorum_type out-parameter of quorum_initialize.
QUORUM_FREE = 0  # no provider configured: always quorate
QUORUM_SET = 1  # a provider (votequorum) decides

# void (*quorum_notification_fn_t)(quorum_handle_t, uint32_t quorate,
#     uint64_t ring_seq, uint32_t view_list_entries, uint32_t *view_list)
_NotifyFn = ctypes.CFUNCTYPE(None, handle_t, ctypes.c_uint32, ctypes.c_uint64,
                             ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))


class _Callbacks(ctypes.Structure):  # quorum_callbacks_t
    _fields_ = [("quorum_notify_fn", _NotifyFn)]


_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = _native.load(SONAME, "quorum", "libquorum5")
        p = ctypes.POINTER
        declare(lib, "quorum_initialize", p(handle_t), p(_Callbacks), p(ctypes.c_uint32))
        declare(lib, "quorum_finalize", handle_t)
        declare(lib, "quorum_fd_get", handle_t, p(ctypes.c_int))
        declare(lib, "quorum_dispatch", handle_t, ctypes.c_int)
        declare(lib, "quorum_getquorate", handle_t, p(ctypes.c_int))
        declare(lib, "quorum_trackstart", handle_t, ctypes.c_uint)
        _lib = lib
    return _lib


class Quorum:
    """A connection to corosync's quorum service.

    Raises :class:`~ha.errors.CorosyncUnavailable` when corosync is not
    running or libquorum is missing.  An exception raised by ``on_change`` is
    re-raised by :meth:`dispatch` (it cannot cross the C frames).
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._lib = _library()
        self._on_change = on_change
        # Kept alive as long as the handle: libquorum holds the raw pointer.
        self._notify_cb = _NotifyFn(self._notify)
        self._callbacks = _Callbacks(self._notify_cb)
        self._callback_error: BaseException | None = None
        self._handle: int | None = None
        self._fd = -1

        handle = handle_t()
        quorum_type = ctypes.c_uint32()
        check("quorum_initialize",
              self._lib.quorum_initialize(ctypes.byref(handle), ctypes.byref(self._callbacks),
                                          ctypes.byref(quorum_type)),
              initializing=True)
        self._handle = handle.value
        self.provider = quorum_type.value == QUORUM_SET
        try:
            fd = ctypes.c_int()
            check("quorum_fd_get", self._lib.quorum_fd_get(self._handle, ctypes.byref(fd)))
            self._fd = fd.value
            if on_change is not None:
                check("quorum_trackstart",
                      self._lib.quorum_trackstart(self._handle, CS_TRACK_CHANGES))
        except BaseException:
            self.close()
            raise

    def _notify(self, _handle, quorate, _ring_seq, _n_view, _view) -> None:
        try:
            if self._on_change is not None:
                self._on_change(bool(quorate))
        except BaseException as exc:
            self._callback_error = self._callback_error or exc

    def _live_handle(self) -> int:
        if self._handle is None:
            raise ValueError("Quorum connection is closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def quorate(self) -> bool:
        """Whether this node's partition is quorate now (quorum_getquorate)."""
        value = ctypes.c_int()
        check("quorum_getquorate",
              self._lib.quorum_getquorate(self._live_handle(), ctypes.byref(value)))
        return bool(value.value)

    def fileno(self) -> int:
        """The descriptor to poll for POLLIN; then call :meth:`dispatch`."""
        self._live_handle()
        return self._fd

    def dispatch(self) -> None:
        """Run ``on_change`` for every queued notification (CS_DISPATCH_ALL)."""
        code = self._lib.quorum_dispatch(self._live_handle(), CS_DISPATCH_ALL)
        error, self._callback_error = self._callback_error, None
        if code not in (CS_OK, CS_ERR_TRY_AGAIN):
            raise error_for("quorum_dispatch", code) from error
        if error is not None:
            raise error

    def close(self) -> None:
        """Drop the connection; idempotent, never raises (also after corosync died)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.quorum_finalize(handle)
        self._fd = -1

    def __enter__(self) -> "Quorum":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
