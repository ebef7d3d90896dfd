"""The HELLO payload codec: round trip, validation, and noise that never crashes it."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol import FrameError
from protocol import auth, handshake
from protocol.frames import MIN_MTU
from protocol.handshake import (
    MAX_VERSION, MIN_VERSION, NONCE_SIZE, decode_hello, encode_hello, session_id,
    versions_compatible,
)

NONCE, ECHO = bytes(range(16)), bytes(range(100, 116))
KEY = auth.stretch_secret(b"a shared secret")


def valid_body(**changes) -> dict:
    body = {"versions": [1, 1], "node": "alpha", "mtu": 1500, "nonce": NONCE, "echo": ECHO,
            "session": 0x01020304, "auth": False, "info": {"size": 123}}
    body.update(changes)
    return body


def pack(body, proof=None) -> bytes:
    return msgpack.packb([msgpack.packb(body, use_bin_type=True), proof], use_bin_type=True)


@pytest.mark.parametrize("echo", [None, ECHO])
@pytest.mark.parametrize("secret", [False, True])
def test_round_trip(echo, secret):
    prove = (lambda body: auth.make_proof(KEY, body)) if secret else None
    payload = encode_hello(node="alpha", mtu=9000, nonce=NONCE, echo=echo, session=77,
                           auth=secret, info={"gen": [1, 2]}, prove=prove)
    for buffer in (payload, bytearray(payload), memoryview(payload)):
        hello = decode_hello(buffer)
        assert (hello.min_version, hello.max_version) == (MIN_VERSION, MAX_VERSION)
        assert (hello.node, hello.mtu, hello.nonce, hello.echo, hello.session, hello.auth) == (
            "alpha", 9000, NONCE, echo, 77, secret)
        assert hello.info == {"gen": [1, 2]}
        if secret and echo is not None:
            assert auth.check_proof(KEY, hello.body, hello.proof)
        else:
            assert hello.proof is None  # a proof only makes sense once both nonces are known


def test_unknown_extra_fields_are_tolerated():
    """A later version may add fields; version 1 must still read the ones it knows."""
    hello = decode_hello(pack(valid_body(future={"x": 1})))
    assert hello.node == "alpha"


@pytest.mark.parametrize("change", [
    {"versions": [1]}, {"versions": [1, 2, 3]}, {"versions": "1..1"}, {"versions": [1, 256]},
    {"versions": [-1, 1]}, {"versions": [True, 1]}, {"versions": [1.0, 1]},
    {"node": ""}, {"node": "x" * 65}, {"node": b"alpha"}, {"node": None},
    {"mtu": 575}, {"mtu": MIN_MTU - 1}, {"mtu": 65536}, {"mtu": "1500"}, {"mtu": True},
    {"nonce": bytes(15)}, {"nonce": bytes(17)}, {"nonce": "n" * 16}, {"nonce": None},
    {"echo": bytes(15)}, {"echo": "e" * 16},
    {"session": -1}, {"session": 2**32}, {"session": "1"}, {"session": None}, {"session": False},
    {"auth": 1}, {"auth": None},
], ids=repr)
def test_bad_fields_are_malformed(change):
    with pytest.raises(FrameError) as info:
        decode_hello(pack(valid_body(**change)))
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("missing", ["versions", "node", "mtu", "nonce", "session", "auth"])
def test_missing_fields_are_malformed(missing):
    body = valid_body()
    del body[missing]
    with pytest.raises(FrameError) as info:
        decode_hello(pack(body))
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("payload", [
    b"", b"\x90", msgpack.packb([b"x"]), msgpack.packb([b"\xc1", None]),
    msgpack.packb(["not bytes", None]), msgpack.packb([msgpack.packb([1, 2]), None]),
    msgpack.packb([msgpack.packb(valid_body()), "proof as text"]),
    msgpack.packb([msgpack.packb(valid_body()), None]) + b"trailing",
    msgpack.packb({"a": 1}), b"\xdd\xff\xff\xff\xff",
], ids=repr)
def test_structurally_broken_payloads_are_malformed(payload):
    with pytest.raises(FrameError) as info:
        decode_hello(payload)
    assert info.value.reason == "malformed"


def test_names_up_to_64_bytes_of_utf8():
    assert decode_hello(pack(valid_body(node="é" * 32))).node == "é" * 32  # 64 bytes
    with pytest.raises(FrameError):
        decode_hello(pack(valid_body(node="é" * 33)))


def test_version_ranges_must_overlap():
    def hello(lo, hi):
        return decode_hello(pack(valid_body(versions=[lo, hi])))
    assert versions_compatible(hello(MIN_VERSION, MAX_VERSION))
    assert versions_compatible(hello(0, 200))
    assert not versions_compatible(hello(9, 9))
    assert not versions_compatible(hello(0, MIN_VERSION - 1)) or MIN_VERSION == 0


def test_encode_hello_sends_this_nodes_version_range(monkeypatch):
    monkeypatch.setattr(handshake, "MIN_VERSION", 9)
    monkeypatch.setattr(handshake, "MAX_VERSION", 9)
    hello = decode_hello(encode_hello(node="x", mtu=1500, nonce=NONCE, echo=None, session=0,
                                      auth=False, info=None))
    assert (hello.min_version, hello.max_version) == (9, 9)


def test_session_id_is_symmetric_nonzero_and_differs_per_nonce_pair():
    assert session_id(NONCE, ECHO) == session_id(ECHO, NONCE)
    assert session_id(NONCE, ECHO) != 0
    ids = {session_id(bytes([i]) * 16, ECHO) for i in range(200)}
    assert len(ids) == 200


# --- noise ----------------------------------------------------------------------------

MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=70) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_frame_error(data):
    try:
        decode_hello(data)
    except FrameError as err:
        assert err.reason == "malformed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.binary(max_size=20), MSGPACK_VALUES))
def test_random_body_bytes_decode_or_raise_frame_error(body, proof):
    try:
        decode_hello(msgpack.packb([body, proof], use_bin_type=True))
    except FrameError as err:
        assert err.reason == "malformed"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["versions", "node", "mtu", "nonce", "echo", "session",
                                        "auth", "info", "other"]), MSGPACK_VALUES, max_size=9),
       st.booleans(), MSGPACK_VALUES)
def test_any_msgpack_body_decodes_or_raises_frame_error(changes, start_valid, proof):
    body = valid_body(**changes) if start_valid else changes
    try:
        payload = pack(body, proof)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack: cannot come off the wire either
    try:
        hello = decode_hello(payload)
    except FrameError as err:
        assert err.reason == "malformed"
    else:
        assert isinstance(hello.node, str) and isinstance(hello.nonce, bytes)
        assert isinstance(hello.mtu, int) and isinstance(hello.auth, bool)
        assert hello.echo is None or len(hello.echo) == NONCE_SIZE


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 10_000))
def test_mutated_valid_hellos_decode_or_raise_frame_error(noise, position):
    payload = bytearray(pack(valid_body(), auth.make_proof(KEY, b"x")))
    position %= len(payload)
    payload[position:position + len(noise)] = noise
    try:
        decode_hello(bytes(payload))
    except FrameError as err:
        assert err.reason == "malformed"
