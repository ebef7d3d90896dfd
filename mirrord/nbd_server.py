"""The NBD frontend: one export served over a unix socket to local clients.

Strategy.  One thread accepts; each client connection gets one thread that does the
fixed-newstyle handshake and then reads requests and dispatches them.  READs are served
by that thread itself (device.read blocks, then header and data go out in one sendmsg).
Write-type requests (WRITE, TRIM, WRITE_ZEROES, FLUSH) are handed to the device with a
`done(errno)` callback: the device may call it from any thread, before or long after the
call returns (a primary waits for its peer: `done` then runs in the link thread).
`done` never blocks on the client: it queues the reply for the connection's reply
writer thread, so a client that reads its replies slowly stalls that thread and never
the device's (the link must keep running), and replies that complete together go out
in one send.  The hand-off costs a wake-up (an eventfd write, made without holding the
GIL) when the writer is idle, and measured +35 us of median latency at queue depth 1;
so the one reply a connection is waiting for (nothing else in flight) is sent by `done`
itself when the socket takes it at once (MSG_DONTWAIT), else it is queued too.
Replies go out in completion order, which simple replies allow (each carries the
request's handle).

Bounds.  At most MAX_IN_FLIGHT write-type requests per connection wait on the device:
at the bound the reader stops reading, and TCP-style back-pressure reaches the client
through the socket.  On DISC or end of stream the connection waits (at most
DRAIN_TIMEOUT) for the requests still in flight, then closes.

Everything about bytes on the wire is in mirrord/nbd_protocol.py; this module only
moves them.  A client that breaks the protocol loses its own connection and costs one
log line; the server and the other clients carry on.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import Callable, Protocol

from . import nbd_protocol as nbd
from .nbd_protocol import Command, Error, NbdProtocolError, Option, OptionDataError, Reply
from .process import name_os_thread

log = logging.getLogger(__name__)

# Write-type requests one connection may have waiting on the device.  Enough to keep a
# queue-depth-32 client and the link to the peer busy; small enough that a stalled peer
# pins at most 64 x 32 MiB of one client's data in memory.
MAX_IN_FLIGHT = 64
# How long a closing connection (DISC, EOF) waits for its in-flight requests' `done`.
DRAIN_TIMEOUT = 30.0
# A client that does not finish the handshake in this time (in total, not per read) is
# dropped: it holds a thread.
HANDSHAKE_TIMEOUT = 30.0
# A reply is sent by the thread that completes its request (not handed to the writer)
# only while the connection has at most this many requests in flight: a client waiting
# for this very reply, whose latency the hand-off would add to.
INLINE_REPLY_MAX_IN_FLIGHT = 1
# A reply that cannot be sent for this long (the client stopped reading) breaks the
# connection instead of blocking the device thread that called `done`.
SEND_TIMEOUT = 60.0
# A WRITE refused for its length has its payload read and thrown away so the stream
# stays in sync; beyond this the client is not sending us real writes: hang up.
MAX_DISCARD = 128 * 1024 * 1024
DISCARD_CHUNK = 1024 * 1024
# Connections at once; more are refused at accept (each costs a thread).
MAX_CONNECTIONS = 128
LISTEN_BACKLOG = 64
# server.close() waits this long (in all) for connection threads to finish; a thread
# still inside a blocking device call is left behind (daemon thread) with a warning.
CLOSE_JOIN_TIMEOUT = 5.0
# Probing an existing socket file for a live server: a listener answers at once.
PROBE_TIMEOUT = 1.0

_MSG_WAITALL = socket.MSG_WAITALL
_TIMEVAL = struct.Struct("@ll")


class BlockDevice(Protocol):
    """What the server needs from the thing it exports (the engine, or a test device).

    `done(errno)` must be called exactly once per write-type call, with 0 for success,
    from any thread, before or after the call returns.  The data passed to write() is a
    fresh bytearray that nobody else touches: keep it until `done`.  Write-type calls may
    block (back-pressure); read() blocks and raises OSError, whose errno becomes the
    NBD error (nbd_protocol.nbd_error).
    """

    size: int  # bytes; fixed while served

    def writable(self) -> bool:
        """False on a secondary: checked at handshake and before every write-type call."""

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`."""

    def write(self, offset: int, data: bytearray, fua: bool,
              done: Callable[[int], None]) -> None:
        """Write `data`; with `fua`, durable before `done(0)`."""

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                     done: Callable[[int], None]) -> None:
        """Make the range read as zeros; `may_trim` allows deallocating it."""

    def trim(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        """The client no longer needs the range (contents become unspecified)."""

    def flush(self, done: Callable[[int], None]) -> None:
        """Every write already completed is durable before `done(0)`."""


class NbdServer:
    """Serve `device` as the export `export_name` on the unix socket `path`.

    The empty export name (the protocol's "default export") also selects it.
    """

    def __init__(self, path: str, device: BlockDevice, export_name: str,
                 description: str = "") -> None:
        self.path = os.path.abspath(path)
        self.device = device
        self.export_name = export_name
        self.description = description
        self._lock = threading.Lock()  # guards everything below
        self._listener: socket.socket | None = None
        self._socket_ino: int | None = None  # our socket file, to remove only ours
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._established = 0  # connections past the handshake
        self._closed = False
        self._ids = itertools.count(1)

    # --- public API -------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen (replacing a stale socket file), then serve in daemon threads."""
        with self._lock:
            if self._closed:
                raise RuntimeError("NbdServer: start() after close()")
            if self._listener is not None:
                raise RuntimeError("NbdServer: already started")
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            _remove_stale_socket(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(self.path)
                listener.listen(LISTEN_BACKLOG)
                self._socket_ino = os.stat(self.path).st_ino
            except OSError:
                listener.close()
                raise
            self._listener = listener
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f"nbd-accept-{self.export_name}", daemon=True)
            self._accept_thread.start()
        log.info("nbd: serving export %r on %s", self.export_name, self.path)

    def close(self) -> None:
        """Stop accepting, drop every client, remove the socket file.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            accept_thread = self._accept_thread
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() with EINVAL
            except OSError:
                pass
        for conn in conns:
            conn.abort()
        deadline = time.monotonic() + CLOSE_JOIN_TIMEOUT
        if accept_thread is not None:
            accept_thread.join(CLOSE_JOIN_TIMEOUT)
        if listener is not None:
            listener.close()
            self._remove_socket_file()
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
            if conn.thread.is_alive():
                log.warning("nbd client %d: still blocked in the device after close", conn.ident)

    @property
    def client_count(self) -> int:
        """Connections past the handshake right now."""
        with self._lock:
            return self._established

    # --- internals --------------------------------------------------------------------

    def _remove_socket_file(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._socket_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("nbd: cannot remove %s: %s", self.path, exc)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                with self._lock:
                    if self._closed:
                        return
                log.warning("nbd: accept failed: %s", exc)
                threading.Event().wait(0.1)  # EMFILE and friends: do not spin
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                if len(self._conns) >= MAX_CONNECTIONS:
                    log.warning("nbd: refusing a client: %d connections already", MAX_CONNECTIONS)
                    sock.close()
                    continue
                conn = _Connection(self, sock, next(self._ids))
                self._conns.add(conn)
            conn.thread.start()

    def _established_changed(self, delta: int) -> bool:
        """Count a connection in or out; False when the server is closing (drop it)."""
        with self._lock:
            if delta > 0 and self._closed:
                return False
            self._established += delta
            return True

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: left by a process that died
    except (socket.timeout, BlockingIOError):
        # A listener with a full backlog: alive, just busy.
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there") from None
    else:
        raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
    finally:
        probe.close()
    os.unlink(path)


class _ClientGone(Exception):
    """The client closed the stream (possibly in the middle of a message)."""


class _Aborted(Exception):
    """The server is closing this connection."""


class _Done:
    """The `done(errno)` callback of one write-type request.

    A slotted object rather than a closure so that a device raising instead of calling
    `done` can be told apart from a device that called it and then raised.
    """

    __slots__ = ("conn", "handle", "called")

    def __init__(self, conn: _Connection, handle: int) -> None:
        self.conn = conn
        self.handle = handle
        self.called = False

    def __call__(self, error: int = 0) -> None:
        if self.called:
            log.error("nbd client %d: device called done() twice for handle %#x",
                      self.conn.ident, self.handle)
            return
        self.called = True
        self.conn._complete(self.handle, error)

    def raised(self, exc: BaseException, what: str) -> None:
        """The device call raised: complete the request with its errno, unless done."""
        if self.called:
            log.error("nbd client %d: %s raised after done(): %r", self.conn.ident, what, exc)
            return
        if isinstance(exc, OSError):
            self(exc.errno or errno.EIO)
        else:
            log.error("nbd client %d: %s raised %r", self.conn.ident, what, exc)
            self(errno.EIO)


class _Connection:
    """One client: its socket, its reader thread, its in-flight requests."""

    def __init__(self, server: NbdServer, sock: socket.socket, ident: int) -> None:
        self.server = server
        self.device = server.device
        self.sock = sock
        self.ident = ident
        self.thread = threading.Thread(target=self._run, name=f"nbd-client-{ident}",
                                       daemon=True)
        self.read_only = True
        self.size = 0
        # One reply on the wire at a time; also makes "closed" and the fd's close atomic
        # with respect to sends, so a late `done` never writes to a reused fd.
        self._send_lock = threading.Lock()
        # Orders close() against abort()'s shutdown (which must not take _send_lock: a
        # send blocked on a full socket holds it, and shutdown is what unblocks it).
        self._fd_lock = threading.Lock()
        self._closed = False  # the socket is closed: replies are dropped
        # In-flight count and its waiters: the reader at the bound, the final drain.
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._aborted = False
        self._deadline = 0.0  # end of the handshake's time budget
        # Replies of write-type requests, queued by `done` (any thread) for the writer.
        self._replies: collections.deque = collections.deque()
        self._writer: threading.Thread | None = None
        self._writer_wake: int | None = None  # eventfd the writer sleeps on
        self._writer_idle = False  # the writer sleeps (or is about to): wake it
        self._writer_stop = False

    # --- thread body ------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        established = False
        drain = False
        try:
            self._deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            if not self._handshake():
                return
            if not self.server._established_changed(+1):
                return
            established = True
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 _TIMEVAL.pack(int(SEND_TIMEOUT), 0))
            self._start_writer()
            log.debug("nbd client %d: connected (%s)", self.ident,
                      "read-only" if self.read_only else "read-write")
            self._serve()
            drain = True  # DISC: the spec says finish outstanding requests first
        except _ClientGone as exc:
            drain = True  # the client may only have half-closed: answer what it sent
            if established or not str(exc) or self._aborted:
                log.debug("nbd client %d: disconnected: %s", self.ident,
                          str(exc) or "end of stream")
            else:
                log.warning("nbd client %d: closing connection: handshake cut short: %s",
                            self.ident, exc)
        except _Aborted:
            pass
        except ConnectionError as exc:  # reset or broken pipe: the client went away
            drain = True
            log.debug("nbd client %d: disconnected: %s", self.ident, exc)
        except NbdProtocolError as exc:
            log.warning("nbd client %d: closing connection: %s", self.ident, exc)
        except socket.timeout:
            log.warning("nbd client %d: closing connection: handshake not finished in %g s",
                        self.ident, HANDSHAKE_TIMEOUT)
        except OSError as exc:
            if not self._aborted:
                log.warning("nbd client %d: closing connection: %s", self.ident, exc)
        except Exception:
            log.exception("nbd client %d: closing connection after an internal error",
                          self.ident)
        finally:
            if drain:
                self._drain()
            self._close_socket()
            self._stop_writer()
            if established:
                self.server._established_changed(-1)
            self.server._forget(self)

    def abort(self) -> None:
        """Called by server.close(): wake the reader and any send, stop waiting."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        with self._fd_lock:
            if not self._closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _close_socket(self) -> None:
        with self._fd_lock, self._send_lock:
            if not self._closed:
                self._closed = True
                self.sock.close()

    def _drain(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._aborted or self._in_flight == 0,
                                       DRAIN_TIMEOUT):
                log.warning("nbd client %d: closing with %d requests still in flight",
                            self.ident, self._in_flight)

    # --- handshake --------------------------------------------------------------------

    def _recv_exact(self, length: int, *, boundary: bool = False) -> bytes:
        """Handshake bytes, within the handshake's deadline.

        `boundary`: EOF before the first byte is a clean end (the client just left).
        """
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self.sock.settimeout(remaining)
            n = self.sock.recv_into(view[got:], length - got, _MSG_WAITALL)
            if n == 0:
                if got == 0 and boundary:
                    raise _ClientGone("")
                raise _ClientGone(f"end of stream after {got} of {length} bytes")
            got += n
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        # Handshake replies are small; the timeout left by the last read bounds them.
        self.sock.sendall(data)

    def _handshake(self) -> bool:
        """Negotiate; True when the client entered transmission, False on ABORT."""
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        self._send(nbd.greeting())
        # A client that leaves before sending anything (a liveness probe) is no error.
        flags = nbd.parse_client_flags(self._recv_exact(nbd.CLIENT_FLAGS.size, boundary=True))
        no_zeroes = bool(flags & nbd.ClientFlag.C_NO_ZEROES)
        while True:
            header = nbd.parse_option_header(
                self._recv_exact(nbd.OPTION_HEADER.size, boundary=True))
            data = self._recv_exact(header.length) if header.length else b""
            option = header.option
            if option == Option.EXPORT_NAME:
                # No error reply exists for EXPORT_NAME: an unknown name ends the session.
                name = nbd.parse_export_name(data)
                if not self._known(name):
                    raise NbdProtocolError("unknown_export", repr(name))
                self._enter_transmission()
                self._send(nbd.export_name_reply(self.size, nbd.transmission_flags(
                    self.read_only), no_zeroes))
                return True
            try:
                if option == Option.ABORT:
                    # The spec asks for an ACK; the client may already be gone.
                    try:
                        self._send(nbd.option_reply(option, Reply.ACK))
                    except OSError:
                        pass
                    return False
                if option == Option.LIST:
                    nbd.parse_empty_option(option, data)
                    self._send(nbd.server_reply(self.server.export_name,
                                                self.server.description)
                               + nbd.option_reply(option, Reply.ACK))
                elif option == Option.INFO or option == Option.GO:
                    if self._info(option, nbd.parse_info_request(data)):
                        return True
                else:
                    self._send(nbd.option_error(option, Reply.ERR_UNSUP,
                                                f"option {_option_name(option)} not supported"))
            except OptionDataError as exc:
                self._send(nbd.option_error(option, Reply.ERR_INVALID, str(exc)))

    def _known(self, name: str) -> bool:
        return name == self.server.export_name or name == ""

    def _enter_transmission(self) -> None:
        # Read-only is decided once, here, and advertised; the size is fixed while served.
        self.read_only = not self.device.writable()
        self.size = self.device.size

    def _info(self, option: int, request: nbd.InfoRequest) -> bool:
        """Answer INFO or GO; True when GO moved the connection to transmission."""
        if not self._known(request.name):
            self._send(nbd.option_error(option, Reply.ERR_UNKNOWN,
                                        f"no export named {request.name!r}"))
            return False
        if option == Option.GO:
            self._enter_transmission()
            read_only, size = self.read_only, self.size
        else:
            read_only, size = not self.device.writable(), self.device.size
        server = self.server
        parts = [nbd.info_export(option, size, nbd.transmission_flags(read_only))]
        for kind in dict.fromkeys(request.info_types):  # each once, in the client's order
            if kind == nbd.Info.NAME:
                parts.append(nbd.info_name(option, server.export_name))
            elif kind == nbd.Info.DESCRIPTION and server.description:
                parts.append(nbd.info_description(option, server.description))
            elif kind == nbd.Info.BLOCK_SIZE:
                parts.append(nbd.info_block_size(option))
        parts.append(nbd.option_reply(option, Reply.ACK))
        self._send(b"".join(parts))
        return option == Option.GO

    # --- transmission -----------------------------------------------------------------

    def _serve(self) -> None:
        """Read and dispatch requests until DISC (returns) or end of stream (raises)."""
        recv_into = self.sock.recv_into
        header = bytearray(nbd.REQUEST_SIZE)
        header_view = memoryview(header)
        parse = nbd.parse_request
        check = nbd.check_request
        device = self.device
        size = self.size
        read_only = self.read_only
        # Plain ints: comparisons with enum members cost a method call per request.
        READ, WRITE, FLUSH = int(Command.READ), int(Command.WRITE), int(Command.FLUSH)
        TRIM, WRITE_ZEROES, DISC = int(Command.TRIM), int(Command.WRITE_ZEROES), int(Command.DISC)
        FUA, NO_HOLE = int(nbd.CommandFlag.FUA), int(nbd.CommandFlag.NO_HOLE)
        while True:
            got = recv_into(header, nbd.REQUEST_SIZE, _MSG_WAITALL)
            if got != nbd.REQUEST_SIZE:
                if got == 0:
                    raise _ClientGone("end of stream")
                self._recv_rest(header_view, got)
            request = parse(header)
            flags, command, handle, offset, length = request
            error = check(request, size, read_only)
            if error:
                if command == WRITE:
                    self._discard(length)
                self._reply(error, handle)
                continue
            if command == READ:
                self._read(handle, offset, length)
                continue
            if command == WRITE:
                data = self._recv_payload(length)
            elif command == DISC:
                return
            if command != FLUSH and not device.writable():
                self._reply(Error.EPERM, handle)
                continue
            self._acquire_slot()
            done = _Done(self, handle)
            try:
                if command == WRITE:
                    device.write(offset, data, bool(flags & FUA), done)
                    data = None
                elif command == FLUSH:
                    device.flush(done)
                elif command == TRIM:
                    device.trim(offset, length,
                                self._flush_after(done) if flags & FUA else done)
                else:  # WRITE_ZEROES (check_request let nothing else through)
                    assert command == WRITE_ZEROES
                    device.write_zeroes(offset, length, bool(flags & FUA),
                                        not flags & NO_HOLE, done)
            except Exception as exc:  # noqa: BLE001 - the device's failure is the client's EIO
                done.raised(exc, f"device {Command(command).name.lower()}")

    def _flush_after(self, done: _Done) -> Callable[[int], None]:
        """TRIM with FUA: the device's trim() has no FUA argument, so flush afterwards."""
        def trimmed(error: int = 0) -> None:
            if error:
                done(error)
                return
            try:
                self.device.flush(done)
            except Exception as exc:  # noqa: BLE001
                done.raised(exc, "device flush")
        return trimmed

    def _recv_rest(self, view: memoryview, got: int) -> None:
        length = len(view)
        while got < length:
            n = self.sock.recv_into(view[got:], length - got, _MSG_WAITALL)
            if n == 0:
                raise _ClientGone(f"end of stream inside a request header ({got} bytes)")
            got += n

    def _recv_payload(self, length: int) -> bytearray:
        # A fresh buffer per request: the device keeps it until `done`.
        buf = bytearray(length)
        view = memoryview(buf)
        got = self.sock.recv_into(view, length, _MSG_WAITALL)
        while got < length:
            n = self.sock.recv_into(view[got:], length - got, _MSG_WAITALL)
            if n == 0:
                raise _ClientGone(f"end of stream inside a write payload ({got} of {length})")
            got += n
        return buf

    def _discard(self, length: int) -> None:
        """Read and drop a refused WRITE's payload so the next header is where we look."""
        if length > MAX_DISCARD:
            raise NbdProtocolError("write_too_long",
                                   f"WRITE of {length} bytes refused; not reading it")
        scratch = bytearray(min(length, DISCARD_CHUNK))
        view = memoryview(scratch)
        while length:
            n = self.sock.recv_into(view, min(length, len(scratch)))
            if n == 0:
                raise _ClientGone("end of stream inside a refused write payload")
            length -= n

    def _read(self, handle: int, offset: int, length: int) -> None:
        try:
            data = self.device.read(offset, length)
        except OSError as exc:
            self._reply(nbd.nbd_error(exc.errno or errno.EIO), handle)
            return
        except Exception as exc:  # noqa: BLE001
            log.error("nbd client %d: device read raised %r", self.ident, exc)
            self._reply(Error.EIO, handle)
            return
        if len(data) != length:
            log.error("nbd client %d: device read returned %d of %d bytes at %d",
                      self.ident, len(data), length, offset)
            self._reply(Error.EIO, handle)
            return
        self._reply(0, handle, data)

    def _acquire_slot(self) -> None:
        with self._cond:
            while self._in_flight >= MAX_IN_FLIGHT:
                if self._aborted:
                    raise _Aborted()
                self._cond.wait()
            self._in_flight += 1

    def _complete(self, handle: int, error: int) -> None:
        """A write-type request's `done` (any thread): send its reply, or queue it for
        the writer, which sends it and then frees the request's slot.

        Sent right here only when this is the connection's one request in flight (a
        queue-depth-1 client waits for exactly this reply: the hand-off to the writer
        measured +35 us at the median) and the socket takes it at once; never waits.
        """
        reply = nbd.simple_reply(nbd.nbd_error(error), handle)
        if (self._in_flight <= INLINE_REPLY_MAX_IN_FLIGHT and self._writer_idle
                and not self._replies and self._send_inline(reply)):
            return
        self._replies.append(reply)
        # The writer publishes "idle" before its last look at the queue, and we look at
        # "idle" after appending: one of us sees the other, so no reply is left behind.
        self._wake_writer()

    def _send_inline(self, reply: bytes) -> bool:
        """Try to send `reply` without blocking; True if it is dealt with (sent, or the
        client is gone) and its slot freed, False to queue it for the writer."""
        if not self._send_lock.acquire(blocking=False):
            return False  # the writer (or a READ's reply) is sending
        try:
            if not self._closed:
                try:
                    sent = self.sock.send(reply, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self._send_failed(exc)
                    sent = len(reply)  # the stream is over: nothing more to send for it
                if sent < len(reply):
                    # The rest must be the next bytes on the stream: first in the queue,
                    # put there while we still hold the send lock.
                    self._replies.appendleft(reply[sent:])
                    self._wake_writer()
                    return True
        finally:
            self._send_lock.release()
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
        return True

    def _wake_writer(self) -> None:
        if self._writer_idle:
            self._writer_idle = False
            try:
                os.eventfd_write(self._writer_wake, 1)
            except (OSError, TypeError):
                pass  # the writer has stopped (the connection is closing)

    # --- reply writer -----------------------------------------------------------------

    def _start_writer(self) -> None:
        self._writer_wake = os.eventfd(0, os.EFD_CLOEXEC)
        self._writer = threading.Thread(target=self._write_replies,
                                        name=f"nbd-reply-{self.ident}", daemon=True)
        self._writer.start()

    def _stop_writer(self) -> None:
        writer = self._writer
        if writer is None:
            return
        self._writer_stop = True
        os.eventfd_write(self._writer_wake, 1)
        writer.join(CLOSE_JOIN_TIMEOUT)
        if writer.is_alive():  # stuck in a send: the socket is closed, it ends soon
            log.warning("nbd client %d: reply writer still running at close", self.ident)
            return
        os.close(self._writer_wake)
        self._writer_wake = None

    def _write_replies(self) -> None:
        """The writer thread: send queued replies (all that are waiting in one send),
        then free their requests' slots."""
        name_os_thread()
        replies = self._replies
        popleft = replies.popleft
        wake = self._writer_wake
        while True:
            if not replies:
                if self._writer_stop:
                    return
                self._writer_idle = True
                if not replies:
                    os.eventfd_read(wake)  # sleeps without the GIL
                self._writer_idle = False
                continue
            batch = [popleft()]
            while replies:
                batch.append(popleft())
            try:
                self._send_replies(batch[0] if len(batch) == 1 else b"".join(batch))
            except Exception:  # noqa: BLE001 - the slots must be freed whatever happens
                log.exception("nbd client %d: sending replies failed", self.ident)
            with self._cond:
                self._in_flight -= len(batch)
                self._cond.notify_all()

    def _reply(self, error: int, handle: int, data=None) -> None:
        """Send one reply now, from this thread (READs, and requests refused at once)."""
        self._send_replies(nbd.simple_reply(error, handle), data)

    def _send_replies(self, header: bytes, data=None) -> None:
        with self._send_lock:
            if self._closed:
                return  # the client is gone; nobody is waiting for this
            try:
                if data is None:
                    self.sock.sendall(header)
                else:
                    _sendmsg_all(self.sock, header, data)
            except OSError as exc:
                self._send_failed(exc)

    def _send_failed(self, exc: OSError) -> None:
        """Under _send_lock: a half-sent reply leaves the stream unusable, so end the
        connection.  The fd is valid here (closing it takes _send_lock): shutdown is safe."""
        if not self._aborted:
            log.warning("nbd client %d: cannot send a reply: %s", self.ident, exc)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _sendmsg_all(sock: socket.socket, header: bytes, data) -> None:
    """Send header + data with one sendmsg (no join); finish a partial send if any."""
    total = len(header) + len(data)
    sent = sock.sendmsg((header, data))
    if sent == total:
        return
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    sock.sendall(memoryview(data)[sent - len(header):])


def _option_name(option: int) -> str:
    try:
        return Option(option).name
    except ValueError:
        return str(option)
