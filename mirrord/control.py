"""The control socket: JSON lines over a unix socket, both ends.

Strategy
--------
A client (``mirrorctl``, the OCF agent, ``socat``) connects to the daemon's unix socket
and sends one JSON object per line, ``{"command": "status"}`` or
``{"command": "primary", "force": false}``; it gets one JSON object per line back:

    {"ok": true, "status": {...}}                         status
    {"ok": true, "message": "..."}                        an action that was done
    {"ok": false, "error": "why", "hint": "what to do"}   a refusal

The server knows no commands: every well-formed request goes to one handler
(``Callable[[dict], dict]``) that the daemon supplies, so new commands need no change
here.  A handler refuses by raising :class:`ControlRefused`; any other exception becomes
``"internal error: ..."`` (logged with its traceback) and the connection stays usable,
as it does after a malformed line.  A handler may also return an iterator of dicts
instead of a dict: each is sent as its own line, for streams such as ``events``.

Each connection is served by its own daemon thread, so the handler may be called from
several threads at once and must do its own locking.  The socket file is mode 0600:
only root may steer the volume.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
from typing import Any, Callable, Iterator

__all__ = [
    "ControlClient", "ControlError", "ControlRefused", "ControlServer", "ControlSocketInUse",
    "ControlUnavailable", "MAX_LINE", "refusal", "request_arg",
]

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10  # longest request line: requests are small; this bounds a thread's buffer
MAX_REPLY = 16 << 20  # longest reply line a client accepts: generous for a big status
LISTEN_BACKLOG = 16  # pending connections: a few operators and the cluster agent at once
SOCKET_MODE = 0o600  # connect() needs write permission: root only
STALE_PROBE_TIMEOUT = 1.0  # how long start() waits to learn whether an old socket is live
JOIN_TIMEOUT = 1.0  # close() waits this long for the accept thread to finish
# close() lets a request in progress send its reply for this long: above all `mirrorctl
# down`'s own, whose handler starts the stop that closes the server.
REPLY_GRACE = 2.0
ACCEPT_RETRY_DELAY = 0.1  # after accept() fails (EMFILE...), before trying again
DEFAULT_TIMEOUT = 10.0  # client: connect and wait for each reply at most this long
USAGE_HINT = 'send one JSON object per line, e.g. {"command": "status"}'


class ControlError(Exception):
    """Base of this module's errors."""


class ControlRefused(ControlError):
    """Raised by a handler to refuse a request; sent as ``{"ok": false, ...}``."""

    def __init__(self, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.error, self.hint = error, hint


class ControlUnavailable(ControlError):
    """The client could not get an answer: no socket, nobody listening, timeout, or a
    reply that is not ours.  The message names the socket.

    ``not_running`` is True when no daemon can be there at all (no socket file, or
    nobody listening on it: a stale file), False when something holds the socket but
    gave no valid answer (stuck, overloaded, or not mirrord): `mirrorctl up`/`down` and
    the OCF agent must tell "stopped" from "hung"."""

    def __init__(self, path: str, message: str, not_running: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.not_running = not_running


class ControlSocketInUse(ControlError, OSError):
    """start() will not take the path: another daemon answers on it, or it is not a
    socket.  An OSError too, so that one ``except OSError`` around start() covers
    every reason the daemon cannot listen."""


def refusal(error: str, hint: str = "") -> dict:
    """The response for a refused request."""
    response = {"ok": False, "error": error}
    if hint:
        response["hint"] = hint
    return response


_MISSING = object()


def request_arg(request: dict, name: str, kind: type, default=_MISSING):
    """request[name] if it has type `kind` (bool is not an int here), else `default`
    when the argument is absent; raises ControlRefused naming the argument otherwise.

    For handlers: ``force = request_arg(request, "force", bool, False)``.
    """
    if name not in request:
        if default is _MISSING:
            raise ControlRefused(f"{request.get('command')}: missing argument {name!r}",
                                 USAGE_HINT)
        return default
    value = request[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ControlRefused(f"{request.get('command')}: argument {name!r} must be "
                             f"{kind.__name__}, not {type(value).__name__}", USAGE_HINT)
    return value


# -- server -----------------------------------------------------------------------------

class ControlServer:
    """Serve `handler` on the unix socket at `path` until :meth:`close`."""

    def __init__(self, path: str, handler: Callable[[dict], Any]) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # the socket file we made (dev, ino)
        self._closed = False
        self._lock = threading.Lock()  # guards _conns, _busy and _closed
        self._conns: set[socket.socket] = set()  # open client connections, closed by close()
        # connections with a request in progress, and the thread serving each
        self._busy: dict[socket.socket, threading.Thread] = {}
        self._replied = threading.Condition(self._lock)  # a busy connection became idle
        self._thread: threading.Thread | None = None  # the accept loop

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Bind and listen, then serve in daemon threads.

        Creates the parent directory, replaces a stale socket file left by a crashed
        daemon, and raises ControlSocketInUse (without touching it) if the path is not
        a socket or another process still answers on it; OSError for anything else.
        """
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            # Between bind and chmod the file has the umask's mode; with systemd's
            # default umask (022) nobody but root can connect() (that needs write) then
            # either.
            os.chmod(self.path, SOCKET_MODE)
            st = os.stat(self.path)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._sock, self._inode = sock, (st.st_dev, st.st_ino)
        self._thread = threading.Thread(target=self._accept_loop, name=f"control {self.path}",
                                        daemon=True)
        self._thread.start()
        log.debug("control socket listening at %s", self.path)

    def close(self) -> None:
        """Stop serving, drop the connections, remove the socket file.  Idempotent.

        A request in progress may send its reply first (for REPLY_GRACE at most): the
        client of `mirrorctl down` learns that the stop it asked for has begun, rather
        than that the connection was cut."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns), set()
            idle = [conn for conn in conns if conn not in self._busy]
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            except OSError:
                pass
            sock.close()
        for conn in idle:
            _shutdown(conn)  # wakes each connection's readline(); its thread closes it
        me = threading.current_thread()
        with self._lock:  # a busy connection's thread closes it once it has replied
            self._replied.wait_for(
                lambda: all(thread is me for thread in self._busy.values()), REPLY_GRACE)
            late = [conn for conn in conns if conn in self._busy]
        for conn in late:
            _shutdown(conn)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
        # Remove the file only if it is still ours, not a successor daemon's.
        try:
            st = os.stat(self.path)
            if self._inode == (st.st_dev, st.st_ino):
                os.unlink(self.path)
        except OSError:
            pass

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketInUse(f"{self.path} exists and is not a socket; remove it or "
                               f"choose another control_socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(STALE_PROBE_TIMEOUT)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: left behind by a daemon that died
        except OSError as err:
            raise ControlSocketInUse(f"{self.path}: cannot tell whether another daemon uses this "
                               f"socket: {err.strerror or err}") from None
        else:
            raise ControlSocketInUse(f"{self.path}: another process is serving this control socket "
                               f"(is mirrord already running for this resource?)")
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        sock = self._sock
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError as err:
                if self._closed:
                    return
                log.warning("control socket %s: accept failed: %s", self.path, err)
                threading.Event().wait(ACCEPT_RETRY_DELAY)
                continue
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="control client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            while True:
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return  # the client closed
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    self._send(conn, refusal(f"request line longer than {MAX_LINE} bytes; "
                                             f"closing the connection", USAGE_HINT))
                    return
                if not line.strip():
                    continue  # blank lines are harmless: `echo` and `socat` send them
                with self._lock:
                    if self._closed:
                        return  # closing: no new request
                    self._busy[conn] = threading.current_thread()
                try:
                    # all() stops at the first send that fails: the client is gone
                    answered = all(self._send(conn, response)
                                   for response in self._responses(line))
                finally:
                    with self._lock:
                        del self._busy[conn]
                        closing = self._closed
                        self._replied.notify_all()
                if closing or not answered:
                    return
        except OSError:
            return  # reset by the client, or close() shut it down
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _responses(self, line: bytes) -> Iterator[dict]:
        """The response line(s) for one request line: never raises."""
        try:
            request = json.loads(line)
        except ValueError as err:
            yield refusal(f"malformed request: not JSON ({err})", USAGE_HINT)
            return
        if not isinstance(request, dict):
            yield refusal("malformed request: not a JSON object", USAGE_HINT)
            return
        if not isinstance(request.get("command"), str):
            yield refusal('malformed request: no "command" string', USAGE_HINT)
            return
        try:
            result = self.handler(request)
            if isinstance(result, dict):
                yield _checked(result)
                return
            if not hasattr(result, "__next__"):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            for item in result:  # a stream: one line per item
                if not isinstance(item, dict):
                    raise TypeError(f"handler's stream yielded {type(item).__name__}, not a dict")
                yield _checked(item)
        except ControlRefused as err:
            yield refusal(err.error, err.hint)
        except Exception as err:
            log.exception("control request %r failed", request.get("command"))
            yield refusal(f"internal error: {err}",
                          "see the daemon's log (journalctl -u 'mirrord@*')")

    def _send(self, conn: socket.socket, response: dict) -> bool:
        """Write one response line; False if the client is gone."""
        try:
            data = json.dumps(response, allow_nan=False)
        except ValueError:
            # NaN or infinity (a rate over no time, say): JSON has none, send null.
            data = json.dumps(_finite(response))
        except TypeError as err:
            log.error("control response not JSON-able: %s: %r", err, response)
            data = json.dumps(refusal(f"internal error: response not JSON-able: {err}"))
        try:
            conn.sendall(data.encode() + b"\n")
        except OSError:
            return False
        return True


def _checked(response: dict) -> dict:
    """A handler's response with "ok" (true unless it says otherwise)."""
    if "ok" not in response:
        response = {"ok": True, **response}
    return response


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- client -----------------------------------------------------------------------------

class ControlClient:
    """One connection to a daemon's control socket, opened on first use.

    Not thread-safe: one request at a time.  ``request`` returns the daemon's response
    as is (``ok`` false included); ``call`` raises ControlRefused instead.
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def request(self, command: str, **args) -> dict:
        """Send ``{"command": command, **args}``; return the response object.

        Raises ControlUnavailable when there is no answer (no socket, nobody listening,
        permission denied, timeout, connection closed, or a reply that is not a JSON
        object with a boolean "ok").
        """
        if self._sock is None:
            self._connect()
        line = json.dumps({"command": command, **args}).encode() + b"\n"
        try:
            self._sock.sendall(line)
            reply = self._reader.readline(MAX_REPLY + 1)
        except TimeoutError:
            self.close()
            raise self._unavailable(f"no reply within {self.timeout:g} s "
                                    f"(the daemon may be stuck or overloaded)") from None
        except OSError as err:
            self.close()
            raise self._unavailable(f"connection lost: {err.strerror or err}") from None
        if not reply.endswith(b"\n"):
            self.close()
            if not reply:
                raise self._unavailable("the daemon closed the connection without replying")
            raise self._unavailable("reply truncated or too long")
        try:
            response = json.loads(reply)
        except ValueError:
            response = None
        if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
            self.close()
            raise self._unavailable(f"unexpected reply (not from mirrord?): {reply[:80]!r}")
        return response

    def call(self, command: str, **args) -> dict:
        """Like request(), but raise ControlRefused for an ``ok: false`` response."""
        response = self.request(command, **args)
        if not response["ok"]:
            raise ControlRefused(str(response.get("error", "refused")),
                                 str(response.get("hint", "")))
        return response

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            not_running = isinstance(err, (FileNotFoundError, ConnectionRefusedError))
            raise self._unavailable(_connect_problem(err), not_running) from None
        self._sock, self._reader = sock, sock.makefile("rb")

    def peer_pid(self) -> int | None:
        """The PID of the process serving the open connection (SO_PEERCRED, recorded at
        connect time), or None: not connected, or the daemon is in a PID namespace this
        process cannot see (the kernel then reports 0)."""
        if self._sock is None:
            return None
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      _UCRED.size)
        pid = _UCRED.unpack(creds)[0]
        return pid or None

    def _unavailable(self, problem: str, not_running: bool = False) -> ControlUnavailable:
        return ControlUnavailable(self.path, f"control socket {self.path}: {problem}",
                                  not_running)


_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid (SO_PEERCRED)


def _connect_problem(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "does not exist; mirrord may not be running"
    if isinstance(err, ConnectionRefusedError):
        return "nobody is listening (stale socket); mirrord may not be running"
    if isinstance(err, PermissionError):
        return "permission denied; run as root"
    if isinstance(err, TimeoutError):
        return "connect timed out; mirrord may be stuck"
    if err.errno == errno.ENOTSOCK or err.errno == errno.ECONNREFUSED:
        return "not a socket; mirrord may not be running"
    return f"{err.strerror or err}; mirrord may not be running"
