"""mirrord's replication-link protocol, sans-IO (see docs/PROTOCOL.md).

Bytes in, events and bytes out; time is passed in.  Nothing in this package opens a
socket, reads a clock, sleeps or touches a disk.
"""

from .config import ConnectionConfig
from .connection import Connection
from .counters import DROP_REASONS, Counters
from .errors import ConfigError, FrameError, LocalProtocolError, ProtocolError
from .events import (
    Connected, ConnectionLost, Event, HandshakeRefused, MessageReceived, MessagesAcknowledged,
)
from .frames import HEADER_SIZE, TRAILER_SIZE, VERSION, FrameType
from .state import ConnState, Input

ETHERTYPE = 0x88B5  # IEEE 802 local experimental EtherType

__all__ = [
    "ETHERTYPE", "HEADER_SIZE", "TRAILER_SIZE", "VERSION", "ConfigError", "ConnState",
    "Connected", "Connection", "ConnectionConfig", "ConnectionLost", "Counters",
    "DROP_REASONS", "Event", "FrameError", "FrameType", "HandshakeRefused", "Input",
    "LocalProtocolError", "MessageReceived", "MessagesAcknowledged", "ProtocolError",
]
