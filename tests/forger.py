"""A hostile third box: sniffs the A→B stream on a hub segment and forges frames.

Usage (inside the third namespace): forger.py IFNAME MAC_A MAC_B PER_KIND
Sends PER_KIND frames of each kind to B; prints what it sent as JSON.  Exit 1 if it
saw no authenticated DATA frame from A to B within SNIFF_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol.frames import (  # noqa: E402
    AUTHENTICATED, BEGIN, CHECKSUM, CHECKSUM_OFFSET, END, HEADER, HEADER_SIZE, FrameType,
    encode_frame, frame_checksum,
)

ETHERTYPE = 0x88B5
SNIFF_TIMEOUT = 30.0
PAUSE = 0.002  # between forged frames: spread them over the transfer


def with_checksum(frame: bytearray) -> bytearray:
    """Recompute the checksum as a forger who knows the format would."""
    length = HEADER.unpack_from(frame)[8]
    checksum = frame_checksum(bytes(frame[:CHECKSUM_OFFSET]), bytes(frame[HEADER_SIZE : HEADER_SIZE + length]))
    CHECKSUM.pack_into(frame, CHECKSUM_OFFSET, checksum)
    return frame


def main() -> int:
    ifname, mac_a, mac_b, per_kind = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
    rnd = random.Random(5)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((ifname, ETHERTYPE))
    sock.settimeout(0.5)
    my_mac = sock.getsockname()[4]
    sniffed = None
    deadline = time.monotonic() + SNIFF_TIMEOUT
    while sniffed is None and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        frame = data[14:]
        if (data[:6] == mac_b and data[6:12] == mac_a and len(frame) > HEADER_SIZE
                and frame[1] == FrameType.DATA and HEADER.unpack_from(frame)[2] & AUTHENTICATED):
            sniffed = bytearray(frame)
    if sniffed is None:
        print("no DATA frame from A to B seen", file=sys.stderr)
        return 1
    fields = HEADER.unpack_from(sniffed)
    volume, session, seq = fields[3], fields[4], fields[5]

    def spoofed(frame) -> bytes:  # pretending to be A
        return mac_b + mac_a + struct.pack(">H", ETHERTYPE) + bytes(frame)

    def own(frame) -> bytes:  # from this box's real MAC
        return mac_b + my_mac + struct.pack(">H", ETHERTYPE) + bytes(frame)

    kinds = {
        # the sniffed frame under another session id, checksum made valid again
        "wrong_session": lambda: spoofed(with_checksum(_patch_session(sniffed, session ^ 0x5A5A5A5A))),
        # a perfect copy of a real frame, from the wrong MAC
        "wrong_mac": lambda: own(sniffed),
        # right session, valid checksum, no MAC tag
        "no_tag": lambda: spoofed(encode_frame(FrameType.DATA, BEGIN | END, volume, session,
                                               seq + rnd.randrange(1, 50), 1, 64, b"evil")),
        # right session, valid checksum, a MAC tag that is made up
        "wrong_tag": lambda: spoofed(_with_fake_tag(volume, session, seq + rnd.randrange(1, 50), rnd)),
        # a real frame with one payload byte flipped in transit
        "bad_checksum": lambda: spoofed(_flip(sniffed, rnd)),
        # noise that claims our EtherType
        "garbage": lambda: spoofed(_garbage(rnd)),
    }
    sent = {}
    for name, make in kinds.items():
        for _ in range(per_kind):
            sock.send(make())
            time.sleep(PAUSE)
        sent[name] = per_kind
    print(json.dumps({"session": f"{session:08x}", "sent": sent}))
    return 0


def _patch_session(frame: bytearray, session: int) -> bytearray:
    out = bytearray(frame)
    struct.pack_into(">I", out, 8, session)
    return out


def _with_fake_tag(volume: int, session: int, seq: int, rnd) -> bytearray:
    frame = bytearray(encode_frame(FrameType.DATA, BEGIN | END, volume, session, seq, 1, 64, b"evil"))
    struct.pack_into(">H", frame, 2, BEGIN | END | AUTHENTICATED)
    frame += rnd.randbytes(24)
    return with_checksum(frame)


def _flip(frame: bytearray, rnd) -> bytearray:
    out = bytearray(frame)
    out[HEADER_SIZE + rnd.randrange(len(out) - HEADER_SIZE - 24)] ^= 0x40
    return out


def _garbage(rnd) -> bytes:
    if rnd.random() < 0.5:
        return rnd.randbytes(rnd.randrange(1, HEADER_SIZE))  # too short to be a frame
    return bytes([rnd.choice([0, 2, 7, 255])]) + rnd.randbytes(rnd.randrange(HEADER_SIZE, 1400))


if __name__ == "__main__":
    sys.exit(main())
