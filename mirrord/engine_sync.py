"""The engine's resync half: bitmap exchange, copying, checksum resync, online verify.

A mixin of mirrord/engine.py's Engine (same state, same two locks, same rules): kept
apart so that each file holds one concern - engine.py the write path, the link events
and the commands; this file what happens once two nodes decided that one copies to the
other.  The copying itself runs in mirrord/sync_source.py's threads.
"""

from __future__ import annotations

import logging
import time

from protocol.replication import (
    MessageType, encode_control, encode_sync_end, encode_write,
)
from resync.digests import block_digests, differing_blocks
from resync.generations import NO_ID, Decision
from resync.metadata import HISTORY

from .backing import BackingError
from .errors import Refused
from .progress import SyncProgress

log = logging.getLogger("mirrord.engine")


class SyncMixin:
    # --- resync -------------------------------------------------------------------------

    def on_peer_bitmap(self, session: int, bits) -> None:
        """Applier thread, sync source: merge the target's marks, then start copying."""
        from .sync_source import SyncSource  # imported late: it imports this module's names

        with self._lock:
            if session != self.session or self.sync_role != "source":
                return
            if not isinstance(bits, bytes) or len(bits) != len(self.bitmap.bits):
                log.error("%s: %s sent a bitmap of the wrong size", self.resource, self.peer_node)
                self.service.call_soon(self._drop_connection)
                return
            self.bitmap.merge(bits)
            self._flush_bitmap_quietly()
            total = self.bitmap.dirty_bytes()
            self.sync = SyncProgress(total)
            self.service.submit(encode_control(MessageType.SYNC_BEGIN, {"total_bytes": total}),
                                self.session)
            log.info("%s: resync to %s: %d bytes marked", self.resource, self.peer_node, total)
            self._sync_thread = SyncSource(self, self.session, self.sync_rate,
                                           checksums=self.checksum_sync)
            self._sync_thread.start()

    def on_sync_begin(self, session: int, body: dict) -> None:
        with self._lock:
            if session == self.session and self.sync_role == "target":
                self.sync = SyncProgress(int(body.get("total_bytes", 0)))

    # --- digests: checksum resync and online verify ---------------------------------

    def send_digests(self, session: int, offset: int, length: int, purpose: str) -> bool:
        """Sync or verify thread: send the digests of a range, in write order."""
        with self._order:
            with self._lock:
                if session != self.session:
                    return False
            try:
                data = self.store.read(offset, length)
            except BackingError as exc:
                log.error("%s: %s stopped: %s", self.resource, purpose, exc)
                return False
            digests = block_digests(data, self.meta.block)
            with self._lock:
                if session != self.session:
                    return False
                self._digests_out += 1
                self.service.submit(encode_control(MessageType.DIGESTS, {
                    "offset": offset, "length": length, "digests": digests,
                    "purpose": purpose}), session)
                if purpose == "sync":
                    self.resync_sent_bytes += len(digests)
        return True

    def wait_digests(self, session: int, timeout: float = 60.0, below: int = 1) -> bool:
        """Wait until fewer than `below` DIGESTS requests lack their result (default:
        all have it); False when the session is over or at the timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._digests_out >= below and session == self.session:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
            return session == self.session

    def on_digests(self, session: int, body: dict) -> None:
        """Applier thread (the peer's request): compare its digests with this disk's."""
        offset, length = int(body["offset"]), int(body["length"])
        try:
            data = self.store.read(offset, length)
        except BackingError as exc:
            log.error("%s", exc)
            differ = list(range((length + self.meta.block - 1) // self.meta.block))
        else:
            differ = differing_blocks(block_digests(data, self.meta.block), body["digests"])
        with self._lock:
            if session == self.session:
                self.service.submit(encode_control(MessageType.DIGESTS_RESULT, {
                    "offset": offset, "length": length, "differ": differ,
                    "purpose": body.get("purpose")}), session)

    def on_digests_result(self, session: int, body: dict) -> None:
        """Applier thread: the peer compared a range; act on the blocks that differ."""
        offset, length = int(body["offset"]), int(body["length"])
        block = self.meta.block
        differ = sorted(set(int(i) for i in body.get("differ", ())))
        purpose = body.get("purpose")
        copies = []
        with self._lock:
            if session != self.session:
                return
            if purpose == "verify":
                for index in differ:
                    self.bitmap.set_range(offset + index * block, block)
                self.verify_found += len(differ)
                if self.verify is not None:
                    self.verify.advance(length)
            elif purpose == "sync" and self.sync_role == "source":
                self.digest_blocks_compared += (length + block - 1) // block
                self.digest_blocks_differed += len(differ)
                # Equal blocks are confirmed: the peer holds them (invariant 2).
                start = offset
                for index in differ + [None]:
                    stop = offset + index * block if index is not None else offset + length
                    if stop > start:
                        self.bitmap.clear_range(start, stop - start)
                        if self.sync is not None:
                            self.sync.advance(stop - start)
                    if index is not None:
                        copies.append(offset + index * block)
                        start = stop + block
        # Copy the differing blocks before this result counts as handled, so that the
        # sync thread's SYNC_END follows them on the stream.
        for run_offset, run_length in _runs_of(copies, block):
            if not self.send_sync_chunk(session, run_offset,
                                        min(run_length, self.size - run_offset), last=False):
                break
        with self._lock:
            self._digests_out -= 1
            self._idle.notify_all()

    def start_verify(self) -> str:
        from .sync_source import Verifier

        with self._lock:
            if self.role != "primary":
                raise Refused("verify runs on the primary",
                              f"run it on the primary ({self.peer_node if self.peer and self.peer.role == 'primary' else 'the node that is primary'})")
            if self.session is None or self.decision is not Decision.IN_SYNC or self.sync_role:
                raise Refused(f"{self.node} is not connected and in sync "
                              f"({self.connection_state()})",
                              "wait for the connection and any resync to finish")
            if self.verify is not None:
                return f"verify already running ({self.verify.as_dict()['percent']}%)"
            self.verify = SyncProgress(self.size)
            self.verify_found = 0
            Verifier(self, self.session).start()
        return "verify started: mirrorctl status shows its progress"

    def verify_finished(self, session: int, completed: bool) -> None:
        with self._lock:
            found = self.verify_found
            self.verify_done = {"completed": completed, "differing_blocks": found,
                                "differing_bytes": found * self.meta.block}
            self.verify = None
            self._flush_bitmap_quietly()
            if found:
                log.warning("%s: verify found %d block(s) that differ from %s: marked out "
                            "of sync; `mirrorctl disconnect` then `connect` resyncs them",
                            self.resource, found, self.peer_node)
            else:
                log.info("%s: verify %s: no differences", self.resource,
                         "finished" if completed else "interrupted")

    def invalidate(self) -> str:
        """This node's data is not to be trusted: get all of it from the peer."""
        with self._lock:
            if self.role == "primary":
                raise Refused("a primary cannot be invalidated", "demote it first")
            if self.session is None or self.peer is None or self.peer.disk != "up-to-date":
                raise Refused("invalidate needs a connected peer with an up-to-date disk",
                              "connect first (mirrorctl connect)")
            self._persist(consistent=False, sync_source=NO_ID)
        self.service.call_soon(self._drop_connection)
        return (f"{self.node} invalidated: a full resync from {self.peer_node} follows "
                "(blocks whose digests match are not copied)")

    def sync_allowed(self, session: int) -> bool:
        """Sync thread: go on?  (Waits while paused.)"""
        with self._lock:
            while self.sync_paused and session == self.session and self.sync_role == "source":
                self._idle.wait(0.5)
            return session == self.session and self.sync_role == "source"

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
                                   lambda ident: encode_write(ident, offset, data, sync=True,
                                                              parts=True),
                                   offset=offset, span=length)
                self.resync_sent_bytes += length
        return True

    def _sync_finished_as_source(self) -> None:
        left = self.bitmap.count()
        if left:
            # Cannot happen while the invariants hold (writes during a resync are
            # replicated); if it does, copy again rather than declare the peer good.
            log.error("%s: %d blocks still marked at the end of the resync: another pass",
                      self.resource, left)
            self.sync = None
            from .sync_source import SyncSource

            self.sync = SyncProgress(self.bitmap.dirty_bytes())
            self._sync_thread = SyncSource(self, self.session, self.sync_rate)
            self._sync_thread.start()
            return
        log.info("%s: resync to %s finished (%d bytes sent in all)", self.resource,
                 self.peer_node, self.resync_sent_bytes)
        self.sync_role = None
        self.sync = None
        self.decision = Decision.IN_SYNC
        self._flush_bitmap_quietly()
        history = self.meta.history
        if self.meta.bitmap != NO_ID:
            history = ((self.meta.bitmap,) + tuple(history))[:HISTORY]
        self._persist(bitmap=NO_ID, history=history, primary=self.role == "primary")
        self.crashed_primary = False  # resolved: the peer holds everything now
        if self.peer is not None:
            self.peer.disk = "up-to-date"
        self._peer_up_to_date()
        self._hook("sync-done", sync_role="source")

    def sync_finished_as_target(self, session: int) -> None:
        """Applier thread, after SYNC_END's data is durable: this disk is up to date."""
        with self._lock:
            peer = self.peer
            if session != self.session or peer is None or peer.generation is None:
                return
            self.bitmap.clear_all()
            self._flush_bitmap_quietly()
            source = peer.generation
            self._persist(consistent=True, current=source.current, bitmap=NO_ID,
                          history=tuple(source.history), sync_source=NO_ID, primary=False,
                          outdated=False, outdated_by="")
            self.crashed_primary = False
            self.sync_role = None
            self.sync = None
            self.decision = Decision.IN_SYNC
            log.info("%s: resync from %s finished: disk up to date", self.resource, peer.node)
            self._send_state()
            self._peer_up_to_date()  # if this node once fenced its peer: both agree now
            self._hook("sync-done", sync_role="target")

    def sync_applied(self, nbytes: int) -> None:
        with self._lock:
            self.resync_received_bytes += nbytes
            if self.sync is not None and self.sync_role == "target":
                self.sync.advance(nbytes)

    def pause_sync(self) -> str:
        with self._lock:
            self.sync_paused = True
        return "resync paused" if self.sync_role else "no resync running; the next one starts paused"

    def resume_sync(self) -> str:
        with self._lock:
            self.sync_paused = False
            self._idle.notify_all()
        return "resync resumed"



def _runs_of(offsets: list[int], block: int) -> list[tuple[int, int]]:
    """Sorted block offsets -> (offset, length) runs of adjacent blocks."""
    runs: list[list[int]] = []
    for offset in offsets:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += block
        else:
            runs.append([offset, block])
    return [(o, n) for o, n in runs]
