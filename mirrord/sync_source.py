"""The resync source: copies the disk to the peer chunk by chunk, throttled.

Each chunk is read and sent under the engine's write-order lock (engine.send_sync_chunk),
so a client write to the same region lands either before the read (and is in the chunk)
or after it (and follows the chunk on the link): the target ends equal either way.
Until the dirty bitmap exists, the whole disk is copied.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class SyncSource(threading.Thread):
    def __init__(self, engine, session: int, rate: int | None) -> None:
        super().__init__(name="sync-source", daemon=True)
        self.engine = engine
        self.session = session
        self.rate = rate  # bytes/s, None = as fast as the link and the peer go

    def run(self) -> None:
        engine = self.engine
        size = engine.size
        started = time.monotonic()
        offset = 0
        while offset < size:
            length = min(CHUNK, size - offset)
            if not engine.send_sync_chunk(self.session, offset, length, last=False):
                return
            offset += length
            if self.rate:
                ahead = offset / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(min(ahead, 1.0))
        engine.send_sync_chunk(self.session, size, 0, last=True)
