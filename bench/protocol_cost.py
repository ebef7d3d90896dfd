"""Per-frame CPU cost of the protocol alone: two connections back to back in memory.

No sockets, no namespaces: a sender Connection and a receiver Connection in one process,
1 MiB messages, frames handed across directly, acks handed back.  Reports µs per DATA
frame on each side, median of several rounds; the allocator is tuned as the daemon does
(mirrord.process.tune_allocator).  What protocol/ costs on top of the socket.

    python3 bench/protocol_cost.py [--mtu 9000] [--secret] [--messages 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirrord.process import tune_allocator  # noqa: E402
from protocol import Connection, ConnectionConfig, ConnState  # noqa: E402

ROUNDS = 5


def connected_pair(mtu: int, secret: bytes | None) -> tuple[Connection, Connection]:
    def make(node: str, seed: int) -> Connection:
        rnd = random.Random(seed)
        return Connection(ConnectionConfig(node=node, volume=1, mtu=mtu, secret=secret,
                                           random_bytes=rnd.randbytes))
    a, b = make("alpha", 1), make("beta", 2)
    a.connect(now=0.0)
    b.connect(now=0.0)
    for _ in range(10):  # bounded: the handshake takes two exchanges
        for x, y, source in ((a, b, "A"), (b, a, "B")):
            for frame, _ in x.frames_to_send(now=0.0):
                y.receive_frame(frame, source, now=0.0)
        while a.next_event() is not None or b.next_event() is not None:
            pass
    assert a.state is ConnState.ESTABLISHED and b.state is ConnState.ESTABLISHED
    return a, b


def one_round(mtu: int, secret: bytes | None, messages: int) -> tuple[float, float]:
    a, b = connected_pair(mtu, secret)
    message = memoryview(bytearray(random.Random(3).randbytes(1 << 20)))
    now = 0.0
    frames = 0
    t_send = t_recv = 0.0
    for _ in range(messages):
        a.send_message(message, now=now)
        while True:
            start = time.perf_counter()
            out = a.frames_to_send(now=now, max_frames=64)
            t_send += time.perf_counter() - start
            if not out:
                break
            frames += len(out)
            start = time.perf_counter()
            for frame, _ in out:
                b.receive_frame(frame, "A", now=now)
            while b.next_event() is not None:
                pass
            back = b.frames_to_send(now=now)
            t_recv += time.perf_counter() - start
            start = time.perf_counter()
            for frame, _ in back:
                a.receive_frame(frame, "B", now=now)
            while a.next_event() is not None:
                pass
            t_send += time.perf_counter() - start
        now += 0.001
    return t_send / frames * 1e6, t_recv / frames * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--secret", action="store_true", help="authenticate every frame")
    p.add_argument("--messages", type=int, default=300)
    args = p.parse_args(argv)
    tune_allocator()
    secret = b"benchmark shared secret" if args.secret else None
    rounds = [one_round(args.mtu, secret, args.messages) for _ in range(ROUNDS)]
    print(json.dumps({
        "mtu": args.mtu, "secret": args.secret,
        "sender_us_per_frame": round(statistics.median(r[0] for r in rounds), 2),
        "receiver_us_per_frame": round(statistics.median(r[1] for r in rounds), 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
