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


def test_an_error_left_on_the_socket_is_collected_only_when_asked(sockets):
    """Taking B's own interface down leaves ENETDOWN pending on its socket; poll reports
    POLLERR until a recv collects it.  recv_batch(pending_error=False), what the link's
    loop calls when poll said nothing of an error, leaves it; the default collects it."""
    import select

    pair, a, b = sockets
    pair.set_link(pair.ns_b, False)
    pair.set_link(pair.ns_b, True)
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)

    def error_pending() -> bool:
        return any(ev & select.POLLERR for _, ev in poller.poll(0))

    assert error_pending()
    assert b.recv_batch(BATCH, pending_error=False) == []
    assert error_pending() and b.counters["recv_errors"] == 0
    assert b.recv_batch(BATCH) == []
    assert b.counters["recv_errors"] == 1 and not error_pending()


def test_missing_interface_is_reported_by_name(netns_pair):
    with netns_pair.enter(netns_pair.ns_a):
        with pytest.raises(InterfaceNotFound, match="'nosuch0'"):
            PacketSocket("nosuch0")
    with pytest.raises(ValueError):
        PacketSocket("lo", ethertype=0x0100)


def test_constants():
    assert ETHERTYPE == 0x88B5 and BROADCAST == b"\xff" * 6


# ---- send_batch through the PACKET_TX_RING ------------------------------------

import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from mirrord import packet_socket  # noqa: E402

# Enough time for a few thousand jumbo frames to cross the veth and be read.
BULK_DEADLINE_S = 10.0


def _tagged(i: int, size: int) -> bytes:
    """A payload that says which frame it is, the rest random (a stale slot shows)."""
    tag = b"%08d" % i
    return (tag + os.urandom(max(size - len(tag), 0)))[:size] if size >= len(tag) else tag[:size]


def _ring_idle(sock: PacketSocket) -> bool:
    """No slot is left waiting for the kernel (none SEND_REQUEST or WRONG_FORMAT)."""
    ring = sock._tx
    return all(ring.words[off >> 2] in (packet_socket.TP_STATUS_AVAILABLE,
                                        packet_socket.TP_STATUS_SENDING)
               for off in ring.offsets)


@pytest.mark.parametrize("sockets", [1500, 9000], indirect=True)
def test_send_batch_frames_arrive_intact_and_in_order(sockets):
    pair, a, b = sockets
    assert a.tx_ring and "tx_ring=True" in repr(a)
    sizes = [pair.mtu, 0, 1, 63, 64, 1000, pair.mtu - 1, pair.mtu]
    payloads = [_tagged(i, size) for i, size in enumerate(sizes)]
    kinds = [bytes, bytearray, lambda p: memoryview(bytearray(p))]
    batch = [(kinds[i % 3](p), pair.mac_b) for i, p in enumerate(payloads)]
    batch[3] = (batch[3][0], None)  # broadcast
    batch[4] = (batch[4][0], bytearray(pair.mac_b))  # any bytes-like MAC
    assert a.send_batch(batch) == len(batch)
    # send() and send_batch() share the wire in call order.
    assert a.send(b"between", pair.mac_b)
    assert a.send_batch([(b"last", pair.mac_b)]) == 1
    assert a.send_batch([]) == 0
    got = _receive(b, len(payloads) + 2)
    assert [bytes(p) for p, _ in got] == payloads + [b"between", b"last"]
    assert all(src == pair.mac_a for _, src in got)
    assert a.counters["send_dropped"] == a.counters["tx_ring_full"] == 0
    assert _ring_idle(a)


@pytest.mark.parametrize("sockets", [9000], indirect=True)
def test_send_batch_wraps_around_the_ring_many_times(sockets):
    pair, a, b = sockets
    nslots = a._tx.nslots
    assert nslots >= 64
    # Batches of 64, then single batches larger than the whole ring (a full lap
    # inside one call), each payload different: a slot rewritten while the
    # kernel still used it would deliver a wrong or torn frame.
    plan = [64] * (3 * nslots // 64 + 1) + [2 * nslots + 7, 5]
    total = sum(plan)
    got: list = []
    deadline = time.monotonic() + BULK_DEADLINE_S
    i = 0
    for size in plan:
        batch = [(_tagged(i + k, pair.mtu - (i + k) % 97), pair.mac_b) for k in range(size)]
        assert a.send_batch(batch) == size
        i += size
        got += b.recv_batch(4096)
    while len(got) < total and time.monotonic() < deadline:
        more = b.recv_batch(4096)
        got += more
        if not more:
            time.sleep(0.001)
    assert len(got) == total
    for k, (p, src) in enumerate(got):
        assert len(p) == pair.mtu - k % 97 and bytes(p[:8]) == b"%08d" % k, k
    assert a.counters["send_dropped"] == a.counters["tx_ring_full"] == 0
    assert a._tx.head == total % nslots
    assert _ring_idle(a)


def test_send_batch_oversize_payload_or_bad_mac_raises_and_the_ring_carries_on(sockets):
    pair, a, b = sockets
    with pytest.raises(ValueError, match="MTU"):
        a.send_batch([(b"before", pair.mac_b), (bytes(pair.mtu + 1), pair.mac_b),
                      (b"after", pair.mac_b)])
    with pytest.raises(ValueError, match="6 bytes"):
        a.send_batch([(b"before2", pair.mac_b), (b"x", b"\x01\x02")])
    assert _ring_idle(a)
    assert a.send_batch([(b"next", pair.mac_b)]) == 1
    assert [bytes(p) for p, _ in _receive(b, 3)] == [b"before", b"before2", b"next"]


def test_send_batch_falls_back_to_send_when_the_ring_is_unavailable(
        netns_pair_factory, monkeypatch, caplog):
    pair = netns_pair_factory(mtu=1500)

    def no_mmap(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(packet_socket.mmap, "mmap", no_mmap)
    monkeypatch.setattr(packet_socket, "_tx_ring_failure_logged", False)
    with caplog.at_level(logging.WARNING, logger="mirrord.packet_socket"):
        a = _open(pair, pair.ns_a, pair.if_a)
        a2 = _open(pair, pair.ns_a, pair.if_a)
    b = _open(pair, pair.ns_b, pair.if_b)
    plain = _open(pair, pair.ns_a, pair.if_a, tx_ring=False)
    try:
        assert not a.tx_ring and not a2.tx_ring and not plain.tx_ring
        warnings = [r for r in caplog.records if "PACKET_TX_RING" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not per socket
        assert a.send_batch([(b"one", pair.mac_b), (b"two", None)]) == 2
        assert plain.send_batch([(b"three", pair.mac_b)]) == 1
        assert [bytes(p) for p, _ in _receive(b, 3)] == [b"one", b"two", b"three"]
        with pytest.raises(ValueError, match="MTU"):
            a.send_batch([(bytes(pair.mtu + 1), pair.mac_b)])
    finally:
        for s in (a, a2, b, plain):
            s.close()


def test_send_batch_link_down_counts_drops_and_the_ring_survives(sockets):
    pair, a, b = sockets
    pair.set_link(pair.ns_a, False)
    assert a.send_batch([(b"lost%d" % i, pair.mac_b) for i in range(5)]) == 0
    assert a.counters["send_dropped"] == 5
    assert _ring_idle(a)
    pair.set_link(pair.ns_a, True)
    assert a.send_batch([(b"back", pair.mac_b), (b"again", pair.mac_b)]) == 2
    # Nothing queued while the link was down goes out late.
    assert [bytes(p) for p, _ in _receive(b, 3, deadline_s=0.3)] == [b"back", b"again"]


@pytest.mark.parametrize("sockets", [9000], indirect=True)
def test_send_batch_drops_a_frame_the_kernel_refuses(sockets):
    """The MTU shrinks under an open socket: the kernel marks the slot WRONG_FORMAT."""
    pair, a, b = sockets
    pair.run(pair.ns_a, ["ip", "link", "set", "dev", pair.if_a, "mtu", "1500"])
    batch = [(b"small1", pair.mac_b), (bytes(9000), pair.mac_b), (b"small2", pair.mac_b),
             (b"small3", pair.mac_b)]
    assert a.send_batch(batch) == 3
    assert a.counters["tx_wrong_format"] == 1 and a.counters["send_dropped"] == 1
    assert _ring_idle(a)
    assert a.send_batch([(b"small4", pair.mac_b)]) == 1
    assert [bytes(p) for p, _ in _receive(b, 4)] == [b"small1", b"small2", b"small3", b"small4"]


def _slow_qdisc(pair) -> None:
    """A 1 Mbit/s token bucket on alpha's end: every ring slot stays in flight."""
    if shutil.which("tc") is None:
        pytest.skip("no tc")
    tc = ["tc", "qdisc", "add", "dev", pair.if_a, "root", "tbf", "rate", "1mbit",
          "burst", "10kb", "limit", "64mb"]
    if pair.run(pair.ns_a, tc, check=False, capture_output=True).returncode != 0:
        pytest.skip("tbf qdisc unavailable")


@pytest.mark.parametrize("sockets", [9000], indirect=True)
def test_send_batch_waits_for_a_full_ring_then_sends_frame_by_frame(sockets):
    """A slow qdisc keeps every slot in flight (SENDING) past SEND_WAIT_MS."""
    pair, a, b = sockets
    _slow_qdisc(pair)
    nslots = a._tx.nslots
    total = nslots + 8
    start = time.monotonic()
    assert a.send_batch([(_tagged(i, 9000), pair.mac_b) for i in range(total)]) == total
    assert time.monotonic() - start >= packet_socket.SEND_WAIT_MS / 1000
    assert 1 <= a.counters["tx_ring_full"] <= 8  # the tail went out through send()
    assert a.counters["send_dropped"] == 0
    # Removing the qdisc frees what it held: the slots come back and the ring goes on.
    pair.run(pair.ns_a, ["tc", "qdisc", "del", "dev", pair.if_a, "root"])
    deadline = time.monotonic() + RECV_DEADLINE_S
    while time.monotonic() < deadline and any(
            a._tx.words[off >> 2] != packet_socket.TP_STATUS_AVAILABLE for off in a._tx.offsets):
        time.sleep(0.001)
    assert _ring_idle(a)
    b.recv_batch(4096)  # the few frames the bucket let through
    fresh = [b"fresh%d" % i for i in range(5)]
    assert a.send_batch([(p, pair.mac_b) for p in fresh]) == 5
    assert [bytes(p) for p, _ in _receive(b, 5)] == fresh
    assert a.counters["tx_ring_full"] <= 8


# ---- recv_batch through the PACKET_RX_RING --------------------------------------------

import select  # noqa: E402


@pytest.mark.parametrize("rx_ring", [True, False], ids=["rx-ring", "recv"])
@pytest.mark.parametrize("mtu", [1500, 9000])
def test_recv_batch_with_and_without_the_rx_ring_reads_the_same(netns_pair_factory, rx_ring,
                                                                 mtu):
    pair = netns_pair_factory(mtu=mtu)
    a = _open(pair, pair.ns_a, pair.if_a)
    b = _open(pair, pair.ns_b, pair.if_b, rx_ring=rx_ring)
    try:
        assert b.rx_ring is rx_ring
        payloads = [_tagged(i, size) for i, size in
                    enumerate([0, 1, 13, 60, 1000, mtu - 1, mtu] * 3)]
        assert a.send_batch([(p, pair.mac_b) for p in payloads]) == len(payloads)
        got = _receive(b, len(payloads))
        assert [bytes(p) for p, _ in got] == payloads
        assert all(src == pair.mac_a and isinstance(p, bytearray) for p, src in got)
        assert b.recv_batch(BATCH) == []
        assert b.counters["runts"] == b.counters["truncated"] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("sockets", [9000], indirect=True)
def test_the_rx_ring_wraps_around_many_times_and_poll_follows_it(sockets):
    pair, a, b = sockets
    ring = b._rx
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    sent = 0
    got: list = []
    for lap in range(3):
        for size in (ring.nslots // 2, ring.nslots - 5, 7):
            batch = [(_tagged(sent + k, 2000 + (sent + k) % 7000), pair.mac_b)
                     for k in range(size)]
            assert a.send_batch(batch) == size
            sent += size
            deadline = time.monotonic() + BULK_DEADLINE_S
            while len(got) < sent and time.monotonic() < deadline:
                if poller.poll(100):
                    got += b.recv_batch(300)
            assert len(got) == sent
            assert poller.poll(0) == []  # everything read: nothing left to report
    for k, (p, _) in enumerate(got):
        assert len(p) == 2000 + k % 7000 and bytes(p[:8]) == b"%08d" % k, k


def test_a_frame_longer_than_the_rx_slots_is_counted_and_skipped(netns_pair_factory):
    pair = netns_pair_factory(mtu=1500)
    a = _open(pair, pair.ns_a, pair.if_a)
    b = _open(pair, pair.ns_b, pair.if_b)  # slots sized for 1500
    try:
        for ns, ifname in ((pair.ns_a, pair.if_a), (pair.ns_b, pair.if_b)):
            pair.run(ns, ["ip", "link", "set", "dev", ifname, "mtu", "9000"])
        with pair.enter(pair.ns_a):
            big = PacketSocket(pair.if_a)
        try:
            assert big.send(bytes(5000), pair.mac_b)
            assert big.send(b"small", pair.mac_b)
            assert [bytes(p) for p, _ in _receive(b, 1)] == [b"small"]
            assert b.counters["truncated"] == 1
        finally:
            big.close()
    finally:
        a.close()
        b.close()


def test_with_the_rx_ring_a_pending_link_error_is_collected(sockets):
    """The kernel leaves ENETDOWN pending when the link goes down; nobody calls recv
    with a ring, so recv_batch must collect it or poll() would return at once for ever."""
    pair, a, b = sockets
    assert b.rx_ring
    poller = select.poll()
    poller.register(b.fileno(), select.POLLIN)
    pair.set_link(pair.ns_b, False)
    b.recv_batch(BATCH)
    b.recv_batch(BATCH)
    assert b.counters["recv_errors"] >= 1
    assert poller.poll(0) == []
    pair.set_link(pair.ns_b, True)
    deadline = time.monotonic() + RECV_DEADLINE_S
    while not a.send(b"back", pair.mac_b) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [bytes(p) for p, _ in _receive(b, 1)] == [b"back"]


# ---- send_batch(build=): frames built straight into the slots ---------------------------

from protocol.frames import (  # noqa: E402
    DataFrames, FrameType, decode_frame, encode_frame, encode_frame_into, frame_builder,
)


def _specs(n: int, size: int) -> list:
    data = memoryview(os.urandom(size * n + 24))
    specs = [(FrameType.DATA, 0, 7, 9, i + 1, 1, 64, data[i * size:(i + 1) * size], None)
             for i in range(n)]
    # one fragment spanning two parts, as a message given as (header, data) makes
    specs.append((FrameType.DATA, 0, 7, 9, n + 1, 1, 64, (b"h" * 24, data[:size - 24]), None))
    return specs


@pytest.fixture(params=[True, False], ids=["tx-ring", "send"])
def ring_or_send(netns_pair_factory, request):
    """(pair, a, b) at MTU 1500, alpha sending through its TX ring or frame by frame."""
    pair = netns_pair_factory(mtu=1500)
    a = _open(pair, pair.ns_a, pair.if_a, tx_ring=request.param)
    b = _open(pair, pair.ns_b, pair.if_b)
    try:
        assert a.tx_ring is request.param  # the ring was asked for and set up, or not asked
        yield pair, a, b
    finally:
        a.close()
        b.close()


def test_send_batch_builds_frames_in_place(ring_or_send):
    pair, a, b = ring_or_send
    specs = _specs(20, 1400)
    frames = [(spec, pair.mac_b) for spec in specs]
    frames.insert(3, (b"plain bytes", pair.mac_b))  # mixed with ordinary payloads
    assert a.send_batch(frames, encode_frame_into) == len(frames)
    got = [bytes(p) for p, _ in _receive(b, len(frames))]
    expected = [encode_frame(*spec) for spec in specs]
    expected.insert(3, b"plain bytes")
    assert got == expected
    assert decode_frame(got[-1]).payload.tobytes()[:24] == b"h" * 24
    with pytest.raises(TypeError):
        a.send_batch([(specs[0], pair.mac_b)])  # a description needs build=
    if a.tx_ring:
        assert _ring_idle(a)


def test_a_build_that_raises_sends_what_came_before_and_leaves_the_ring_clean(sockets):
    pair, a, b = sockets
    specs = _specs(3, 1000)
    too_big = (FrameType.DATA, 0, 7, 9, 99, 1, 64, bytes(pair.mtu), None)  # + header > MTU
    with pytest.raises(ValueError):
        a.send_batch([(specs[0], pair.mac_b), (specs[1], pair.mac_b), (too_big, pair.mac_b),
                      (specs[2], pair.mac_b)], encode_frame_into)
    assert _ring_idle(a)
    assert a.send_batch([(specs[2], pair.mac_b)], encode_frame_into) == 1
    got = [bytes(p) for p, _ in _receive(b, 3)]
    assert got == [encode_frame(*specs[i]) for i in (0, 1, 2)]


def _data_frames(first_seq: int, payloads: list) -> DataFrames:
    """A DATA batch as Connection.frames_to_send(in_place=True) hands it over."""
    return DataFrames([(first_seq + i, p, 0) for i, p in enumerate(payloads)],
                      frame_builder(FrameType.DATA, 7, 9, 1, 64))


def _encoded(batch: DataFrames) -> list:
    return [encode_frame(FrameType.DATA, flags, 7, 9, seq, 1, 64, payload)
            for seq, payload, flags in batch.items]


def test_send_batch_builds_a_described_batch_of_data_frames(ring_or_send):
    pair, a, b = ring_or_send
    data = memoryview(os.urandom(1400 * 30))
    batch = _data_frames(1, [data[i * 1400:(i + 1) * 1400] for i in range(29)]
                         + [(b"h" * 24, data[:1376])])  # one fragment spanning parts
    frames = [(b"before", pair.mac_b), (batch, pair.mac_b), (b"after", pair.mac_b)]
    assert a.send_batch(frames) == len(batch) + 2
    got = [bytes(p) for p, _ in _receive(b, len(batch) + 2)]
    assert got == [b"before", *_encoded(batch), b"after"]
    if a.tx_ring:
        assert _ring_idle(a)


@pytest.mark.parametrize("sockets", [9000], indirect=True)
def test_a_described_batch_larger_than_a_full_ring_goes_on_frame_by_frame(sockets):
    """Every slot stays in flight (a slow qdisc): the rest of the batch, and the frames
    after it, go out through send().  Removing the qdisc discards what it still holds;
    what got through came in order."""
    pair, a, b = sockets
    _slow_qdisc(pair)
    nslots = a._tx.nslots
    batch = _data_frames(1, [_tagged(i, 8900) for i in range(nslots + 5)])
    assert a.send_batch([(batch, pair.mac_b), (b"tail", pair.mac_b)]) == nslots + 6
    assert 1 <= a.counters["tx_ring_full"] <= 6 and a.counters["send_dropped"] == 0
    pair.run(pair.ns_a, ["tc", "qdisc", "del", "dev", pair.if_a, "root"])
    got = [bytes(p) for p, _ in _receive(b, nslots + 6, deadline_s=0.5)]
    assert got and got == [*_encoded(batch), b"tail"][:len(got)]
