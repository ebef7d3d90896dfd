"""The connection state machine: one table, and the rule that enforces it.

Rules (as h11's _state.py states its own):
1. Every change of state goes through `transition()`, which looks up (state, input) in
   TRANSITIONS; there is no other way to change state.
2. An input the table does not list for the current state raises LocalProtocolError and
   leaves the connection in ERROR, from which no input leads out: a caller that breaks
   the protocol's rules must not be able to carry on as if nothing happened.

Inputs come from the API (CONNECT, SEND, CLOSE, CARRIER_*) and from the wire and timers
(HANDSHAKE_DONE, PEER_LOST).  Role logic (primary/secondary) is not here: it belongs to
the replication engine.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError


class ConnState(enum.Enum):
    IDLE = "idle"  # created, not yet asked to connect
    CONNECTING = "connecting"  # sending HELLOs, waiting for a peer
    ESTABLISHED = "established"  # a session exists: messages flow
    CLOSED = "closed"  # the operator disconnected: no HELLOs, peers ignored
    ERROR = "error"  # the caller broke the rules; terminal


class Input(enum.Enum):
    CONNECT = "connect"  # API: start (or restart) looking for the peer
    HANDSHAKE_DONE = "handshake-done"  # wire: the peer proved itself for a new session
    PEER_LOST = "peer-lost"  # wire/timer: dead-peer timeout, CLOSE from peer, restart
    SEND = "send"  # API: queue a message
    CARRIER_DOWN = "carrier-down"  # link layer: the interface lost carrier
    CARRIER_UP = "carrier-up"  # link layer: carrier is back
    CLOSE = "close"  # API: disconnect and stay standalone


S, I = ConnState, Input

TRANSITIONS: dict[tuple[ConnState, Input], ConnState] = {
    (S.IDLE, I.CONNECT): S.CONNECTING,
    (S.IDLE, I.CARRIER_DOWN): S.IDLE,
    (S.IDLE, I.CARRIER_UP): S.IDLE,
    (S.IDLE, I.CLOSE): S.CLOSED,
    (S.CONNECTING, I.CONNECT): S.CONNECTING,
    (S.CONNECTING, I.HANDSHAKE_DONE): S.ESTABLISHED,
    (S.CONNECTING, I.CARRIER_DOWN): S.CONNECTING,
    (S.CONNECTING, I.CARRIER_UP): S.CONNECTING,
    (S.CONNECTING, I.CLOSE): S.CLOSED,
    (S.ESTABLISHED, I.CONNECT): S.ESTABLISHED,
    (S.ESTABLISHED, I.SEND): S.ESTABLISHED,
    (S.ESTABLISHED, I.PEER_LOST): S.CONNECTING,
    (S.ESTABLISHED, I.CARRIER_DOWN): S.CONNECTING,
    (S.ESTABLISHED, I.CARRIER_UP): S.ESTABLISHED,
    (S.ESTABLISHED, I.CLOSE): S.CLOSED,
    (S.CLOSED, I.CONNECT): S.CONNECTING,
    (S.CLOSED, I.CARRIER_DOWN): S.CLOSED,
    (S.CLOSED, I.CARRIER_UP): S.CLOSED,
    (S.CLOSED, I.CLOSE): S.CLOSED,
}
del S, I


class StateMachine:
    """Holds the current state and applies the table."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = ConnState.IDLE

    def transition(self, event: Input) -> ConnState:
        """Apply `event`; raise (and move to ERROR) if the table does not allow it."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            old = self.state
            self.state = ConnState.ERROR
            raise LocalProtocolError(f"{event.value!r} is not allowed in state {old.value!r}")
        self.state = new
        return new
