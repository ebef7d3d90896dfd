"""The namespace harness itself: topology, hub behaviour, teardown."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import netns

pytestmark = pytest.mark.netns

# A test EtherType (the other IEEE local experimental one), so the harness
# tests do not depend on anything the protocol sends.
TEST_ETHERTYPE = 0x88B6
FRAMES = 20
# Frames cross a veth in microseconds; 1 s of polling is a generous bound.
RECV_DEADLINE_S = 1.0
# How long to watch for frames that must NOT arrive.
NEGATIVE_WAIT_S = 0.2


def _raw_socket(group, ns: str, ifname: str) -> socket.socket:
    """A plain AF_PACKET socket inside ``ns`` that sees every frame of our type."""
    with group.enter(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.bind((ifname, TEST_ETHERTYPE))
    sock.setblocking(False)
    return sock


def _collect(sock: socket.socket, want: int, tag: bytes,
             deadline_s: float = RECV_DEADLINE_S) -> list[bytes]:
    """Frames containing ``tag`` until ``want`` arrived or the deadline passed."""
    got: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < deadline:
        try:
            frame = sock.recv(2048)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        if tag in frame:
            got.append(frame)
    return got


def _frame(dst: bytes, src: bytes, body: bytes) -> bytes:
    return dst + src + TEST_ETHERTYPE.to_bytes(2, "big") + body


def _link(ns: str, ifname: str) -> dict:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def test_pair_is_two_namespaces_joined_by_an_up_veth(netns_pair):
    p = netns_pair
    assert p.ns_a != p.ns_b and p.namespaces == [p.ns_a, p.ns_b]
    for ns in p.namespaces:
        assert netns.netns_exists(ns)
        assert ns in netns.created_namespaces()
        assert netns._PID_TAG in ns  # unique to this run
        ifname = p.ifname(ns)
        assert len(ifname) <= netns.IFNAMSIZ_MAX
        link = _link(ns, ifname)
        assert "UP" in link["flags"] and "LOWER_UP" in link["flags"]
        assert link["mtu"] == 1500
        assert bytes.fromhex(link["address"].replace(":", "")) == p.mac(ns)
        assert len(p.mac(ns)) == 6
    assert p.mac_a != p.mac_b
    assert p.peer(p.ns_a) == p.ns_b
    # run() executes inside the namespace: only lo and our veth are there.
    out = p.run(p.ns_a, ["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert p.if_a in out and p.if_b not in out and len(out.splitlines()) == 2


@pytest.mark.parametrize("netns_pair", [9000], indirect=True)
def test_pair_fixture_takes_an_mtu(netns_pair):
    assert netns_pair.mtu == 9000
    assert _link(netns_pair.ns_b, netns_pair.if_b)["mtu"] == 9000


def test_pair_factory_and_distinct_ifindex(netns_pair_factory):
    fast = netns_pair_factory(mtu=9000)
    natural = netns_pair_factory(mtu=1500, distinct_ifindex=False)
    assert _link(fast.ns_a, fast.if_a)["mtu"] == 9000
    assert _link(fast.ns_a, fast.if_a)["ifindex"] != _link(fast.ns_b, fast.if_b)["ifindex"]
    # Fresh namespaces number their first interface alike: both ends are 2.
    assert _link(natural.ns_a, natural.if_a)["ifindex"] == _link(natural.ns_b, natural.if_b)["ifindex"]
    assert not set(fast.namespaces) & set(natural.namespaces)


def test_set_link_takes_one_end_down_and_up(netns_pair):
    p = netns_pair
    p.set_link(p.ns_a, False)
    assert "UP" not in _link(p.ns_a, p.if_a)["flags"]
    assert "NO-CARRIER" in _link(p.ns_b, p.if_b)["flags"]
    p.set_link(p.ns_a, True)
    assert "LOWER_UP" in _link(p.ns_b, p.if_b)["flags"]


def test_close_stops_processes_and_deletes_namespaces():
    if netns.unusable_reason():
        pytest.skip(netns.unusable_reason())
    pair = netns.make_pair()
    # A shell that forks a child: close() must stop the whole process group.
    proc = pair.popen(pair.ns_a, ["sh", "-c", "sleep 60 & sleep 60; wait"])
    names = list(pair.namespaces)
    time.sleep(0.05)
    started = time.monotonic()
    pair.close()
    assert proc.poll() is not None
    assert time.monotonic() - started < 3.0  # SIGTERM was enough: no kill timeout
    assert not any(netns.netns_exists(ns) for ns in names)
    assert not set(names) & set(netns.created_namespaces())
    pair.close()  # idempotent


def test_context_manager_deletes_namespaces_when_the_body_raises():
    if netns.unusable_reason():
        pytest.skip(netns.unusable_reason())
    names: list[str] = []
    with pytest.raises(RuntimeError, match="body failed"):
        with netns.make_pair() as pair:
            names.extend(pair.namespaces)
            raise RuntimeError("body failed")
    assert names and not any(netns.netns_exists(ns) for ns in names)


def test_run_and_popen_refuse_foreign_namespaces(netns_pair):
    with pytest.raises(ValueError):
        netns_pair.run("rtA", ["true"])
    with pytest.raises(ValueError):
        netns_pair.popen("not-ours", ["true"])


@pytest.mark.parametrize("hub", [True, "no-learning"])
def test_hub_floods_frames_so_a_spoofer_cannot_steal_them(netns_segment, hub):
    """C sends with B's source MAC; A's frames to B must still reach B.

    hub=True is the bridge-wide ``ageing_time 0``; "no-learning" is per-port
    ``learning off``.  Both must leave the forwarding table empty and flood
    every frame to every port.
    """
    seg = netns_segment(3, hub=hub)
    a, b, c = seg.members
    sa, sb, sc = (_raw_socket(seg, m.ns, m.ifname) for m in seg.members)
    try:
        for i in range(FRAMES):
            sc.send(_frame(b"\xff" * 6, b.mac, b"spoof%d" % i))
        assert len(_collect(sa, FRAMES, b"spoof")) == FRAMES  # the spoof did go out
        assert seg.fdb() == []  # ...and the bridge learned nothing from it
        for i in range(FRAMES):
            sa.send(_frame(b.mac, a.mac, b"a-to-b%d" % i))
        assert len(_collect(sb, FRAMES, b"a-to-b")) == FRAMES
        # Flooded like a hub: the third port saw the unicast frames too.
        assert len(_collect(sc, FRAMES, b"a-to-b")) == FRAMES
        assert seg.fdb() == []
    finally:
        for s in (sa, sb, sc):
            s.close()


def test_learning_bridge_is_misled_by_a_spoofed_source(netns_segment):
    """The control case: why the hub setting is needed at all."""
    seg = netns_segment(3, hub=False)
    a, b, c = seg.members
    sa, sb, sc = (_raw_socket(seg, m.ns, m.ifname) for m in seg.members)
    try:
        sc.send(_frame(b"\xff" * 6, b.mac, b"spoof"))
        assert _collect(sa, 1, b"spoof")
        learned = {e["mac"]: e["ifname"] for e in seg.fdb()}
        assert learned.get(b.mac.hex(":")) == c.port  # B's MAC now points at C
        for i in range(FRAMES):
            sa.send(_frame(b.mac, a.mac, b"a-to-b%d" % i))
        assert len(_collect(sc, FRAMES, b"a-to-b")) == FRAMES  # stolen by C
        # ...and B got nothing (C's frames all arrived first, so a short wait
        # is enough to show nothing else is coming).
        assert _collect(sb, 1, b"a-to-b", deadline_s=NEGATIVE_WAIT_S) == []
    finally:
        for s in (sa, sb, sc):
            s.close()


INNER_CONFTEST = """
import importlib.util, sys
sys.path.insert(0, {tests!r})
spec = importlib.util.spec_from_file_location("outer_conftest", {conftest!r})
outer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outer)
_netns_safety_net = outer._netns_safety_net
netns_pair = outer.netns_pair
"""

INNER_TESTS = """
import netns

def _record(names):
    with open({record!r}, "a") as f:
        f.write("\\n".join(names) + "\\n")

def test_body_fails(netns_pair):
    _record(netns_pair.namespaces)
    assert False, "deliberate failure"

def test_forgets_to_close():
    pair = netns.make_pair()  # never closed: the session safety net must catch it
    _record(pair.namespaces)
"""


def test_fixture_teardown_runs_after_a_failing_body_and_the_safety_net_catches_leaks(tmp_path):
    """Run an inner pytest session whose tests fail and leak, then look for leftovers."""
    if netns.unusable_reason():
        pytest.skip(netns.unusable_reason())
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    record = tmp_path / "names.txt"
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST.format(
        tests=tests_dir, conftest=os.path.join(tests_dir, "conftest.py")))
    (inner / "test_inner.py").write_text(INNER_TESTS.format(record=str(record)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(inner), str(inner)],
        capture_output=True, text=True, timeout=60, cwd=str(inner),
    )
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    # The leak was caught by the session fixture (which warns), not only atexit.
    assert "deleted namespaces left behind by tests" in proc.stdout, proc.stdout
    names = record.read_text().split()
    assert len(names) == 4
    assert not any(netns.netns_exists(ns) for ns in names), names
