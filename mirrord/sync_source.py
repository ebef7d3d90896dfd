"""The resync source: copies the marked blocks to the peer, chunk by chunk, throttled.

Each chunk is read and sent under the engine's write-order lock (engine.send_sync_chunk),
so a client write to the same region lands either before the read (and is in the chunk)
or after it (and follows the chunk on the link): the target ends equal either way.  A
block's bit is cleared when the target's REPLY confirms its chunk (engine._on_reply), so
an interrupted resync resumes with what is still marked; the bitmap is written out
every FLUSH_EVERY seconds for that.
"""

from __future__ import annotations

import logging
import threading
import time

from resync.rate import RateController

from .process import name_os_thread

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FLUSH_EVERY = 1.0  # seconds between bitmap write-outs during a resync
# A checksum resync sends a chunk's block digests and waits for the target to say which
# blocks differ: worth it where most blocks match (a target that was in sync before), a
# waste where nearly all differ (a blank target: then every block is read twice here
# and once there for nothing).  So the source watches the answers and adapts:
MAX_DIGESTS_OUT = 16  # digest requests ahead of their answers (16 MiB of the volume)
WINDOW_BLOCKS = 4096  # decide on this many compared blocks (16 MiB of 4 KiB blocks)
COPY_ABOVE = 0.9  # share of differing blocks above which chunks are copied outright
PROBE_EVERY = 16  # while copying outright, every 16th chunk is compared by digests...
DIGESTS_BELOW = 0.5  # ...and below this share of differing blocks, digests come back


class SyncSource(threading.Thread):
    def __init__(self, engine, session: int, rate: int | None, checksums: bool = False) -> None:
        super().__init__(name="sync-source", daemon=True)
        self.engine = engine
        self.session = session
        self.rate = rate  # bytes/s, None = as fast as the link and the peer go
        # Send each chunk's block digests first; the peer's answer says which blocks to
        # copy (engine.on_digests_result), the others are confirmed equal.
        self.checksums = checksums
        self.copying = False  # a checksum resync copying outright for now (see above)
        # (compared, differed) of the engine's running totals where the window began
        self._window = (engine.digest_blocks_compared, engine.digest_blocks_differed)
        self._chunks = 0

    def _use_digests(self) -> bool:
        """For the next chunk of a checksum resync: digests first, or copy outright?"""
        engine = self.engine
        self._chunks += 1
        compared, differed = engine.digest_blocks_compared, engine.digest_blocks_differed
        seen, different = compared - self._window[0], differed - self._window[1]
        if seen >= WINDOW_BLOCKS:
            share = different / seen
            if not self.copying and share >= COPY_ABOVE:
                self.copying = True
                log.info("%s: resync: %.0f%% of the blocks compared differ: copying without "
                         "digests (comparing one chunk in %d)", engine.resource, 100 * share,
                         PROBE_EVERY)
            elif self.copying and share < DIGESTS_BELOW:
                self.copying = False
                log.info("%s: resync: only %.0f%% of the blocks compared differ: comparing "
                         "digests again", engine.resource, 100 * share)
            self._window = (compared, differed)
        return not self.copying or self._chunks % PROBE_EVERY == 0

    def run(self) -> None:
        name_os_thread()
        engine = self.engine
        last_flush = time.monotonic()
        # At most the configured rate; slower while the application writes.
        controller = RateController(self.rate)
        # One pass over the bitmap: blocks are cleared behind the cursor as the target
        # confirms them; writes during the resync are replicated, so nothing is marked
        # behind it.
        for offset, length in engine.bitmap.runs(max_bytes=CHUNK):
            if not engine.sync_allowed(self.session):
                return
            wait = controller.delay(time.monotonic(), length, engine.last_app_write)
            if wait > 0:
                time.sleep(min(wait, 1.0))
            if self.checksums and self._use_digests():
                if not (engine.wait_digests(self.session, below=MAX_DIGESTS_OUT)
                        and engine.send_digests(self.session, offset, length, "sync")):
                    return
            elif not engine.send_sync_chunk(self.session, offset, length, last=False):
                return
            now = time.monotonic()
            if now - last_flush >= FLUSH_EVERY:
                engine.flush_bitmap()
                last_flush = now
        if self.checksums and not engine.wait_digests(self.session):
            return
        if engine.sync_allowed(self.session):
            engine.send_sync_chunk(self.session, 0, 0, last=True)


class Verifier(threading.Thread):
    """Online verify: digests of the whole volume, chunk by chunk, compared by the peer."""

    def __init__(self, engine, session: int) -> None:
        super().__init__(name="verify", daemon=True)
        self.engine = engine
        self.session = session

    def run(self) -> None:
        name_os_thread()
        engine = self.engine
        completed = False
        try:
            for offset in range(0, engine.size, CHUNK):
                length = min(CHUNK, engine.size - offset)
                if not engine.send_digests(self.session, offset, length, "verify"):
                    return
            completed = engine.wait_digests(self.session)
        finally:
            engine.verify_finished(self.session, completed)
