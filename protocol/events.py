"""Events a connection hands to the layer above (frozen, slotted dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every connection event."""


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The handshake completed: messages may be sent."""

    session_id: int
    peer_node: str
    peer_address: Hashable
    mtu: int  # the smaller of the two ends' MTUs
    peer_info: Any  # the peer's upper-layer handshake payload


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """One whole upper-layer message, in order, exactly once.

    `parts` are the fragments as memoryviews into the received frames (no copy): write
    them with one os.pwritev, or take `data` for one joined bytes object.
    """

    parts: tuple
    frames: int  # how many frames it arrived in

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclass(frozen=True, slots=True)
class MessagesAcknowledged(Event):
    """The peer has received every message up to and including `up_to` (send order)."""

    up_to: int


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """The session ended; messages not yet acknowledged may not have arrived."""

    session_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeRefused(Event):
    """A peer tried to connect and was refused (wrong secret, version, name...)."""

    peer_node: str | None
    reason: str
