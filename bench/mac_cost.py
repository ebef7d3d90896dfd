"""Cost of authenticating one frame: the choice behind protocol/auth.py.

Compares, per frame of payload size 1456 and 8956 bytes (MTU 1500 and 9000 without a
trailer), in one run:
- xxh3-64 (the checksum every frame carries anyway: the baseline),
- keyed BLAKE2b-128 from hashlib,
- bare Poly1305 from cryptography (needs a fresh key per message to be secure),
- ChaCha20-Poly1305 with the frame as associated data (what protocol/ uses: Poly1305
  with a per-frame one-time key derived from the nonce),
- protocol.auth.FrameSealer.seal itself (the above plus building the AAD).

    python3 bench/mac_cost.py          # prints JSON, µs per frame (median of 5 rounds)
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time

import xxhash
from cryptography.hazmat.primitives import poly1305
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from protocol.auth import FrameSealer  # noqa: E402

ROUNDS = 5
FRAMES = 20000


def per_frame(fn, payload) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(FRAMES):
            fn(i, payload)
        times.append((time.perf_counter() - start) / FRAMES * 1e6)
    return round(statistics.median(times), 3)


def main() -> int:
    key = os.urandom(32)
    aead = ChaCha20Poly1305(key)
    sealer = FrameSealer(key)
    fields = os.urandom(36)
    results = []
    for size in (1456, 8956):
        payload = os.urandom(size)
        row = {
            "payload_bytes": size,
            "xxh3_64": per_frame(lambda i, p: xxhash.xxh3_64_intdigest(p), payload),
            "blake2b_keyed": per_frame(lambda i, p: hashlib.blake2b(p, key=key, digest_size=16).digest(), payload),
            "poly1305_bare": per_frame(lambda i, p: poly1305.Poly1305.generate_tag(key, p), payload),
            "chacha20poly1305_aad": per_frame(lambda i, p: aead.encrypt(i.to_bytes(12, "big"), b"", p), payload),
            "frame_sealer": per_frame(lambda i, p: sealer.seal(fields, p), payload),
        }
        results.append(row)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
