"""Closed process groups (corosync CPG) over libcpg.so.4, with ctypes.

CPG is how the two boxes talk through the cluster rather than over the
replication link: every process that joins a named group receives every
message multicast to it, in one total order that is the same on every member
(``CPG_TYPE_AGREED``), and a membership change ("confchg") whenever a process
joins, leaves, dies, or its node goes down.  The daemon uses it for small
control messages -- above all "I am writing alone, you are outdated" when the
replication link fails while the cluster is still connected -- so a stale
secondary is never promoted.

Strategy
--------
* No thread of our own: :meth:`ProcessGroup.fileno` is a descriptor the caller
  polls for POLLIN (next to its other sockets), then :meth:`dispatch` runs the
  callbacks in the caller's thread.  Callbacks therefore never race with the
  caller's own state.
* An exception raised by a callback cannot cross the C frames of
  ``cpg_dispatch`` (ctypes would print and drop it): it is kept and re-raised
  by :meth:`dispatch` once corosync's dispatch returns, after the remaining
  callbacks of that batch have run (no delivery is lost).
* **A message is also delivered to its sender** (CPG semantics): the sender
  sees its own message in the total order, at the same position as every
  other member, which is what lets both boxes act on one agreed sequence.
  Compare ``nodeid``/``pid`` with :attr:`ProcessGroup.local_nodeid` /
  :attr:`ProcessGroup.local_pid` to recognise one's own messages.
* One thread owns a ProcessGroup: it polls, dispatches, sends and closes.
  :meth:`ProcessGroup.send` may be called from inside a callback (to answer
  a message or a membership change); nothing here is locked for calls from
  several threads at once.
* ``pid`` in callbacks is the process id as corosync sees it (its own PID
  namespace); ``local_pid`` is ``os.getpid()``, equal to it when the daemon and
  corosync share a PID namespace (the normal case on a box).

The struct layouts below were checked against corosync 3.1.7's
``corosync/cpg.h`` and ``corosync/corotypes.h``.
"""

from __future__ import annotations

import ctypes
import enum
import os
import time
from dataclasses import dataclass
from typing import Callable

from . import _native
from ._native import CS_DISPATCH_ALL, check, declare, handle_t
from .errors import CS_ERR_TRY_AGAIN, CS_OK, error_for

__all__ = [
    "CPG_MAX_NAME_LENGTH",
    "MAX_MESSAGE_BYTES",
    "Member",
    "Membership",
    "ProcessGroup",
    "Reason",
]

SONAME = "libcpg.so.4"
# cpg.h: struct cpg_name { uint32_t length; char value[CPG_MAX_NAME_LENGTH]; }
CPG_MAX_NAME_LENGTH = 128
# cpg_guarantee_t: AGREED is total order on every member (FIFO is an alias of
# it, UNORDERED and SAFE are not implemented by corosync).
CPG_TYPE_AGREED = 2
# Our messages are small msgpack control messages (well under 1 KiB).  CPG
# itself fragments far larger ones, but a message this big would mean bulk
# data on the cluster network, which belongs on the replication link.
MAX_MESSAGE_BYTES = 64 * 1024
# send(): corosync answers TRY_AGAIN under flow control or while it forms a new
# membership (token timeout ~1 s here); retry with a short, growing sleep.
SEND_RETRY_FIRST_SLEEP_S = 0.005
SEND_RETRY_MAX_SLEEP_S = 0.1
SEND_TIMEOUT_S = 2.0


class Reason(enum.IntEnum):
    """cpg_reason_t: why a process is in a confchg's joined or left list."""

    UNDEFINED = 0  # entries of the member list itself carry no reason
    JOIN = 1  # cpg_join
    LEAVE = 2  # cpg_leave (a clean close)
    NODEDOWN = 3  # its whole node left the cluster (crash, network cut)
    NODEUP = 4  # its node (re)joined the cluster with the process already in the group
    PROCDOWN = 5  # the process died or dropped its connection without leaving


@dataclass(frozen=True, slots=True)
class Member:
    """One process in a group: its node, its pid (as corosync sees it), why it is listed."""

    nodeid: int
    pid: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Membership:
    """A confchg: the group's members after the change, who left, who joined."""

    members: tuple[Member, ...]
    left: tuple[Member, ...]
    joined: tuple[Member, ...]


# -- C declarations (cpg.h) ---------------------------------------------------


class _CpgName(ctypes.Structure):
    _fields_ = [("length", ctypes.c_uint32), ("value", ctypes.c_char * CPG_MAX_NAME_LENGTH)]


class _CpgAddress(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("reason", ctypes.c_uint32)]


class _IoVec(ctypes.Structure):  # <sys/uio.h>
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# void (*cpg_deliver_fn_t)(cpg_handle_t, const struct cpg_name *group_name,
#                          uint32_t nodeid, uint32_t pid, void *msg, size_t msg_len)
_DeliverFn = ctypes.CFUNCTYPE(None, handle_t, ctypes.POINTER(_CpgName), ctypes.c_uint32,
                              ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
# void (*cpg_confchg_fn_t)(cpg_handle_t, const struct cpg_name *group_name,
#     const struct cpg_address *member_list, size_t member_list_entries,
#     const struct cpg_address *left_list, size_t left_list_entries,
#     const struct cpg_address *joined_list, size_t joined_list_entries)
_AddressArray = ctypes.POINTER(_CpgAddress)
_ConfchgFn = ctypes.CFUNCTYPE(None, handle_t, ctypes.POINTER(_CpgName),
                              _AddressArray, ctypes.c_size_t, _AddressArray, ctypes.c_size_t,
                              _AddressArray, ctypes.c_size_t)


class _Callbacks(ctypes.Structure):  # cpg_callbacks_t
    _fields_ = [("cpg_deliver_fn", _DeliverFn), ("cpg_confchg_fn", _ConfchgFn)]


_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    """libcpg with every function we call declared (once per process)."""
    global _lib
    if _lib is None:
        lib = _native.load(SONAME, "cpg", "libcpg4")
        p = ctypes.POINTER
        declare(lib, "cpg_initialize", p(handle_t), p(_Callbacks))
        declare(lib, "cpg_finalize", handle_t)
        declare(lib, "cpg_fd_get", handle_t, p(ctypes.c_int))
        declare(lib, "cpg_local_get", handle_t, p(ctypes.c_uint))
        declare(lib, "cpg_join", handle_t, p(_CpgName))
        declare(lib, "cpg_leave", handle_t, p(_CpgName))
        declare(lib, "cpg_dispatch", handle_t, ctypes.c_int)
        declare(lib, "cpg_mcast_joined", handle_t, ctypes.c_int, p(_IoVec), ctypes.c_uint)
        _lib = lib
    return _lib


def _reason(value: int) -> Reason:
    try:
        return Reason(value)
    except ValueError:  # a newer corosync's reason: report it as unknown, never crash
        return Reason.UNDEFINED


def _members(array, count: int) -> tuple[Member, ...]:
    return tuple(Member(array[i].nodeid, array[i].pid, _reason(array[i].reason))
                 for i in range(count))


class ProcessGroup:
    """Membership of one CPG group: join on construction, leave on :meth:`close`.

    ``on_deliver(nodeid, pid, data)`` runs for every message multicast to the
    group, including this process's own (see the module docstring);
    ``on_membership(Membership)`` for every change, starting with our own join.
    Both run inside :meth:`dispatch`, in the caller's thread.

    Raises :class:`~ha.errors.CorosyncUnavailable` when corosync is not
    running or libcpg is missing, :class:`~ha.errors.CorosyncError` for other
    failures, ValueError for a bad group name.
    """

    def __init__(self, name: str, *, on_deliver: Callable[[int, int, bytes], None],
                 on_membership: Callable[[Membership], None]) -> None:
        raw = name.encode("utf-8")
        if not raw or len(raw) > CPG_MAX_NAME_LENGTH:
            raise ValueError(f"CPG group name must be 1..{CPG_MAX_NAME_LENGTH} bytes, "
                             f"got {len(raw)}")
        self.name = name
        self._lib = _library()
        self._on_deliver = on_deliver
        self._on_membership = on_membership
        self._group = _CpgName(len(raw), raw)
        # The callback objects must outlive the handle: libcpg keeps only the
        # raw function pointers, and a collected thunk is freed memory.
        self._deliver_cb = _DeliverFn(self._deliver)
        self._confchg_cb = _ConfchgFn(self._confchg)
        self._callbacks = _Callbacks(self._deliver_cb, self._confchg_cb)
        self._handle: int | None = None
        self._fd = -1
        self._callback_error: BaseException | None = None
        self._dispatching = False
        self._close_pending = False
        self.local_pid = os.getpid()

        handle = handle_t()
        check("cpg_initialize",
              self._lib.cpg_initialize(ctypes.byref(handle), ctypes.byref(self._callbacks)),
              initializing=True)
        self._handle = handle.value
        try:
            nodeid = ctypes.c_uint()
            check("cpg_local_get", self._lib.cpg_local_get(self._handle, ctypes.byref(nodeid)))
            self.local_nodeid = nodeid.value
            fd = ctypes.c_int()
            check("cpg_fd_get", self._lib.cpg_fd_get(self._handle, ctypes.byref(fd)))
            self._fd = fd.value
            self._join()
        except BaseException:
            self._finalize()
            raise

    def _join(self) -> None:
        """cpg_join, retrying TRY_AGAIN (corosync may be syncing a new membership)."""
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            code = self._lib.cpg_join(self._handle, ctypes.byref(self._group))
            if code == CS_OK:
                return
            if code != CS_ERR_TRY_AGAIN or time.monotonic() >= deadline:
                raise error_for("cpg_join", code)
            time.sleep(SEND_RETRY_MAX_SLEEP_S)

    # -- the callbacks, called by libcpg from inside cpg_dispatch ------------

    def _deliver(self, _handle, _group, nodeid, pid, msg, msg_len) -> None:
        try:
            self._on_deliver(nodeid, pid, ctypes.string_at(msg, msg_len))
        except BaseException as exc:  # re-raised by dispatch(); see module docstring
            self._callback_error = self._callback_error or exc

    def _confchg(self, _handle, _group, members, n_members, left, n_left,
                 joined, n_joined) -> None:
        try:
            self._on_membership(Membership(_members(members, n_members),
                                           _members(left, n_left),
                                           _members(joined, n_joined)))
        except BaseException as exc:
            self._callback_error = self._callback_error or exc

    # -- public API ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live_handle(self) -> int:
        if self._handle is None:
            raise ValueError(f"CPG group {self.name!r} is closed")
        return self._handle

    def fileno(self) -> int:
        """The descriptor to poll for POLLIN; then call :meth:`dispatch`."""
        self._live_handle()
        return self._fd

    def dispatch(self) -> None:
        """Run the callbacks for everything corosync has queued (CS_DISPATCH_ALL).

        Raises CorosyncUnavailable when corosync went away (the group is then
        dead: close it and build a new one once corosync is back), another
        CorosyncError for other failures, and the first exception a callback
        raised, after the whole batch was delivered.
        """
        handle = self._live_handle()
        self._dispatching = True
        try:
            code = self._lib.cpg_dispatch(handle, CS_DISPATCH_ALL)
        finally:
            self._dispatching = False
        error, self._callback_error = self._callback_error, None
        if self._close_pending:
            self.close()
        # TRY_AGAIN from a non-blocking dispatch only means "nothing queued".
        if code not in (CS_OK, CS_ERR_TRY_AGAIN):
            raise error_for("cpg_dispatch", code) from error
        if error is not None:
            raise error

    def send(self, data: bytes, *, timeout: float = SEND_TIMEOUT_S) -> None:
        """Multicast ``data`` to the group in agreed (total) order, including to us.

        Retries CS_ERR_TRY_AGAIN (flow control, membership change) with a short
        sleep for up to ``timeout`` seconds, then raises CorosyncError.
        """
        data = bytes(data)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"CPG message of {len(data)} bytes exceeds "
                             f"MAX_MESSAGE_BYTES={MAX_MESSAGE_BYTES}")
        handle = self._live_handle()
        # Points into the bytes object itself (no copy); `data` stays referenced.
        iov = _IoVec(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data))
        deadline = time.monotonic() + timeout
        sleep_s = SEND_RETRY_FIRST_SLEEP_S
        while True:
            code = self._lib.cpg_mcast_joined(handle, CPG_TYPE_AGREED, ctypes.byref(iov), 1)
            if code == CS_OK:
                return
            remaining = deadline - time.monotonic()
            if code != CS_ERR_TRY_AGAIN or remaining <= 0:
                detail = (f"corosync still busy after {timeout:g} s"
                          if code == CS_ERR_TRY_AGAIN else None)
                raise error_for("cpg_mcast_joined", code, detail=detail)
            time.sleep(min(sleep_s, remaining))
            sleep_s = min(sleep_s * 2, SEND_RETRY_MAX_SLEEP_S)

    def close(self) -> None:
        """Leave the group and drop the connection; idempotent, never raises.

        Safe after corosync died (the calls fail and are ignored).  Called from
        inside a callback, it takes effect when :meth:`dispatch` returns, since
        finalizing the handle under libcpg's own dispatch loop is not allowed.
        """
        if self._handle is None:
            return
        if self._dispatching:
            self._close_pending = True
            return
        self._lib.cpg_leave(self._handle, ctypes.byref(self._group))
        self._finalize()

    def _finalize(self) -> None:
        handle, self._handle = self._handle, None
        self._close_pending = False
        if handle is not None:
            self._lib.cpg_finalize(handle)  # closes the fd too
        self._fd = -1

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"nodeid={self.local_nodeid}"
        return f"ProcessGroup({self.name!r}, {state})"

