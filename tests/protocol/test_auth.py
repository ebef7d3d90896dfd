"""Handshake proofs and per-direction keys (the frame MAC itself is in test_frames.py)."""

from __future__ import annotations

from protocol import auth
from protocol.handshake import encode_hello

K1 = auth.stretch_secret(b"first secret")
K2 = auth.stretch_secret(b"second secret")
NA, NB = b"A" * 16, b"B" * 16


def body(node: str, nonce: bytes, echo: bytes) -> bytes:
    import msgpack
    payload = encode_hello(node=node, mtu=1500, nonce=nonce, echo=echo, session=0, auth=True,
                           info=None, prove=lambda b: auth.make_proof(K1, b))
    return msgpack.unpackb(payload)[0]


def test_stretched_keys_are_32_bytes_and_secret_specific():
    assert len(K1) == 32 and K1 != K2
    assert auth.stretch_secret(b"first secret") == K1


def test_a_proof_checks_only_with_the_same_key_and_body():
    b = body("alpha", NA, NB)
    proof = auth.make_proof(K1, b)
    assert len(proof) == auth.PROOF_SIZE
    assert auth.check_proof(K1, b, proof)
    assert not auth.check_proof(K2, b, proof)
    assert not auth.check_proof(K1, body("alpha", NA, b"C" * 16), proof)


def test_a_reflected_proof_fails():
    """The peer cannot send our own proof back: the body names the sender and its nonce."""
    ours = body("alpha", NA, NB)
    proof = auth.make_proof(K1, ours)
    theirs = body("beta", NB, NA)
    assert not auth.check_proof(K1, theirs, proof)


def test_malformed_proofs_are_refused_without_raising():
    b = body("alpha", NA, NB)
    for proof in (None, b"", b"x" * 15, b"x" * 17, "text" * 4, 12345):
        assert not auth.check_proof(K1, b, proof)


def test_each_direction_and_session_has_its_own_key():
    keys = {auth.direction_key(K1, NA, NB), auth.direction_key(K1, NB, NA),
            auth.direction_key(K2, NA, NB), auth.direction_key(K1, NA, b"C" * 16)}
    assert len(keys) == 4
    assert all(len(k) == 32 for k in keys)
