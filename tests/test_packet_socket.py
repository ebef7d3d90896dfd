"""mirrord.packet_socket between two (or three) real namespaces."""

from __future__ import annotations

import os
import socket
import time

import pytest

from mirrord.iface import InterfaceNotFound
from mirrord.packet_socket import BROADCAST, ETHERTYPE, PacketSocket

pytestmark = pytest.mark.netns

# Frames cross a veth in microseconds; this bounds every wait.
RECV_DEADLINE_S = 1.0
BATCH = 64


def _open(group, ns: str, ifname: str, **kw) -> PacketSocket:
    with group.enter(ns):
        return PacketSocket(ifname, **kw)


def _receive(sock: PacketSocket, want: int, deadline_s: float = RECV_DEADLINE_S) -> list:
    got: list = []
    deadline = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < deadline:
        batch = sock.recv_batch(BATCH)
        if batch:
            got += batch
        else:
            time.sleep(0.0005)
    return got


def _raw(group, ns: str, ifname: str, ethertype: int) -> socket.socket:
    with group.enter(ns):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        raw.bind((ifname, ethertype))
    return raw


@pytest.fixture
def sockets(netns_pair_factory, request):
    mtu = getattr(request, "param", 1500)
    pair = netns_pair_factory(mtu=mtu)
    a = _open(pair, pair.ns_a, pair.if_a)
    b = _open(pair, pair.ns_b, pair.if_b)
    try:
        yield pair, a, b
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("sockets", [1500, 9000], indirect=True)
def test_full_mtu_frames_round_trip(sockets):
    pair, a, b = sockets
    assert a.mac == pair.mac_a and b.mac == pair.mac_b
    assert a.mtu == b.mtu == pair.mtu
    payloads = [os.urandom(pair.mtu) for _ in range(10)] + [b"", b"x", os.urandom(100)]
    for p in payloads:
        assert a.send(p, pair.mac_b) is True
    got = _receive(b, len(payloads))
    assert [bytes(p) for p, _ in got] == payloads  # in order, payload only
    assert all(src == pair.mac_a for _, src in got)
    assert all(isinstance(p, bytearray) for p, _ in got)
    # ...and back, broadcast, from bytearray and memoryview payloads.
    reply = bytearray(os.urandom(pair.mtu))
    assert b.send(reply) and b.send(memoryview(reply)[:100], None)
    got = _receive(a, 2)
    assert [bytes(p) for p, _ in got] == [bytes(reply), bytes(reply[:100])]
    assert got[0][1] == pair.mac_b


def test_payloads_are_fresh_and_writable_and_the_caller_buffer_is_untouched(sockets):
    pair, a, b = sockets
    original = bytearray(b"A" * 64)
    a.send(original, pair.mac_b)
    a.send(original, pair.mac_b)
    (p1, _), (p2, _) = _receive(b, 2)
    p1[0:4] = b"XXXX"  # the protocol layer mutates in place
    assert bytes(p2) == b"A" * 64 and original == bytearray(b"A" * 64)
    assert p1 is not p2


def test_foreign_ethertype_and_own_frames_are_ignored(sockets):
    pair, a, b = sockets
    raw = _raw(pair, pair.ns_a, pair.if_a, 0x88B6)
    second_a = _open(pair, pair.ns_a, pair.if_a)  # a second socket on A's interface
    try:
        for i in range(5):
            raw.send(pair.mac_b + pair.mac_a + (0x88B6).to_bytes(2, "big") + b"foreign%d" % i)
        a.send(b"ours", pair.mac_b)
        got = _receive(b, 2, deadline_s=0.2)
        assert [bytes(p) for p, _ in got] == [b"ours"]
        # A's own transmission is not looped back to another socket on A.
        assert second_a.recv_batch(BATCH) == []
    finally:
        raw.close()
        second_a.close()


def test_unicast_for_another_mac_is_dropped_in_the_kernel(netns_segment):
    """On a hub segment C sees A's frames to B; its PacketSocket must not."""
    seg = netns_segment(3)
    a, b, c = seg.members
    socks = [_open(seg, m.ns, m.ifname) for m in seg.members]
    sa, sb, sc = socks
    try:
        for i in range(5):
            sa.send(b"to-b%d" % i, b.mac)
        sa.send(b"to-all", None)
        assert [bytes(p) for p, _ in _receive(sb, 6)] == [b"to-b%d" % i for i in range(5)] + [b"to-all"]
        assert [bytes(p) for p, _ in _receive(sc, 6, deadline_s=0.2)] == [b"to-all"]
    finally:
        for s in socks:
            s.close()


def test_recv_batch_is_bounded_and_never_blocks(sockets):
    pair, a, b = sockets
    assert b.recv_batch(BATCH) == []
    for i in range(10):
        a.send(b"%d" % i, pair.mac_b)
    time.sleep(0.01)
    first = b.recv_batch(3)
    rest = _receive(b, 7)
    assert [bytes(p) for p, _ in first + rest] == [b"%d" % i for i in range(10)]
    assert len(first) == 3


def test_oversized_payload_and_bad_mac_are_refused(sockets):
    pair, a, b = sockets
    with pytest.raises(ValueError, match="MTU"):
        a.send(bytes(pair.mtu + 1), pair.mac_b)
    with pytest.raises(ValueError, match="6 bytes"):
        a.send(b"x", b"\x01\x02")
    assert a.send(b"x", bytearray(pair.mac_b))  # any bytes-like MAC will do


def test_link_down_counts_drops_and_the_socket_survives(sockets):
    pair, a, b = sockets
    pair.set_link(pair.ns_a, False)
    assert a.send(b"lost", pair.mac_b) is False
    assert a.counters["send_dropped"] == 1
    b.recv_batch(BATCH)  # B's link lost carrier: no exception either
    pair.set_link(pair.ns_a, True)
    assert a.send(b"back", pair.mac_b) is True
    assert [bytes(p) for p, _ in _receive(b, 1)] == [b"back"]


def test_missing_interface_is_reported_by_name(netns_pair):
    with netns_pair.enter(netns_pair.ns_a):
        with pytest.raises(InterfaceNotFound, match="'nosuch0'"):
            PacketSocket("nosuch0")
    with pytest.raises(ValueError):
        PacketSocket("lo", ethertype=0x0100)


def test_constants():
    assert ETHERTYPE == 0x88B5 and BROADCAST == b"\xff" * 6
