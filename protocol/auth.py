"""Peer authentication with a shared secret: handshake proofs and per-frame MACs.

Strategy:
- The configured secret never travels.  Both sides stretch it into a key `K`
  (BLAKE2b, personalised) and prove they hold it by a keyed BLAKE2b over the HELLO body
  they send, which contains both sides' fresh random nonces: a proof is good for one
  handshake only, and a reflected proof fails because the body names the sender first.
- After the handshake, frames are authenticated with Poly1305, used through the
  cryptography package's ChaCha20-Poly1305 AEAD (see the note above FrameSealer).  That
  is Poly1305 with a fresh one-time key per frame (derived from the nonce), which the
  bare MAC would not give us, and it measured 2-5x cheaper than keyed BLAKE2b per 9 KB
  frame (bench/mac_cost.py).
- Each direction of each session has its own key, derived from K and both nonces, so
  the per-direction frame counter alone is a unique AEAD nonce.

What this does not do: encrypt (a dedicated cable is assumed private; integrity and
peer identity are the goal), or keep a replay window: a replayed frame of the current
session is a duplicate the reliable stream drops, and frames of any other session carry
another key.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .frames import TAG_SIZE, TRAILER_COUNTER, TRAILER_SIZE

PROOF_SIZE = 16  # 128-bit proofs: forging one is as hard as guessing the key
_KEY_SIZE = 32
_NONCE_PAD = bytes(4)  # AEAD nonces are 12 bytes: 4 zero bytes + the 8-byte counter


def stretch_secret(secret: bytes) -> bytes:
    """The 32-byte key both sides derive from the configured secret."""
    return hashlib.blake2b(secret, digest_size=_KEY_SIZE, person=b"mirrord-psk").digest()


def make_proof(key: bytes, body: bytes) -> bytes:
    """Proof that the sender of `body` holds `key` (body contains both nonces)."""
    return hashlib.blake2b(body, key=key, digest_size=PROOF_SIZE, person=b"mirrord-proof").digest()


def check_proof(key: bytes, body: bytes, proof) -> bool:
    """Constant-time check of a peer's proof."""
    if not isinstance(proof, bytes) or len(proof) != PROOF_SIZE:
        return False
    return hmac.compare_digest(make_proof(key, body), proof)


def direction_key(key: bytes, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
    """The MAC key for frames sent by the owner of `sender_nonce` in this session."""
    return hashlib.blake2b(
        sender_nonce + receiver_nonce, key=key, digest_size=_KEY_SIZE, person=b"mirrord-frame"
    ).digest()


# The AEAD is used as a MAC over two parts without joining them: the payload is the
# associated data, the header's fields are the "plaintext".  The tag authenticates the
# associated data and the ciphertext; encryption under a fixed key and nonce is a
# bijection, so authenticating the ciphertext authenticates the fields.  The receiver
# recomputes the tag from what it received and compares in constant time.  This saves a
# copy of the payload on each side (measured: bench/mac_cost.py).


class FrameSealer:
    """Makes the MAC trailer of outgoing frames of one direction of one session."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0  # never repeats within a session: it is the AEAD nonce

    def seal(self, fields, payload) -> bytes:
        """The 24-byte trailer: the counter, then the tag over header fields and payload."""
        self._counter += 1
        counter = TRAILER_COUNTER.pack(self._counter)
        return counter + self._aead.encrypt(_NONCE_PAD + counter, fields, payload)[-TAG_SIZE:]


class FrameOpener:
    """Checks the MAC trailer of incoming frames of one direction of one session."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def verify(self, fields, payload, trailer) -> bool:
        """True if `trailer` (counter ‖ tag) authenticates the header fields and payload."""
        counter = bytes(trailer[: TRAILER_COUNTER.size])
        expected = self._aead.encrypt(_NONCE_PAD + counter, bytes(fields), payload)[-TAG_SIZE:]
        return hmac.compare_digest(expected, bytes(trailer[TRAILER_COUNTER.size : TRAILER_SIZE]))
