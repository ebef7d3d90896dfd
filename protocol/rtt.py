"""Round-trip time estimation and the retransmission timeout (RFC 6298's estimator).

smoothed RTT and RTT variance from samples; RTO = srtt + 4·rttvar (at least the clock
granularity), clamped to [rto_min, rto_max], then doubled per consecutive expiry
(exponential backoff) and capped at rto_max again.  Samples come only from frames sent
once (Karn's rule), so a retransmission never yields a misleading sample.
"""

from __future__ import annotations

# A dedicated link has RTTs of ~100 µs, but a Python peer can stall for a few ms
# (scheduling, GC); below this floor we would retransmit what is merely late.
GRANULARITY = 0.001


class RttEstimator:
    """Smoothed RTT, variance and the backed-off retransmission timeout."""

    __slots__ = ("srtt", "rttvar", "latest", "backoff", "_initial", "_min", "_max")

    def __init__(self, initial_rto: float, rto_min: float, rto_max: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.latest = 0.0
        self.backoff = 0  # consecutive expiries without progress
        self._initial = initial_rto
        self._min = rto_min
        self._max = rto_max

    def sample(self, rtt: float) -> None:
        """Feed one measured round trip (seconds)."""
        rtt = max(rtt, 0.0)
        self.latest = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def rto(self) -> float:
        """The current retransmission timeout, backoff included."""
        if self.srtt is None:
            base = self._initial
        else:
            base = self.srtt + max(GRANULARITY, 4 * self.rttvar)
        base = min(max(base, self._min), self._max)
        return min(base * (2 ** min(self.backoff, 16)), self._max)

    def loss_delay(self) -> float:
        """How long a frame may trail a later acknowledged one before it counts as lost.

        9/8 of the larger of smoothed and latest RTT, as QUIC does: enough slack for
        reordering on the wire, short enough to recover well before the RTO.
        """
        base = max(self._initial if self.srtt is None else self.srtt, self.latest)
        return max(base * 9 / 8, GRANULARITY)
