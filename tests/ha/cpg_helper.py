"""A CPG + quorum client run *inside* a cluster node by tests/ha/test_corosync.py.

It joins a group with ha.cpg.ProcessGroup, watches quorum with ha.quorum.Quorum,
and prints one JSON line per event on stdout:

    {"event": "ready", "nodeid": 1, "pid": 42, "quorate": true}
    {"event": "confchg", "members": [[nodeid, pid, reason], ...], "left": [...], "joined": [...]}
    {"event": "deliver", "nodeid": 2, "pid": 17, "data": "text"}
    {"event": "quorum", "quorate": true}                     (a notification)
    {"event": "quorate", "quorate": true}                    (answer to "quorate")
    {"event": "sent", "count": n}                            (after "send"/"burst")
    {"event": "refused", "message": "..."}                   (send over MAX_MESSAGE_BYTES)
    {"event": "error", "type": "CorosyncUnavailable", "message": "...", "call": "..."}
    {"event": "closed"}                                      (after "leave")
    {"event": "callback-error", "message": "..."}            (re-raised by dispatch)
    {"event": "ok"}                                          (after "echo"/"fail-next")

Commands, one per line on stdin: ``send TEXT``, ``burst N PREFIX`` (N messages
PREFIX0..PREFIXn-1, as fast as CPG takes them), ``quorate``, ``echo`` (answer
every "ping:X" with "pong:X" from inside the delivery callback), ``fail-next``
(the next delivery callback raises ValueError), ``leave`` (close cleanly and
exit 0).  EOF on stdin exits too.  The process ends by itself
after LIFETIME_S so a lost test cannot leave it behind.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

from ha.cpg import Membership, ProcessGroup
from ha.errors import CorosyncError
from ha.quorum import Quorum

LIFETIME_S = 120.0
POLL_MS = 200


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def members(items) -> list[list[int]]:
    return [[m.nodeid, m.pid, int(m.reason)] for m in items]


def on_membership(change: Membership) -> None:
    emit(event="confchg", members=members(change.members), left=members(change.left),
         joined=members(change.joined))


# Set by commands: "echo" answers "ping:X" with "pong:X" from inside the
# callback; "fail-next" makes the next delivery callback raise.
FLAGS = {"echo": False, "fail_next": False}
GROUP: list[ProcessGroup] = []


def on_deliver(nodeid: int, pid: int, data: bytes) -> None:
    emit(event="deliver", nodeid=nodeid, pid=pid, data=data.decode())
    if FLAGS["echo"] and data.startswith(b"ping:"):
        GROUP[0].send(b"pong:" + data[5:])  # a send from inside cpg_dispatch
    if FLAGS["fail_next"]:
        FLAGS["fail_next"] = False
        raise ValueError("boom from a callback")


def fail(exc: CorosyncError) -> None:
    emit(event="error", type=type(exc).__name__, message=str(exc), call=exc.call, code=exc.code)


def command(group: ProcessGroup, quorum: Quorum, line: str) -> str | None:
    """Run one stdin command; "closed" once the group was left."""
    cmd, _, arg = line.partition(" ")
    if cmd == "send":
        try:
            group.send(arg.encode())
        except ValueError as exc:  # over MAX_MESSAGE_BYTES
            emit(event="refused", message=str(exc))
            return None
        emit(event="sent", count=1)
    elif cmd == "burst":
        count, _, prefix = arg.partition(" ")
        for i in range(int(count)):
            group.send(f"{prefix}{i}".encode())
        emit(event="sent", count=int(count))
    elif cmd == "echo":
        FLAGS["echo"] = True
        emit(event="ok")
    elif cmd == "fail-next":
        FLAGS["fail_next"] = True
        emit(event="ok")
    elif cmd == "quorate":
        emit(event="quorate", quorate=quorum.quorate)
    elif cmd == "leave":
        group.close()
        group.close()  # idempotent
        quorum.close()
        emit(event="closed")
        return "closed"
    return None


def main(group_name: str) -> int:
    try:
        group = ProcessGroup(group_name, on_deliver=on_deliver, on_membership=on_membership)
        quorum = Quorum(on_change=lambda q: emit(event="quorum", quorate=q))
    except CorosyncError as exc:
        fail(exc)
        return 3
    GROUP.append(group)
    emit(event="ready", nodeid=group.local_nodeid, pid=group.local_pid, quorate=quorum.quorate)
    poller = select.poll()
    poller.register(group.fileno(), select.POLLIN)
    poller.register(quorum.fileno(), select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN)
    deadline = time.monotonic() + LIFETIME_S
    pending = b""
    try:
        while time.monotonic() < deadline:
            for fd, _mask in poller.poll(POLL_MS):
                if fd == group.fileno():
                    try:
                        group.dispatch()
                    except ValueError as exc:  # raised by on_deliver, handed on by dispatch
                        emit(event="callback-error", message=str(exc))
                elif fd == quorum.fileno():
                    quorum.dispatch()
                else:
                    # Raw reads: a buffered readline() could keep a second command
                    # in Python's buffer while poll() says the pipe is empty.
                    chunk = os.read(sys.stdin.fileno(), 1 << 20)
                    if not chunk:
                        return 0
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if command(group, quorum, line.decode()) == "closed":
                            return 0
    except CorosyncError as exc:
        fail(exc)
        group.close()  # must be safe after corosync died
        quorum.close()
        emit(event="closed")
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
