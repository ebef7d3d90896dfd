"""The replication engine: roles, disk and connection states, and the path of a write.

Threads that meet here:
- NBD client threads call the block-device methods (read, write, write_zeroes, trim,
  flush) - see mirrord/nbd_server.py for the contract: `done(errno)` once per request;
- the link thread (mirrord/link_service.py) delivers connection events: on_event;
- the applier thread (mirrord/applier.py) applies the peer's requests in order and hands
  control messages back here;
- the sync thread (mirrord/sync_source.py) copies the disk to the peer during a resync;
- control-socket threads call the commands (promote, demote, connect, disconnect, status).

Two locks:
- `_order` serialises "send to the peer + write locally" so that the local disk and the
  stream to the peer see the writes in the same order (the secondary applies them in
  stream order, so both disks end equal even for overlapping writes in flight), and so
  that a resync chunk is read and sent atomically with respect to writes;
- `_lock` guards the state below.  Order: _order before _lock.  The link thread takes
  only _lock and never waits on a disk while holding it, except to persist metadata.

Generations (resync/generations.py): a primary that writes what the peer will not get
first persists a new generation id (`_peer_behind`), so the next connection knows it is
the sync source.  Until the dirty bitmap exists, a resync copies the whole disk.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from protocol import Connected, ConnectionLost, HandshakeRefused, MessageReceived
from protocol.replication import (
    MessageError, MessageType, decode_message, encode_control, encode_flush, encode_reply,
    encode_sync_end, encode_write, encode_zeroes,
)
from resync.generations import NO_ID, Decision, Generation, decide
from resync.metadata import Metadata

from . import metafile
from .backing import BackingError, BackingStore
from .completion import Completion
from .progress import SyncProgress

log = logging.getLogger(__name__)

# Largest piece of one client write sent as one message (the link's max_message is
# 8 MiB; larger NBD writes are split).
MAX_WRITE_PIECE = 4 << 20
# Bytes sent to the peer and not yet applied there (no REPLY yet): bounds how far the
# secondary may fall behind under protocols A and B, and the memory both sides use.
MAX_UNREPLIED = 64 << 20
# How long a writer waits for room before giving up on the peer (it is then dropped).
ROOM_TIMEOUT = 30.0


class Refused(Exception):
    """A command the engine will not carry out now: why, and what to do."""

    def __init__(self, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.hint = hint


@dataclass
class Pending:
    """A request sent to the peer, waiting for its REPLY."""

    kind: MessageType
    length: int
    completion: Completion | None  # the client request to complete on REPLY, if any


@dataclass
class PeerView:
    node: str
    role: str = "unknown"
    disk: str = "unknown"
    generation: Generation | None = None
    size: int | None = None


class Engine:
    def __init__(self, *, resource: str, node: str, peer_node: str, protocol: str,
                 store: BackingStore, meta: Metadata, meta_path: str,
                 sync_rate: int | None = None,
                 on_fatal: Callable[[int, str], None] | None = None) -> None:
        self.resource = resource
        self.node = node
        self.peer_node = peer_node
        self.protocol = protocol
        self.store = store
        self.size = store.size
        self.meta = meta
        self.meta_path = meta_path
        self.sync_rate = sync_rate
        self.on_fatal = on_fatal or (lambda code, message: None)
        self.service = None  # LinkService, attached before start
        self.nbd = None  # NbdServer, for the client count (demotion refuses while open)
        self._order = threading.Lock()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # notified when _pending shrinks
        self._ids = itertools.count(1)
        self.role = "secondary"
        self.disk_failed = False
        self.want_connect = True
        self.session: int | None = None
        self.peer: PeerView | None = None
        self.refusal: str | None = None  # why the last connection was refused
        self._snapshot: Generation | None = None  # what we told the peer at connect
        self.decision: Decision | None = None
        self.replicating = False  # writes go to the peer
        self.sync_role: str | None = None  # "source" | "target" while a resync runs
        self.sync: SyncProgress | None = None
        self._pending: dict[int, Pending] = {}
        self._unreplied = 0
        self._sync_thread = None
        self.applier = None  # Applier, attached before start

    # --- wiring ---------------------------------------------------------------------

    def attach(self, service, applier) -> None:
        self.service = service
        self.applier = applier

    # --- metadata -------------------------------------------------------------------

    def _persist(self, **changes) -> None:
        """Change the metadata record and make it durable before going on."""
        meta = self.meta.with_(**changes)
        metafile.save(self.meta_path, meta)
        self.meta = meta

    def _note_peer_behind(self) -> None:
        """This node is about to hold data the peer lacks: move to a new generation.

        Persisted before the write it precedes, so that after any crash the next
        connection sees this node as the sync source.  Idempotent until a resync ends.
        """
        if self.meta.peer_behind or self.role != "primary":
            return
        new_id = _new_generation_id()
        self._persist(peer_behind=True, previous=self.meta.current, current=new_id)
        log.info("%s: writing without the peer: new generation %016x (was %016x)",
                 self.resource, new_id, self.meta.previous)

    # --- block device (NBD) -----------------------------------------------------------

    def writable(self) -> bool:
        return self.role == "primary" and not self.disk_failed

    def read(self, offset: int, length: int) -> bytes:
        if self.disk_failed:
            raise OSError(errno.EIO, "local disk failed")
        try:
            return self.store.read(offset, length)
        except BackingError as exc:
            log.error("%s", exc)
            raise

    def write(self, offset: int, data, fua: bool, done) -> None:
        view = memoryview(data)
        if len(view) <= MAX_WRITE_PIECE:
            self._replicate(done, len(view), fua,
                            lambda ident: encode_write(ident, offset, view, fua=fua),
                            lambda: self.store.write(offset, [view]))
            return
        # Split: each piece is replicated in order; the request completes with them all.
        whole = Completion(done)
        for start in range(0, len(view), MAX_WRITE_PIECE):
            piece = view[start:start + MAX_WRITE_PIECE]
            whole.add_part()
            self._replicate(whole.part_done, len(piece), fua,
                            lambda ident, o=offset + start, p=piece: encode_write(ident, o, p, fua=fua),
                            lambda o=offset + start, p=piece: self.store.write(o, [p]))
        whole.part_done(0)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, done) -> None:
        self._replicate(done, 0, fua,
                        lambda ident: encode_zeroes(ident, offset, length, fua=fua,
                                                    may_trim=may_trim),
                        lambda: self.store.write_zeroes(offset, length, may_trim))

    def trim(self, offset: int, length: int, done) -> None:
        # A trimmed range reads back as zeros on both boxes: NBD leaves its content
        # unspecified, but a mirror must not hold two different "unspecified"s.
        self.write_zeroes(offset, length, False, True, done)

    def flush(self, done) -> None:
        if self.disk_failed:
            done(errno.EIO)
            return
        completion = Completion(done)
        with self._lock:
            if self.replicating:
                self._send_request(MessageType.FLUSH, 0, completion, encode_flush)
        self._finish_local(completion, None, durable=True)

    def _replicate(self, done, nbytes: int, durable: bool, encode, apply_local) -> None:
        """Send a write to the peer (when replicating) and apply it here, in one order."""
        if not self.writable():
            done(errno.EPERM if not self.disk_failed else errno.EIO)
            return
        completion = Completion(done)
        with self._order:
            if self.replicating:
                self._wait_for_room(nbytes)
            with self._lock:
                if self.role != "primary":
                    completion.part_done(errno.EPERM)
                    return
                if self.replicating:
                    self._send_request(MessageType.WRITE, nbytes, completion, encode,
                                       durable=durable)
                else:
                    self._note_peer_behind()
            self._finish_local(completion, apply_local, durable)

    def _finish_local(self, completion: Completion, apply_local, durable: bool) -> None:
        error = 0
        try:
            if apply_local is not None:
                apply_local()
            if durable:
                self.store.sync()
        except BackingError as exc:
            log.error("%s", exc)
            error = errno.EIO
        completion.part_done(error)

    def _send_request(self, kind: MessageType, nbytes: int, completion: Completion | None,
                      encode, *, durable: bool = True) -> None:
        """Under _lock, replicating: send one request; `completion` waits as the protocol says."""
        ident = next(self._ids)
        on_acked = None
        waits_reply = completion is not None and (
            durable or self.protocol == "C" or kind is not MessageType.WRITE)
        if completion is not None:
            if waits_reply:
                completion.add_part()
            elif self.protocol == "B":
                completion.add_part()
                on_acked = completion.acked
        self._pending[ident] = Pending(kind, nbytes, completion if waits_reply else None)
        self._unreplied += nbytes
        self.service.submit(encode(ident), self.session, on_acked)

    def _wait_for_room(self, nbytes: int) -> None:
        """Back-pressure: wait until the peer has applied enough of what was sent."""
        deadline = time.monotonic() + ROOM_TIMEOUT
        with self._idle:
            while (self.replicating and self._unreplied
                   and self._unreplied + nbytes > MAX_UNREPLIED):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%s: peer %s applied nothing for %.0f s: disconnecting it",
                              self.resource, self.peer_node, ROOM_TIMEOUT)
                    self.service.call_soon(self._drop_connection)
                    return
                self._idle.wait(min(left, 1.0))
        self.service.wait_for_room(nbytes, ROOM_TIMEOUT)

    def _drop_connection(self) -> None:
        """In the link thread: end the session (the peer reconnects, a resync follows)."""
        conn = self.service.conn
        conn.close("peer stalled", now=self.service.link.clock())
        if self.want_connect:
            conn.connect(now=self.service.link.clock())

    # --- link events (link thread) ----------------------------------------------------

    def on_event(self, event) -> None:
        if isinstance(event, MessageReceived):
            try:
                message = decode_message(event.parts)
            except MessageError as exc:
                log.error("%s: malformed message from %s (%s): dropping the connection",
                          self.resource, self.peer_node, exc)
                self.service.call_soon(self._drop_connection)
                return
            if message.type is MessageType.REPLY:
                self._on_reply(message.id, message.errno)
            else:
                self.applier.put(self.session, message)
        elif isinstance(event, Connected):
            self._on_connected(event)
        elif isinstance(event, ConnectionLost):
            self._on_lost(event)
        elif isinstance(event, HandshakeRefused):
            log.warning("%s: refused a peer: %s", self.resource, event.reason)

    def _on_connected(self, event: Connected) -> None:
        with self._lock:
            log.info("%s: connected to %s (session %08x, MTU %d)", self.resource,
                     event.peer_node, event.session_id, event.mtu)
            self.session = event.session_id
            self.peer = PeerView(event.peer_node)
            self.refusal = None
            self.decision = None
            self._snapshot = self.meta.generation
            self.service.submit(encode_control(MessageType.STATE, self._state_body()),
                                self.session)
            # From here on a primary's writes go to the peer, ordered after our STATE:
            # whatever the peer decides, it sees them after it knows who we are.
            self.replicating = self.role == "primary" and not self.disk_failed

    def _on_lost(self, event: ConnectionLost) -> None:
        with self._lock:
            if self.session != event.session_id:
                return
            log.warning("%s: connection to %s lost: %s", self.resource, self.peer_node,
                        event.reason)
            was_replicating = self.replicating
            self.session = None
            self.peer = None
            self.replicating = False
            self.decision = None
            if self.sync_role is not None:
                log.warning("%s: resync interrupted at %.1f%%", self.resource,
                            100.0 * self.sync.done / self.sync.total if self.sync else 0)
            self.sync_role = None
            self.sync = None
            if was_replicating or self.role == "primary":
                self._note_peer_behind()
            self._complete_all_pending()

    def _complete_all_pending(self) -> None:
        """The peer is gone: its parts of every waiting request are over (it is behind)."""
        pending, self._pending = self._pending, {}
        self._unreplied = 0
        self._idle.notify_all()
        for entry in pending.values():
            if entry.completion is not None:
                entry.completion.part_done(0)

    def _on_reply(self, ident: int, error: int) -> None:
        with self._lock:
            entry = self._pending.pop(ident, None)
            if entry is None:
                return
            self._unreplied -= entry.length
            self._idle.notify_all()
            if entry.kind is MessageType.SYNC_DATA and self.sync is not None and not error:
                self.sync.advance(entry.length)
            if error:
                self._peer_disk_failed(error)
            elif entry.kind is MessageType.SYNC_END:
                self._sync_finished_as_source()
        if entry.completion is not None:
            entry.completion.part_done(0)  # the peer's failure is not the client's

    def _peer_disk_failed(self, error: int) -> None:
        if self.peer is not None and self.peer.disk == "failed":
            return
        log.error("%s: peer %s could not write its disk (%s): going on alone",
                  self.resource, self.peer_node, os.strerror(error))
        if self.peer is not None:
            self.peer.disk = "failed"
        self.replicating = False
        self.sync_role = None
        self.sync = None
        self._note_peer_behind()
        self._complete_all_pending()

    # --- the peer's state (applier thread, in stream order) ----------------------------

    def on_peer_state(self, session: int, body: dict) -> None:
        with self._lock:
            if session != self.session or self.peer is None:
                return
            peer = self.peer
            peer.role = str(body.get("role", "unknown"))
            peer.disk = str(body.get("disk", "unknown"))
            peer.size = body.get("size")
            generation = Generation(int(body.get("current", 0)), int(body.get("previous", 0)),
                                    bool(body.get("consistent")), bool(body.get("crashed_primary")))
            first = peer.generation is None
            peer.generation = generation
            if first or self.decision is Decision.BOTH_INCONSISTENT:
                self._decide(generation)

    def _decide(self, peer_gen: Generation) -> None:
        """Both sides run this on the same two generations and reach mirrored answers."""
        mine = self._snapshot
        peer = self.peer
        if peer.size != self.size:
            self._refuse(f"disk sizes differ: {self.node} has {self.size} bytes, "
                         f"{peer.node} has {peer.size}", fatal_if_secondary=True)
            return
        if self.role == "primary" and peer.role == "primary":
            self._refuse("both nodes are primary (split brain); demote one of them")
            return
        decision = decide(mine, peer_gen)
        if decision is Decision.TARGET and self.role == "primary":
            self._refuse(f"{peer.node} has newer data but {self.node} is primary")
            return
        if decision is Decision.SOURCE and peer.role == "primary":
            self._refuse(f"{self.node} has newer data but {peer.node} is primary")
            return
        if decision in (Decision.SPLIT_BRAIN, Decision.UNRELATED):
            what = "split brain: both nodes wrote while apart" \
                if decision is Decision.SPLIT_BRAIN else "the disks share no history"
            self._refuse(f"{what}; resolve by hand (see docs/OPERATIONS.md)")
            return
        self.decision = decision
        log.info("%s: peer %s: %s", self.resource, peer.node, decision.value)
        if decision is Decision.SOURCE:
            self.replicating = self.replicating or not self.disk_failed
            self._start_sync_source()
        elif decision is Decision.TARGET:
            self.sync_role = "target"
            self.sync = SyncProgress(self.size)
            if self.meta.consistent:
                self._persist(consistent=False)
            self._send_state()

    def _refuse(self, reason: str, fatal_if_secondary: bool = False) -> None:
        log.error("%s: refusing the connection with %s: %s", self.resource,
                  self.peer_node, reason)
        self.refusal = reason
        self.want_connect = False
        self.replicating = False
        self.service.submit(encode_control(MessageType.REFUSE, {"reason": reason}), self.session)
        service = self.service
        service.call_soon(lambda: service.conn.close(reason, now=service.link.clock()))
        if self.role == "primary":
            self._note_peer_behind()
        self._complete_all_pending()
        if fatal_if_secondary and self.role != "primary":
            self.on_fatal(2, reason)

    def on_peer_refused(self, session: int, reason: str) -> None:
        with self._lock:
            if session != self.session:
                return
            log.error("%s: %s refused the connection: %s", self.resource, self.peer_node, reason)
            if self.refusal is None:
                self.refusal = reason
            self.want_connect = False

    # --- resync -------------------------------------------------------------------------

    def _start_sync_source(self) -> None:
        from .sync_source import SyncSource  # a module of its own; imported late to avoid a cycle

        self.sync_role = "source"
        self.sync = SyncProgress(self.size)
        self._sync_thread = SyncSource(self, self.session, self.sync_rate)
        self._sync_thread.start()

    def send_sync_chunk(self, session: int, offset: int, length: int, last: bool) -> bool:
        """Sync thread: read and send one chunk (or SYNC_END when `last`), in write order.

        False when the sync must stop (session over, peer failed).
        """
        with self._order:
            if not last:
                self._wait_for_room(length)
            with self._lock:
                if session != self.session or self.sync_role != "source":
                    return False
            if last:
                with self._lock:
                    self._send_request(MessageType.SYNC_END, 0, None, encode_sync_end)
                return True
            try:
                data = self.store.read(offset, length)
            except BackingError as exc:
                log.error("%s: resync stopped: %s", self.resource, exc)
                self.disk_failed = True
                self.service.call_soon(self._drop_connection)
                return False
            with self._lock:
                if session != self.session or self.sync_role != "source":
                    return False
                self._send_request(MessageType.SYNC_DATA, length, None,
                                   lambda ident: encode_write(ident, offset, data, sync=True))
        return True

    def _sync_finished_as_source(self) -> None:
        log.info("%s: resync to %s finished (%d bytes)", self.resource, self.peer_node,
                 self.size)
        self.sync_role = None
        self.sync = None
        self.decision = Decision.IN_SYNC
        if self.meta.peer_behind or (self.meta.primary and self.role != "primary"):
            # The peer holds everything now; a crashed-primary mark is resolved too.
            self._persist(peer_behind=False, primary=self.role == "primary")
        if self.peer is not None:
            self.peer.disk = "up-to-date"

    def sync_finished_as_target(self, session: int) -> None:
        """Applier thread, after SYNC_END's data is durable: this disk is up to date."""
        with self._lock:
            peer = self.peer
            if session != self.session or peer is None or peer.generation is None:
                return
            self._persist(consistent=True, current=peer.generation.current,
                          previous=peer.generation.previous, primary=False, peer_behind=False)
            self.sync_role = None
            self.sync = None
            self.decision = Decision.IN_SYNC
            log.info("%s: resync from %s finished: disk up to date", self.resource, peer.node)
            self._send_state()

    def sync_applied(self, nbytes: int) -> None:
        with self._lock:
            if self.sync is not None and self.sync_role == "target":
                self.sync.advance(nbytes)

    def local_disk_failed(self, exc: BackingError) -> None:
        """Applier thread: this node's disk refused a replicated write."""
        with self._lock:
            if not self.disk_failed:
                log.error("%s: %s: disk failed, telling %s", self.resource, exc, self.peer_node)
                self.disk_failed = True
                try:
                    self._persist(consistent=False)
                except metafile.MetadataFileError as meta_exc:
                    log.error("%s", meta_exc)
                self._send_state()

    def may_apply(self, session: int) -> bool:
        """Applier thread: may requests of `session` be applied to this disk?"""
        with self._lock:
            return (not self.disk_failed and self.role != "primary"
                    and self.decision in (Decision.IN_SYNC, Decision.TARGET))

    def reply(self, session: int, ident: int, error: int) -> None:
        with self._lock:
            if session == self.session:
                self.service.submit(encode_reply(ident, error), session)

    # --- state for the peer and the operator ------------------------------------------

    def disk_state(self) -> str:
        if self.disk_failed:
            return "failed"
        if self.sync_role == "target" or not self.meta.consistent:
            return "inconsistent"
        return "up-to-date"

    def connection_state(self) -> str:
        if self.session is not None and self.peer is not None:
            if self.sync_role == "source":
                return "sync-source"
            if self.sync_role == "target":
                return "sync-target"
            return "connected"
        return "connecting" if self.want_connect else "standalone"

    def _state_body(self) -> dict:
        meta = self.meta
        return {"role": self.role, "disk": self.disk_state(), "size": self.size,
                "current": meta.current, "previous": meta.previous,
                "consistent": meta.consistent and not self.disk_failed,
                "crashed_primary": meta.primary and self.role != "primary"}

    def _send_state(self) -> None:
        if self.session is not None:
            self.service.submit(encode_control(MessageType.STATE, self._state_body()),
                                self.session)

    def status(self) -> dict:
        with self._lock:
            peer = None
            if self.peer is not None:
                peer = {"node": self.peer.node, "role": self.peer.role, "disk": self.peer.disk}
            if self.sync is not None:
                out_of_sync = self.sync.left
            elif self.meta.peer_behind or (self.peer is not None and self.peer.disk in
                                           ("inconsistent", "failed")):
                out_of_sync = self.size
            else:
                out_of_sync = 0
            status = {
                "resource": self.resource, "node": self.node, "role": self.role,
                "disk": self.disk_state(), "connection": self.connection_state(),
                "peer": peer, "protocol": self.protocol, "out_of_sync_bytes": out_of_sync,
                "sync": self.sync.as_dict() if self.sync is not None else None,
                "size_bytes": self.size,
                "generation": {"current": f"{self.meta.current:016x}",
                               "previous": f"{self.meta.previous:016x}"},
            }
            if self.refusal is not None:
                status["refused"] = self.refusal
            return status

    # --- commands (control socket) ------------------------------------------------------

    def promote(self, force: bool = False) -> str:
        with self._lock:
            if self.role == "primary":
                return f"{self.node} is already primary"
            if self.peer is not None and self.peer.role == "primary":
                raise Refused(f"the peer {self.peer.node} is primary",
                              f"demote it first: mirrorctl secondary on {self.peer.node}")
            if self.disk_failed:
                raise Refused(f"the disk {self.store.path} has failed",
                              "replace or repair it, then restart mirrord")
            if self.sync_role == "target":
                raise Refused("this node is the target of a running resync "
                              f"({self.sync.as_dict()['percent'] if self.sync else 0}% done)",
                              "wait for it to finish (mirrorctl status)")
            forced = False
            if not self.meta.consistent:
                if not force:
                    raise Refused(f"the disk of {self.node} is {self.disk_state()}",
                                  "wait for a resync from an up-to-date peer, or use "
                                  "--force if this node has the only good data (its whole "
                                  "disk is then copied to the peer)")
                self._persist(consistent=True, current=_new_generation_id(), previous=NO_ID,
                              peer_behind=False)
                forced = True
            self._persist(primary=True)
            self.role = "primary"
            if self.peer is not None and self.decision is not None:
                self.replicating = not self.disk_failed and (
                    self.decision is Decision.IN_SYNC or self.sync_role == "source")
            elif self.peer is not None and forced:
                self.replicating = False
            if not self.replicating:
                self._note_peer_behind()
            if forced and self.peer is not None:
                self._snapshot = self.meta.generation
                self._send_state()
                if self.peer.generation is not None:
                    self._decide(self.peer.generation)
            else:
                self._send_state()
            log.info("%s: %s is now primary%s", self.resource, self.node,
                     " (forced)" if forced else "")
            return f"{self.node} is now primary" + (" (forced)" if forced else "")

    def demote(self) -> str:
        with self._lock:
            if self.role != "primary":
                return f"{self.node} is already secondary"
            clients = self.nbd.client_count if self.nbd is not None else 0
            if clients:
                raise Refused(f"{clients} NBD client(s) are connected to the export",
                              "stop them first (umount the filesystem, stop nbdfuse or "
                              "qemu), then demote")
            self.role = "secondary"  # new writes are refused from here on
        with self._order:  # writes already inside finish their local part
            pass
        deadline = time.monotonic() + ROOM_TIMEOUT
        with self._idle:
            while any(p.completion is not None for p in self._pending.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(min(left, 1.0))
        try:
            self.store.sync()
        except BackingError as exc:
            log.error("%s", exc)
        with self._lock:
            self._persist(primary=False)
            self.replicating = False
            self._send_state()
        log.info("%s: %s is now secondary", self.resource, self.node)
        return f"{self.node} is now secondary"

    def connect(self) -> str:
        with self._lock:
            if self.session is not None:
                return f"already connected to {self.peer_node}"
            self.want_connect = True
            self.refusal = None
        service = self.service
        service.call_soon(lambda: service.conn.connect(now=service.link.clock()))
        return f"connecting to {self.peer_node}"

    def disconnect(self) -> str:
        with self._lock:
            self.want_connect = False
            if self.role == "primary":
                self._note_peer_behind()
        service = self.service
        service.call_soon(lambda: service.conn.close("disconnected by the operator",
                                                     now=service.link.clock()))
        return f"disconnected from {self.peer_node}"

    def shutdown(self) -> None:
        """Clean stop: wait briefly for requests in flight, flush, clear the primary mark."""
        with self._lock:
            was_primary = self.role == "primary"
            self.role = "secondary"
        with self._order:
            pass
        try:
            self.store.sync()
        except BackingError as exc:
            log.error("%s", exc)
            return
        if was_primary:
            with self._lock:
                if self.replicating and self._pending:
                    # What the peer has not confirmed must be resynced next time.
                    self.role = "primary"
                    self._note_peer_behind()
                    self.role = "secondary"
                self._persist(primary=False)


def _new_generation_id() -> int:
    while True:
        value = int.from_bytes(os.urandom(8), "big")
        if value != NO_ID:
            return value
