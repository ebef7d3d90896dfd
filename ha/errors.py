"""Errors from the corosync client libraries, as one small hierarchy.

Every libcpg/libquorum call returns a ``cs_error_t``; the bindings turn any
value other than ``CS_OK`` into a :class:`CorosyncError` that names the C call
and the code, e.g. ``cpg_join: CS_ERR_ACCESS (11)``, so a log line says what
failed without a header at hand.

Callers must be able to tell "there is no cluster here" (corosync is not
running, or its libraries are not installed) from a real failure of a running
cluster: the first is :class:`CorosyncUnavailable`, a subclass, so
``except CorosyncError`` still catches both.  :func:`error_for` is the one place
that decides which class a code becomes.
"""

from __future__ import annotations

__all__ = [
    "CS_ERROR_NAMES",
    "CS_OK",
    "CS_ERR_LIBRARY",
    "CS_ERR_TRY_AGAIN",
    "CS_ERR_BAD_HANDLE",
    "CorosyncError",
    "CorosyncUnavailable",
    "error_for",
    "error_name",
]

# The complete cs_error_t enum of corosync/corotypes.h (corosync 3.1); 29 is
# not assigned there.
CS_ERROR_NAMES: dict[int, str] = {
    1: "CS_OK",
    2: "CS_ERR_LIBRARY",
    3: "CS_ERR_VERSION",
    4: "CS_ERR_INIT",
    5: "CS_ERR_TIMEOUT",
    6: "CS_ERR_TRY_AGAIN",
    7: "CS_ERR_INVALID_PARAM",
    8: "CS_ERR_NO_MEMORY",
    9: "CS_ERR_BAD_HANDLE",
    10: "CS_ERR_BUSY",
    11: "CS_ERR_ACCESS",
    12: "CS_ERR_NOT_EXIST",
    13: "CS_ERR_NAME_TOO_LONG",
    14: "CS_ERR_EXIST",
    15: "CS_ERR_NO_SPACE",
    16: "CS_ERR_INTERRUPT",
    17: "CS_ERR_NAME_NOT_FOUND",
    18: "CS_ERR_NO_RESOURCES",
    19: "CS_ERR_NOT_SUPPORTED",
    20: "CS_ERR_BAD_OPERATION",
    21: "CS_ERR_FAILED_OPERATION",
    22: "CS_ERR_MESSAGE_ERROR",
    23: "CS_ERR_QUEUE_FULL",
    24: "CS_ERR_QUEUE_NOT_AVAILABLE",
    25: "CS_ERR_BAD_FLAGS",
    26: "CS_ERR_TOO_BIG",
    27: "CS_ERR_NO_SECTIONS",
    28: "CS_ERR_CONTEXT_NOT_FOUND",
    30: "CS_ERR_TOO_MANY_GROUPS",
    100: "CS_ERR_SECURITY",
}

CS_OK = 1
# The IPC connection to corosync failed or broke (libqb's ECONNREFUSED,
# ENOTCONN, ENOENT... all map here): the daemon is not there (any more).
CS_ERR_LIBRARY = 2
# Corosync is busy (flow control, or still starting up); retry later.
CS_ERR_TRY_AGAIN = 6
# The handle is unknown to the library: used after finalize.
CS_ERR_BAD_HANDLE = 9

# Codes that mean "no usable corosync here" rather than a failed request.
# TRY_AGAIN counts only at initialize: corosync answers it while it is still
# starting (or shutting down), so there is no cluster to talk to yet.
_UNAVAILABLE_ALWAYS = frozenset({CS_ERR_LIBRARY})
_UNAVAILABLE_AT_INIT = frozenset({CS_ERR_LIBRARY, CS_ERR_TRY_AGAIN})


def error_name(code: int) -> str:
    """The cs_error_t name of ``code``; ``CS_ERR_UNKNOWN_<n>`` if the header has none."""
    return CS_ERROR_NAMES.get(code, f"CS_ERR_UNKNOWN_{code}")


class CorosyncError(Exception):
    """A corosync library call failed.

    ``call`` is the C function ("cpg_join"), ``code`` the cs_error_t value and
    ``name`` its symbolic name; ``detail`` an optional explanation added by the
    bindings (e.g. how long a send was retried).
    """

    def __init__(self, call: str, code: int, detail: str | None = None) -> None:
        self.call = call
        self.code = code
        self.name = error_name(code)
        self.detail = detail
        message = f"{call}: {self.name} ({code})"
        if detail:
            message += f": {detail}"
        super().__init__(message)

    def __reduce__(self):  # keep the attributes through pickling (multiprocessing)
        return (type(self), (self.call, self.code, self.detail))


class CorosyncUnavailable(CorosyncError):
    """No usable corosync: it is not running, went away, or its library is missing."""


def error_for(call: str, code: int, *, initializing: bool = False,
              detail: str | None = None) -> CorosyncError:
    """The exception for a failed call: :class:`CorosyncUnavailable` when the code
    means there is no cluster to talk to, :class:`CorosyncError` otherwise.

    ``initializing`` is True for the ``*_initialize`` calls, where TRY_AGAIN
    also means "corosync is not (yet) available".
    """
    unavailable = _UNAVAILABLE_AT_INIT if initializing else _UNAVAILABLE_ALWAYS
    cls = CorosyncUnavailable if code in unavailable else CorosyncError
    return cls(call, code, detail)
