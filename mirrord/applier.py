"""Applies the peer's requests to this node's disk, one at a time, in stream order.

The secondary must apply writes in the order the primary issued them, and must not hold
up the link thread while its disk works (the link would stop acknowledging and the peer
would think it dead), so received messages queue here and one thread applies them.
Every request gets its REPLY after it is applied - and after fdatasync when it asks
for durability (FUA, FLUSH, SYNC_END).
"""

from __future__ import annotations

import errno
import logging
import queue
import threading

from protocol.replication import FUA, MAY_TRIM, Message, MessageType

from .backing import BackingError
from .process import name_os_thread

log = logging.getLogger(__name__)


class Applier:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.store = engine.store
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="applier", daemon=True)
        self.applied = 0  # requests applied (for tests and metrics)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def put(self, session: int, message: Message) -> None:
        self._queue.put((session, message))

    def _run(self) -> None:
        name_os_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            session, message = item
            try:
                self._apply(session, message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the applier
                log.exception("applying %s failed", message.type.name)

    def _apply(self, session: int, message: Message) -> None:
        engine = self.engine
        mtype = message.type
        if mtype is MessageType.STATE:
            engine.on_peer_state(session, message.body)
            return
        if mtype is MessageType.REFUSE:
            engine.on_peer_refused(session, message.body)
            return
        if mtype is MessageType.BITMAP:
            engine.on_peer_bitmap(session, message.body.get("bits"))
            return
        if mtype is MessageType.SYNC_BEGIN:
            engine.on_sync_begin(session, message.body)
            return
        if mtype is MessageType.DIGESTS:
            engine.on_digests(session, message.body)
            return
        if mtype is MessageType.DIGESTS_RESULT:
            engine.on_digests_result(session, message.body)
            return
        if not engine.may_apply(session):
            # Not ours to write (we are primary, failed, or undecided): say so; the peer
            # treats an error as "this disk is behind" and goes on alone.
            engine.reply(session, message.id, errno.EIO if engine.disk_failed else errno.EPERM)
            return
        store = self.store
        try:
            if mtype is MessageType.WRITE or mtype is MessageType.SYNC_DATA:
                store.write(message.offset, message.data)
                if message.flags & FUA:
                    store.sync()
                if mtype is MessageType.SYNC_DATA:
                    engine.sync_applied(message.length)
            elif mtype is MessageType.ZEROES:
                store.write_zeroes(message.offset, message.length, bool(message.flags & MAY_TRIM))
                if message.flags & FUA:
                    store.sync()
            elif mtype is MessageType.FLUSH:
                store.sync()
            elif mtype is MessageType.SYNC_END:
                store.sync()
                engine.sync_finished_as_target(session)
        except BackingError as exc:
            engine.local_disk_failed(exc)
            engine.reply(session, message.id, exc.errno or errno.EIO)
            return
        self.applied += 1
        engine.reply(session, message.id, 0)
