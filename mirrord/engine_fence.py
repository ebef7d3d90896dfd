"""The engine's fencing half: holding writes until the peer is fenced, outdating this
disk when the peer asks, and the operator's hooks.

A mixin of mirrord/engine.py's Engine (same state, same two locks, same rules), kept
apart so that engine.py stays the write path and the link events.  The procedure that
reaches the peer is mirrord/fencing.py (cluster message, fence_peer handler); this file
is what the engine does around it:
- `_fence_peer` (a primary without its peer): freeze writes and FLUSH, hold the
  completions of writes the peer did not confirm, start an attempt;
- `_fence_done`: thaw when the peer is fenced, or when the policy says go on anyway;
  a newer attempt or the peer's return supersedes an older attempt;
- `outdate_by_peer` (the peer asks, through the cluster): persist "outdated" before
  answering, so that this disk refuses promotion from then on, also after a restart;
- `_peer_up_to_date`: the peer holds everything again: run unfence_peer if we fenced.
"""

from __future__ import annotations

import errno
import logging

from .errors import Refused
from .metafile import MetadataFileError

log = logging.getLogger("mirrord.engine")


class FenceMixin:
    fencer = None  # mirrord/fencing.py Fencer, or None (policy "none")
    hooks = None  # mirrord/hooks.py HookRunner, or None

    def _init_fencing(self) -> None:
        self.io_frozen = False  # writes and FLUSH wait (fencing in progress or failed)
        self._held: list = []  # completions of writes the peer missed, held while frozen
        self._fence_attempt: int | None = None  # the attempt whose result counts
        self.fence_state = "idle"  # idle | fencing | peer-fenced | failed
        self.fence_detail: str | None = None  # how the last attempt went

    # --- freezing and thawing (under _lock) ----------------------------------------------

    def _fence_peer(self, reason: str) -> None:
        """Under _lock, role primary, the peer not connected: fence it before going on."""
        if self.fencer is None or not self.fencer.freezes:
            return
        self.io_frozen = True
        self.fence_state = "fencing"
        self._fence_attempt = self.fencer.begin(reason, self._fence_done)

    def _fence_done(self, result) -> None:
        """A fencing attempt's thread: its result."""
        with self._lock:
            if result.attempt != self._fence_attempt:
                return  # superseded by a newer attempt, or the peer came back
            self._fence_attempt = None
            self.fence_detail = result.detail
            if result.handler_ok and not self.meta.peer_fenced:
                self._persist_quietly(peer_fenced=True)
            if result.fenced:
                self.fence_state = "peer-fenced"
                log.warning("%s: %s cannot be promoted now (%s): writes go on without it",
                            self.resource, self.peer_node, result.detail)
                self._thaw()
            elif self.fencer.keeps_frozen_on_failure:
                self.fence_state = "failed"
                log.error("%s: could not fence %s (%s): writes stay frozen (fencing "
                          "resource-and-stonith) until it reconnects or `mirrorctl resume-io`",
                          self.resource, self.peer_node, result.detail)
            else:
                self.fence_state = "failed"
                log.warning("%s: could not fence %s (%s): going on without it anyway "
                            "(fencing resource-only)", self.resource, self.peer_node,
                            result.detail)
                self._thaw()

    def _thaw(self, error: int = 0) -> None:
        """Under _lock: writes go on; held completions finish (with `error`)."""
        self.io_frozen = False
        held, self._held = self._held, []
        self._idle.notify_all()
        for completion in held:
            completion.part_done(error)

    def _fence_cancel(self) -> None:
        """Under _lock: the peer is connected again and a resync decided: no fence needed."""
        self._fence_attempt = None
        if self.io_frozen:
            log.info("%s: %s is back: writes go on", self.resource, self.peer_node)
            self.fence_state = "idle"
            self._thaw()

    def _wait_unfrozen(self) -> None:
        """Under _lock, before a primary's write or FLUSH: wait while fencing holds them."""
        while self.io_frozen and self.role == "primary":
            self._idle.wait(1.0)

    def _hold_or_complete(self, completion) -> None:
        """Under _lock: a write the peer will not confirm; its client waits for the fence."""
        if self.io_frozen:
            self._held.append(completion)
        else:
            completion.part_done(0)

    def _peer_received(self, completion, delivered: bool) -> None:
        """Protocol B's on_acked (link thread).  Not delivered means the session ended:
        the fence about to start (in _on_lost, right after) must hold this write too."""
        if delivered:
            completion.part_done(0)
            return
        with self._lock:
            self._held.append(completion)
        self.service.call_soon(self._release_unless_frozen)

    def _release_unless_frozen(self) -> None:
        with self._lock:
            if not self.io_frozen:
                self._thaw()

    def resume_io(self) -> str:
        with self._lock:
            if not self.io_frozen:
                return "writes are not frozen"
            log.warning("%s: writes resumed by the operator while %s may still be promotable",
                        self.resource, self.peer_node)
            self._fence_attempt = None
            self.fence_state = "failed"
            self._thaw()
        return "writes resumed (the peer was not fenced: do not promote it)"

    def _thaw_on_demote(self) -> None:
        """Under _lock: a primary becomes secondary while frozen: held writes fail."""
        if self.io_frozen or self._held:
            self._fence_attempt = None
            self.fence_state = "idle"
            self._thaw(errno.EIO)

    # --- the peer asks us (cluster thread) -------------------------------------------------

    def outdate_by_peer(self, requester: str) -> tuple[bool, str]:
        """The peer goes on without us: mark this disk outdated, durably, then answer."""
        with self._lock:
            if requester != self.peer_node:
                return False, f"{requester} is not the peer of {self.node}"
            if self.role == "primary":
                log.error("%s: %s asks this node, a primary, to outdate itself: refused",
                          self.resource, requester)
                return False, f"{self.node} is primary"
            if self.session is not None:
                # The link looks alive from here but not from there: it is not.
                service = self.service
                service.call_soon(lambda: service.conn.close(
                    f"{requester} reports the link down", now=service.link.clock()))
            if not self.meta.consistent or self.disk_failed:
                return True, f"the disk of {self.node} is {self.disk_state()} already"
            if not self.meta.outdated:
                self._persist(outdated=True, outdated_by=requester)
                log.warning("%s: %s went on without this node: disk outdated (promotion "
                            "refused until a resync)", self.resource, requester)
                self._send_state()
            return True, f"the disk of {self.node} is outdated"

    def _clear_outdated(self) -> None:
        """Under _lock: this disk is up to date again (in sync, or a resync ended)."""
        if self.meta.outdated:
            self._persist(outdated=False, outdated_by="")
            log.info("%s: disk up to date again (no longer outdated)", self.resource)

    def _check_outdated_promotion(self, force: bool) -> None:
        """Under _lock, promote(): an outdated disk is refused unless forced."""
        if not self.meta.outdated:
            return
        if not force:
            raise Refused(f"the disk of {self.node} is outdated: {self.meta.outdated_by} "
                          f"went on writing without it",
                          f"connect it to {self.meta.outdated_by} and let the resync finish; "
                          f"--force only if {self.meta.outdated_by}'s data is lost for good "
                          f"(its later writes are then discarded)")
        self._persist(outdated=False, outdated_by="")

    # --- the peer holds everything again ---------------------------------------------

    def _peer_up_to_date(self) -> None:
        """Under _lock: the peer is in sync with us: undo what fencing left behind."""
        self.fence_state = "idle"
        if self.fencer is not None and self.meta.peer_fenced:
            self.fencer.unfence(self._unfenced)

    def _unfenced(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._persist_quietly(peer_fenced=False)
            else:
                log.error("%s: unfence_peer failed: %s may still be kept from promotion; "
                          "it runs again after the next resync", self.resource, self.peer_node)

    def _persist_quietly(self, **changes) -> None:
        try:
            self._persist(**changes)
        except MetadataFileError as exc:
            log.error("%s", exc)

    # --- status and hooks ------------------------------------------------------------

    def _fence_status(self) -> dict:
        return {"policy": self.fencer.policy if self.fencer is not None else "none",
                "state": self.fence_state, "detail": self.fence_detail,
                "peer_fenced": self.meta.peer_fenced}

    def _hook(self, event: str, **info) -> None:
        """Under _lock: run the operator's hooks for `event` (asynchronously)."""
        if self.hooks is None:
            return
        self.hooks.fire(event, role=self.role, disk=self.disk_state(),
                        connection=self.connection_state(), **info)
