"""Settings of one connection, with their defaults and the reason for each.

All times are seconds.  `validate()` raises ConfigError naming the field; the daemon's
own config layer maps its keys onto these fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from .errors import ConfigError
from .frames import MAX_MTU, MIN_MTU

# HELLO frames go out before the MTU is agreed, so they must fit the smallest MTU; the
# upper layers' handshake payload gets what is left after our own fields.
MAX_UPPER_HANDSHAKE = 768

DEFAULT_HELLO_INTERVAL = 0.1  # reconnect within a few tenths of a second of carrier return
DEFAULT_KEEPALIVE_INTERVAL = 0.25  # ping after this much silence from the peer
DEFAULT_DEAD_PEER_TIMEOUT = 2.0  # declare the peer dead after this much silence
DEFAULT_RTO_INITIAL = 0.05  # before any RTT sample: generous for a Python peer
DEFAULT_RTO_MIN = 0.01  # see rtt.GRANULARITY: a Python peer can stall a few ms
DEFAULT_RTO_MAX = 1.0  # backoff cap: beyond this the dead-peer timeout decides
DEFAULT_ACK_DELAY = 0.0005  # longest an in-order frame waits for a batched ack
DEFAULT_ACK_EVERY = 32  # in-order frames per ack: one ack per ~288 KB at MTU 9000
DEFAULT_SEND_WINDOW = 2048  # frames in flight: ~18 MB at MTU 9000, many RTTs of a 2 GB/s link
DEFAULT_RECEIVE_BUFFER = 32 << 20  # bytes buffered per connection; the frame window is
# derived from it at handshake, when the payload size per frame is known
DEFAULT_MAX_MESSAGE = 8 << 20  # largest upper-layer message (a 4 MiB write + headroom)


@dataclass
class ConnectionConfig:
    """What one end of a link needs to know to connect and carry messages."""

    node: str  # this node's name, sent in HELLO
    volume: int  # volume id in every frame header (0 .. 2**32-1)
    mtu: int = 1500  # this side's interface MTU = largest frame it can receive
    peer_node: str | None = None  # expected peer name; None accepts any other name
    peer_address: Hashable | None = None  # pinned peer address (MAC); None = discover
    secret: bytes | None = None  # shared secret; None = no authentication
    handshake_info: Any = None  # msgpack-able payload the upper layers exchange
    hello_interval: float = DEFAULT_HELLO_INTERVAL
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    dead_peer_timeout: float = DEFAULT_DEAD_PEER_TIMEOUT
    rto_initial: float = DEFAULT_RTO_INITIAL
    rto_min: float = DEFAULT_RTO_MIN
    rto_max: float = DEFAULT_RTO_MAX
    ack_delay: float = DEFAULT_ACK_DELAY
    ack_every: int = DEFAULT_ACK_EVERY
    send_window: int = DEFAULT_SEND_WINDOW
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER
    max_message: int = DEFAULT_MAX_MESSAGE
    random_bytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    def validate(self) -> None:
        """Raise ConfigError for the first field that is out of range."""
        if not self.node or len(self.node.encode()) > 64:
            raise ConfigError("node", "must be 1 to 64 bytes of UTF-8")
        if self.peer_node is not None and (not self.peer_node or self.peer_node == self.node):
            raise ConfigError("peer_node", "must be a name other than this node's")
        if not 0 <= self.volume <= 0xFFFFFFFF:
            raise ConfigError("volume", "must fit in 32 bits")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ConfigError("mtu", f"must be between {MIN_MTU} and {MAX_MTU}")
        if self.secret is not None and len(self.secret) < 8:
            raise ConfigError("secret", "must be at least 8 bytes")
        for name in ("hello_interval", "keepalive_interval", "dead_peer_timeout",
                     "rto_initial", "rto_min", "rto_max", "ack_delay"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be a positive number of seconds")
        if self.rto_min > self.rto_max:
            raise ConfigError("rto_min", "must not exceed rto_max")
        if self.dead_peer_timeout <= self.keepalive_interval:
            raise ConfigError("dead_peer_timeout", "must be longer than keepalive_interval")
        if self.ack_every < 1:
            raise ConfigError("ack_every", "must be at least 1")
        if self.send_window < 1:
            raise ConfigError("send_window", "must be at least 1 frame")
        if self.max_message < 1:
            raise ConfigError("max_message", "must be at least 1 byte")
        if self.receive_buffer < 2 * self.max_message:
            # A message must fit in the receive window with room to spare, or a sender
            # waiting for window space and a receiver waiting for the message's end
            # would wait for each other forever.
            raise ConfigError(
                "receive_buffer",
                f"{self.receive_buffer} bytes cannot hold two messages of "
                f"max_message={self.max_message} bytes",
            )
