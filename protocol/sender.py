"""The sending half of the reliable stream: window, acks, loss detection, retransmission.

Strategy (TCP SACK + RACK / QUIC loss detection, without congestion control — the link
is a dedicated cable and the receiver's advertised window is what must not be overrun):
- Messages are cut into payload-sized memoryview slices (no copy) and queued; a message
  given as several parts is cut across them, a frame spanning two parts holding a tuple
  of views (assembled only when the frame is encoded).  A slice gets its sequence
  number when it is first sent, if the send window and the peer's advertised window
  both allow it.
- `_inflight` holds frames sent and neither acked nor selectively acked, in the order
  of their latest transmission (an OrderedDict, moved to the end on retransmission).
  So the frames most likely lost are at the front, and loss detection stops at the first
  one that is not.
- A frame is lost when a frame transmitted after it has been acknowledged and either
  PACKET_THRESHOLD later transmissions were acknowledged, or it was sent loss_delay
  before now.  Lost frames are retransmitted before any new data.
- If nothing is acknowledged for an RTO, the oldest frames are resent as probes and the
  RTO doubles (capped); the ack a probe brings back exposes every other loss at once.
- The peer never discards what it selectively acked, so a SACKed frame is forgotten for
  good; sacked ranges are remembered in a RangeSet so repeated ranges cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat

from .frames import BEGIN, END
from .ranges import RangeSet
from .rtt import RttEstimator

# Later transmissions acknowledged before a frame counts as lost (QUIC's
# kPacketThreshold): tolerates a little reordering on the wire without waiting an RTO.
PACKET_THRESHOLD = 3
# Frames resent when the RTO fires: enough to elicit an ack that exposes the rest.
PROBES_PER_RTO = 2

# Fields of an in-flight record (a list, cheaper than an object on the hot path).
_PAYLOAD, _FLAGS, _SENT_AT, _TX, _RETX = range(5)


def _newest_first_sent(records: list, newest, any_acked: bool):
    """(newest, any_acked) updated with `records` (in seq order, None where nothing was
    in flight): the record sent once with the latest transmission, and whether any was
    acknowledged at all.

    A frame's first transmission comes in seq order (take() numbers new frames as it
    sends them), so among records sent once the latest transmission is the last one:
    scanning back from the end stops at the first such record, usually at once.
    """
    for record in reversed(records):
        if record is None:
            continue
        any_acked = True
        if record[_RETX] == 0:
            if newest is None or record[_TX] > newest[_TX]:
                newest = record
            break
    return newest, any_acked


class Sender:
    """Sequence numbers, in-flight frames and the decisions about what to send next."""

    __slots__ = (
        "rtt", "next_seq", "snd_una", "right_edge", "_send_window", "_queue", "_inflight",
        "_lost", "_sacked", "_tx", "_largest_acked_tx", "_message_ends", "_next_message",
        "acked_messages", "_rto_armed_at", "counters",
    )

    def __init__(self, rtt: RttEstimator, send_window: int, counters) -> None:
        self.rtt = rtt
        self.next_seq = 1  # seq of the next new frame
        self.snd_una = 1  # lowest seq not yet cumulatively acked
        self.right_edge = 1  # peer's ack + window: nothing until the peer announces it
        self._send_window = send_window  # our own cap on frames in flight
        self._queue: deque = deque()  # (payload, flags) waiting for a seq
        self._inflight: OrderedDict = OrderedDict()  # seq -> record, in transmission order
        self._lost: deque = deque()  # (seq, record) waiting for retransmission
        self._sacked = RangeSet()  # seqs the peer selectively acked, above snd_una
        self._tx = 0  # transmission counter (orders every send, retransmissions too)
        self._largest_acked_tx = 0  # latest transmission known to have arrived
        self._message_ends: deque = deque()  # (seq of last frame, message number)
        self._next_message = 1
        self.acked_messages = 0  # highest message number wholly acked
        self._rto_armed_at: float | None = None  # when the RTO clock last restarted
        self.counters = counters

    # --- what the connection asks ---------------------------------------------------

    def queue_message(self, data, max_payload: int) -> int:
        """Fragment `data` into the queue; return its message number.

        `data` is a buffer, or a list or tuple of buffers (parts) sent as one message
        without being joined: frames are cut as views, and a frame whose payload spans
        a part boundary carries a tuple of views (assembled when it is encoded).
        """
        if type(data) is list or type(data) is tuple:
            parts = [p if type(p) is memoryview and p.format == "B" and p.ndim == 1
                     else memoryview(p).cast("B") for p in data]
            parts = [p for p in parts if len(p)]
            if len(parts) == 1:
                data = parts[0]
            elif not parts:
                data = memoryview(b"")
            else:
                return self._queue_parts(parts, max_payload)
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        n = len(view)
        if n <= max_payload:
            self._queue.append((view, BEGIN | END))
            return self._new_message(1)
        return self._enqueue([view[offset : offset + max_payload]
                              for offset in range(0, n, max_payload)])

    def _enqueue(self, payloads: list) -> int:
        """Queue one message's frames (two or more), flagged BEGIN .. END."""
        flags = [0] * len(payloads)
        flags[0] = BEGIN
        flags[-1] = END
        self._queue.extend(zip(payloads, flags))
        return self._new_message(len(payloads))

    def _new_message(self, frames: int) -> int:
        number = self._next_message
        self._next_message += 1
        # The message's last frame will get seq next_seq + frames already queued - 1.
        self._message_ends.append((self.next_seq + len(self._queue) - 1, number))
        return number

    def _queue_parts(self, parts: list, max_payload: int) -> int:
        """queue_message for two or more non-empty parts (views of single bytes)."""
        payloads = []
        add = payloads.append
        pieces: list = []  # of the frame being filled, when it spans parts
        room = max_payload
        for part in parts:
            pos = 0
            size = len(part)
            while pos < size:
                if room == max_payload and size - pos >= max_payload:
                    # Whole frames inside this part: plain views, as for one buffer.
                    stop = pos + (size - pos) // max_payload * max_payload
                    payloads += [part[offset : offset + max_payload]
                                 for offset in range(pos, stop, max_payload)]
                    pos = stop
                    continue
                take = min(room, size - pos)
                pieces.append(part[pos : pos + take])
                pos += take
                room -= take
                if not room:
                    add(pieces[0] if len(pieces) == 1 else tuple(pieces))
                    pieces = []
                    room = max_payload
        if pieces:
            add(pieces[0] if len(pieces) == 1 else tuple(pieces))
        if len(payloads) == 1:
            self._queue.append((payloads[0], BEGIN | END))
            return self._new_message(1)
        return self._enqueue(payloads)

    def take(self, now: float, limit: int) -> list:
        """Up to `limit` frames to send now, as (seq, payload, flags): lost frames first,
        then new ones as far as both windows allow.  Batched because this is the hot path."""
        out = []
        lost = self._lost
        inflight = self._inflight
        while lost and len(out) < limit:
            seq, record = lost.popleft()
            if seq < self.snd_una or seq in self._sacked:
                continue  # acknowledged while it waited
            self._tx += 1
            record[_SENT_AT] = now
            record[_TX] = self._tx
            record[_RETX] += 1
            inflight[seq] = record
            self.counters.retransmits += 1
            out.append((seq, record[_PAYLOAD], record[_FLAGS]))
        queue = self._queue
        if queue and len(out) < limit:
            seq = self.next_seq
            stop = min(self.right_edge, self.snd_una + self._send_window, seq + limit - len(out),
                       seq + len(queue))
            tx = self._tx
            popleft = queue.popleft
            append = out.append
            while seq < stop:
                payload, flags = popleft()
                tx += 1
                inflight[seq] = [payload, flags, now, tx, 0]
                append((seq, payload, flags))
                seq += 1
            self._tx = tx
            self.next_seq = seq
        if out and self._rto_armed_at is None:
            self._rto_armed_at = now
        return out

    # --- what the peer tells us -----------------------------------------------------

    def on_ack(self, ack: int, window: int, sack_ranges, now: float) -> bool:
        """Process a cumulative ack, its window and selective-ack ranges.

        Returns True if anything new was acknowledged.  Bogus values from the peer (an
        ack beyond what was sent) are clamped, never trusted.
        """
        if ack > self.next_seq:
            ack = self.next_seq
        edge = ack + window
        if edge > self.right_edge:
            self.right_edge = edge
        if ack <= self.snd_una and not sack_ranges:
            return False  # the common case on a one-way stream: nothing new
        inflight = self._inflight
        pop = inflight.pop
        # The newest transmission known to have arrived anchors both the RTT sample and
        # loss detection.  Only frames sent once qualify (Karn's rule, applied to loss
        # detection too): an ack for a retransmitted frame may have been sent for its
        # original copy before the retransmission even arrived, and taking it as the
        # anchor would declare everything sent in between lost (seen after a receiver
        # stall longer than the RTO: a burst of spurious retransmissions).
        newest = None
        any_acked = False
        if ack > self.snd_una:
            # Popped in C (map): this runs for every frame sent.  None for seqs already
            # gone (selectively acked, or waiting in _lost).
            newest, any_acked = _newest_first_sent(
                list(map(pop, range(self.snd_una, ack), repeat(None))), newest, any_acked)
            self.snd_una = ack
            self._sacked.discard_below(ack)
            self._ack_messages(ack)
        for start, end in sack_ranges:
            if end > self.next_seq:
                end = self.next_seq
            if start < self.snd_una:
                start = self.snd_una
            for new_start, new_end in self._sacked.add_range(start, end):
                newest, any_acked = _newest_first_sent(
                    list(map(pop, range(new_start, new_end), repeat(None))), newest, any_acked)
        if not any_acked:
            return False
        self.rtt.backoff = 0
        self._rto_armed_at = now if inflight else None
        if newest is None:
            return True
        self.rtt.sample(now - newest[_SENT_AT])
        if newest[_TX] > self._largest_acked_tx:
            self._largest_acked_tx = newest[_TX]
        self._detect_losses(now)
        return True

    def _ack_messages(self, ack: int) -> None:
        ends = self._message_ends
        while ends and ends[0][0] < ack:
            self.acked_messages = ends.popleft()[1]

    def _detect_losses(self, now: float) -> None:
        inflight = self._inflight
        largest = self._largest_acked_tx
        delay = self.rtt.loss_delay()
        while inflight:
            seq = next(iter(inflight))
            record = inflight[seq]
            tx = record[_TX]
            if tx >= largest:
                break  # sent after the newest acknowledged frame: nothing to judge by
            # `sent + delay <= now`, the same expression timer() uses: written as
            # `sent <= now - delay` rounding can leave the timer due but nothing lost.
            if largest - tx >= PACKET_THRESHOLD or record[_SENT_AT] + delay <= now:
                del inflight[seq]
                self._lost.append((seq, record))
            else:
                break  # later records were sent later still: none of them is lost either

    # --- timers ---------------------------------------------------------------------

    def timer(self) -> float | None:
        """When the sender next needs handle_timer: loss-delay or RTO expiry."""
        inflight = self._inflight
        if not inflight:
            return None
        record = inflight[next(iter(inflight))]
        if record[_TX] < self._largest_acked_tx:
            return record[_SENT_AT] + self.rtt.loss_delay()
        armed = self._rto_armed_at if self._rto_armed_at is not None else record[_SENT_AT]
        return armed + self.rtt.rto()

    def handle_timer(self, now: float) -> None:
        inflight = self._inflight
        if not inflight:
            return
        record = inflight[next(iter(inflight))]
        if record[_TX] < self._largest_acked_tx:
            self._detect_losses(now)
            return
        armed = self._rto_armed_at if self._rto_armed_at is not None else record[_SENT_AT]
        if now < armed + self.rtt.rto():
            return
        self.counters.rto_expirations += 1
        self.rtt.backoff += 1
        self._rto_armed_at = now
        for _ in range(min(PROBES_PER_RTO, len(inflight))):
            seq, record = inflight.popitem(last=False)
            self._lost.append((seq, record))
