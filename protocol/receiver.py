"""The receiving half of the reliable stream: order, duplicates, reassembly, acks, window.

Strategy:
- `rcv_next` is the cumulative ack: every seq below it has been handed up in order.
  Frames above it wait in `_out_of_order`, and their seqs in a RangeSet that the ACK
  frame reports as selective-ack ranges.  What is selectively acked is never discarded
  (the sender forgets it), so the buffer must have room for the whole window.
- Flow control in frames: the window advertised is `capacity - held`, where `held`
  counts frames of messages not yet taken by the upper layer (partly reassembled or
  waiting in the event queue).  Taking a message reopens the window.  The right edge
  (rcv_next + window) never moves backwards, which is what lets the sender trust it.
- Acks: in-order frames are acked every `ack_every` frames or after `ack_delay`; a frame
  that opens a gap, and then every OOO_ACK_EVERY further frames while a gap remains, or a
  duplicate, asks for an ack at once: the sender's loss detection lives on them.
"""

from __future__ import annotations

import struct

from .errors import FrameError
from .frames import BEGIN, END
from .ranges import RangeSet

# Selective-ack ranges per ACK frame: 64 × 16 bytes fits a 1500-byte MTU (fewer are sent
# when the session's frames are smaller); older holes beyond these are found by the
# sender's own loss detection.
MAX_SACK_RANGES = 64
# While a gap is open, ack every this many out-of-order frames: often enough for the
# sender to detect losses quickly, rarely enough not to double the frame rate.
OOO_ACK_EVERY = 4

SACK_COUNT = struct.Struct(">H")
SACK_RANGE = struct.Struct(">QQ")


def encode_sack(ranges) -> bytes:
    """ACK payload: u16 count, then (u64 start, u64 end) per range."""
    return SACK_COUNT.pack(len(ranges)) + b"".join(SACK_RANGE.pack(a, b) for a, b in ranges)


def decode_sack(payload) -> list[tuple[int, int]]:
    """Parse an ACK payload; FrameError("malformed") if the lengths do not add up."""
    if len(payload) < SACK_COUNT.size:
        raise FrameError("malformed", "ACK payload too short")
    (count,) = SACK_COUNT.unpack_from(payload)
    if count > MAX_SACK_RANGES or len(payload) != SACK_COUNT.size + count * SACK_RANGE.size:
        raise FrameError("malformed", f"ACK payload does not hold {count} ranges")
    ranges = []
    for i in range(count):
        start, end = SACK_RANGE.unpack_from(payload, SACK_COUNT.size + i * SACK_RANGE.size)
        if start >= end:
            raise FrameError("malformed", f"empty or inverted SACK range {start}..{end}")
        ranges.append((start, end))
    return ranges


class Receiver:
    """Turns DATA frames into whole messages, in order, exactly once."""

    __slots__ = (
        "rcv_next", "capacity", "held", "_right_edge", "_out_of_order", "_ranges", "_parts",
        "_max_message_frames", "_max_ranges", "ack_pending", "ack_due", "ack_now", "_ooo_since_ack",
        "counters", "_ack_every", "_ack_delay", "_deliver",
    )

    def __init__(self, capacity: int, max_message_frames: int, counters, deliver,
                 ack_every: int, ack_delay: float, max_payload: int = 1 << 16) -> None:
        self._deliver = deliver  # deliver(parts, frames) for each completed message
        self._ack_every = ack_every
        self._ack_delay = ack_delay
        self.rcv_next = 1
        # as many ranges as one ACK frame's payload holds
        self._max_ranges = max(1, min(MAX_SACK_RANGES, (max_payload - SACK_COUNT.size) // SACK_RANGE.size))
        self.capacity = capacity  # frames we can buffer
        self.held = 0  # frames of messages the upper layer has not taken yet
        self._right_edge = 1 + capacity
        self._out_of_order: dict = {}  # seq -> (flags, payload)
        self._ranges = RangeSet()  # seqs in _out_of_order
        self._parts: list = []  # fragments of the message being reassembled
        self._max_message_frames = max_message_frames
        self.ack_pending = 0  # frames received since the last ack went out
        self.ack_due: float | None = None  # when a delayed ack must go out
        self.ack_now = False  # an ack must go out with the next batch of frames
        self._ooo_since_ack = 0
        self.counters = counters

    def window(self) -> int:
        """Frames beyond rcv_next we accept; keeps the right edge from shrinking."""
        edge = self.rcv_next + self.capacity - self.held
        if edge > self._right_edge:
            self._right_edge = edge
        return self._right_edge - self.rcv_next

    def sack_ranges(self) -> list[tuple[int, int]]:
        return self._ranges.highest(self._max_ranges)

    def has_gap(self) -> bool:
        return bool(self._out_of_order)

    def on_data(self, seq: int, flags: int, payload, now: float) -> None:
        """Accept one DATA frame; completed messages go to the deliver callback."""
        rcv_next = self.rcv_next
        parts = self._parts
        if (seq == rcv_next and seq < self._right_edge and not self._out_of_order and parts
                and not flags & (BEGIN | END)):
            # Fast path, most frames of a large message: the next one in order, in the
            # middle of a message, nothing waiting behind it.
            if len(parts) >= self._max_message_frames:
                raise FrameError("malformed", "message larger than the agreed maximum")
            parts.append(payload)
            self.held += 1
            self.rcv_next = rcv_next + 1
            self.ack_pending += 1
            if self.ack_pending >= self._ack_every:
                self.ack_now = True
            elif self.ack_due is None:
                self.ack_due = now + self._ack_delay
            return
        if seq < rcv_next or seq in self._out_of_order:
            self.counters.duplicates += 1
            self.ack_now = True  # our ack may have been lost: say it again
            return
        if seq >= self._right_edge:
            self.counters.out_of_window += 1
            self.ack_now = True
            return
        if seq != rcv_next:
            self._out_of_order[seq] = (flags, payload)
            self._ranges.add(seq)
            self._ooo_since_ack += 1
            if self._ooo_since_ack == 1 or self._ooo_since_ack >= OOO_ACK_EVERY:
                self.ack_now = True
            return
        self._take(flags, payload)
        rcv_next += 1
        ooo = self._out_of_order
        if ooo:
            while rcv_next in ooo:
                flags, payload = ooo.pop(rcv_next)
                self._take(flags, payload)
                rcv_next += 1
            self._ranges.discard_below(rcv_next)
            self.ack_now = True  # a hole was filled: tell the sender at once
        self.rcv_next = rcv_next
        self.ack_pending += 1
        if self.ack_pending >= self._ack_every:
            self.ack_now = True
        elif self.ack_due is None:
            self.ack_due = now + self._ack_delay

    def _take(self, flags: int, payload) -> None:
        parts = self._parts
        if bool(flags & BEGIN) == bool(parts):
            # BEGIN must open a message and only open one.  The checksum (and MAC) passed,
            # so this is a broken peer, not noise: refuse to guess where messages start.
            raise FrameError("malformed", "DATA fragment flags out of order (BEGIN)")
        if len(parts) >= self._max_message_frames:
            raise FrameError("malformed", "message larger than the agreed maximum")
        parts.append(payload)
        self.held += 1
        if flags & END:
            self._parts = []
            self._deliver(tuple(parts), len(parts))

    def acked(self) -> None:
        """An ACK (or a DATA frame carrying the same information) just went out."""
        self.ack_pending = 0
        self.ack_due = None
        self.ack_now = False
        self._ooo_since_ack = 0

    def release(self, frames: int) -> bool:
        """The upper layer took a message of `frames` frames.  True if a window update
        is worth sending (the window had shrunk to under a quarter and now grows)."""
        before = self.capacity - self.held
        self.held -= frames
        return before < max(self.capacity // 4, 1) <= self.capacity - self.held
