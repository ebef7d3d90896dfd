"""One end of a replication link, sans-IO: frames in, events and frames out.

Use (the daemon's link glue is about this much):

    conn = Connection(ConnectionConfig(node="alpha", volume=7, mtu=9000))
    conn.connect(now=t)
    loop:
        for frame, source in received: conn.receive_frame(frame, source, now=t)
        if t >= conn.get_timer(): conn.handle_timer(now=t)
        for frame, dest in conn.frames_to_send(now=t): send(frame, dest)   # dest None = broadcast
        while (event := conn.next_event()) is not None: handle(event)

Addresses (`source`, `dest`, `peer_address`) are opaque to this module: the link layer
uses MAC addresses.  Nothing here reads a clock, sleeps, or touches a socket; randomness
(handshake nonces) comes from config.random_bytes so tests can seed it.

Structure: a connection holds at most one handshake *attempt* (our nonce, the peer's) and
at most one *session* (what the attempt produced: id, keys, sender, receiver).  While a
session runs, a HELLO with a new nonce from the peer's address starts a new attempt
beside it (the peer restarted); only when that attempt completes — with the secret's
proof, if one is configured — is the old session dropped for the new one, so a forged
HELLO cannot tear a session down.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Hashable

import msgpack
import xxhash

from . import auth
from .config import MAX_UPPER_HANDSHAKE, ConnectionConfig
from .counters import Counters
from .errors import FrameError, LocalProtocolError
from .events import (
    Connected, ConnectionLost, Event, HandshakeRefused, MessageReceived, MessagesAcknowledged,
)
from .frames import (
    AUTHENTICATED, BEGIN, CHECKSUM_OFFSET, END, HEADER, HEADER_SIZE, MAX_MTU, MIN_MTU,
    TRAILER_SIZE, VERSION, DataFrames, FrameType, decode_frame, encode_frame, frame_builder, peek_version,
)
from .handshake import (
    MAX_VERSION, MIN_VERSION, NONCE_SIZE, decode_hello, encode_hello, session_id,
    versions_compatible,
)
from .receiver import Receiver, decode_sack, encode_sack
from .rtt import RttEstimator
from .sender import Sender
from .state import ConnState, Input, StateMachine

# Frames with the same unknown version byte before it is reported (one may be noise).
VERSION_REPORT_AFTER = 3

_HELLO = int(FrameType.HELLO)
_DATA = int(FrameType.DATA)
_ACK = int(FrameType.ACK)
_PING = int(FrameType.PING)
_CLOSE = int(FrameType.CLOSE)
_NOT_FRAGMENT_FLAGS = 0xFFFF & ~(BEGIN | END)  # any other flag bit: not the fast path
_unpack_header = HEADER.unpack_from
_checksum = xxhash.xxh3_64_intdigest


class _Attempt:
    """A handshake in progress."""

    __slots__ = ("nonce", "peer_nonce", "peer_address", "reply", "refused")

    def __init__(self, nonce: bytes, peer_address: Hashable | None) -> None:
        self.nonce = nonce  # ours, fresh for this attempt
        self.peer_nonce: bytes | None = None  # the latest the peer announced
        self.peer_address = peer_address  # where that announcement came from
        self.reply = False  # answer the peer's HELLO at the next chance
        self.refused: set = set()  # (peer nonce, reason) already reported


class _Session:
    """What a completed handshake produced."""

    __slots__ = (
        "id", "nonce", "peer_nonce", "peer_node", "peer_address", "mtu", "max_payload",
        "sealer", "opener", "sender", "receiver", "last_received", "ping_at", "hello_reply",
        "peer_confirmed",
    )


class Connection:
    """The reliable, authenticated message stream to one peer over one link."""

    def __init__(self, config: ConnectionConfig) -> None:
        config.validate()
        self.config = config
        self.counters = Counters()
        self._sm = StateMachine()
        self._key = auth.stretch_secret(config.secret) if config.secret is not None else None
        self._events: deque = deque()  # (event, receiver to release its frames to, or None)
        self._attempt: _Attempt | None = None
        self._session: _Session | None = None
        self._hello_at: float | None = None  # next periodic HELLO
        self._carrier = True  # assume carrier until the link layer says otherwise
        self._outbox: list = []  # one-off frames (CLOSE) for the next frames_to_send
        self._acked_reported = 0
        self._foreign_versions: dict[int, int] = {}  # version byte -> frames seen
        info = msgpack_size(config.handshake_info)
        if info > MAX_UPPER_HANDSHAKE:
            raise LocalProtocolError(
                f"handshake_info packs to {info} bytes; the limit is {MAX_UPPER_HANDSHAKE}"
            )

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        return self._sm.state

    @property
    def session_id(self) -> int | None:
        return self._session.id if self._session else None

    @property
    def peer_node(self) -> str | None:
        return self._session.peer_node if self._session else None

    @property
    def max_payload(self) -> int | None:
        """Bytes of message per DATA frame in the current session."""
        return self._session.max_payload if self._session else None

    def rtt(self) -> float | None:
        """Smoothed round-trip time of the current session, seconds."""
        return self._session.sender.rtt.srtt if self._session else None

    # --- API inputs -------------------------------------------------------------------

    def connect(self, *, now: float) -> None:
        """Start looking for the peer (HELLO to broadcast or to the pinned address)."""
        self._sm.transition(Input.CONNECT)
        if self._session is None and self._attempt is None:
            self._new_attempt(now)

    def close(self, reason: str = "disconnected by this node", *, now: float) -> None:
        """Leave the session (telling the peer) and stop connecting."""
        session = self._session
        self._sm.transition(Input.CLOSE)
        if session is not None:
            self._outbox.append((self._build(session, _CLOSE, 0, 0, reason.encode()[:256]),
                                 session.peer_address))
            self._end_session(session, reason)
        self._attempt = None
        self._hello_at = None

    def carrier_changed(self, up: bool, *, now: float) -> None:
        """The link layer saw the interface's carrier go down or come back."""
        self._carrier = up
        self._sm.transition(Input.CARRIER_UP if up else Input.CARRIER_DOWN)
        if not up and self._session is not None:
            self._end_session(self._session, "link carrier lost")
            self._new_attempt(now)
        elif up and self._attempt is not None:
            self._hello_at = now  # say hello at once: the peer may be back

    def mtu_changed(self, mtu: int, *, now: float) -> None:
        """The link layer saw the interface's MTU become `mtu`.

        HELLOs from now on offer it.  A session agreed on a larger MTU ends at once:
        the kernel refuses its frames, and retransmitting them would only wait for a
        dead-peer timeout that never comes (pings are small and still pass).  A new
        session, at the new MTU, is sought at once; the upper layer sees the loss and
        the reconnection as after any other.  A larger MTU leaves the session as it
        is (its frames still fit) and serves the next one.
        """
        offered = min(max(mtu, MIN_MTU), MAX_MTU)  # below MIN_MTU not even a HELLO fits
        self.config = dataclasses.replace(self.config, mtu=offered)
        session = self._session
        if session is not None and mtu < session.mtu:
            self._lose(session, f"interface MTU lowered to {mtu}, below the session's "
                       f"{session.mtu}: reconnecting", now)

    def send_message(self, data, *, now: float) -> int:
        """Queue one message for the peer; returns its number (see MessagesAcknowledged).

        `data` is a buffer, or a list or tuple of buffers (parts: the message is their
        concatenation, cut into frames across part boundaries without joining them).
        It is not copied: frames are cut from it as views, and it may be read again
        for a retransmission.  Do not modify it until MessagesAcknowledged covers it.
        A message larger than max_message is refused (LocalProtocolError) and nothing
        else changes.
        """
        self._sm.transition(Input.SEND)
        if type(data) is list or type(data) is tuple:
            size = sum(memoryview(p).nbytes for p in data)
        else:
            size = memoryview(data).nbytes
        if size > self.config.max_message:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds max_message={self.config.max_message}"
            )
        self.counters.messages_sent += 1
        return self._session.sender.queue_message(data, self._session.max_payload)

    def next_event(self) -> Event | None:
        """The next event for the upper layer, or None."""
        if not self._events:
            return None
        event, receiver = self._events.popleft()
        if receiver is not None and self._session is not None and receiver is self._session.receiver:
            if receiver.release(event.frames):
                receiver.ack_now = True  # tell a stalled sender the window reopened
        return event

    # --- wire input -------------------------------------------------------------------

    def receive_frame(self, data, source: Hashable, *, now: float) -> None:
        """Take one received frame.  Invalid frames are counted and dropped, never raised."""
        session = self._session
        if (session is not None and session.opener is None and source == session.peer_address
                and len(data) >= HEADER_SIZE):
            # Fast path: the bulk of the traffic, an unauthenticated session's DATA frame
            # that passes every check.  The same checks as decode_frame and the path
            # below, in another order and without building a Frame; anything that fails
            # one of them takes the path below, which checks (and counts) in the order
            # docs/PROTOCOL.md gives.
            (version, ftype, flags, volume, sid, seq, ack, window, length, reserved,
             checksum) = _unpack_header(data)
            end = HEADER_SIZE + length
            if (ftype == _DATA and version == VERSION and not flags & _NOT_FRAGMENT_FLAGS
                    and not reserved and sid == session.id and volume == self.config.volume
                    and end <= len(data)):
                view = memoryview(data)
                payload = view[HEADER_SIZE:end]
                if _checksum(payload, _checksum(view[:CHECKSUM_OFFSET])) == checksum:
                    self._on_data_frame(session, seq, flags, ack, window, payload, now)
                    return
        counters = self.counters
        try:
            frame = decode_frame(data)
        except FrameError as err:
            counters.drop(err.reason)
            if err.reason == "bad_version" and self._attempt is not None:
                # The version byte is read before the checksum can be (its layout is the
                # other version's), so one such frame may be noise: report a version only
                # once it has been seen VERSION_REPORT_AFTER times.
                version = peek_version(data)
                seen = self._foreign_versions.get(version, 0) + 1
                self._foreign_versions[version] = seen
                if seen >= VERSION_REPORT_AFTER:
                    self._refuse(None, b"", f"a peer sent protocol version {version}; this "
                                 f"node speaks {MIN_VERSION}..{MAX_VERSION}")
            return
        if frame.volume != self.config.volume:
            counters.wrong_volume += 1
            return
        if frame.type == _HELLO:
            self._on_hello(frame, source, now)
            return
        session = self._session
        if session is None:
            counters.stale_session += 1
            return
        if source != session.peer_address:
            counters.foreign_source += 1
            return
        if frame.session != session.id:
            counters.stale_session += 1
            return
        if session.opener is not None:
            if not frame.flags & AUTHENTICATED:
                counters.unauthenticated += 1
                return
            if not session.opener.verify(frame.fields, frame.payload, frame.trailer):
                counters.bad_mac += 1
                return
        elif frame.flags & AUTHENTICATED:
            counters.unauthenticated += 1  # a MAC where none was agreed: not from our peer
            return
        try:
            self._on_session_frame(session, frame, now)
        except FrameError as err:
            # Authentic and in-session but nonsensical: the peer is broken.  Do not guess.
            counters.drop(err.reason)
            self._lose(session, f"protocol violation by peer: {err.detail}", now)

    def _on_session_frame(self, session: _Session, frame, now: float) -> None:
        counters = self.counters
        counters.frames_received += 1
        session.last_received = now
        if not session.peer_confirmed:
            self._confirm_peer(session)
        ftype = frame.type
        sender = session.sender
        if ftype == _DATA:
            if frame.ack > sender.snd_una or frame.ack + frame.window > sender.right_edge:
                sender.on_ack(frame.ack, frame.window, (), now)  # skipped: nothing new
            session.receiver.on_data(frame.seq, frame.flags, frame.payload, now)
        elif ftype == _ACK:
            sender.on_ack(frame.ack, frame.window, decode_sack(frame.payload), now)
        elif ftype == _PING:
            sender.on_ack(frame.ack, frame.window, (), now)
            session.receiver.ack_now = True
        elif ftype == _CLOSE:
            reason = bytes(frame.payload).decode("utf-8", "replace") or "no reason given"
            self._lose(session, f"peer closed the connection: {reason}", now)
            return
        if sender.acked_messages > self._acked_reported:
            self._acked_reported = sender.acked_messages
            self._events.append((MessagesAcknowledged(sender.acked_messages), None))

    def _on_data_frame(self, session: _Session, seq: int, flags: int, ack: int, window: int,
                       payload, now: float) -> None:
        """_on_session_frame for a DATA frame, from receive_frame's fast path."""
        self.counters.frames_received += 1
        session.last_received = now
        if not session.peer_confirmed:
            self._confirm_peer(session)
        sender = session.sender
        if ack > sender.snd_una or ack + window > sender.right_edge:
            sender.on_ack(ack, window, (), now)
        try:
            session.receiver.on_data(seq, flags, payload, now)
        except FrameError as err:
            self.counters.drop(err.reason)
            self._lose(session, f"protocol violation by peer: {err.detail}", now)
            return
        if sender.acked_messages > self._acked_reported:
            self._acked_reported = sender.acked_messages
            self._events.append((MessagesAcknowledged(sender.acked_messages), None))

    @staticmethod
    def _confirm_peer(session: _Session) -> None:
        """The peer is connected too: stop repeating our HELLO, and (re)announce our
        window, in case the ACK sent on connecting arrived before the peer completed."""
        session.peer_confirmed = True
        session.receiver.ack_now = True

    def _deliver(self, parts: tuple, frames: int) -> None:
        event = MessageReceived(parts, frames)
        counters = self.counters
        counters.messages_received += 1
        counters.bytes_delivered += sum(map(len, parts))
        self._events.append((event, self._session.receiver))

    # --- handshake --------------------------------------------------------------------

    def _new_attempt(self, now: float) -> None:
        self._attempt = _Attempt(self.config.random_bytes(NONCE_SIZE), self.config.peer_address)
        self._hello_at = now

    def _on_hello(self, frame, source: Hashable, now: float) -> None:
        counters = self.counters
        config = self.config
        pinned = config.peer_address
        session = self._session
        if (pinned is not None and source != pinned) or (
            session is not None and source != session.peer_address
        ):
            counters.foreign_source += 1
            return
        try:
            hello = decode_hello(frame.payload)
        except FrameError as err:
            counters.drop(err.reason)
            return
        state = self._sm.state
        if state is not ConnState.CONNECTING and state is not ConnState.ESTABLISHED:
            return  # not listening: idle or disconnected by the operator
        if hello.node == config.node:
            counters.foreign_source += 1  # our own name: a loop, or an impostor
            return
        counters.frames_received += 1
        if session is not None and hello.nonce == session.peer_nonce:
            if hello.session == session.id:
                if not session.peer_confirmed:
                    self._confirm_peer(session)
            elif hello.echo == session.nonce and not session.peer_confirmed:
                # The peer may have missed our last HELLO: repeat it, until a session
                # frame shows the peer is connected too (else two connected peers would
                # answer each other's HELLOs for ever).
                session.hello_reply = True
            return
        if session is not None and hello.session == session.id:
            # A new nonce from a peer that still holds our session: it is answering a
            # handshake of ours (or a stray), it has not restarted.  Keep the session.
            return
        attempt = self._attempt
        if attempt is None:  # a new nonce while a session runs: the peer restarted
            # Reply-only (no periodic HELLOs): the restarted peer is connecting and
            # sends its own every interval; we answer each.
            attempt = self._attempt = _Attempt(config.random_bytes(NONCE_SIZE), source)
            self._hello_at = None
        if not versions_compatible(hello):
            self._refuse(hello.node, hello.nonce,
                         f"peer {hello.node!r} speaks protocol versions {hello.min_version}.."
                         f"{hello.max_version}; this node speaks {MIN_VERSION}..{MAX_VERSION}")
            return
        if config.peer_node is not None and hello.node != config.peer_node:
            self._refuse(hello.node, hello.nonce,
                         f"node {hello.node!r} is not the configured peer {config.peer_node!r}")
            return
        if hello.auth != (self._key is not None):
            if hello.auth:
                problem = "has a shared secret configured and this node has none"
            else:
                problem = "has no shared secret configured but this node has one"
            self._refuse(hello.node, hello.nonce,
                         f"peer {hello.node!r} {problem}: configure the same secret on both")
            return
        if hello.nonce != attempt.peer_nonce:
            attempt.peer_nonce = hello.nonce
            attempt.peer_address = source
        elif source != attempt.peer_address:
            counters.foreign_source += 1  # a copy of the peer's HELLO from elsewhere
            return
        if hello.echo != attempt.nonce:
            attempt.reply = True  # tell the peer our nonce, echoing theirs
            return
        if self._key is not None and not auth.check_proof(self._key, hello.body, hello.proof):
            self._refuse(hello.node, hello.nonce,
                         f"peer {hello.node!r} failed authentication: it does not hold this "
                         f"node's shared secret")
            return
        self._establish(attempt, hello, source, now)

    def _refuse(self, peer: str | None, peer_nonce: bytes, reason: str) -> None:
        attempt = self._attempt
        key = (peer_nonce, reason)
        if attempt is not None:
            if key in attempt.refused:
                return  # already said for this peer attempt: HELLOs repeat every interval
            attempt.refused.add(key)
        self.counters.handshakes_refused += 1
        self._events.append((HandshakeRefused(peer, reason), None))

    def _establish(self, attempt: _Attempt, hello, source: Hashable, now: float) -> None:
        config = self.config
        old = self._session
        if old is not None:
            self._lose(old, f"peer {hello.node!r} restarted", now, reconnect=False)
        session = _Session()
        session.id = session_id(attempt.nonce, hello.nonce)
        session.nonce = attempt.nonce
        session.peer_nonce = hello.nonce
        session.peer_node = hello.node
        session.peer_address = source
        session.mtu = min(config.mtu, hello.mtu)
        trailer = TRAILER_SIZE if self._key is not None else 0
        session.max_payload = session.mtu - HEADER_SIZE - trailer
        if self._key is not None:
            session.sealer = auth.FrameSealer(auth.direction_key(self._key, attempt.nonce, hello.nonce))
            session.opener = auth.FrameOpener(auth.direction_key(self._key, hello.nonce, attempt.nonce))
        else:
            session.sealer = session.opener = None
        rtt = RttEstimator(config.rto_initial, config.rto_min, config.rto_max)
        session.sender = Sender(rtt, config.send_window, self.counters)
        session.receiver = Receiver(
            capacity=max(config.receive_buffer // session.max_payload, 1),
            max_message_frames=math.ceil(config.max_message / session.max_payload),
            counters=self.counters,
            deliver=self._deliver,
            ack_every=config.ack_every,
            ack_delay=config.ack_delay,
            max_payload=session.max_payload,
        )
        session.receiver.ack_now = True  # announce our window at once
        session.last_received = now
        session.ping_at = now + config.keepalive_interval
        session.hello_reply = True  # let the peer complete its side of the handshake
        session.peer_confirmed = False  # until a session frame arrives from the peer
        self._session = session
        self._attempt = None
        self._hello_at = None
        self._acked_reported = 0
        self._sm.transition(Input.HANDSHAKE_DONE)
        self.counters.handshakes += 1
        self._events.append((Connected(session.id, hello.node, source, session.mtu, hello.info), None))

    def _lose(self, session: _Session, reason: str, now: float, reconnect: bool = True) -> None:
        self._sm.transition(Input.PEER_LOST)
        self._end_session(session, reason)
        if reconnect:
            self._new_attempt(now)

    def _end_session(self, session: _Session, reason: str) -> None:
        self._session = None
        self.counters.sessions_lost += 1
        self._events.append((ConnectionLost(session.id, reason), None))

    def _hello(self, nonce: bytes, echo: bytes | None) -> bytes:
        key = self._key
        payload = encode_hello(
            node=self.config.node, mtu=self.config.mtu, nonce=nonce, echo=echo,
            session=self._session.id if self._session is not None else 0,
            auth=key is not None, info=self.config.handshake_info,
            prove=(lambda body: auth.make_proof(key, body)) if key is not None else None,
        )
        return encode_frame(_HELLO, 0, self.config.volume, 0, 0, 0, 0, payload)

    # --- wire output ------------------------------------------------------------------

    def _build(self, session: _Session, ftype: int, seq: int, flags: int, payload=b"") -> bytearray:
        receiver = session.receiver
        return encode_frame(ftype, flags, self.config.volume, session.id, seq,
                            receiver.rcv_next, receiver.window(), payload, session.sealer)

    def frames_to_send(self, *, now: float, max_frames: int | None = None,
                       in_place: bool = False) -> list:
        """Frames to put on the wire now, as (frame, destination address or None).

        With `in_place`, the DATA frames come unencoded, as one frames.DataFrames
        entry (its items and the function that builds each), for a link that builds
        them straight into its send buffers: the payload is then copied once.  The
        other frames are bytes as always.  The items' payload views stay valid as long
        as send_message's rule for the message's data holds.  `max_frames` counts
        frames, those of a DataFrames entry each.
        """
        if self._sm.state is ConnState.ERROR:
            return []  # terminal: a broken connection must not look alive to the peer
        out = self._outbox
        self._outbox = []
        attempt = self._attempt
        if attempt is not None and self._carrier and (
            attempt.reply or (self._hello_at is not None and now >= self._hello_at)
        ):
            out.append((self._hello(attempt.nonce, attempt.peer_nonce), attempt.peer_address))
            attempt.reply = False
            if self._session is None:  # beside a session, an attempt only replies
                self._hello_at = now + self.config.hello_interval
        session = self._session
        data = 0
        if session is not None:
            data = self._session_frames(session, out, now, max_frames, in_place)
        self.counters.frames_sent += len(out) - 1 + data if in_place and data else len(out)
        return out

    def _session_frames(self, session: _Session, out: list, now: float, max_frames,
                        in_place: bool = False) -> int:
        """Append the session's frames to `out`; return how many DATA frames it sent."""
        dest = session.peer_address
        append = out.append
        if session.hello_reply:
            append((self._hello(session.nonce, session.peer_nonce), dest))
            session.hello_reply = False
        sender = session.sender
        receiver = session.receiver
        volume = self.config.volume
        sid = session.id
        sealer = session.sealer
        limit = max_frames - len(out) if max_frames is not None else 1 << 30
        bytes_sent = 0
        batch = sender.take(now, limit) if limit > 0 else ()
        if batch:
            ack = receiver.rcv_next
            window = receiver.window()
            if in_place:
                append((DataFrames(batch, frame_builder(_DATA, volume, sid, ack, window,
                                                        sealer)), dest))
            else:
                for seq, payload, flags in batch:
                    append((encode_frame(_DATA, flags, volume, sid, seq, ack, window, payload,
                                         sealer), dest))
            for _, payload, _ in batch:
                if type(payload) is tuple:
                    bytes_sent += sum(map(len, payload))
                else:
                    bytes_sent += len(payload)
        self.counters.bytes_sent += bytes_sent
        if batch and not receiver.has_gap():
            receiver.acked()  # the DATA frames carried the cumulative ack
        ack_due = receiver.ack_due
        if receiver.ack_now or (ack_due is not None and now >= ack_due):
            append((self._build(session, _ACK, 0, 0, encode_sack(receiver.sack_ranges())), dest))
            receiver.acked()
            self.counters.acks_sent += 1
        if now >= session.ping_at:
            if session.last_received + self.config.keepalive_interval <= now:
                append((self._build(session, _PING, 0, 0), dest))
                self.counters.pings_sent += 1
                session.ping_at = now + self.config.keepalive_interval
            else:
                session.ping_at = session.last_received + self.config.keepalive_interval
        return len(batch)

    # --- timers -----------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time handle_timer + frames_to_send must run, or None."""
        if self._sm.state is ConnState.ERROR:
            return None
        times = []
        if self._attempt is not None and self._carrier and self._hello_at is not None:
            times.append(self._hello_at)
        session = self._session
        if session is not None:
            times.append(session.ping_at)
            times.append(session.last_received + self.config.dead_peer_timeout)
            sender_timer = session.sender.timer()
            if sender_timer is not None:
                times.append(sender_timer)
            if session.receiver.ack_due is not None:
                times.append(session.receiver.ack_due)
        return min(times) if times else None

    def handle_timer(self, *, now: float) -> None:
        """Act on every timer that has expired by `now`."""
        session = self._session
        if session is None:
            return
        silent = now - session.last_received
        if silent >= self.config.dead_peer_timeout:
            self._lose(session, f"no frame from peer for {silent:.1f} s (dead-peer timeout)", now)
            return
        session.sender.handle_timer(now)


def msgpack_size(value) -> int:
    """Packed size of the upper layers' handshake payload (it must fit in a HELLO)."""
    return len(msgpack.packb(value, use_bin_type=True))
