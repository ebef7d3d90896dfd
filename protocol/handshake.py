"""The HELLO message: what it carries, how it is encoded and checked.

The handshake is symmetric (either side may start, both may start at once):
1. Each side, while connecting, sends HELLO{nonce: its fresh random nonce, echo: the
   peer's nonce if it has heard one} every hello interval (to the broadcast address
   until it knows the peer's).
2. On a HELLO from the peer, a side stores the peer's nonce and answers at once with a
   HELLO echoing it; with a shared secret, that HELLO carries a proof over its body.
3. A side is connected when it receives a HELLO whose echo is its own current nonce (and,
   with a secret, whose proof checks): it then knows the peer holds both nonces, and
   answers once more so the peer can complete too.
Every HELLO also names the sender's current session id (0 if none): a connected node
shown a new nonce by a peer that still holds their session knows the peer has not
restarted, and leaves the session alone.
The session id and, with a secret, the per-direction MAC keys derive from both nonces,
so every connection attempt gets a new session and old frames can never be taken for
new ones.

Payload: msgpack [body, proof]; body is msgpack of a map (below) kept as bytes so the
proof covers exactly what was sent.  Everything the peer says is validated here and a
bad HELLO becomes FrameError("malformed"), never a crash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import FrameError
from .frames import MAX_MTU, MIN_MTU, VERSION

# The versions this node can speak.  A peer whose range does not overlap is refused.
MIN_VERSION = VERSION
MAX_VERSION = VERSION
NONCE_SIZE = 16  # 128 random bits: a repeat across attempts is out of the question
_MAX_NODE_NAME = 64


@dataclass(frozen=True, slots=True)
class Hello:
    """A decoded HELLO."""

    min_version: int
    max_version: int
    node: str
    mtu: int
    nonce: bytes
    echo: bytes | None
    session: int  # the sender's current session id, 0 if it has none
    auth: bool
    info: Any
    body: bytes  # the exact bytes the proof covers
    proof: bytes | None


def encode_hello(*, node: str, mtu: int, nonce: bytes, echo: bytes | None, session: int = 0,
                 auth: bool, info: Any, prove=None) -> bytes:
    """The HELLO payload.  `prove(body) -> bytes` adds a proof (only with an echo)."""
    body = msgpack.packb(
        {
            "versions": [MIN_VERSION, MAX_VERSION],
            "node": node,
            "mtu": mtu,
            "nonce": nonce,
            "echo": echo,
            "session": session,
            "auth": auth,
            "info": info,
        },
        use_bin_type=True,
    )
    proof = prove(body) if (prove is not None and echo is not None) else None
    return msgpack.packb([body, proof], use_bin_type=True)


def _field(body: dict, name: str, kind, check=None):
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FrameError("malformed", f"HELLO field {name!r} missing or of the wrong type")
    if check is not None and not check(value):
        raise FrameError("malformed", f"HELLO field {name!r} out of range")
    return value


def decode_hello(payload) -> Hello:
    """Parse and validate a HELLO payload; raise FrameError("malformed") if it is not one."""
    try:
        outer = msgpack.unpackb(bytes(payload), raw=False)
        if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)):
            raise ValueError("not [body, proof]")
        body_bytes, proof = outer
        body = msgpack.unpackb(body_bytes, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as err:
        raise FrameError("malformed", f"HELLO payload is not valid msgpack: {err}") from None
    if not isinstance(body, dict):
        raise FrameError("malformed", "HELLO body is not a map")
    if proof is not None and not isinstance(proof, bytes):
        raise FrameError("malformed", "HELLO proof is not bytes")
    versions = _field(body, "versions", list, lambda v: len(v) == 2)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in versions):
        raise FrameError("malformed", "HELLO field 'versions' out of range")
    echo = body.get("echo")
    if echo is not None and not (isinstance(echo, bytes) and len(echo) == NONCE_SIZE):
        raise FrameError("malformed", "HELLO field 'echo' is not a nonce")
    return Hello(
        min_version=versions[0],
        max_version=versions[1],
        node=_field(body, "node", str, lambda v: 0 < len(v.encode()) <= _MAX_NODE_NAME),
        mtu=_field(body, "mtu", int, lambda v: MIN_MTU <= v <= MAX_MTU),
        nonce=_field(body, "nonce", bytes, lambda v: len(v) == NONCE_SIZE),
        echo=echo,
        session=_field(body, "session", int, lambda v: 0 <= v <= 0xFFFFFFFF),
        auth=_field(body, "auth", bool),
        info=body.get("info"),
        body=body_bytes,
        proof=proof,
    )


def session_id(nonce_a: bytes, nonce_b: bytes) -> int:
    """The session id both sides compute from the two nonces (never 0: HELLO uses 0)."""
    low, high = sorted((nonce_a, nonce_b))
    digest = hashlib.blake2b(low + high, digest_size=4, person=b"mirrord-session").digest()
    return int.from_bytes(digest, "big") or 1


def versions_compatible(hello: Hello) -> bool:
    """True if the peer's version range overlaps ours."""
    return hello.min_version <= MAX_VERSION and MIN_VERSION <= hello.max_version
