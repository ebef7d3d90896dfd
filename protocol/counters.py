"""Counters of what a connection did and what it refused; exported as metrics.

Every dropped frame bumps exactly one drop counter, named by the FrameError reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The drop reasons; each is a field below.
DROP_REASONS = (
    "malformed",  # not parseable as a frame, or fields out of range
    "bad_version",  # a protocol version this node does not speak
    "corrupt",  # checksum mismatch
    "wrong_volume",  # volume id of another resource
    "foreign_source",  # from an address other than the peer's
    "stale_session",  # session id of no current session (old or forged)
    "unauthenticated",  # no MAC trailer where the session requires one
    "bad_mac",  # a MAC trailer that does not verify
    "out_of_window",  # a DATA frame beyond the advertised window
    "duplicates",  # a DATA frame already received
)


@dataclass
class Counters:
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0  # valid frames accepted
    messages_sent: int = 0
    messages_received: int = 0
    bytes_delivered: int = 0  # message payload handed to the upper layer
    retransmits: int = 0
    rto_expirations: int = 0
    acks_sent: int = 0
    pings_sent: int = 0
    handshakes: int = 0
    handshakes_refused: int = 0
    sessions_lost: int = 0
    malformed: int = 0
    bad_version: int = 0
    corrupt: int = 0
    wrong_volume: int = 0
    foreign_source: int = 0
    stale_session: int = 0
    unauthenticated: int = 0
    bad_mac: int = 0
    out_of_window: int = 0
    duplicates: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def drop(self, reason: str) -> None:
        """Count one frame dropped for `reason` (a FrameError reason, a field here)."""
        setattr(self, reason, getattr(self, reason) + 1)

    def dropped(self) -> int:
        """Frames dropped for any reason."""
        return sum(getattr(self, name) for name in DROP_REASONS)
