"""The link's thread: one Link and its Connection, fed by the daemon's other threads.

protocol.Connection is not thread-safe and the Link loop must never block on a disk or
an NBD client, so one thread owns both.  Other threads hand it messages with submit();
an eventfd wakes its poll.  Events (connected, message received, acknowledged, lost) are
passed to one handler, called in this thread: it must not block for long.

Memory is bounded: submit() callers first wait in wait_for_room() until the bytes queued
and not yet acknowledged by the peer's link layer are under a limit, so a fast writer
cannot queue more than that ahead of a slow link.

A thread that has just submitted a small message that someone waits for (a write at
queue depth 1, a REPLY) may call send_now() to send it itself when the link thread is
asleep in poll, instead of waiting for the link thread to wake up and send it: that
wake-up (15-40 us on an idle vCPU) and a turn of the link loop come off the write's
round trip.  Whoever works the link holds `_turn`: the link thread for each turn of its
loop (never while it sleeps in poll), send_now for its drain.  The queue is drained in
order by whoever holds it, so messages keep the order of their submit() calls.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable

from protocol import Connection, ConnectionLost, Event, LocalProtocolError, MessagesAcknowledged

from .link import Link
from .process import name_os_thread

log = logging.getLogger(__name__)

DEFAULT_MAX_UNACKED = 64 << 20  # bytes submitted and not yet acked by the peer's link


class LinkService:
    """Runs `link` (serving `conn`) in a thread of its own."""

    def __init__(self, link: Link, conn: Connection, on_event: Callable[[Event], None], *,
                 max_unacked: int = DEFAULT_MAX_UNACKED) -> None:
        self.link = link
        self.conn = conn
        self.on_event = on_event
        self.max_unacked = max_unacked
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        link.watch(self._wake)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()  # (data, size, session, on_acked)
        self._calls: collections.deque = collections.deque()  # functions to run here
        self._unacked = 0  # bytes queued or sent, not yet acked
        self._sent: collections.deque = collections.deque()  # (msg_no, size, on_acked)
        self._stop = False
        # The eventfd holds a wake-up that _drain_inputs has not read yet.  Both change
        # only under _lock, so the link thread reads the eventfd only when there is
        # something to read: a read that fails with EAGAIN costs a system call and an
        # exception, and it happened on every loop turn.
        self._woken = False
        # Held by the thread that works the link and its Connection: the link thread for
        # each loop turn (not while it polls), or send_now().  Lock order: _turn before
        # _lock, and before the engine's _lock (taken by event handlers and callbacks),
        # which a caller of send_now therefore must not hold.
        self._turn = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # --- any thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        with self._lock:
            self._poke_locked()
        if self._thread is not None:
            self._thread.join(timeout)
        # Not under a send_now() in another thread (it sees _stop and does nothing after).
        taken = self._turn.acquire(timeout=timeout)
        try:
            self.link.close()
            os.close(self._wake)
        finally:
            if taken:
                self._turn.release()

    def submit(self, data, session: int, on_acked: Callable[[bool], None] | None = None) -> None:
        """Send `data` as one message on session `session` (dropped if that session ended).

        `data` is a buffer or a list or tuple of buffers (parts of one message, sent
        without being joined: Connection.send_message).  It is not copied; leave it
        alone until the message is acknowledged.
        `on_acked(True)` runs in the link thread once the peer's link has it, or
        `on_acked(False)` if the session ends first (or had already ended).
        """
        if type(data) is list or type(data) is tuple:
            size = sum(map(len, data))
        else:
            size = len(data)
        with self._lock:
            self._unacked += size
            self._queue.append((data, size, session, on_acked))
            self._poke_locked()

    def send_now(self) -> None:
        """Send what submit() queued, from this thread, if the link thread is asleep in
        poll; otherwise do nothing (the link thread, which submit() woke, sends it).

        For a thread that just submitted a small message someone waits for.  It must not
        hold the engine's _lock: the drain may run on_acked callbacks, which take it (its
        write-order lock is fine: nothing the link thread runs takes that one).
        The link thread still wakes (submit() poked it) and plans its timers anew: the
        frames sent here start retransmission timers its sleep did not know of.
        """
        if not self._turn.acquire(blocking=False):
            return  # the link thread is in a turn: it drains the queue itself
        try:
            if not self._stop:
                self._drain_inputs(in_link_thread=False)
        except BaseException as exc:  # noqa: BLE001 - the same as a failure of the loop
            self.failure = exc
            log.exception("sending from %s failed", threading.current_thread().name)
            self._release_all()
        finally:
            self._turn.release()

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run `func()` in the link thread (to touch the Connection safely)."""
        with self._lock:
            self._calls.append(func)
            self._poke_locked()

    def wait_for_room(self, nbytes: int, timeout: float) -> bool:
        """Wait until `nbytes` more fit under the unacked limit; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._room:
            while self._unacked and self._unacked + nbytes > self.max_unacked:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    return False
                self._room.wait(left)
        return True

    def _poke_locked(self) -> None:
        """Under _lock: wake the link thread's poll, unless a wake-up is pending."""
        if self._woken:
            return
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            return  # closed while stopping
        self._woken = True

    # --- the link thread ------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        try:
            self.link.start()
            link = self.link
            turn = self._turn
            while not self._stop:
                with turn:
                    wait = link.wait_time()
                ready = link.poll(wait)
                with turn:
                    # What was handed over while the link slept goes out first: a write's
                    # frame leaves before this turn's receiving and bookkeeping, not after.
                    self._drain_inputs()
                    for _conn, event in link.work(ready):
                        self._on_link_event(event)
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which stops
            self.failure = exc
            log.exception("link thread failed")
            self._release_all()

    def _drain_inputs(self, in_link_thread: bool = True) -> None:
        """Under _turn: run the calls handed over and send the messages queued.

        From send_now (not `in_link_thread`), the wake-up is left pending, so the link
        thread still wakes and plans its timers anew; and calls, which are for the link
        thread, stay queued for it, with the messages after them (their order is kept).
        """
        with self._lock:
            if not in_link_thread and self._calls:
                return
            if self._woken and in_link_thread:
                self._woken = False
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass  # cannot happen while _woken tells the truth; harmless if it does
            calls, self._calls = self._calls, collections.deque()
            queue, self._queue = self._queue, collections.deque()
        for func in calls:
            func()
        if not queue:
            return
        now = self.link.clock()
        conn = self.conn
        failed = []
        for data, size, session, on_acked in queue:
            if conn.session_id != session:
                failed.append((size, on_acked))
                continue
            try:
                number = conn.send_message(data, now=now)
            except LocalProtocolError:
                failed.append((size, on_acked))
                continue
            self._sent.append((number, size, on_acked))
        if failed:
            self._forget(failed)
        self.link.flush(now)

    def _on_link_event(self, event: Event) -> None:
        if isinstance(event, MessagesAcknowledged):
            sent, done = self._sent, []
            while sent and sent[0][0] <= event.up_to:
                _, size, on_acked = sent.popleft()
                done.append((size, on_acked))
            self._forget(done, acked=True)
        elif isinstance(event, ConnectionLost):
            lost, self._sent = list(self._sent), collections.deque()
            self._forget([(size, cb) for _, size, cb in lost])
        self.on_event(event)

    def _forget(self, entries, acked: bool = False) -> None:
        """Release the bytes of finished messages and run their callbacks."""
        with self._room:
            self._unacked -= sum(size for size, _ in entries)
            self._room.notify_all()
        for _, on_acked in entries:
            if on_acked is not None:
                on_acked(acked)

    def _release_all(self) -> None:
        with self._room:
            self._stop = True
            self._room.notify_all()
