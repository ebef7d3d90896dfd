"""Fencing the peer: a primary that goes on without its peer first makes sure the peer
can no longer be promoted (DRBD's `fencing`; the data-safety half of failover).

When it runs: a primary loses its connection (the link failed, the peer died, the
operator disconnected, the handshake was refused), or a node is promoted while its
peer is not connected.  Until it has run, the engine holds every write (and FLUSH) and
the completion of every write the peer did not confirm: nothing the peer lacks is
acknowledged to a client before the peer is outdated, so a stale peer can never be
promoted with an acknowledged write missing.

How (each attempt in a thread of its own, at most `timeout` seconds per step):
1. through the cluster (mirrord/cluster.py): the peer's daemon marks its disk outdated
   in its metadata and says so; it then refuses promotion until a resync brings it up
   to date;
2. the `fence_peer` handler, when configured: an operator's command that makes the peer
   unpromotable by other means — `python3 -m ha.crm_fence fence` places a Pacemaker
   location constraint (DRBD's crm-fence-peer), a stonith handler powers the peer off.
   Exit 0 means done.
The peer is fenced when either step succeeded.

Policies (config `fencing`):
- "none": no fencing; writes never wait (DRBD's dont-care).
- "resource-only" (default): writes wait for the attempt, then go on whatever its
  result (when the peer is dead, nothing can outdate it, and the writes must go on).
- "resource-and-stonith": writes stay frozen until the peer is fenced, it reconnects,
  or the operator runs `mirrorctl resume-io`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ha.outdate import Outcome

from .hooks import run_command

log = logging.getLogger(__name__)

POLICIES = ("none", "resource-only", "resource-and-stonith")
DEFAULT_POLICY = "resource-only"
DEFAULT_TIMEOUT = 10.0  # seconds each step may take: an answer over corosync, a handler


@dataclass(frozen=True)
class FenceResult:
    attempt: int
    fenced: bool  # the peer can no longer be promoted
    outdated: bool  # its daemon confirmed its disk is outdated (step 1)
    handler_ok: bool | None  # the fence_peer handler's verdict; None: not configured
    detail: str  # what happened, for the log and `status`


class Fencer:
    """Runs fencing attempts and unfence commands; the engine owns the state."""

    def __init__(self, *, policy: str, timeout: float, cluster, fence_peer: str | None,
                 unfence_peer: str | None, env: dict[str, str]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown fencing policy {policy!r}")
        self.policy = policy
        self.timeout = timeout
        self.cluster = cluster  # ClusterLink or None
        self.fence_peer = fence_peer  # shell command or None
        self.unfence_peer = unfence_peer
        self.env = env  # MIRRORD_RESOURCE, MIRRORD_NODE, MIRRORD_PEER, MIRRORD_CONFIG
        self._attempts = itertools.count(1)

    @property
    def freezes(self) -> bool:
        """Whether writes wait for the peer to be fenced at all."""
        return self.policy != "none"

    @property
    def keeps_frozen_on_failure(self) -> bool:
        return self.policy == "resource-and-stonith"

    def begin(self, reason: str, on_done: Callable[[FenceResult], None]) -> int:
        """Start an attempt in its own thread; `on_done` gets its result.  Returns the
        attempt's number (a later attempt supersedes an earlier one)."""
        attempt = next(self._attempts)
        threading.Thread(target=self._attempt, args=(attempt, reason, on_done),
                         name=f"fence-{attempt}", daemon=True).start()
        return attempt

    def unfence(self, on_done: Callable[[bool], None]) -> None:
        """Run the unfence_peer handler (the peer is up to date again) in a thread."""
        if not self.unfence_peer:
            on_done(True)
            return

        def run() -> None:
            result = run_command(["/bin/sh", "-c", self.unfence_peer],
                                 dict(self.env, MIRRORD_REASON="the peer is up to date"),
                                 self.timeout, "unfence_peer")
            on_done(result.returncode == 0)

        threading.Thread(target=run, name="unfence", daemon=True).start()

    def _attempt(self, attempt: int, reason: str, on_done) -> None:
        log.warning("%s: fencing the peer (%s): writes wait until it cannot be promoted",
                    self.env.get("MIRRORD_RESOURCE"), reason)
        outdated = False
        notes = []
        if self.cluster is not None:
            outcome, why = self.cluster.outdate_peer(self.timeout)
            outdated = outcome is Outcome.OUTDATED
            notes.append(f"outdated through the cluster ({why})" if outdated
                         else f"not outdated through the cluster: {why}")
        handler_ok = None
        if self.fence_peer:
            result = run_command(["/bin/sh", "-c", self.fence_peer],
                                 dict(self.env, MIRRORD_REASON=reason), self.timeout,
                                 "fence_peer")
            handler_ok = result.returncode == 0
            notes.append("fence_peer handler succeeded" if handler_ok else
                         f"fence_peer handler failed (exit {result.returncode})")
        fenced = outdated or bool(handler_ok)
        if not notes:
            notes.append("no cluster and no fence_peer handler configured")
        on_done(FenceResult(attempt, fenced, outdated, handler_ok, "; ".join(notes)))
