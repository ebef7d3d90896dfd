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
first persists a new generation id (`_note_peer_behind`), so the next connection knows
it is the sync source.  The out-of-sync bitmap marks every block such a write touches,
and the activity log (resync/activity_log.py) records, before any write, the extents
that may have writes in flight: after a crash both together name every block that may
differ (invariant 1).  A bit is cleared only when the peer confirmed the block: a resync
chunk's REPLY (invariant 2).  A resync copies only the marked blocks of both sides.
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
    encode_write, encode_zeroes,
)
from resync.activity_log import DEFAULT_CAPACITY, ActivityLog, ActivityLogFull
from resync.generations import NO_ID, Decision, Generation, Kind, decide
from resync.metadata import max_al_extents

from .backing import BackingError, BackingStore
from .completion import Completion
from .engine_fence import FenceMixin
from .engine_sync import SyncMixin
from .errors import Refused
from .metafile import MetadataFileError, MetaStore
from .progress import SyncProgress

log = logging.getLogger(__name__)

# Largest piece of one client write sent as one message (the link's max_message is
# 8 MiB; larger NBD writes are split).
MAX_WRITE_PIECE = 4 << 20
# Writes up to this size are sent by the writing thread itself when the link thread is
# idle (LinkService.send_now): a few frames, on a small write's critical path.  Larger
# ones are left to the link thread, which builds their frames while this thread writes
# the local copy.
SEND_NOW_MAX = 64 << 10
# Bytes sent to the peer and not yet applied there (no REPLY yet): bounds how far the
# secondary may fall behind under protocols A and B, and the memory both sides use.
MAX_UNREPLIED = 64 << 20
# How long a writer waits for room before giving up on the peer (it is then dropped).
ROOM_TIMEOUT = 30.0
# A refused session is closed once the peer acknowledged our REFUSE, or after this long.
REFUSE_LINGER = 2.0


@dataclass
class Pending:
    """A request sent to the peer, waiting for its REPLY."""

    kind: MessageType
    length: int  # bytes counted against MAX_UNREPLIED
    completion: Completion | None  # the client request to complete on REPLY, if any
    offset: int = 0  # the range a WRITE or ZEROES touches (marked if the peer misses it)
    span: int = 0


@dataclass
class PeerView:
    node: str
    role: str = "unknown"
    disk: str = "unknown"
    generation: Generation | None = None
    size: int | None = None
    block: int | None = None
    dirty_bytes: int = 0
    discard_my_data: bool = False


class Engine(SyncMixin, FenceMixin):
    def __init__(self, *, resource: str, node: str, peer_node: str, protocol: str,
                 store: BackingStore, metastore: MetaStore,
                 sync_rate: int | None = None, activity_log: bool = True,
                 after_split_brain: str = "disconnect",
                 on_fatal: Callable[[int, str], None] | None = None,
                 fencer=None, hooks=None, cluster=None) -> None:
        self.resource = resource
        self.node = node
        self.peer_node = peer_node
        self.protocol = protocol
        self.store = store
        self.size = store.size
        self.metastore = metastore
        self.meta = metastore.meta
        self.bitmap = metastore.bitmap
        self.crashed_primary = self.meta.primary  # it was primary when it last stopped
        self.use_activity_log = activity_log  # False only to prove the tests would notice
        self.al = ActivityLog(self.meta.extent, min(DEFAULT_CAPACITY, max_al_extents()))
        self.sync_rate = sync_rate
        self.after_split_brain = after_split_brain
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
        self._snapshot_dirty = 0  # and how many bytes our bitmap marked then
        self._last_session: int | None = None  # the latest session, even after it ended
        self.decision: Decision | None = None
        self.replicating = False  # writes go to the peer
        self.sync_role: str | None = None  # "source" | "target" while a resync runs
        self.sync: SyncProgress | None = None
        self._pending: dict[int, Pending] = {}
        self.resync_sent_bytes = 0  # resync data sent to the peer, since start
        self.resync_received_bytes = 0  # resync data applied here, since start
        self._unreplied = 0
        self._sync_thread = None
        self.sync_paused = False
        self.last_app_write: float | None = None  # monotonic time of the last client write
        self.discard_my_data = False  # set by `connect --discard-my-data` until used
        self.split_brain: dict | None = None  # both sides' changes, after a refusal
        self.checksum_sync = False  # this resync compares digests before copying
        self._digests_out = 0  # DIGESTS requests without a result yet
        # Blocks a checksum resync compared so far, and how many of them differed: the
        # sync thread copies without digests while nearly all differ (sync_source.py).
        self.digest_blocks_compared = 0
        self.digest_blocks_differed = 0
        self.verify: SyncProgress | None = None  # a running online verify
        self.verify_found = 0  # blocks the running or last verify found different
        self.verify_done: dict | None = None  # the last verify's result
        self.applier = None  # Applier, attached before start
        self.fencer = fencer  # mirrord/fencing.py Fencer; None: policy "none"
        self.hooks = hooks  # mirrord/hooks.py HookRunner, or None
        self.cluster = cluster  # mirrord/cluster.py ClusterLink, or None
        self._init_fencing()
        self._recover()

    # --- wiring ---------------------------------------------------------------------

    def attach(self, service, applier) -> None:
        self.service = service
        self.applier = applier

    # --- metadata -------------------------------------------------------------------

    def _recover(self) -> None:
        """At start: extents the activity log names may hold writes the peer lacks."""
        extents = self.metastore.al_active_at_open
        if not extents:
            return
        for extent in extents:
            start = extent * self.meta.extent
            if start < self.size:
                self.bitmap.set_range(start, min(self.meta.extent, self.size - start))
        self.metastore.flush_bitmap()
        self.metastore.write_al([])
        log.warning("%s: %d extent(s) of the activity log were active at the last stop: "
                    "marked out of sync (%d bytes)", self.resource, len(extents),
                    self.bitmap.dirty_bytes())

    def _persist(self, **changes) -> None:
        """Change the metadata record and make it durable before going on."""
        self.metastore.save(self.meta.with_(**changes))
        self.meta = self.metastore.meta

    def _note_peer_behind(self) -> None:
        """This node is about to hold data the peer lacks: move to a new generation.

        Persisted before the write it precedes, so that after any crash the next
        connection sees this node as the sync source; from here the bitmap tracks what
        the peer lacks.  Idempotent until a resync ends.
        """
        if self.meta.bitmap != NO_ID or self.role != "primary":
            return
        new_id = _new_generation_id()
        self._persist(bitmap=self.meta.current, current=new_id)
        log.info("%s: writing without the peer: new generation %016x (was %016x)",
                 self.resource, new_id, self.meta.bitmap)

    def _al_begin(self, offset: int, length: int) -> None:
        """Under _lock, before a primary's write: its extents are active on disk."""
        if not self.use_activity_log:
            return
        warned = False
        while True:
            try:
                added, evicted = self.al.begin(offset, length)
                break
            except ActivityLogFull:
                if not warned:
                    log.warning("%s: activity log full of busy extents: waiting",
                                self.resource)
                    warned = True
                self._idle.wait(0.5)
        if added:
            if evicted:
                # What the bitmap knows of those extents must be on disk before the
                # log forgets them.
                self.metastore.flush_bitmap()
            self.metastore.write_al(self.al.active)

    def _al_end(self, offset: int, length: int) -> None:
        if self.use_activity_log:
            self.al.end(offset, length)

    def flush_bitmap(self) -> None:
        with self._lock:
            self.metastore.flush_bitmap()

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
            self._replicate(done, len(view), fua, offset, len(view),
                            lambda ident: encode_write(ident, offset, view, fua=fua, parts=True),
                            lambda: self.store.write(offset, [view]))
            return
        # Split: each piece is replicated in order; the request completes with them all.
        whole = Completion(done)
        for start in range(0, len(view), MAX_WRITE_PIECE):
            piece = view[start:start + MAX_WRITE_PIECE]
            whole.add_part()
            self._replicate(whole.part_done, len(piece), fua, offset + start, len(piece),
                            lambda ident, o=offset + start, p=piece: encode_write(ident, o, p, fua=fua,
                                                                     parts=True),
                            lambda o=offset + start, p=piece: self.store.write(o, [p]))
        whole.part_done(0)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, done) -> None:
        self._replicate(done, 0, fua, offset, length,
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
            self._wait_unfrozen()
            replicated = self.replicating
            if replicated:
                self._send_request(MessageType.FLUSH, 0, completion, encode_flush)
        if replicated:
            self.service.send_now()
        self._finish_local(completion, None, durable=True)

    def _replicate(self, done, nbytes: int, durable: bool, offset: int, span: int, encode,
                   apply_local) -> None:
        """Send a write to the peer (when replicating) and apply it here, in one order."""
        if not self.writable():
            done(errno.EPERM if not self.disk_failed else errno.EIO)
            return
        completion = Completion(done)
        self.last_app_write = time.monotonic()  # the resync yields to the application
        with self._order:
            if self.replicating:
                self._wait_for_room(nbytes)
            with self._lock:
                self._wait_unfrozen()  # the peer is being fenced: nothing goes on before
                if self.role != "primary":
                    completion.part_done(errno.EPERM)
                    return
                self._al_begin(offset, span)
                replicated = self.replicating
                if replicated:
                    self._send_request(MessageType.WRITE, nbytes, completion, encode,
                                       durable=durable, offset=offset, span=span)
                else:
                    self._note_peer_behind()
                    self.bitmap.set_range(offset, span)
            if replicated and nbytes <= SEND_NOW_MAX:
                self.service.send_now()  # the round trip to the peer starts before our write
            self._finish_local(completion, apply_local, durable)
            if not replicated:
                with self._lock:
                    self._al_end(offset, span)

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
                      encode, *, durable: bool = True, offset: int = 0, span: int = 0) -> None:
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
                on_acked = lambda delivered: self._peer_received(completion, delivered)  # noqa: E731
        self._pending[ident] = Pending(kind, nbytes, completion if waits_reply else None,
                                       offset, span)
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

    def _generation(self) -> Generation:
        return self.meta.generation(self.crashed_primary and self.role != "primary",
                                    self.bitmap.count() > 0)

    def _on_connected(self, event: Connected) -> None:
        with self._lock:
            log.info("%s: connected to %s (session %08x, MTU %d)", self.resource,
                     event.peer_node, event.session_id, event.mtu)
            self.session = event.session_id
            self._last_session = event.session_id
            self._digests_out = 0
            self.peer = PeerView(event.peer_node)
            self.refusal = None
            self.decision = None
            self._snapshot = self._generation()
            self._snapshot_dirty = self.bitmap.dirty_bytes()
            self._send_state()
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
                            self.sync.as_dict()["percent"] if self.sync else 0.0)
                self._flush_bitmap_quietly()
            self.sync_role = None
            self.sync = None
            if was_replicating or self.role == "primary":
                self._note_peer_behind()
            if self.role == "primary":
                self._fence_peer(f"connection to {self.peer_node} lost: {event.reason}")
            self._complete_all_pending()
            self._hook("disconnect", reason=event.reason)

    def _flush_bitmap_quietly(self) -> None:
        try:
            self.metastore.flush_bitmap()
        except MetadataFileError as exc:
            log.error("%s", exc)

    def _complete_all_pending(self) -> None:
        """The peer is gone: what it did not confirm is marked, and the waits are over."""
        pending, self._pending = self._pending, {}
        self._unreplied = 0
        self._idle.notify_all()
        for entry in pending.values():
            if entry.kind is MessageType.WRITE:
                self.bitmap.set_range(entry.offset, entry.span)
                self._al_end(entry.offset, entry.span)
        for entry in pending.values():
            if entry.completion is not None:
                self._hold_or_complete(entry.completion)

    def _on_reply(self, ident: int, error: int) -> None:
        with self._lock:
            entry = self._pending.pop(ident, None)
            if entry is None:
                return
            self._unreplied -= entry.length
            self._idle.notify_all()
            if error:
                if entry.kind is MessageType.WRITE:
                    self.bitmap.set_range(entry.offset, entry.span)
                    self._al_end(entry.offset, entry.span)
                self._peer_disk_failed(error)
            elif entry.kind is MessageType.SYNC_DATA:
                # Invariant 2: the peer has the block now.
                self.bitmap.clear_range(entry.offset, entry.span)
                if self.sync is not None:
                    self.sync.advance(entry.span)
            elif entry.kind is MessageType.SYNC_END:
                self._sync_finished_as_source()
            elif entry.kind is MessageType.WRITE:
                self._al_end(entry.offset, entry.span)
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
            peer.block = body.get("block")
            peer.dirty_bytes = int(body.get("dirty_bytes", 0))
            peer.discard_my_data = bool(body.get("discard_my_data"))
            generation = Generation(
                int(body.get("current", 0)), int(body.get("bitmap", 0)),
                tuple(body.get("history", ())), bool(body.get("consistent")),
                bool(body.get("crashed_primary")), int(body.get("sync_source", 0)),
                bool(body.get("dirty")))
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
        if peer.block != self.meta.block:
            self._refuse(f"bitmap block sizes differ: {self.meta.block} here, {peer.block} "
                         f"on {peer.node}; recreate one node's metadata")
            return
        verdict = decide(mine, peer_gen)
        decision, kind = verdict.decision, verdict.kind
        if self.role == "primary" and peer.role == "primary" \
                and decision is not Decision.SPLIT_BRAIN:
            self._refuse("both nodes are primary; demote one of them")
            return
        if decision is Decision.SPLIT_BRAIN:
            mine_discards = self.discard_my_data
            if mine_discards == peer.discard_my_data and not mine_discards:
                mine_discards = self._split_brain_victim_is_me()
                peer_discards = mine_discards is False
            else:
                peer_discards = peer.discard_my_data
            if mine_discards is not None and mine_discards != peer_discards:
                decision = Decision.TARGET if mine_discards else Decision.SOURCE
                kind = Kind.BITMAP  # both sides' marks: everything either changed
                log.warning("%s: split brain resolved: %s discards its changes",
                            self.resource, self.node if mine_discards else peer.node)
        if decision is Decision.TARGET and self.role == "primary":
            self._refuse(f"{peer.node} has newer data but {self.node} is primary")
            return
        if decision is Decision.SOURCE and peer.role == "primary":
            self._refuse(f"{self.node} has newer data but {peer.node} is primary")
            return
        if decision is Decision.SPLIT_BRAIN:
            self._refuse(f"split brain: both nodes wrote while apart ({self.node} changed "
                         f"{self.bitmap.dirty_bytes()} bytes, {peer.node} "
                         f"{peer.dirty_bytes}); resolve with `mirrorctl connect "
                         f"--discard-my-data` on the node whose changes are to be dropped",
                         split_brain=True)
            return
        if decision is Decision.UNRELATED:
            self._refuse("the disks share no history (unrelated data); recreate the "
                         "metadata of the node to be overwritten (docs/OPERATIONS.md)")
            return
        self.decision = decision
        self.split_brain = None
        self._fence_cancel()
        log.info("%s: peer %s: %s%s (rule %d)", self.resource, peer.node, decision.value,
                 f", {kind.value} resync" if kind is not Kind.NONE else "", verdict.rule)
        if decision is not Decision.TARGET:
            self._clear_outdated()  # in sync with the peer, or newer than it
        if decision is Decision.IN_SYNC:
            self._peer_up_to_date()
        self._hook("connect", peer_role=peer.role, peer_disk=peer.disk)
        if decision is Decision.SOURCE:
            self.replicating = self.role == "primary" and not self.disk_failed
            self.sync_role = "source"
            self.sync = None  # until the peer's bitmap arrives
            # The target holds data that may mostly match: compare digests first.
            self.checksum_sync = kind is Kind.FULL or verdict.rule == 6
            if kind is Kind.FULL:
                self.bitmap.set_all()
            self._flush_bitmap_quietly()
            self._hook("sync-start", sync_role="source")
        elif decision is Decision.TARGET:
            self.discard_my_data = False
            self.sync_role = "target"
            self.sync = None  # until SYNC_BEGIN
            if self.meta.consistent or self.meta.sync_source != peer_gen.current:
                self._persist(consistent=False, sync_source=peer_gen.current)
            self._send_state()
            bits = bytes(self.bitmap.bits)
            self.service.submit(encode_control(MessageType.BITMAP, {"bits": bits}),
                                self.session)
            self._hook("sync-start", sync_role="target")

    def _split_brain_victim_is_me(self) -> bool | None:
        """The configured automatic policy's verdict: True (discard mine), False (the
        peer's), None (no automatic decision).  Both sides compute it from the same
        numbers, so they agree.  A primary is never chosen as the victim."""
        mine, theirs = self._snapshot_dirty, self.peer.dirty_bytes  # as both sides saw them
        policy = self.after_split_brain
        if policy == "discard-zero-changes":
            if (mine == 0) == (theirs == 0):
                return None
            victim_is_me = mine == 0
        elif policy == "discard-least-changes":
            if mine == theirs:
                victim_is_me = self.node > self.peer.node  # any order both sides agree on
            else:
                victim_is_me = mine < theirs
        else:
            return None
        primary = self.role == "primary" if victim_is_me else self.peer.role == "primary"
        if primary:
            return None  # never throw away a primary's data automatically
        log.warning("%s: split brain, policy %s: %s changed %d bytes, %s %d: %s's changes "
                    "are discarded", self.resource, policy, self.node, mine, self.peer.node,
                    theirs, self.node if victim_is_me else self.peer.node)
        return victim_is_me

    def _refuse(self, reason: str, fatal_if_secondary: bool = False,
                split_brain: bool = False) -> None:
        log.error("%s: refusing the connection with %s: %s", self.resource,
                  self.peer_node, reason)
        self.refusal = reason
        if split_brain:
            self.split_brain = {"this_node_bytes": self.bitmap.dirty_bytes(),
                                "peer_bytes": self.peer.dirty_bytes if self.peer else None}
        self.want_connect = False
        self.replicating = False
        body = {"reason": reason}
        if self.split_brain is not None:
            body["split_brain"] = self.split_brain
        # The session ends once the peer's link has the REFUSE (closing at once would
        # drop it unsent), or after REFUSE_LINGER if the peer does not acknowledge it.
        session, service = self.session, self.service

        def close(_delivered: bool = False) -> None:
            service.call_soon(lambda: self._close_session(session, reason))

        self.service.submit(encode_control(MessageType.REFUSE, body), session, close)
        timer = threading.Timer(REFUSE_LINGER, close)
        timer.daemon = True
        timer.start()
        if self.role == "primary":
            self._note_peer_behind()
            self._fence_peer(f"connection to {self.peer_node} refused: {reason}")
        self._complete_all_pending()
        if split_brain:
            self._hook("split-brain", reason=reason,
                       this_node_bytes=self.split_brain["this_node_bytes"],
                       peer_bytes=self.split_brain["peer_bytes"])
        if fatal_if_secondary and self.role != "primary":
            self.on_fatal(2, reason)

    def _close_session(self, session: int | None, reason: str) -> None:
        """In the link thread: end `session` if it is still the current one."""
        conn = self.service.conn
        if session is not None and conn.session_id == session:
            conn.close(reason, now=self.service.link.clock())

    def on_peer_refused(self, session: int, body: dict) -> None:
        """The peer ended the connection and said why.  Its REFUSE often arrives after
        the session is gone (the peer closed it right after), so the last session counts
        too, unless a newer one started."""
        reason = str(body.get("reason", ""))
        with self._lock:
            if session != self.session and not (self.session is None
                                                and session == self._last_session):
                return
            log.error("%s: %s refused the connection: %s", self.resource, self.peer_node, reason)
            if self.refusal is None:
                self.refusal = reason
            theirs = body.get("split_brain")
            if isinstance(theirs, dict) and self.split_brain is None:
                self.split_brain = {"this_node_bytes": theirs.get("peer_bytes"),
                                    "peer_bytes": theirs.get("this_node_bytes")}
            self.want_connect = False
        service = self.service
        service.call_soon(lambda: service.conn.close(reason, now=service.link.clock()))

    def local_disk_failed(self, exc: BackingError) -> None:
        """Applier thread: this node's disk refused a replicated write."""
        with self._lock:
            if not self.disk_failed:
                log.error("%s: %s: disk failed, telling %s", self.resource, exc, self.peer_node)
                self.disk_failed = True
                try:
                    self._persist(consistent=False)
                except MetadataFileError as meta_exc:
                    log.error("%s", meta_exc)
                self._send_state()

    def may_apply(self, session: int) -> bool:
        """Applier thread: may requests of `session` be applied to this disk?"""
        with self._lock:
            return (not self.disk_failed and self.role != "primary"
                    and self.decision in (Decision.IN_SYNC, Decision.TARGET))

    def reply(self, session: int, ident: int, error: int) -> None:
        with self._lock:
            if session != self.session:
                return
            self.service.submit(encode_reply(ident, error), session)
        self.service.send_now()  # the primary's write waits for this: no link wake-up

    # --- state for the peer and the operator ------------------------------------------

    def disk_state(self) -> str:
        if self.disk_failed:
            return "failed"
        if self.sync_role == "target" or not self.meta.consistent:
            return "inconsistent"
        if self.meta.outdated:
            return "outdated"
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
        generation = self._generation()
        return {"role": self.role, "disk": self.disk_state(), "size": self.size,
                "block": self.meta.block, "current": generation.current,
                "bitmap": generation.bitmap, "history": list(generation.history),
                "consistent": generation.consistent and not self.disk_failed,
                "crashed_primary": generation.crashed_primary,
                "sync_source": generation.sync_source, "dirty": generation.dirty,
                "dirty_bytes": self.bitmap.dirty_bytes(),
                "discard_my_data": self.discard_my_data}

    def _send_state(self) -> None:
        if self.session is not None:
            self.service.submit(encode_control(MessageType.STATE, self._state_body()),
                                self.session)

    def status(self) -> dict:
        with self._lock:
            peer = None
            if self.peer is not None:
                peer = {"node": self.peer.node, "role": self.peer.role, "disk": self.peer.disk}
            out_of_sync = self.bitmap.dirty_bytes()
            if self.sync_role == "target" and self.sync is not None:
                out_of_sync = self.sync.left
            status = {
                "resource": self.resource, "node": self.node, "role": self.role,
                "disk": self.disk_state(), "connection": self.connection_state(),
                "peer": peer, "protocol": self.protocol, "out_of_sync_bytes": out_of_sync,
                "sync": self.sync.as_dict() if self.sync is not None else None,
                "sync_paused": self.sync_paused,
                "verify": (dict(self.verify.as_dict(), differing_blocks=self.verify_found)
                           if self.verify is not None else None),
                "last_verify": self.verify_done,
                "size_bytes": self.size,
                "out_of_sync_map": self.bitmap.out_of_sync_map(),
                "resync_sent_bytes": self.resync_sent_bytes,
                "resync_received_bytes": self.resync_received_bytes,
                "generation": {"current": f"{self.meta.current:016x}",
                               "bitmap": f"{self.meta.bitmap:016x}"},
            }
            status["outdated"] = ({"by": self.meta.outdated_by,
                                   "reason": f"{self.meta.outdated_by} went on writing "
                                             f"without this node; a resync from it makes "
                                             f"this disk up to date again"}
                                  if self.meta.outdated else None)
            status["io_frozen"] = self.io_frozen
            status["fencing"] = self._fence_status()
            status["cluster"] = self.cluster.status() if self.cluster is not None else None
            if self.refusal is not None:
                status["refused"] = self.refusal
            if self.sync is not None:
                status["sync"]["checksums"] = self.checksum_sync
            if self.split_brain is not None:
                status["split_brain"] = self.split_brain
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
            self._check_outdated_promotion(force)
            forced = False
            if not self.meta.consistent:
                if not force:
                    raise Refused(f"the disk of {self.node} is {self.disk_state()}",
                                  "wait for a resync from an up-to-date peer, or use "
                                  "--force if this node has the only good data (its whole "
                                  "disk is then copied to the peer)")
                self._persist(consistent=True, current=_new_generation_id(), bitmap=NO_ID,
                              history=(), sync_source=NO_ID)
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
            if self.session is None:
                self._fence_peer(f"promoted while {self.peer_node} is not connected")
            if forced and self.peer is not None:
                self._snapshot = self._generation()
                self._snapshot_dirty = self.bitmap.dirty_bytes()
                self._send_state()
                if self.peer.generation is not None:
                    self._decide(self.peer.generation)
            else:
                self._send_state()
            log.info("%s: %s is now primary%s", self.resource, self.node,
                     " (forced)" if forced else "")
            self._hook("role-change", old_role="secondary")
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
            self._thaw_on_demote()
        with self._order:  # writes already inside finish their local part
            pass
        self._wait_for_peer(ROOM_TIMEOUT)
        try:
            self.store.sync()
        except BackingError as exc:
            log.error("%s", exc)
        with self._lock:
            self._flush_bitmap_quietly()
            self._persist(primary=False)
            self.crashed_primary = False
            self.replicating = False
            self._send_state()
            self._hook("role-change", old_role="primary")
        log.info("%s: %s is now secondary", self.resource, self.node)
        return f"{self.node} is now secondary"

    def _wait_for_peer(self, timeout: float) -> None:
        """Wait (bounded) until the peer has answered every client request sent to it."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while any(p.completion is not None or p.span and p.kind is MessageType.WRITE
                      for p in self._pending.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(min(left, 1.0))

    def connect(self, discard_my_data: bool = False) -> str:
        with self._lock:
            if discard_my_data and self.role == "primary":
                raise Refused("a primary cannot discard its data",
                              "demote it first (mirrorctl secondary)")
            # want_connect: a `disconnect` just before may not have closed the session
            # yet (the link thread does that); this connect must still undo it.
            if (self.want_connect and self.session is not None and self.peer is not None
                    and self.decision is not None):
                return f"already connected to {self.peer_node}"
            self.discard_my_data = discard_my_data
            self.want_connect = True
            self.refusal = None
        service = self.service
        service.call_soon(lambda: service.conn.connect(now=service.link.clock()))
        return f"connecting to {self.peer_node}" + (
            " (this node's changes will be discarded)" if discard_my_data else "")

    def disconnect(self) -> str:
        with self._lock:
            self.want_connect = False
            if self.role == "primary":
                self._note_peer_behind()
                self._fence_peer("disconnected by the operator")
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
        if was_primary:
            self._wait_for_peer(5.0)
        try:
            self.store.sync()
        except BackingError as exc:
            log.error("%s", exc)
            return
        with self._lock:
            try:
                if was_primary and self._pending:
                    # Not confirmed by the peer: marked, and a resync follows next time.
                    self.role = "primary"
                    self._note_peer_behind()
                    self.role = "secondary"
                    self._complete_all_pending()
                self.metastore.flush_bitmap()
                if self.al.busy() == 0:
                    self.metastore.write_al([])
                if was_primary:
                    self._persist(primary=False)
            except MetadataFileError as exc:
                log.error("%s", exc)


def _new_generation_id() -> int:
    while True:
        value = int.from_bytes(os.urandom(8), "big")
        if value != NO_ID:
            return value
