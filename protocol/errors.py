"""The protocol package's one error hierarchy.

Two kinds of trouble, kept apart as h11 does:
- `LocalProtocolError`: our own caller used the API wrongly (sent while not connected,
  bad configuration).  It is a bug or a misconfiguration on this node and is raised.
- `FrameError`: bytes from the wire are not a frame we accept.  It carries a `reason`,
  which is also the name of the counter that the connection bumps before it drops the
  frame.  A bad frame is never applied and never crashes the connection.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by protocol/."""


class LocalProtocolError(ProtocolError):
    """This node asked the protocol for something it cannot do in its state."""


class ConfigError(LocalProtocolError):
    """A connection setting is out of range; `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class FrameError(ProtocolError):
    """A received frame was rejected.  `reason` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
