"""The replication link as a user relies on it: real processes, real veth, real faults.

Each test makes its own namespaces (tests/netns.py) and runs `mirrord-link` on both ends.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from netns import NetnsPair, NetnsSegment, unusable_reason
from linkproc import LinkProcess, link_argv, REPO

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason())),
]

FAULTS = "loss=0.05,dup=0.01,reorder=0.02,corrupt=0.001"


def _secret(tmp_path, name: str, value: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(value)
    return str(path)


def test_256_mib_over_a_faulty_link_arrives_intact():
    """5% loss, 1% duplication, reordering and 0.1% corruption in both directions."""
    with NetnsPair(mtu=9000) as pair:
        receiver = LinkProcess(pair, pair.ns_b, link_argv(
            pair.if_b, "beta", "--peer-node", "alpha", "--faults", FAULTS + ",seed=2",
            "receive", "--bytes", "256M", "--timeout", "240"))
        sender = LinkProcess(pair, pair.ns_a, link_argv(
            pair.if_a, "alpha", "--peer-node", "beta", "--faults", FAULTS + ",seed=1",
            "send", "--bytes", "256M", "--message-size", "1M", "--timeout", "240"))
        rc_s, sent = sender.finish(timeout=300)
        rc_r, got = receiver.finish(timeout=30)
        assert rc_s == 0, sender.stderr
        assert rc_r == 0, receiver.stderr
        assert got["bytes"] == sent["bytes"] == 256 << 20
        assert got["digest"] == sent["digest"]
        assert got["order_errors"] == 0
        # The faults really happened, and the protocol really repaired them.
        assert sent["faults"]["dropped"] > 0 and sent["faults"]["corrupted"] > 0
        assert sent["counters"]["retransmits"] > 0
        assert got["counters"]["duplicates"] > 0
        assert got["counters"]["corrupt"] > 0
        print("sender", sent["goodput_mb_s"], "MB/s", sent["counters"])
        print("receiver", got["counters"])


def test_carrier_loss_is_seen_at_once_and_the_link_reconnects_with_a_new_session():
    with NetnsPair(mtu=1500) as pair:
        a = LinkProcess(pair, pair.ns_a, link_argv(pair.if_a, "alpha", "monitor",
                                                   "--stats-interval", "0.2"))
        b = LinkProcess(pair, pair.ns_b, link_argv(pair.if_b, "beta", "monitor",
                                                   "--stats-interval", "0.2"))
        first_a = a.wait_event("connected", 10)
        first_b = b.wait_event("connected", 10)
        assert first_a["session"] == first_b["session"]
        assert first_a["peer"] == "beta" and first_b["peer"] == "alpha"

        cut = time.monotonic()
        pair.set_link(pair.ns_a, False)
        lost_a = a.wait_event("lost", 5)
        lost_b = b.wait_event("lost", 5)
        assert lost_a["t"] - cut < 1.0, lost_a
        assert lost_b["t"] - cut < 1.0, lost_b
        assert "carrier" in lost_a["reason"] and "carrier" in lost_b["reason"]

        restored = time.monotonic()
        pair.set_link(pair.ns_a, True)
        again_a = a.wait_event("connected", 5)
        again_b = b.wait_event("connected", 5)
        assert again_a["t"] - restored < 2.0, again_a
        assert again_b["t"] - restored < 2.0, again_b
        assert again_a["session"] == again_b["session"] != first_a["session"]

        # A frame of the old session, from the peer's own MAC, must be dropped as stale.
        old_session = int(first_a["session"], 16)
        forged = 20
        _inject(pair, pair.ns_a, pair.if_a, pair.mac_b,
                [_data_frame(old_session, seq) for seq in range(1, forged + 1)])
        stats = b.wait_line(lambda l: l.get("event") == "stats"
                            and l["counters"]["stale_session"] >= forged, 5)
        assert stats["session"] == again_b["session"]  # and the new session is unharmed


def test_wrong_secret_is_refused_at_handshake(tmp_path):
    with NetnsPair(mtu=1500) as pair:
        a = LinkProcess(pair, pair.ns_a, link_argv(
            pair.if_a, "alpha", "--secret-file", _secret(tmp_path, "a", b"correct horse"),
            "monitor", "--seconds", "3"))
        b = LinkProcess(pair, pair.ns_b, link_argv(
            pair.if_b, "beta", "--secret-file", _secret(tmp_path, "b", b"battery staple"),
            "monitor", "--seconds", "3"))
        refused_a = a.wait_event("refused", 5)
        refused_b = b.wait_event("refused", 5)
        for refusal in (refused_a, refused_b):
            assert "failed authentication" in refusal["reason"]
        assert a.finish(10)[0] == 0 and b.finish(10)[0] == 0
        assert not any(l.get("event") == "connected" for l in a.all_lines + b.all_lines)
        assert "handshake refused" in a.stderr and "shared secret" in a.stderr
        assert "handshake refused" in b.stderr and "shared secret" in b.stderr


def test_forged_frames_from_a_third_box_change_nothing(tmp_path):
    """A third namespace on the same (hub) segment forges frames of every kind."""
    secret = _secret(tmp_path, "s", b"a shared secret")
    with NetnsSegment(3, mtu=1500, hub=True) as seg:
        a, b, c = seg.members
        receiver = LinkProcess(seg, b.ns, link_argv(
            b.ifname, "beta", "--peer-node", "alpha", "--secret-file", secret,
            "receive", "--bytes", "64M", "--timeout", "120"))
        sender = LinkProcess(seg, a.ns, link_argv(
            a.ifname, "alpha", "--peer-node", "beta", "--secret-file", secret,
            "send", "--bytes", "64M", "--message-size", "256K", "--rate", "16M",
            "--timeout", "120"))
        per_kind = 40
        forger = seg.run(c.ns, [os.sys.executable, os.path.join(REPO, "tests", "forger.py"),
                                c.ifname, a.mac.hex(), b.mac.hex(), str(per_kind)],
                         capture_output=True, text=True, timeout=60, check=False)
        assert forger.returncode == 0, forger.stderr
        rc_s, sent = sender.finish(timeout=150)
        rc_r, got = receiver.finish(timeout=30)
        assert rc_s == 0 and rc_r == 0, sender.stderr + receiver.stderr
        assert got["digest"] == sent["digest"] and got["bytes"] == 64 << 20
        counters = got["counters"]
        assert counters["stale_session"] >= per_kind  # wrong session id
        assert counters["foreign_source"] >= per_kind  # right frame, wrong source MAC
        assert counters["unauthenticated"] >= per_kind  # no MAC tag
        assert counters["bad_mac"] >= per_kind  # a MAC tag that does not verify
        assert counters["corrupt"] >= per_kind  # bad checksum
        assert counters["malformed"] + counters["bad_version"] >= per_kind  # garbage
        assert counters["handshakes"] == 1  # nothing forged reset the session


def _data_frame(session: int, seq: int, volume: int = 0) -> bytes:
    from protocol.frames import BEGIN, END, FrameType, encode_frame

    return bytes(encode_frame(FrameType.DATA, BEGIN | END, volume, session, seq, 1, 64,
                              b"forged payload"))


def _inject(group, ns: str, ifname: str, dst_mac: bytes, frames: list[bytes]) -> None:
    """Send raw frames from `ns` (with that interface's own source MAC)."""
    with group.enter(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        try:
            sock.bind((ifname, 0x88B5))
            src = sock.getsockname()[4]
            for frame in frames:
                sock.send(dst_mac + src + struct.pack(">H", 0x88B5) + frame)
        finally:
            sock.close()


def test_the_usable_mtu_is_the_smaller_of_the_two_ends():
    with NetnsPair(mtu=9000) as pair:
        pair.run(pair.ns_b, ["ip", "link", "set", "dev", pair.if_b, "mtu", "1500"])
        receiver = LinkProcess(pair, pair.ns_b, link_argv(pair.if_b, "beta", "receive",
                                                          "--bytes", "32M", "--timeout", "60"))
        sender = LinkProcess(pair, pair.ns_a, link_argv(pair.if_a, "alpha", "send",
                                                        "--bytes", "32M", "--timeout", "60"))
        rc_s, sent = sender.finish(timeout=90)
        rc_r, got = receiver.finish(timeout=30)
        assert rc_s == 0 and rc_r == 0, sender.stderr + receiver.stderr
        assert got["digest"] == sent["digest"]
        # Had alpha used its own 9000, beta's end would have dropped every DATA frame and
        # the transfer above would have failed.
        assert "mtu 1500" in sender.stderr and "mtu 1500" in receiver.stderr


def test_a_pinned_peer_mac_is_the_only_peer_accepted():
    with NetnsPair(mtu=1500) as pair:
        wrong = "02:00:00:00:00:01"
        a = LinkProcess(pair, pair.ns_a, link_argv(pair.if_a, "alpha", "--peer-mac", wrong,
                                                   "monitor", "--seconds", "1.5",
                                                   "--stats-interval", "0.5"))
        b = LinkProcess(pair, pair.ns_b, link_argv(pair.if_b, "beta", "monitor", "--seconds", "1.5",
                                                   "--stats-interval", "0.5"))
        a.finish(10)
        b.finish(10)
        assert not any(l.get("event") == "connected" for l in a.all_lines + b.all_lines)
        assert a.all_lines[-1]["counters"]["foreign_source"] > 0  # beta's HELLOs, ignored

        right = pair.mac_b.hex(":")
        a = LinkProcess(pair, pair.ns_a, link_argv(pair.if_a, "alpha", "--peer-mac", right,
                                                   "monitor", "--seconds", "5"))
        b = LinkProcess(pair, pair.ns_b, link_argv(pair.if_b, "beta", "monitor", "--seconds", "5"))
        assert a.wait_event("connected", 5)["peer_mac"] == right
        assert b.wait_event("connected", 5)["peer"] == "alpha"
