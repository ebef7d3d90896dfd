"""Network-namespace harness: throwaway "boxes" joined by a real veth link.

Strategy
--------
Every namespace and interface is created by this module with a name unique to
the running process (``mt`` + the PID in base 36 + a per-process counter), so
concurrent runs never collide and nothing is ever sent on an interface that we
did not create.  Interfaces are created *directly inside* their namespaces
(``ip -n A link add ... peer ... netns B``), so no name ever appears in the
root namespace, not even for a moment.

Each namespace this process creates is recorded in a registry the moment
``ip netns add`` succeeds; ``close()`` deletes what one object made, and
:func:`cleanup_leftovers` (called by the pytest session fixture and by
``atexit``) deletes whatever is still registered, so a failing test body, a
failing setup half-way through, or a forgotten ``close()`` leaves nothing
behind.  Only ``kill -9`` of the whole process can leak a namespace.

We drive the stock ``ip`` tool rather than pyroute2 here: the commands are the
ones an operator would type, errors come back as readable stderr, and the
daemon's own netlink code (mirrord.iface) is then tested against a link it did
not build itself.

Two topologies:

* :class:`NetnsPair` -- two namespaces, one veth pair: the dedicated link.
* :class:`NetnsSegment` -- n namespaces, each with one veth into a Linux
  bridge in an extra "hub" namespace.  With ``hub=True`` the bridge is made to
  behave like a dumb hub (no MAC learning, so every frame is flooded to every
  port): a namespace can then send frames with a spoofed source MAC without
  teaching the bridge a wrong port and stealing the other members' traffic.
  ``tests/test_netns.py`` verifies this, and that a learning bridge does not.

This file is imported by the tests (via conftest.py) and, by path, by the
benchmarks in bench/; it depends on nothing but the standard library and the
``ip``/``bridge`` tools, and must stay out of the daemon package.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = [
    "NetnsError",
    "NetnsPair",
    "NetnsSegment",
    "SegmentMember",
    "cleanup_leftovers",
    "created_namespaces",
    "in_netns",
    "make_pair",
    "make_segment",
    "netns_exists",
    "unusable_reason",
]

# -- limits and names -------------------------------------------------------

# Linux interface names are at most IFNAMSIZ-1 = 15 characters.
IFNAMSIZ_MAX = 15
# Every name starts with this (unless a caller passes its own prefix), so
# `ip netns list | grep ^mt` finds ours.
NAME_PREFIX = "mt"
# prefix (4) + PID in base 36 (pid_max 4194304 -> 5) + counter (<=3 for the
# first 46656 groups) + role (2, e.g. "vb" / "br") stays within IFNAMSIZ_MAX.
PREFIX_MAX = 4
# How many counter values to try when a name is taken (a stale namespace from
# an earlier run that had the same PID): a handful is plenty, and the bound
# keeps a broken /run/netns from looping forever.
NAME_RETRIES = 20
# Any single `ip`/`bridge` invocation finishes in milliseconds; 10 s means the
# system is wedged, and we would rather fail loudly than hang a test run.
IP_TIMEOUT_S = 10.0
# Default for run(): long enough for a short helper program, short enough that
# a hung child cannot stall the suite.
RUN_TIMEOUT_S = 30.0
# After SIGTERM a child gets this long to exit before SIGKILL; after SIGKILL
# this long to be reaped.  Both are far above what a healthy process needs.
TERM_GRACE_S = 1.0
KILL_REAP_S = 5.0
# Bridge ports need to reach the "forwarding" state before frames cross the
# hub; with STP off that is immediate once carrier is up, so 3 s is generous.
BRIDGE_READY_TIMEOUT_S = 3.0
BRIDGE_POLL_S = 0.005
# Fixed ifindexes for the veth ends, chosen so the two ends of one veth
# never share an index (a fresh namespace holds only lo, index 1).
IFINDEX_A = 10
IFINDEX_B = 20
IFINDEX_PORT_BASE = 100
# Members are named by one letter each (a..z); tests need two or three.
MAX_SEGMENT_MEMBERS = 26

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    digits = []
    while True:
        n, r = divmod(n, 36)
        digits.append(_B36[r])
        if n == 0:
            return "".join(reversed(digits))


# One tag per process: PIDs are unique among live processes, so two test runs
# (or a test run and a benchmark) never pick the same names.
_PID_TAG = _base36(os.getpid())
_counter = itertools.count()
_counter_lock = threading.Lock()

# Namespaces created by this process and not yet deleted (name -> None; a
# dict keeps insertion order, so cleanup can delete newest first).
_created: dict[str, None] = {}
_created_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip``/``bridge`` command failed; the message carries its stderr."""


# -- low-level helpers ------------------------------------------------------


def _run_tool(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ip/bridge with a timeout; raise NetnsError with stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)!s}: timed out after {IP_TIMEOUT_S}s") from exc
    if check and proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return _run_tool(argv, check=check)


def _next_id(prefix: str | None = None) -> str:
    """``prefix`` + this process's PID (base 36) + a counter: unique to the run."""
    if prefix is None:
        prefix = NAME_PREFIX
    if not prefix.isalnum() or len(prefix) > PREFIX_MAX:
        raise ValueError(f"name prefix must be 1..{PREFIX_MAX} alphanumerics, got {prefix!r}")
    with _counter_lock:
        return prefix + _PID_TAG + _base36(next(_counter))


def netns_exists(name: str) -> bool:
    """True if a named network namespace ``name`` exists (in /run/netns)."""
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def created_namespaces() -> list[str]:
    """Names of namespaces this process created and has not deleted yet."""
    with _created_lock:
        return list(_created)


def _add_netns(name: str) -> None:
    _ip("netns", "add", name)
    with _created_lock:
        _created[name] = None


def _del_netns(name: str) -> None:
    """Delete a namespace we created; tolerate it being gone already."""
    if netns_exists(name):
        proc = _ip("netns", "del", name, check=False)
        if proc.returncode != 0 and netns_exists(name):
            raise NetnsError(f"ip netns del {name} failed: {proc.stderr.strip()}")
    with _created_lock:
        _created.pop(name, None)


def cleanup_leftovers() -> list[str]:
    """Delete every namespace this process created that still exists.

    The session-level safety net: returns the names it had to delete, so a
    caller can report leaks.  Errors are collected, not raised half-way, so one
    stuck namespace does not keep the others alive; the first one is raised at
    the end.
    """
    removed, first_error = [], None
    for name in reversed(created_namespaces()):
        try:
            if netns_exists(name):
                removed.append(name)
            _del_netns(name)
        except NetnsError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return removed


atexit.register(cleanup_leftovers)


_usable_cache: list[str | None] = []


def unusable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can).

    Checked once per process: root, the ``ip`` tool, and a real
    ``ip netns add``/``del`` round trip with a throwaway name.
    """
    if _usable_cache:
        return _usable_cache[0]
    reason: str | None = None
    if os.geteuid() != 0:
        reason = "network namespaces need root (euid is %d)" % os.geteuid()
    elif shutil.which("ip") is None:
        reason = "the iproute2 'ip' tool is not installed"
    else:
        probe = _next_id() + "probe"
        try:
            _add_netns(probe)
            _del_netns(probe)
        except (NetnsError, OSError) as exc:
            reason = f"'ip netns' is unusable here: {exc}"
    _usable_cache.append(reason)
    return reason


# setns(2) for the *calling thread* only.  Python 3.11 has no os.setns, and
# pyroute2.netns.setns would create a missing namespace (O_CREAT) and saves
# /proc/self (the main thread) instead of the current thread's namespace.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread inside network namespace ``name``.

    Sockets (AF_PACKET, netlink) opened in the body stay bound to that
    namespace after the thread switches back, which is how tests build a
    daemon-side object "inside a box" without a subprocess.  Only the calling
    thread moves; other threads are unaffected.
    """
    target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def _quiet_namespace(name: str) -> None:
    """Disable IPv6 in a fresh namespace so the link carries only our frames.

    Otherwise every link-up emits router solicitations and MLD reports, which
    would show up in raw-socket tests that count frames and in benchmarks.
    Must run before interfaces are created ("default" applies to new ones).
    """
    with in_netns(name):
        for scope in ("all", "default"):
            path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
            if os.path.exists(path):
                with open(path, "w") as f:
                    f.write("1")


def _link_json(ns: str, ifname: str) -> dict:
    out = _ip("-j", "link", "show", "dev", ifname, ns=ns).stdout
    return json.loads(out)[0]


def _ifname(base: str, role: str) -> str:
    name = base + role
    if len(name) > IFNAMSIZ_MAX:
        raise NetnsError(f"interface name {name!r} longer than {IFNAMSIZ_MAX} characters")
    return name


def _mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# -- the objects the tests use ----------------------------------------------


class _NamespaceGroup:
    """Namespaces plus the processes started in them; one close() for all."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    # ---- processes
    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = RUN_TIMEOUT_S,
        check: bool = True,
        **popen_kw,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside ``ns`` (``ip netns exec``).

        Extra keywords go to subprocess.run (e.g. ``capture_output=True``).
        The timeout is always set so a stuck helper cannot hang the suite.
        """
        self._check_ns(ns)
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, **popen_kw
        )

    def popen(self, ns: str, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns``; close() will stop it (by PID).

        ``ip netns exec`` execs the command in place, so the PID we hold is the
        command's own.  The child gets its own session so close() can signal
        its whole process group, including anything it forked.
        """
        self._check_ns(ns)
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kw)
        self._procs.append(proc)
        return proc

    def enter(self, ns: str):
        """Context manager: this thread inside ``ns`` (see :func:`in_netns`)."""
        self._check_ns(ns)
        return in_netns(ns)

    def _check_ns(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not one of this object's namespaces {self.namespaces}")

    # ---- teardown
    def _stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                continue
            for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_REAP_S)):
                try:
                    # The process group id is the PID we started (new session).
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                except PermissionError:
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._procs.clear()

    def close(self) -> None:
        """Stop our processes, then delete our namespaces (idempotent).

        Processes go first: a namespace with live processes outlives
        ``ip netns del`` (and so would its veth).  Every namespace is attempted
        even if one deletion fails; the first error is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        first_error: Exception | None = None
        try:
            self._stop_processes()
        except Exception as exc:  # still delete the namespaces below
            first_error = exc
        for ns in reversed(self.namespaces):
            try:
                _del_netns(ns)
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _pick_base(self, prefix: str | None, suffixes: str) -> str:
        """A fresh name stem: no namespace base+suffix exists yet."""
        for _ in range(NAME_RETRIES):
            base = _next_id(prefix)
            # Taken only by a stale leftover of an earlier run with our PID.
            if not any(netns_exists(base + s) for s in suffixes):
                return base
        raise NetnsError(f"no free namespace name after {NAME_RETRIES} tries")

    def _new_namespace(self, name: str) -> str:
        """Create, register and quieten namespace ``name``."""
        _add_netns(name)
        self.namespaces.append(name)
        _quiet_namespace(name)
        return name


class NetnsPair(_NamespaceGroup):
    """Two namespaces ``ns_a``/``ns_b`` joined by veth ``if_a``/``if_b``.

    Both ends are up with the requested MTU; ``mac_a``/``mac_b`` are read back
    from the kernel as 6-byte ``bytes``.

    ``distinct_ifindex`` (default True) gives the two ends different ifindexes
    (IFINDEX_A/IFINDEX_B).  That matters for carrier events: the kernel's
    linkwatch reports a veth end's carrier *loss* at once only when the end's
    ifindex differs from its peer's; in two fresh namespaces both ends would
    be ifindex 2 and the peer's "carrier lost" event would be batched for up
    to a second (see mirrord/iface.py).  Pass False to get that slower,
    physical-NIC-like behaviour on purpose.
    """

    def __init__(self, mtu: int = 1500, prefix: str | None = None,
                 distinct_ifindex: bool = True) -> None:
        super().__init__()
        self.mtu = mtu
        try:
            base = self._pick_base(prefix, "ab")
            self.ns_a = self._new_namespace(base + "a")
            self.ns_b = self._new_namespace(base + "b")
            # Interface names only need to be unique inside their namespace,
            # but carrying the run tag makes `ip link` output self-explaining.
            self.if_a = _ifname(base, "va")
            self.if_b = _ifname(base, "vb")
            index_a, index_b = (
                (["index", str(IFINDEX_A)], ["index", str(IFINDEX_B)])
                if distinct_ifindex else ([], [])
            )
            _ip(
                "link", "add", self.if_a, *index_a, "mtu", str(mtu), "type", "veth",
                "peer", "name", self.if_b, *index_b, "mtu", str(mtu), "netns", self.ns_b,
                ns=self.ns_a,
            )
            self.set_link(self.ns_a, True)
            self.set_link(self.ns_b, True)
            self.mac_a = _mac_bytes(_link_json(self.ns_a, self.if_a)["address"])
            self.mac_b = _mac_bytes(_link_json(self.ns_b, self.if_b)["address"])
        except BaseException:
            self.close()
            raise

    def ifname(self, ns: str) -> str:
        """The veth end living in ``ns``."""
        self._check_ns(ns)
        return self.if_a if ns == self.ns_a else self.if_b

    def mac(self, ns: str) -> bytes:
        """MAC of the veth end living in ``ns``."""
        self._check_ns(ns)
        return self.mac_a if ns == self.ns_a else self.mac_b

    def peer(self, ns: str) -> str:
        """The other namespace."""
        self._check_ns(ns)
        return self.ns_b if ns == self.ns_a else self.ns_a

    def set_link(self, ns: str, up: bool) -> None:
        """Administratively bring the veth end in ``ns`` up or down."""
        _ip("link", "set", "dev", self.ifname(ns), "up" if up else "down", ns=ns)

    def __repr__(self) -> str:
        return (f"NetnsPair({self.ns_a}:{self.if_a} <-> {self.ns_b}:{self.if_b}, "
                f"mtu={self.mtu})")


@dataclass(frozen=True)
class SegmentMember:
    """One box on a segment: its namespace, its interface, and the hub port."""

    ns: str
    ifname: str
    mac: bytes
    port: str  # the bridge-side veth end, in the hub namespace


class NetnsSegment(_NamespaceGroup):
    """``n`` namespaces on one Ethernet segment through a bridge in ``hub_ns``.

    ``hub=True`` (the default) turns MAC learning off so the bridge floods
    every frame to every port, like a hub; ``hub=False`` leaves a normal
    learning bridge (used by the test that shows why the hub is needed).

    How: ``ip link set BR type bridge ageing_time 0``.  With a zero ageing
    time the kernel's br_fdb_update() returns before learning anything ("some
    users want to always flood"), so no address is ever bound to a port and
    every unicast frame is flooded as unknown-destination.  Per-port
    ``learning off`` would do the same, but needs one command per port and a
    port added later would learn by default; the bridge-wide setting cannot
    be forgotten.  Both are checked in tests/test_netns.py.
    """

    def __init__(self, n: int, mtu: int = 1500, hub: bool | str = True,
                 prefix: str | None = None) -> None:
        super().__init__()
        if not 1 <= n <= MAX_SEGMENT_MEMBERS:
            raise ValueError(f"segment size n must be 1..{MAX_SEGMENT_MEMBERS}, got {n}")
        if hub not in (True, False, "ageing", "no-learning"):
            raise ValueError(f"hub must be True, False, 'ageing' or 'no-learning', got {hub!r}")
        self.mtu = mtu
        self.members: list[SegmentMember] = []
        letters = _B36[10:10 + n]
        try:
            base = self._pick_base(prefix, "h" + letters)
            self.hub_ns = self._new_namespace(base + "h")
            self.bridge = _ifname(base, "br")
            # STP off: ports forward as soon as they have carrier, and no BPDUs
            # appear on the segment.  ageing_time is in centiseconds.
            ageing = ["ageing_time", "0"] if hub in (True, "ageing") else []
            _ip("link", "add", self.bridge, "mtu", str(mtu), "type", "bridge",
                "stp_state", "0", *ageing, ns=self.hub_ns)
            _ip("link", "set", "dev", self.bridge, "up", ns=self.hub_ns)
            for letter in letters:
                ns = self._new_namespace(base + letter)
                ifname = _ifname(base, "v" + letter)
                port = _ifname(base, "p" + letter)
                # Distinct ifindexes on the two ends: see NetnsPair's docstring.
                _ip("link", "add", port, "index", str(IFINDEX_PORT_BASE + len(self.members)),
                    "mtu", str(mtu), "type", "veth", "peer", "name", ifname,
                    "index", str(IFINDEX_A), "mtu", str(mtu), "netns", ns, ns=self.hub_ns)
                _ip("link", "set", "dev", port, "master", self.bridge, ns=self.hub_ns)
                if hub == "no-learning":
                    _run_tool(["bridge", "-n", self.hub_ns, "link", "set", "dev", port,
                               "learning", "off"])
                _ip("link", "set", "dev", port, "up", ns=self.hub_ns)
                _ip("link", "set", "dev", ifname, "up", ns=ns)
                mac = _mac_bytes(_link_json(ns, ifname)["address"])
                self.members.append(SegmentMember(ns, ifname, mac, port))
            self._wait_forwarding()
        except BaseException:
            self.close()
            raise

    def _wait_forwarding(self) -> None:
        """Poll (bounded) until every bridge port is in the forwarding state."""
        deadline = time.monotonic() + BRIDGE_READY_TIMEOUT_S
        ports = {m.port for m in self.members}
        while True:
            out = _run_tool(["bridge", "-n", self.hub_ns, "-j", "link", "show"]).stdout
            states = {p["ifname"]: p.get("state") for p in json.loads(out or "[]")}
            if all(states.get(p) == "forwarding" for p in ports):
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"bridge ports not forwarding after "
                                 f"{BRIDGE_READY_TIMEOUT_S}s: {states}")
            time.sleep(BRIDGE_POLL_S)

    @property
    def ns(self) -> list[str]:
        """Member namespace names, in creation order (not the hub)."""
        return [m.ns for m in self.members]

    def member(self, ns: str) -> SegmentMember:
        """The member living in ``ns``."""
        for m in self.members:
            if m.ns == ns:
                return m
        raise ValueError(f"{ns!r} is not a member of this segment")

    def set_link(self, ns: str, up: bool) -> None:
        """Bring a member's interface up or down (its hub port stays up)."""
        m = self.member(ns)
        _ip("link", "set", "dev", m.ifname, "up" if up else "down", ns=ns)

    def fdb(self) -> list[dict]:
        """The bridge's learned (non-permanent) forwarding entries, as JSON."""
        out = _run_tool(["bridge", "-n", self.hub_ns, "-j", "fdb", "show",
                         "br", self.bridge]).stdout
        return [e for e in json.loads(out or "[]") if e.get("state") != "permanent"]

    def __repr__(self) -> str:
        return f"NetnsSegment(hub={self.hub_ns}, members={self.ns}, mtu={self.mtu})"


def make_pair(prefix: str | None = None, mtu: int = 1500,
              distinct_ifindex: bool = True) -> NetnsPair:
    """Create a :class:`NetnsPair`; use as a context manager or call close().

    ``prefix`` (1-4 alphanumerics, default "mt") starts every name; the PID
    and a counter follow it, so names stay unique to the run whatever it is.
    """
    return NetnsPair(mtu=mtu, prefix=prefix, distinct_ifindex=distinct_ifindex)


def make_segment(n: int, mtu: int = 1500, hub: bool | str = True,
                 prefix: str | None = None) -> NetnsSegment:
    """Create a :class:`NetnsSegment` of ``n`` members behind one bridge."""
    return NetnsSegment(n, mtu=mtu, hub=hub, prefix=prefix)
