"""Outdating the peer through the cluster: the messages two daemons exchange in their
corosync process group, sans-IO.

Why: when the replication link fails but both boxes are alive, the primary must make
sure the secondary can no longer be promoted before it writes anything the secondary
lacks (DRBD's "fencing resource-only"); the cluster network is the other path to the
peer.  Both daemons of a resource join one closed process group (CPG, ha/cpg.py) named
after it; this module holds what they say there and what each side concludes.  No
sockets, no clock: mirrord/cluster.py feeds membership changes and messages in and
sends what comes out.

Messages are msgpack maps with a version and a type:
    hello     {"v": 1, "t": "hello", "node": N, "resource": R}
              sent on joining and whenever someone joins: members learn who is who
              (CPG names processes by node id and pid, not by our node names)
    outdate   {"v": 1, "t": "outdate", "node": REQUESTER, "target": PEER, "id": ID}
              "mark your disk outdated": a primary about to go on without its peer
    outdated  {"v": 1, "t": "outdated", "node": PEER, "to": REQUESTER, "id": ID,
               "ok": bool, "reason": str}
              the answer: ok once the outdated mark is durable in the peer's
              metadata (or its disk was not promotable anyway); not ok when the peer
              refuses (it is primary itself)

CPG delivers every message to every member, the sender included, in one total order:
a member ignores its own messages and those addressed to somebody else.  A request
whose target leaves the group (its box died or its daemon stopped) resolves as
PEER_GONE: it can no longer be promoted by anything this daemon could tell it, and the
caller's fencing policy decides what that means.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Iterable

import msgpack

VERSION = 1  # version 1: hello, outdate, outdated
MAX_MESSAGE = 4096  # bytes; our messages are a few dozen: anything larger is not ours
MAX_NAME = 64  # node and resource names (mirrord's config allows at most 64 characters)

Process = tuple[int, int]  # (corosync node id, pid): how CPG names a member


class Outcome(enum.Enum):
    OUTDATED = "outdated"  # the peer confirmed: its disk is marked outdated
    REFUSED = "refused"  # the peer answered no (it is primary)
    PEER_GONE = "peer-gone"  # the peer's daemon is not (or no longer) in the group


@dataclass(frozen=True)
class OutdateRequested:
    """The peer asks this node to mark its disk outdated; answer with `answer()`."""

    requester: str
    request_id: int


@dataclass(frozen=True)
class OutdateResolved:
    """A request of ours ended."""

    request_id: int
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class PeerPresence:
    """The peer's daemon joined (True) or left (False) the group."""

    present: bool


class PeerGroup:
    """One daemon's view of its resource's process group."""

    def __init__(self, resource: str, node: str, peer: str) -> None:
        self.resource = resource
        self.node = node
        self.peer = peer
        self.local: Process | None = None
        self._names: dict[Process, str] = {}  # members that said hello
        self._members: set[Process] = set()
        self._pending: dict[int, None] = {}  # our outdate requests without an answer
        self._ids = itertools.count(1)
        self.dropped = 0  # malformed or foreign messages, counted and ignored

    # --- what the caller tells us ----------------------------------------------------

    def joined(self, local: Process) -> bytes:
        """We are in the group as `local`: the hello to send."""
        self.local = local
        self._members.add(local)
        return self._hello()

    def on_membership(self, members: Iterable[Process], left: Iterable[Process],
                      joined: Iterable[Process]) -> tuple[list[bytes], list]:
        """A configuration change: (messages to send, events)."""
        was_present = self.peer_present
        self._members = set(members)
        for process in left:
            self._names.pop(process, None)
        for process in list(self._names):
            if process not in self._members:
                del self._names[process]
        out = [self._hello()] if any(p != self.local for p in joined) else []
        events: list = []
        if was_present and not self.peer_present:
            events.append(PeerPresence(False))
            events += self._resolve_all(Outcome.PEER_GONE, f"{self.peer} left the cluster group")
        return out, events

    def on_message(self, sender: Process, data: bytes) -> list:
        """A message delivered to the group: the events it causes (none for our own)."""
        if sender == self.local:
            return []
        message = self._decode(data)
        if message is None:
            self.dropped += 1
            return []
        kind = message["t"]
        if kind == "hello":
            if message.get("resource") != self.resource:
                self.dropped += 1
                return []
            was_present = self.peer_present
            # CPG is virtually synchronous: a member's messages come after the
            # configuration change that lists it, and none after the one it leaves in.
            self._names[sender] = message["node"]
            return [PeerPresence(True)] if self.peer_present and not was_present else []
        if kind == "outdate":
            if message.get("target") != self.node or message["node"] != self.peer:
                return []  # not for us (or from a node that is not our peer)
            request_id = message.get("id")
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                self.dropped += 1
                return []
            return [OutdateRequested(self.peer, request_id)]
        if kind == "outdated":
            if message.get("to") != self.node or message["node"] != self.peer:
                return []
            request_id = message.get("id")
            if request_id not in self._pending:
                return []  # an answer to a request that already ended
            del self._pending[request_id]
            ok = message.get("ok") is True
            reason = message.get("reason")
            return [OutdateResolved(request_id, Outcome.OUTDATED if ok else Outcome.REFUSED,
                                    reason if isinstance(reason, str) else "")]
        self.dropped += 1
        return []

    # --- what the caller asks ---------------------------------------------------------

    @property
    def peer_present(self) -> bool:
        """Whether the peer's daemon is in the group (it said hello and has not left)."""
        return any(name == self.peer for name in self._names.values())

    def request_outdate(self) -> tuple[int, bytes | None, OutdateResolved | None]:
        """Start an outdate request: (id, message to send, None), or (id, None, resolved
        at once) when the peer's daemon is not in the group."""
        request_id = next(self._ids)
        if not self.peer_present:
            return request_id, None, OutdateResolved(
                request_id, Outcome.PEER_GONE, f"{self.peer} is not in the cluster group")
        self._pending[request_id] = None
        return request_id, self._pack({"t": "outdate", "node": self.node,
                                       "target": self.peer, "id": request_id}), None

    def forget(self, request_id: int) -> None:
        """The caller gave up waiting for `request_id` (its timeout)."""
        self._pending.pop(request_id, None)

    def answer(self, request_id: int, ok: bool, reason: str) -> bytes:
        """Our answer to the peer's OutdateRequested."""
        return self._pack({"t": "outdated", "node": self.node, "to": self.peer,
                           "id": request_id, "ok": ok, "reason": reason[:200]})

    def left_group(self) -> list:
        """We are out of the group (corosync went away): every request is over."""
        was_present = self.peer_present
        self.local = None
        self._members.clear()
        self._names.clear()
        events: list = [PeerPresence(False)] if was_present else []
        return events + self._resolve_all(Outcome.PEER_GONE, "this node left the cluster group")

    # --- bytes ------------------------------------------------------------------------

    def _hello(self) -> bytes:
        return self._pack({"t": "hello", "node": self.node, "resource": self.resource})

    @staticmethod
    def _pack(fields: dict) -> bytes:
        return msgpack.packb({"v": VERSION, **fields}, use_bin_type=True)

    @staticmethod
    def _decode(data: bytes) -> dict | None:
        """The message, or None when it is not one of ours (checked field by field)."""
        if len(data) > MAX_MESSAGE:
            return None
        try:
            message = msgpack.unpackb(data, raw=False)
        except Exception:  # noqa: BLE001 - msgpack raises several types for garbage
            return None
        if not isinstance(message, dict) or message.get("v") != VERSION:
            return None
        if message.get("t") not in ("hello", "outdate", "outdated"):
            return None
        name = message.get("node")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            return None
        return message

    def _resolve_all(self, outcome: Outcome, reason: str) -> list:
        pending, self._pending = self._pending, {}
        return [OutdateResolved(request_id, outcome, reason) for request_id in pending]
