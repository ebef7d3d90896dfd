"""Shared pytest fixtures: throwaway network namespaces (see tests/netns.py).

Every fixture that creates namespaces tears them down in a ``finally`` after
its ``yield``, so a failing test body still removes them; the session-level
safety net then deletes anything this run created and did not remove (a test
that called make_pair() and forgot close(), a crash half-way through setup).

Fixtures skip the test, with the reason, only when namespaces cannot be used
at all here (not root, no ``ip``, ``ip netns add`` refused).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

# Make `import netns` and `import mirrord` work however pytest was started.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS, os.path.dirname(_TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import netns  # noqa: E402


def _require_netns() -> None:
    reason = netns.unusable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _netns_safety_net():
    """At session end, delete every namespace this run created that still exists."""
    yield
    leaked = netns.cleanup_leftovers()
    if leaked:
        warnings.warn(f"deleted namespaces left behind by tests: {leaked}", stacklevel=1)


@pytest.fixture
def netns_pair(request):
    """Two namespaces joined by veth, both ends up.

    MTU 1500 by default; parametrize indirectly for another, e.g.
    ``@pytest.mark.parametrize("netns_pair", [9000], indirect=True)``.
    """
    _require_netns()
    mtu = getattr(request, "param", 1500)
    pair = netns.NetnsPair(mtu=mtu)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def netns_pair_factory():
    """``make(mtu=9000, distinct_ifindex=True) -> NetnsPair``; all closed at teardown."""
    _require_netns()
    made: list[netns.NetnsPair] = []

    def make(mtu: int = 9000, distinct_ifindex: bool = True) -> netns.NetnsPair:
        pair = netns.NetnsPair(mtu=mtu, distinct_ifindex=distinct_ifindex)
        made.append(pair)
        return pair

    try:
        yield make
    finally:
        _close_all(made)


@pytest.fixture
def netns_segment():
    """``make(n, mtu=1500, hub=True) -> NetnsSegment``; all closed at teardown."""
    _require_netns()
    made: list[netns.NetnsSegment] = []

    def make(n: int, mtu: int = 1500, hub: bool | str = True) -> netns.NetnsSegment:
        segment = netns.NetnsSegment(n, mtu=mtu, hub=hub)
        made.append(segment)
        return segment

    try:
        yield make
    finally:
        _close_all(made)


def _close_all(groups) -> None:
    """Close every group even if one close fails; re-raise the first failure."""
    first_error = None
    for group in reversed(groups):
        try:
            group.close()
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


@pytest.fixture
def mirror_pair(netns_pair_factory):
    """``make(mtu=9000, **MirrorPair options) -> MirrorPair``: two daemons' worth of
    namespaces, disks and config (tests/mirrorpair.py); stopped and removed at teardown."""
    from mirrorpair import MirrorPair

    made: list = []

    def make(mtu: int = 9000, **options) -> MirrorPair:
        pair = MirrorPair(netns_pair_factory(mtu=mtu), **options)
        made.append(pair)
        return pair

    try:
        yield make
    finally:
        for pair in reversed(made):
            pair.close()


@pytest.fixture
def cluster():
    """``make(start=True, **Cluster options) -> Cluster``: a real two-node Corosync +
    Pacemaker cluster in namespaces (tests/cluster.py), started unless ``start=False``
    (to put files in ``node_dir()`` first); every one closed at teardown.  Skips, with
    the reason, only where a cluster cannot run (not root, corosync/pacemaker missing)."""
    import cluster as cluster_module

    reason = cluster_module.unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list = []

    def make(start: bool = True, **options):
        c = cluster_module.Cluster(**options)
        made.append(c)
        if start:
            c.start()
        return c

    try:
        yield make
    finally:
        _close_all(made)
