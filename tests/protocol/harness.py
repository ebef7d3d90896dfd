"""Two (or more) protocol endpoints back to back in memory, on a simulated wire and clock.

Strategy (aioquic's test style): `Network.now` is the only clock.  Each step delivers
every frame due by `now`, runs expired timers, drains events, runs the test's hooks and
collects what the connections want to send; then the clock jumps straight to the next
thing that can happen (a frame's arrival or a connection's timer).  Nothing sleeps and
nothing reads a real clock, so a minute of idle link costs a few hundred steps.

The wire is what a real one does to frames, no more: one-way latency, an optional
bandwidth (serialisation delay), Ethernet padding of short frames, an MTU check at the
receiving NIC, a broadcast for destination None, and an optional `fault` callable that
may drop, duplicate, delay or corrupt each copy.  Every delivered frame is a fresh
bytearray: decode_frame zeroes the checksum in place, and a real NIC never hands the
same buffer twice.  `taps` see every frame sent and delivered, for assertions.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Hashable

import msgpack

from protocol import (
    Connected, Connection, ConnectionConfig, ConnectionLost, HandshakeRefused,
    MessageReceived, MessagesAcknowledged,
)
from protocol.frames import AUTHENTICATED, HEADER, HEADER_SIZE, FrameType, encode_frame

VOLUME = 7
LATENCY = 50e-6  # one way: a ~100 µs round trip, like the dedicated cable
PAD_TO = 60  # short frames come off a real NIC padded (the spec says to 60 bytes)
# Each sender's frames leave one after another at this rate, so that a transfer takes
# time on the wire (and faults scheduled in time hit the middle of it), as on the cable.
BANDWIDTH = 1e9
# The clock never stands still between steps: a real loop's clock advances too, and a
# timer that stays expired after handle_timer() would otherwise stall the simulation.
TICK = 1e-7
DEFAULT_MAX_STEPS = 200_000


def header(data) -> dict:
    """The header fields of a frame as a dict, without checking anything."""
    (version, ftype, flags, volume, session, seq, ack, window, length, reserved,
     checksum) = HEADER.unpack_from(bytes(data[:HEADER_SIZE]))
    return dict(version=version, type=ftype, flags=flags, volume=volume, session=session,
                seq=seq, ack=ack, window=window, length=length, reserved=reserved,
                checksum=checksum)


def frame_type(data) -> int | None:
    return data[1] if len(data) > 1 else None


def make_config(node: str, peer: str | None, *, seed: int, **overrides) -> ConnectionConfig:
    """A config with seeded nonces (so every run is reproducible)."""
    rnd = random.Random(seed)
    overrides.setdefault("volume", VOLUME)
    return ConnectionConfig(node=node, peer_node=peer, random_bytes=rnd.randbytes, **overrides)


def hello_frame(*, node: str, nonce: bytes, echo: bytes | None = None, auth: bool = False,
                mtu: int = 1500, versions=(1, 1), info=None, proof: bytes | None = None,
                session: int = 0, volume: int = VOLUME, extra: dict | None = None) -> bytearray:
    """A HELLO built by hand, so tests can say things a real node never would."""
    body = {"versions": list(versions), "node": node, "mtu": mtu, "nonce": nonce,
            "echo": echo, "session": session, "auth": auth, "info": info}
    if extra:
        body.update(extra)
    payload = msgpack.packb([msgpack.packb(body, use_bin_type=True), proof], use_bin_type=True)
    return encode_frame(FrameType.HELLO, 0, volume, 0, 0, 0, 0, payload)


class Endpoint:
    """One connection on the network, with everything it has reported so far."""

    def __init__(self, net: "Network", address: Hashable, conn: Connection) -> None:
        self.net = net
        self.address = address
        self.conn = conn
        self.events: list = []  # every event taken from next_event(), in order
        self.event_times: list[float] = []
        self.messages: list[bytes] = []  # MessageReceived payloads, joined
        self.draining = True  # False: the upper layer is busy and does not call next_event()

    def drain(self) -> None:
        conn = self.conn
        while (event := conn.next_event()) is not None:
            self.events.append(event)
            self.event_times.append(self.net.now)
            if isinstance(event, MessageReceived):
                self.messages.append(event.data)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def connected(self) -> list[Connected]:
        return self.of(Connected)

    @property
    def lost(self) -> list[ConnectionLost]:
        return self.of(ConnectionLost)

    @property
    def refused(self) -> list[HandshakeRefused]:
        return self.of(HandshakeRefused)

    @property
    def acked(self) -> list[int]:
        return [e.up_to for e in self.of(MessagesAcknowledged)]

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} {self.conn.state.value} events={len(self.events)}>"


@dataclass
class Faults:
    """What the wire does to each copy of each frame.

    `script` is applied to the first frames in order (one action each: "ok", "drop",
    "dup", "delay", "flip"), which hypothesis can shrink to the one action that matters;
    after it, the random rates apply.  `bursts` are [start, end) intervals of simulated
    time in which every frame is lost.  `only` limits the faults to frames for which it
    returns True (e.g. only DATA frames from A).
    """

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    max_delay: float = 2e-3
    bursts: tuple = ()
    script: tuple = ()
    seed: int = 0
    only: Callable | None = None
    stats: dict = field(default_factory=lambda: dict(dropped=0, duplicated=0, delayed=0,
                                                      corrupted=0))

    def __post_init__(self) -> None:
        self._rnd = random.Random(self.seed)
        self._index = 0

    def _flip(self, data: bytearray) -> None:
        bit = self._rnd.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        self.stats["corrupted"] += 1

    def __call__(self, src, dst, data: bytearray, now: float) -> list:
        if self.only is not None and not self.only(src, dst, data):
            return [(0.0, data)]
        stats, rnd = self.stats, self._rnd
        for start, end in self.bursts:
            if start <= now < end:
                stats["dropped"] += 1
                return []
        if self._index < len(self.script):
            action = self.script[self._index]
            self._index += 1
            if action == "drop":
                stats["dropped"] += 1
                return []
            if action == "dup":
                stats["duplicated"] += 1
                return [(0.0, data), (rnd.random() * self.max_delay, bytearray(data))]
            if action == "delay":
                stats["delayed"] += 1
                return [(rnd.random() * self.max_delay, data)]
            if action == "flip":
                self._flip(data)
            return [(0.0, data)]
        if rnd.random() < self.loss:
            stats["dropped"] += 1
            return []
        copies = [data]
        if rnd.random() < self.dup:
            stats["duplicated"] += 1
            copies.append(bytearray(data))
        out = []
        for copy in copies:
            if rnd.random() < self.corrupt:
                self._flip(copy)
            delay = 0.0
            if rnd.random() < self.reorder:
                stats["delayed"] += 1
                delay = rnd.random() * self.max_delay
            out.append((delay, copy))
        return out


class Network:
    """A shared segment: endpoints by address, the frames in flight, the clock."""

    def __init__(self, *, latency: float = LATENCY, pad_to: int = PAD_TO,
                 bandwidth: float | None = BANDWIDTH, start: float = 0.0) -> None:
        self.now = start
        self.latency = latency
        self.pad_to = pad_to
        self.bandwidth = bandwidth  # bits per second per sender, None = no serialisation delay
        self.endpoints: dict[Hashable, Endpoint] = {}
        self.fault: Callable | None = None
        self.taps: list[Callable] = []  # tap(kind, src, dst, data, now); kind "send" / "deliver"
        self.hooks: list[Callable] = []  # hook(net), each step before frames_to_send
        self.steps = 0
        self.spins = 0  # steps after which a timer was still expired (a busy loop for real)
        self.oversize: list = []  # (src, dst, length, mtu): frames a real NIC would drop
        self._queue: list = []
        self._order = itertools.count()
        self._seeds = itertools.count(1)
        self._busy_until: dict = {}

    # --- building ---------------------------------------------------------------------

    def add(self, address: Hashable, conn: Connection) -> Endpoint:
        endpoint = Endpoint(self, address, conn)
        self.endpoints[address] = endpoint
        return endpoint

    def new(self, address: Hashable, node: str, peer: str | None, *, connect: bool = True,
            **overrides) -> Endpoint:
        """A fresh connection with seeded nonces (a new seed each time), added at `address`."""
        conn = Connection(make_config(node, peer, seed=next(self._seeds) * 7919, **overrides))
        endpoint = self.add(address, conn)
        if connect:
            conn.connect(now=self.now)
        return endpoint

    def remove(self, address: Hashable) -> Endpoint:
        """The endpoint vanishes (power cut): frames to it are lost from now on."""
        return self.endpoints.pop(address)

    # --- the wire ---------------------------------------------------------------------

    def inject(self, data, src: Hashable, dst: Hashable, *, delay: float = 0.0) -> None:
        """Put a frame on the wire as if `src` sent it (no faults applied)."""
        self._schedule(src, dst, bytearray(data), self.now + self.latency + delay)

    def flush(self, address: Hashable) -> list:
        """Call frames_to_send on one endpoint now, put the frames on the wire, and
        return them (for tests that look at exactly what one call produced)."""
        frames = self.endpoints[address].conn.frames_to_send(now=self.now)
        for frame, dest in frames:
            self._transmit(address, dest, frame)
        return frames

    def _schedule(self, src, dst, data: bytearray, at: float) -> None:
        if self.pad_to and len(data) < self.pad_to:
            data += bytes(self.pad_to - len(data))
        heapq.heappush(self._queue, (at, next(self._order), dst, src, data))

    def _transmit(self, src, dest, frame) -> None:
        now = self.now
        for tap in self.taps:
            tap("send", src, dest, frame, now)
        depart = now
        if self.bandwidth:
            depart = max(now, self._busy_until.get(src, now)) + len(frame) * 8 / self.bandwidth
            self._busy_until[src] = depart
        targets = [a for a in self.endpoints if a != src] if dest is None else [dest]
        for dst in targets:
            endpoint = self.endpoints.get(dst)
            if endpoint is not None and len(frame) > endpoint.conn.config.mtu:
                self.oversize.append((src, dst, len(frame), endpoint.conn.config.mtu))
                continue
            copies = [(0.0, bytearray(frame))]
            if self.fault is not None:
                copies = self.fault(src, dst, bytearray(frame), now)
            for delay, data in copies:
                self._schedule(src, dst, data, depart + self.latency + delay)

    # --- the clock --------------------------------------------------------------------

    def step(self) -> None:
        """Everything that happens at `now`."""
        self.steps += 1
        now = self.now
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, _, dst, src, data = heapq.heappop(queue)
            endpoint = self.endpoints.get(dst)
            if endpoint is None:
                continue
            for tap in self.taps:
                tap("deliver", src, dst, data, now)
            endpoint.conn.receive_frame(data, src, now=now)
        endpoints = list(self.endpoints.values())
        for endpoint in endpoints:
            timer = endpoint.conn.get_timer()
            if timer is not None and timer <= now:
                endpoint.conn.handle_timer(now=now)
        for endpoint in endpoints:
            if endpoint.draining:
                endpoint.drain()
        for hook in list(self.hooks):
            hook(self)
        for endpoint in list(self.endpoints.values()):
            for frame, dest in endpoint.conn.frames_to_send(now=now):
                self._transmit(endpoint.address, dest, frame)
        for endpoint in self.endpoints.values():
            if endpoint.draining:
                endpoint.drain()

    def next_time(self) -> float | None:
        candidates = [self._queue[0][0]] if self._queue else []
        for endpoint in self.endpoints.values():
            timer = endpoint.conn.get_timer()
            if timer is not None:
                candidates.append(timer)
        if not candidates:
            return None
        earliest = min(candidates)
        if earliest <= self.now:
            self.spins += 1
        return max(earliest, self.now + TICK)

    def run_for(self, duration: float, *, max_steps: int = DEFAULT_MAX_STEPS) -> None:
        """Advance the simulation by `duration` seconds (processing the final instant)."""
        self._run(None, self.now + duration, max_steps, "")

    def run_until(self, condition: Callable[[], bool], *, timeout: float,
                  max_steps: int = DEFAULT_MAX_STEPS, what: str = "") -> float:
        """Step until condition() holds; fail if `timeout` simulated seconds pass first.
        Returns the simulated time it took."""
        start = self.now
        if not self._run(condition, start + timeout, max_steps, what):
            raise AssertionError(
                f"{what or 'condition'} not reached within {timeout} simulated seconds "
                f"(t={self.now:.6f}, steps={self.steps}); {self.describe()}")
        return self.now - start

    def _run(self, condition, limit: float, max_steps: int, what: str) -> bool:
        for _ in range(max_steps):
            self.step()
            if condition is not None and condition():
                return True
            if self.now >= limit:
                return False
            nxt = self.next_time()
            self.now = limit if nxt is None else min(nxt, limit)
        raise AssertionError(
            f"{what or 'simulation'} did not end within {max_steps} steps "
            f"(t={self.now:.6f}); {self.describe()}")

    def describe(self) -> str:
        parts = []
        for endpoint in self.endpoints.values():
            counters = {k: v for k, v in endpoint.conn.counters.as_dict().items() if v}
            parts.append(f"{endpoint.address}: {endpoint.conn.state.value} "
                         f"events={[type(e).__name__ for e in endpoint.events][-8:]} {counters}")
        if self.oversize:
            parts.append(f"{len(self.oversize)} frames larger than the receiver's MTU were "
                         f"dropped, e.g. (src, dst, length, mtu) = {self.oversize[0]}")
        return "; ".join(parts)


def pair(*, secret: bytes | None = None, mtu=1500, connect: bool = True,
         latency: float = LATENCY, bandwidth: float | None = BANDWIDTH,
         a_overrides: dict | None = None, b_overrides: dict | None = None,
         **overrides) -> tuple[Network, Endpoint, Endpoint]:
    """Nodes "a" (address "A") and "b" (address "B"), each expecting the other."""
    mtu_a, mtu_b = mtu if isinstance(mtu, tuple) else (mtu, mtu)
    net = Network(latency=latency, bandwidth=bandwidth)
    a = net.new("A", "a", "b", connect=connect,
                **{"secret": secret, "mtu": mtu_a, **overrides, **(a_overrides or {})})
    b = net.new("B", "b", "a", connect=connect,
                **{"secret": secret, "mtu": mtu_b, **overrides, **(b_overrides or {})})
    return net, a, b


def established(*endpoints: Endpoint) -> Callable[[], bool]:
    from protocol import ConnState
    return lambda: all(e.conn.state is ConnState.ESTABLISHED for e in endpoints)


def connected_pair(**kwargs) -> tuple[Network, Endpoint, Endpoint]:
    """A pair that has completed its handshake (both sides saw Connected)."""
    net, a, b = pair(**kwargs)
    net.run_until(lambda: bool(a.connected) and bool(b.connected), timeout=1.0,
                  what="handshake")
    return net, a, b


def payloads(count: int, sizes, seed: int = 0) -> list[bytes]:
    """`count` distinct messages; sizes cycle through `sizes`."""
    rnd = random.Random(seed)
    sizes = list(sizes)
    out = []
    for i in range(count):
        size = sizes[i % len(sizes)]
        out.append(rnd.randbytes(size))
    return out


class Sender:
    """A hook that sends `messages` from `endpoint` once it is established, and records
    the message numbers send_message returned."""

    def __init__(self, endpoint: Endpoint, messages: list[bytes], *, batch: int | None = None):
        from protocol import ConnState
        self._established = ConnState.ESTABLISHED
        self.endpoint = endpoint
        self.messages = messages
        self.numbers: list[int] = []
        self.batch = batch  # at most this many per step (None: all at once)

    def __call__(self, net: Network) -> None:
        conn = self.endpoint.conn
        if conn.state is not self._established:
            return
        sent = len(self.numbers)
        end = len(self.messages) if self.batch is None else min(len(self.messages), sent + self.batch)
        for i in range(sent, end):
            self.numbers.append(conn.send_message(self.messages[i], now=net.now))

    @property
    def done(self) -> bool:
        return len(self.numbers) == len(self.messages)


def is_type(ftype: FrameType) -> Callable:
    return lambda src, dst, data: data[1] == ftype


def authenticated(data) -> bool:
    return bool(header(data)["flags"] & AUTHENTICATED)
