"""The sender's Python cost per DATA frame through PacketSocket.send_batch, without a kernel.

A sender Connection hands its frames (frames_to_send(in_place=True), as mirrord.link
does) to a PacketSocket whose TX ring is a plain bytearray: the "kernel" takes every
slot the moment it is asked.  A receiver Connection in the same process gets the frames
and its acks go back to the sender; only the sender's side is timed (send_message,
frames_to_send, send_batch, ack processing).  1 MiB messages from a pool of 17 (more
than the L2 cache, as in mirrord-link).  Reports the minimum and the median over
rounds: on a shared VM the minimum is the steadier figure.  No namespaces, no root.

    python3 bench/sender_cost.py [--mtu 9000] [--rounds 11] [--messages 100]
    python3 bench/sender_cost.py --repo /path/to/other/checkout   # A/B against a tree

Frames the fake ring captures are copied out for the receiver inside send_batch's
timing (~1 µs a frame at MTU 9000): compare figures from this script only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import types

PEER_MAC = b"\x02\x00\x00\x00\x00\x02"


def load(repo: str):
    sys.path.insert(0, repo)
    from mirrord import packet_socket
    from mirrord.process import tune_allocator
    from protocol.frames import encode_frame_into
    # After the repo's modules: protocol_cost then uses them (already imported).
    from protocol_cost import connected_pair
    return packet_socket, tune_allocator, connected_pair, encode_frame_into


def ring_socket(packet_socket, mtu: int):
    """A PacketSocket over an in-memory TX ring, and the list its "kernel" fills."""
    sock = packet_socket.PacketSocket.__new__(packet_socket.PacketSocket)
    block, blocks, slot = packet_socket._tx_ring_geometry(mtu)
    per_block = block // slot
    ring = types.SimpleNamespace(nslots=blocks * per_block, slot_size=slot, head=0)
    ring.offsets = [(i // per_block) * block + (i % per_block) * slot for i in range(ring.nslots)]
    ring.view = memoryview(bytearray(block * blocks))
    ring.words = ring.view.cast("I")
    sock._tx, sock._headers, sock.mtu, sock.ifname = ring, {}, mtu, "bench"
    sock._build_scratch = None
    sock.counters = {"send_dropped": 0, "tx_ring_full": 0, "tx_wrong_format": 0}
    sock._ethertype, sock.mac = b"\x88\xb5", b"\x02\x00\x00\x00\x00\x01"
    data = packet_socket.TPACKET2_HDRLEN + packet_socket.ETH_HLEN
    taken: list = []

    def flush(queued: int) -> int:  # the kernel: take every queued slot at once
        for i in range(queued):
            off = ring.offsets[(ring.head - queued + i) % ring.nslots]
            length = ring.words[(off >> 2) + 1] - packet_socket.ETH_HLEN
            taken.append(bytes(ring.view[off + data:off + data + length]))
            ring.words[off >> 2] = packet_socket.TP_STATUS_AVAILABLE
        return queued

    sock._tx_flush = flush
    return sock, taken


def frame_count(frames) -> int:
    return sum(len(f.items) if hasattr(f, "items") else 1 for f, _ in frames)


def one_round(mods, mtu: int, messages: int) -> float:
    packet_socket, _, connected_pair, encode_frame_into = mods
    a, b = connected_pair(mtu, None)
    sock, taken = ring_socket(packet_socket, mtu)
    rnd = random.Random(3)
    pool = [memoryview(bytearray(rnd.randbytes(1 << 20))) for _ in range(17)]
    now = 0.0
    frames = 0
    spent = 0.0
    clock = time.perf_counter
    for i in range(messages):
        start = clock()
        a.send_message(pool[i % len(pool)], now=now)
        while True:
            out = a.frames_to_send(now=now, max_frames=256, in_place=True)
            if not out:
                break
            frames += frame_count(out)
            # build= for trees whose DATA frames come as one tuple each (before DataFrames)
            sock.send_batch([(f, PEER_MAC) for f, _ in out], encode_frame_into)
            spent += clock() - start
            for frame in taken:  # the receiver, untimed
                b.receive_frame(frame, "A", now=now)
            taken.clear()
            while b.next_event() is not None:
                pass
            back = b.frames_to_send(now=now)
            start = clock()
            for frame, _ in back:
                a.receive_frame(frame, "B", now=now)
            while a.next_event() is not None:
                pass
        spent += clock() - start
        now += 0.001
    return spent / frames * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose mirrord/ and protocol/ to measure (default: this one)")
    args = p.parse_args(argv)
    mods = load(os.path.abspath(args.repo))
    mods[1]()  # tune_allocator, as the daemon and mirrord-link do
    rounds = [one_round(mods, args.mtu, args.messages) for _ in range(args.rounds)]
    print(json.dumps({"repo": args.repo, "mtu": args.mtu,
                      "sender_us_per_frame_min": round(min(rounds), 3),
                      "sender_us_per_frame_median": round(statistics.median(rounds), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
