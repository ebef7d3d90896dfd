"""mirrord.iface against a real veth pair: interface facts and carrier events."""

from __future__ import annotations

import select
import subprocess
import time

import pytest

from mirrord.iface import (
    CarrierMonitor,
    InterfaceError,
    InterfaceInfo,
    InterfaceNotFound,
    interface_info,
)

pytestmark = pytest.mark.netns

# Carrier events on a veth with distinct ifindexes arrive in well under a
# millisecond; 0.5 s leaves room for a loaded CI box.
FAST_EVENT_S = 0.5
# With equal ifindexes the peer's carrier loss waits for linkwatch's
# once-per-second batch: up to ~1 s, plus the same margin.
LINKWATCH_BATCH_S = 1.5


def _monitor(pair, ns: str) -> CarrierMonitor:
    with pair.enter(ns):
        return CarrierMonitor(pair.ifname(ns))


def _wait_changes(monitor: CarrierMonitor, want: int, timeout: float) -> tuple[list[bool], float]:
    """Poll the monitor like the daemon does; (changes, seconds to the last one)."""
    start = time.monotonic()
    changes: list[bool] = []
    while len(changes) < want:
        left = start + timeout - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([monitor], [], [], left)
        if ready:
            changes += monitor.read()
    return changes, time.monotonic() - start


def test_interface_info_reads_back_what_the_harness_made(netns_pair_factory):
    pair = netns_pair_factory(mtu=9000)
    with pair.enter(pair.ns_a):
        info = interface_info(pair.if_a)
    assert isinstance(info, InterfaceInfo)
    assert info.mac == pair.mac_a and len(info.mac) == 6
    assert info.mtu == 9000
    assert info.carrier and info.up
    assert info.index > 0
    pair.set_link(pair.ns_b, False)
    with pair.enter(pair.ns_a):
        info = interface_info(pair.if_a)
    assert info.up and not info.carrier  # admin up, but the peer is gone


def test_missing_interface_raises_an_error_naming_it(netns_pair):
    with netns_pair.enter(netns_pair.ns_a):
        with pytest.raises(InterfaceNotFound) as caught:
            interface_info("nosuch0")
        # The peer end lives in the other namespace: not visible from here.
        with pytest.raises(InterfaceNotFound):
            interface_info(netns_pair.if_b)
        with pytest.raises(InterfaceNotFound):
            CarrierMonitor("nosuch0")
    assert isinstance(caught.value, InterfaceError)
    assert caught.value.ifname == "nosuch0"
    assert "'nosuch0'" in str(caught.value)
    with pytest.raises(InterfaceError, match="not a valid interface name"):
        interface_info("x" * 16)


def test_link_down_is_carrier_loss_on_both_ends_and_up_again(netns_pair):
    """With distinct ifindexes (the harness default) both ends hear at once."""
    pair = netns_pair
    near, far = _monitor(pair, pair.ns_a), _monitor(pair, pair.ns_b)
    try:
        assert near.carrier and far.carrier
        pair.set_link(pair.ns_a, False)
        near_changes, near_s = _wait_changes(near, 1, FAST_EVENT_S)
        far_changes, far_s = _wait_changes(far, 1, FAST_EVENT_S)
        assert near_changes == [False] and far_changes == [False]
        assert not near.carrier and not far.carrier

        pair.set_link(pair.ns_a, True)
        assert _wait_changes(near, 1, FAST_EVENT_S)[0] == [True]
        assert _wait_changes(far, 1, FAST_EVENT_S)[0] == [True]
        # Several RTM_NEWLINK messages per change, but one transition each.
        time.sleep(0.05)
        assert near.read() == [] and far.read() == []
        print(f"carrier loss seen after: own end {near_s * 1e3:.2f} ms, "
              f"peer end {far_s * 1e3:.2f} ms (after `ip link set down` returned)")
    finally:
        near.close()
        far.close()


def test_peer_carrier_loss_waits_for_linkwatch_when_ifindexes_are_equal(netns_pair_factory):
    """The surprise: equal ifindexes make the peer's event non-urgent (<= ~1 s)."""
    pair = netns_pair_factory(mtu=1500, distinct_ifindex=False)
    near, far = _monitor(pair, pair.ns_a), _monitor(pair, pair.ns_b)
    try:
        pair.set_link(pair.ns_a, False)
        started = time.monotonic()
        # The kernel state flips at once...
        out = subprocess.run(["ip", "-n", pair.ns_b, "link", "show", "dev", pair.if_b],
                             capture_output=True, text=True, check=True).stdout
        assert "NO-CARRIER" in out
        assert _wait_changes(near, 1, FAST_EVENT_S)[0] == [False]
        # ...but the event for the peer may be batched for up to a second.
        far_changes, _ = _wait_changes(far, 1, LINKWATCH_BATCH_S)
        delay = time.monotonic() - started
        assert far_changes == [False]
        print(f"peer carrier-loss event after {delay * 1e3:.0f} ms (equal ifindexes)")
    finally:
        near.close()
        far.close()


def test_quick_bounce_reports_both_transitions_in_order(netns_pair):
    pair = netns_pair
    far = _monitor(pair, pair.ns_b)
    try:
        pair.set_link(pair.ns_a, False)
        pair.set_link(pair.ns_a, True)
        changes, _ = _wait_changes(far, 2, FAST_EVENT_S)
        assert changes == [False, True]
        assert far.carrier
    finally:
        far.close()


def test_other_interfaces_are_ignored(netns_pair):
    pair = netns_pair
    mon = _monitor(pair, pair.ns_a)
    try:
        pair.run(pair.ns_a, ["ip", "link", "set", "lo", "up"])
        pair.run(pair.ns_a, ["ip", "link", "set", "lo", "down"])
        assert _wait_changes(mon, 1, 0.1)[0] == []
    finally:
        mon.close()


def test_deleted_interface_reads_as_carrier_lost_and_gone(netns_pair):
    pair = netns_pair
    mon = _monitor(pair, pair.ns_b)
    try:
        pair.run(pair.ns_a, ["ip", "link", "del", pair.if_a])  # takes the peer with it
        changes, _ = _wait_changes(mon, 1, FAST_EVENT_S)
        assert changes == [False]
        assert mon.gone
        assert mon.read() == []
    finally:
        mon.close()


def test_mtu_change_is_reported_once_and_leaves_the_carrier_alone(netns_pair):
    pair = netns_pair
    mon = _monitor(pair, pair.ns_a)
    try:
        start = mon.mtu
        assert mon.take_mtu_change() is None  # nothing changed since the monitor was made
        lower = start - 500
        pair.run(pair.ns_a, ["ip", "link", "set", "dev", pair.if_a, "mtu", str(lower)])
        deadline = time.monotonic() + FAST_EVENT_S
        changes: list[bool] = []
        while mon.mtu != lower and time.monotonic() < deadline:
            select.select([mon], [], [], 0.05)
            changes += mon.read()
        assert mon.mtu == lower
        assert changes == [] and mon.carrier
        assert mon.take_mtu_change() == lower
        assert mon.take_mtu_change() is None  # once per change
        # Back to where it was: a change again (the caller decides what it means).
        pair.run(pair.ns_a, ["ip", "link", "set", "dev", pair.if_a, "mtu", str(start)])
        deadline = time.monotonic() + FAST_EVENT_S
        while mon.mtu != start and time.monotonic() < deadline:
            select.select([mon], [], [], 0.05)
            mon.read()
        assert mon.take_mtu_change() == start
    finally:
        mon.close()
