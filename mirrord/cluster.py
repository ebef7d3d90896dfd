"""The daemon's seat in the cluster: one corosync process group per resource.

Why: the replication link is one cable; the cluster network is another path to the
peer box.  Through it the daemon learns whether the peer's daemon is alive when the
link is down, and a primary that must go on alone asks the peer to mark its disk
outdated (ha/outdate.py says what the two daemons tell each other there).

One thread owns the corosync handles (ha/cpg.py, ha/quorum.py): it polls their file
descriptors and an eventfd that other threads use to hand it work, so no corosync call
is ever made from two threads.  Without corosync (not installed, not running, or gone)
the thread tries again every JOIN_RETRY seconds; the rest of the daemon sees "no
cluster" (`joined` False) and the fencing policy decides what that means.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Callable

from ha.outdate import (
    Outcome, OutdateRequested, OutdateResolved, PeerGroup, PeerPresence,
)

log = logging.getLogger(__name__)

GROUP_PREFIX = "mirrord:"  # the group's name is this + the resource name
JOIN_RETRY = 2.0  # seconds between attempts to join while corosync is unavailable
POLL_TIMEOUT_MS = 500  # the thread looks at `stopping` at least this often
JOIN_TIMEOUT = 3.0  # stop() waits this long for the thread


class ClusterLink:
    """This node's daemon in its resource's process group."""

    def __init__(self, resource: str, node: str, peer: str, *,
                 on_outdate_request: Callable[[str], tuple[bool, str]],
                 on_peer_presence: Callable[[bool], None] | None = None) -> None:
        self.resource = resource
        self.node = node
        self.peer = peer
        self._on_outdate_request = on_outdate_request  # (requester) -> (ok, reason)
        self._on_peer_presence = on_peer_presence or (lambda present: None)
        self._group = PeerGroup(resource, node, peer)
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)  # notified when a request ends
        self._work: collections.deque = collections.deque()  # functions for the thread
        self._results: dict[int, OutdateResolved] = {}  # request id -> how it ended
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpg = None
        self._quorum = None
        self.joined = False  # in the group now
        self.quorate: bool | None = None  # None: unknown (no quorum service)
        self._unavailable_logged = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._poke()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        self._leave()
        os.close(self._wake)

    # --- what other threads ask -------------------------------------------------------

    @property
    def peer_present(self) -> bool | None:
        """The peer's daemon is in the group (True/False), or None without a cluster."""
        with self._lock:
            return self._group.peer_present if self.joined else None

    def status(self) -> dict:
        with self._lock:
            return {"joined": self.joined, "quorate": self.quorate,
                    "peer_present": self._group.peer_present if self.joined else None}

    def outdate_peer(self, timeout: float) -> tuple[Outcome | None, str]:
        """Ask the peer's daemon to mark its disk outdated; wait at most `timeout`.

        Returns (outcome, reason); outcome None means no answer in time, or no cluster.
        Called from any thread but the cluster thread.
        """
        if not self.joined:
            return None, "not in a cluster (corosync not running on this node)"
        box: dict = {}

        def send() -> None:
            request_id, data, resolved = self._group.request_outdate()
            box["id"] = request_id
            if resolved is not None:
                self._results[request_id] = resolved
                self._answered.notify_all()
                return
            try:
                self._cpg.send(data)
            except Exception as exc:  # noqa: BLE001 - any corosync error ends the request
                self._group.forget(request_id)
                self._results[request_id] = OutdateResolved(
                    request_id, Outcome.PEER_GONE, f"cannot send to the group: {exc}")
                self._answered.notify_all()

        deadline = time.monotonic() + timeout
        with self._lock:
            self._work.append(send)
        self._poke()
        with self._lock:
            while True:
                request_id = box.get("id")
                if request_id is not None and request_id in self._results:
                    result = self._results.pop(request_id)
                    return result.outcome, result.reason
                left = deadline - time.monotonic()
                if left <= 0:
                    if request_id is not None:
                        self._work.append(lambda: self._group.forget(request_id))
                    return None, f"{self.peer} did not answer within {timeout:g} s"
                self._answered.wait(left)

    # --- the cluster thread -----------------------------------------------------------

    def _poke(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed: stopping

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._cpg is None and not self._try_join():
                self._stopping.wait(JOIN_RETRY)
                self._run_work()  # requests made meanwhile end as "no cluster"
                continue
            try:
                self._serve_once()
            except Exception as exc:  # noqa: BLE001 - corosync went away, or a bug
                log.warning("%s: lost the cluster (%s): trying again every %g s",
                            self.resource, exc, JOIN_RETRY)
                self._leave()

    def _try_join(self) -> bool:
        try:
            return self._join()
        except Exception:  # noqa: BLE001 - a bug must not end the thread: log, retry
            log.exception("%s: joining the cluster group failed", self.resource)
            self._leave()
            return False

    def _join(self) -> bool:
        from ha.errors import CorosyncError, CorosyncUnavailable

        try:
            from ha.cpg import ProcessGroup  # loads libcpg: may be missing

            cpg = ProcessGroup(GROUP_PREFIX + self.resource, on_deliver=self._deliver,
                               on_membership=self._membership)
        except (CorosyncUnavailable, ImportError, OSError) as exc:
            if not self._unavailable_logged:
                log.info("%s: no cluster here (%s): the peer can be outdated only through "
                         "the fence_peer handler; trying again every %g s", self.resource,
                         exc, JOIN_RETRY)
                self._unavailable_logged = True
            return False
        except CorosyncError as exc:
            log.warning("%s: cannot join the cluster group: %s", self.resource, exc)
            return False
        self._cpg = cpg
        self._quorum = self._open_quorum()
        with self._lock:
            self.joined = True
            hello = self._group.joined((cpg.local_nodeid, cpg.local_pid))
        self._unavailable_logged = False
        log.info("%s: joined the cluster group %s%s", self.resource, GROUP_PREFIX + self.resource,
                 "" if self.quorate is None else f" (quorate: {self.quorate})")
        cpg.send(hello)
        return True

    def _open_quorum(self):
        from ha.errors import CorosyncError
        from ha.quorum import Quorum

        try:
            quorum = Quorum(on_change=self._quorum_changed)
            self.quorate = quorum.quorate
            return quorum
        except CorosyncError as exc:
            log.info("%s: no quorum service (%s)", self.resource, exc)
            self.quorate = None
            return None

    def _quorum_changed(self, quorate: bool) -> None:
        if quorate != self.quorate:
            log.warning("%s: cluster quorum %s", self.resource, "regained" if quorate else "lost")
        self.quorate = quorate

    def _serve_once(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        poller.register(self._cpg.fileno(), select.POLLIN)
        if self._quorum is not None:
            poller.register(self._quorum.fileno(), select.POLLIN)
        for fd, _ in poller.poll(POLL_TIMEOUT_MS):
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
            elif fd == self._cpg.fileno():
                self._cpg.dispatch()
            elif self._quorum is not None and fd == self._quorum.fileno():
                self._quorum.dispatch()
        self._run_work()

    def _run_work(self) -> None:
        """Run what other threads handed over, under _lock.  Out of the group, the
        PeerGroup knows no peer and answers an outdate request at once."""
        with self._lock:
            while self._work:
                self._work.popleft()()

    def _leave(self) -> None:
        cpg, self._cpg = self._cpg, None
        quorum, self._quorum = self._quorum, None
        for handle in (cpg, quorum):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - corosync may already be gone
                    pass
        with self._lock:
            was_joined = self.joined
            self.joined = False
            self.quorate = None
            self._handle(self._group.left_group())
        if was_joined:
            log.warning("%s: left the cluster group", self.resource)

    # --- callbacks (in the cluster thread, from dispatch) ------------------------------

    def _membership(self, membership) -> None:
        members = [(m.nodeid, m.pid) for m in membership.members]
        left = [(m.nodeid, m.pid) for m in membership.left]
        joined = [(m.nodeid, m.pid) for m in membership.joined]
        with self._lock:
            out, events = self._group.on_membership(members, left, joined)
            self._handle(events)
        for data in out:
            self._cpg.send(data)

    def _deliver(self, nodeid: int, pid: int, data: bytes) -> None:
        with self._lock:
            events = self._group.on_message((nodeid, pid), bytes(data))
            self._handle([e for e in events if not isinstance(e, OutdateRequested)])
        for event in events:
            if isinstance(event, OutdateRequested):
                self._answer(event)

    def _answer(self, request: OutdateRequested) -> None:
        """The peer asks us to outdate our disk: the engine decides and persists it."""
        try:
            ok, reason = self._on_outdate_request(request.requester)
        except Exception as exc:  # noqa: BLE001 - answer no rather than not at all
            log.exception("%s: outdate request from %s failed", self.resource, request.requester)
            ok, reason = False, f"internal error: {exc}"
        with self._lock:
            data = self._group.answer(request.request_id, ok, reason)
        self._cpg.send(data)

    def _handle(self, events: list) -> None:
        """Under _lock: record how requests ended; report the peer coming and going."""
        for event in events:
            if isinstance(event, OutdateResolved):
                self._results[event.request_id] = event
                self._answered.notify_all()
            elif isinstance(event, PeerPresence):
                log.info("%s: %s's daemon %s the cluster group", self.resource, self.peer,
                         "joined" if event.present else "left")
                self._on_peer_presence(event.present)  # records a flag: no lock taken
