"""The replication link's I/O glue: one interface, its connections, one event loop.

Everything protocol-shaped lives in protocol/; this module only moves frames between an
AF_PACKET socket and the sans-IO connections, feeds them the clock and the interface's
carrier events, and sends what they produce (through the fault injector when one is
configured).  Several connections (one per volume) may share an interface: incoming
frames are dispatched by the volume id in the header.

The loop is single-threaded and never blocks while a connection has more to send: a
call to frames_to_send that fills its batch means "there is more", so the next poll
does not wait.  Batches keep acks flowing in while a large message goes out.
"""

from __future__ import annotations

import logging
import select
import struct
import time
from typing import Callable

from protocol import Connection, Event

from .faults import FaultInjector
from .iface import CarrierMonitor, interface_info
from .packet_socket import PacketSocket

log = logging.getLogger(__name__)

# Frames handed to the socket per connection per loop turn: large enough to amortise the
# loop (a poll, timers, one TX-ring flush), small enough that incoming acks are read long
# before the send window (2048 frames) runs dry.  256 measured ~6% more goodput than 64
# at MTU 9000 (docs/BENCHMARKS.md).
SEND_BATCH = 256
# Frames read per loop turn before timers and sends get their turn.
RECV_BATCH = 256
# Longest poll wait when no timer is due sooner: bounds the reaction to new work.
MAX_WAIT = 0.1

_VOLUME = struct.Struct(">I")
_VOLUME_OFFSET = 4


class Link:
    """Connections over one dedicated interface."""

    def __init__(self, ifname: str, *, faults: FaultInjector | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ifname = ifname
        self.info = interface_info(ifname)
        self.socket = PacketSocket(ifname)
        self.carrier = CarrierMonitor(ifname)
        self.faults = faults
        self.clock = clock
        self.counters = {"runt": 0, "unknown_volume": 0}  # frames no connection could take
        self._conns: dict[int, Connection] = {}
        self._more = False  # a connection filled its last batch: don't wait in poll
        self._poll = select.poll()
        self._poll.register(self.socket.fileno(), select.POLLIN)
        self._poll.register(self.carrier.fileno(), select.POLLIN)

    @property
    def mac(self) -> bytes:
        return self.info.mac

    @property
    def mtu(self) -> int:
        return self.info.mtu

    def add(self, conn: Connection) -> None:
        """Serve `conn` on this link (its config.volume must be unique here)."""
        volume = conn.config.volume
        if volume in self._conns:
            raise ValueError(f"volume id {volume} is already served on {self.ifname}")
        self._conns[volume] = conn

    def watch(self, fd: int) -> None:
        """Make step() also wake up when `fd` is readable (the caller reads it)."""
        self._poll.register(fd, select.POLLIN)

    def start(self) -> None:
        """Start every connection's handshake, telling it the carrier's present state."""
        now = self.clock()
        for conn in self._conns.values():
            conn.connect(now=now)
            if not self.info.carrier:
                conn.carrier_changed(False, now=now)
        self.flush()

    def close(self) -> None:
        """Release the socket and the netlink subscription."""
        self.socket.close()
        self.carrier.close()

    def step(self, timeout: float = MAX_WAIT) -> list[tuple[Connection, Event]]:
        """One loop turn: wait up to `timeout` for input or a timer, then do all due work.

        Returns the events the connections produced, in order.
        """
        return self.work(self.wait(timeout))

    def wait(self, timeout: float = MAX_WAIT) -> list[tuple[int, int]]:
        """The first half of step(): poll until input, a timer or `timeout`; what poll said.

        Split from work() so that a caller with its own input (LinkService's queue of
        messages to send) can take it in between: a message handed over while the link
        slept goes out before the receive path's turn, not after it.
        """
        return self.poll(self.wait_time(timeout))

    def wait_time(self, timeout: float = MAX_WAIT) -> float:
        """How long the next poll may sleep: `timeout`, less when a connection's timer is
        due sooner, 0 while a connection has more to send.  It reads the connections:
        a caller that shares them with other threads holds its lock for this, and not
        for poll()."""
        now = self.clock()
        wait = 0.0 if self._more else timeout
        for conn in self._conns.values():
            due = conn.get_timer()
            if due is not None and due - now < wait:
                wait = max(due - now, 0.0)
        return wait

    def poll(self, wait: float) -> list[tuple[int, int]]:
        """Sleep up to `wait` seconds for input on the socket, the carrier or a watched fd."""
        return self._poll.poll(wait * 1000.0) if wait > 0 else self._poll.poll(0)

    def work(self, ready: list[tuple[int, int]]) -> list[tuple[Connection, Event]]:
        """The second half of step(): the carrier, received frames, timers, sending."""
        now = self.clock()
        carrier_fd = self.carrier.fileno()
        socket_fd = self.socket.fileno()
        socket_error = False
        for fd, revents in ready:
            if fd == carrier_fd:
                for up in self.carrier.read():
                    log.info("%s: carrier %s", self.ifname, "up" if up else "down")
                    for conn in self._conns.values():
                        conn.carrier_changed(up, now=now)
                mtu = self.carrier.take_mtu_change()
                if mtu is not None:
                    self._mtu_changed(mtu, now)
            elif fd == socket_fd and revents & select.POLLERR:
                socket_error = True
        self._receive(now, socket_error)
        for conn in self._conns.values():
            due = conn.get_timer()
            if due is not None and due <= now:
                conn.handle_timer(now=now)
        self.flush(now)
        events = []
        for conn in self._conns.values():
            while (event := conn.next_event()) is not None:
                events.append((conn, event))
        return events

    def _mtu_changed(self, mtu: int, now: float) -> None:
        # The socket's rings were sized for the MTU at startup: frames above it would
        # not fit a receive slot, so a raised MTU serves only after a restart.
        usable = min(mtu, self.socket.mtu)
        if usable < mtu:
            log.warning("%s: MTU raised to %d; this daemon goes on using at most %d "
                        "(restart it to use more)", self.ifname, mtu, usable)
        else:
            log.warning("%s: MTU changed to %d: a session agreed on more reconnects at "
                        "it; one agreed on less goes on as it is", self.ifname, mtu)
        for conn in self._conns.values():
            conn.mtu_changed(usable, now=now)

    def _receive(self, now: float, socket_error: bool) -> None:
        conns = self._conns
        single = next(iter(conns.values())) if len(conns) == 1 else None
        for payload, source in self.socket.recv_batch(RECV_BATCH, socket_error):
            if single is not None:
                single.receive_frame(payload, source, now=now)  # it checks the volume itself
                continue
            if len(payload) < _VOLUME_OFFSET + _VOLUME.size:
                self.counters["runt"] += 1
                continue
            conn = conns.get(_VOLUME.unpack_from(payload, _VOLUME_OFFSET)[0])
            if conn is None:
                self.counters["unknown_volume"] += 1
                continue
            conn.receive_frame(payload, source, now=now)

    def flush(self, now: float | None = None) -> None:
        """Send what every connection has to send now (one batch each).

        Each connection's batch goes to the socket in one send_batch call (through
        the fault injector first when one is configured): with the socket's TX ring
        that is one system call per batch instead of one per frame, and DATA frames
        are built straight into the ring's slots.
        """
        if now is None:
            now = self.clock()
        more = False
        send_batch = self.socket.send_batch
        faults = self.faults
        for conn in self._conns.values():
            if faults is not None:
                frames = conn.frames_to_send(now=now, max_frames=SEND_BATCH)
                if len(frames) >= SEND_BATCH:
                    more = True
                apply = faults.apply
                out: list = []
                for frame, dest in frames:
                    out += apply(frame, dest)
                if out:
                    send_batch(out)
                continue
            # DATA frames come unencoded (one DataFrames entry) and are built straight
            # into the socket's TX-ring slots: their payload is copied once.
            before = conn.counters.frames_sent
            frames = conn.frames_to_send(now=now, max_frames=SEND_BATCH, in_place=True)
            if conn.counters.frames_sent - before >= SEND_BATCH:
                more = True
            if frames:
                send_batch(frames)
        if faults is not None and not more and faults.held:
            # Idle: release frames held back for reordering, or they would wait for
            # traffic that may never come (the last frames of a transfer, a lone ack).
            send_batch(faults.flush())
        self._more = more
