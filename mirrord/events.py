"""The ``events`` stream: a daemon's state changes as JSON objects, like ``drbdsetup events2``.

    {"type": "exists", "time": "...", "status": {...}}                   first, the state now
    {"type": "change", "time": "...", "changed": {"connection": ["connected", "connecting"]},
     "status": {...}}                                                    then one per change
    {"type": "progress", "time": "...", "percent": 42.0, "bytes_per_s": ..., "eta_s": ...,
     "done_bytes": ..., "total_bytes": ..., "out_of_sync_bytes": ...}   each interval of a resync
    {"type": "keepalive", "time": "..."}                                 after a quiet while

Strategy
--------
Poll, do not hook: :func:`status_events` calls ``get_status()`` (``Engine.status``) once
per interval and compares what an operator or a cluster agent reacts to — role, disk,
connection, the peer's role and disk, the refusal — with the previous poll.  The engine
needs no knowledge of its watchers, a slow reader slows only its own stream, and a change
that comes and goes between two polls is not reported (as with any sampling; the
interval bounds how late a change is seen).  The ``changed`` keys are flat:
``role``, ``disk``, ``connection``, ``peer_role``, ``peer_disk`` (``null`` while there is
no peer), ``refused``.

The stream ends when ``stop`` is set (the daemon stops) or after ``max_lines`` lines.
A client that goes away is noticed only when a line is written to it; ``keepalive``
bounds how long that takes while nothing changes (the control server ends the stream
when a write fails), so an abandoned stream does not keep its thread forever.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

__all__ = ["CHANGE_KEYS", "DEFAULT_INTERVAL", "KEEPALIVE", "status_events", "watched"]

DEFAULT_INTERVAL = 0.5  # seconds between polls of the status
KEEPALIVE = 5.0  # the daemon's streams send a keepalive line after this long without a line
CHANGE_KEYS = ("role", "disk", "connection", "peer_role", "peer_disk", "refused")


def now_iso() -> str:
    """The time now, ISO 8601 in UTC with milliseconds: 2024-05-01T12:00:00.123+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def watched(status: dict) -> dict:
    """The values of a status whose changes make a ``change`` line (CHANGE_KEYS)."""
    peer = status.get("peer")
    if not isinstance(peer, dict):
        peer = {}
    return {"role": status.get("role"), "disk": status.get("disk"),
            "connection": status.get("connection"), "peer_role": peer.get("role"),
            "peer_disk": peer.get("disk"), "refused": status.get("refused")}


def status_events(get_status: Callable[[], dict], *, interval: float = DEFAULT_INTERVAL,
                  stop: threading.Event | None = None, max_lines: int | None = None,
                  keepalive: float | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  timestamp: Callable[[], str] = now_iso) -> Iterator[dict]:
    """Yield the event lines of the status that ``get_status()`` returns, until ``stop``
    is set or ``max_lines`` lines were yielded (see the module docstring).

    Waits ``interval`` seconds between polls (on ``stop`` when given, so that setting it
    ends the stream at once).  ``keepalive`` (seconds, None = never) yields a
    ``{"type": "keepalive"}`` line when no line was yielded for that long.  An exception
    from ``get_status`` propagates: it ends the stream.
    """
    if max_lines is not None and max_lines <= 0:
        return
    sent = 0
    last_line = clock()

    def line(item: dict) -> dict:
        nonlocal sent, last_line
        sent += 1
        last_line = clock()
        return item

    def done() -> bool:
        return (max_lines is not None and sent >= max_lines) or (
            stop is not None and stop.is_set())

    if stop is not None and stop.is_set():
        return
    status = get_status()
    before = watched(status)
    yield line({"type": "exists", "time": timestamp(), "status": status})
    if done():
        return
    while True:
        if stop is not None:
            if stop.wait(interval):
                return
        elif interval > 0:
            time.sleep(interval)
        status = get_status()
        after = watched(status)
        changed = {key: [before[key], after[key]] for key in CHANGE_KEYS
                   if before[key] != after[key]}
        before = after
        if changed:
            yield line({"type": "change", "time": timestamp(), "changed": changed,
                        "status": status})
            if done():
                return
        sync = status.get("sync")
        if isinstance(sync, dict):
            yield line({"type": "progress", "time": timestamp(),
                        **{k: v for k, v in sync.items() if k not in ("type", "time")},
                        "out_of_sync_bytes": status.get("out_of_sync_bytes")})
            if done():
                return
        if keepalive is not None and clock() - last_line >= keepalive:
            yield line({"type": "keepalive", "time": timestamp()})
            if done():
                return
        if done():
            return
