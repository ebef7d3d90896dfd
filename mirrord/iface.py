"""The dedicated link's interface, seen through rtnetlink.

Strategy
--------
Two needs, two tools:

* :func:`interface_info` is a one-shot query (index, MAC, MTU, carrier, admin
  state) done with pyroute2's ``IPRoute``, whose attribute parsing is worth its
  cost when it runs once per (re)connect.
* :class:`CarrierMonitor` must sit in the daemon's poll loop next to the
  AF_PACKET socket, so it owns a plain non-blocking ``AF_NETLINK`` socket
  subscribed to ``RTMGRP_LINK`` and decodes only the fixed ``ifinfomsg``
  header (index and flags) with ``struct``.  We do not use pyroute2's
  ``IPRoute.bind()`` here: in pyroute2 0.9 the sync ``IPRoute`` wraps an
  asyncio core whose ``get()`` runs an event loop that can move datagrams
  off the socket into a private queue -- where ``select()`` on ``fileno()``
  no longer sees them -- and that blocks when nothing is queued (read from
  pyroute2's source, not observed as a failure here).  A socket we read
  ourselves keeps ``fileno()`` honest.

Carrier means ``IFF_LOWER_UP`` in the link flags.  The kernel reports that
flag only while the interface is administratively up, so "admin down" and
"cable pulled" both read as carrier lost, which is what the replication link
cares about.

What veth really does (measured on this machine, kernel 6.18, see
tests/test_iface.py):

* ``ip link set X down`` on one end: X's own monitor sees carrier lost at
  once (tens of microseconds after the command returns).  The *peer* end also
  loses carrier at once in the kernel (``ip link`` shows NO-CARRIER
  immediately), but the netlink event for the peer goes through the kernel's
  linkwatch, which treats it as non-urgent when the veth end's ifindex equals
  its peer's ifindex -- and in two fresh namespaces both ends are usually
  ifindex 2.  Non-urgent events are processed at most once per second
  (a global, system-wide schedule), so the peer's carrier-loss event came
  0.1 to 1.0 s after the command (8 trials: 117-1018 ms).  With different
  ifindexes on the two ends the peer's event is "urgent" and arrived within
  0.1 ms in every trial; tests/netns.py gives the ends distinct ifindexes
  by default for that reason.
* Carrier *up* is reported to both ends within ~0.1 ms either way.
* A physical NIC should behave like the equal-ifindex veth (its ifindex is
  its own "iflink"; this is read from the kernel's linkwatch code, not
  measured here): carrier loss can take up to a second to be announced.  The protocol's dead-peer timeout must therefore
  stay the backstop; the carrier event only shortens the common case.
* One change can produce several RTM_NEWLINK messages (e.g. "going down" with
  the old flags, then the new flags; "up" then "running"), so
  :meth:`CarrierMonitor.read` reports only transitions of the carrier bit.
* ``ip link set X mtu N`` sends one RTM_NEWLINK carrying IFLA_MTU, carrier
  unchanged; the monitor keeps the MTU too (:meth:`CarrierMonitor.take_mtu_change`),
  because a session agreed on a larger MTU would otherwise send frames the
  kernel refuses, forever.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "CarrierMonitor",
    "InterfaceError",
    "InterfaceInfo",
    "InterfaceNotFound",
    "interface_info",
]

# rtnetlink constants (linux/rtnetlink.h, linux/if.h, linux/netlink.h).
NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
ENODEV = errno.ENODEV

# struct nlmsghdr: len, type, flags, seq, pid (native byte order).
NLMSGHDR = struct.Struct("=IHHII")
# struct ifinfomsg: family, pad, type, index, flags, change.
IFINFOMSG = struct.Struct("=BBHiII")
NLMSG_ALIGNTO = 4
# struct rtattr: len, type; then the value, padded to RTA_ALIGNTO.
RTATTR = struct.Struct("=HH")
RTA_ALIGNTO = 4
IFLA_MTU = 4  # u32
U32 = struct.Struct("=I")

# One datagram holds one link message of a few hundred bytes to a few KiB
# (with stats and VF info); 64 KiB cannot truncate any of them.
RECV_BUFSIZE = 65536
# read() drains at most this many datagrams per call so a storm of link
# events (e.g. a host creating hundreds of interfaces) cannot starve the
# frame path; anything left keeps fileno() readable for the next poll.
MAX_DATAGRAMS_PER_READ = 256
# Kernel socket buffer for link events: they are small and rare on a box
# with a dedicated link, but a burst (bridges, containers starting) must not
# overflow it.  On overflow (ENOBUFS) we re-query the state instead.
NETLINK_RCVBUF = 1 << 20


class InterfaceError(OSError):
    """A problem with a named network interface; ``ifname`` says which."""

    def __init__(self, ifname: str, message: str, code: int = 0) -> None:
        super().__init__(code, f"interface {ifname!r}: {message}")
        self.ifname = ifname

    def __str__(self) -> str:  # OSError's default "[Errno n] ..." hides the name
        return self.strerror


class InterfaceNotFound(InterfaceError):
    """No interface of that name exists in this network namespace."""

    def __init__(self, ifname: str) -> None:
        super().__init__(ifname, "no such interface in this network namespace", ENODEV)


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """A snapshot of one interface.

    ``mac`` is the 6-byte hardware address (empty for interfaces without one);
    ``carrier`` is IFF_LOWER_UP (never true while admin down); ``up`` is the
    administrative IFF_UP flag.
    """

    index: int
    mac: bytes
    mtu: int
    carrier: bool
    up: bool


def interface_info(ifname: str) -> InterfaceInfo:
    """Look ``ifname`` up in the current network namespace.

    Raises :class:`InterfaceNotFound` if it does not exist and
    :class:`InterfaceError` for any other netlink failure.
    """
    # Imported here: pyroute2 takes ~0.2 s to import and only this one-shot
    # query needs it, not the poll loop.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if not ifname or len(ifname) > 15 or "/" in ifname:
        raise InterfaceError(ifname, "not a valid interface name", errno.EINVAL)
    try:
        with IPRoute() as ipr:
            msgs = list(ipr.link("get", ifname=ifname))
    except NetlinkError as exc:
        if exc.code == ENODEV:
            raise InterfaceNotFound(ifname) from None
        raise InterfaceError(ifname, f"netlink query failed: {exc}", exc.code) from exc
    if not msgs:
        raise InterfaceNotFound(ifname)
    msg = msgs[0]
    flags = msg["flags"]
    address = msg.get("address")
    return InterfaceInfo(
        index=msg["index"],
        mac=bytes.fromhex(address.replace(":", "")) if address else b"",
        mtu=msg.get("mtu"),
        carrier=bool(flags & IFF_LOWER_UP),
        up=bool(flags & IFF_UP),
    )


def _attr_u32(data: bytes, offset: int, end: int, wanted: int) -> int | None:
    """The u32 value of the first rtattr of type `wanted` in data[offset:end], if any."""
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            return None  # malformed; the kernel never sends this, do not loop
        if kind == wanted and length >= RTATTR.size + U32.size:
            return U32.unpack_from(data, offset + RTATTR.size)[0]
        offset += (length + RTA_ALIGNTO - 1) & ~(RTA_ALIGNTO - 1)
    return None


class CarrierMonitor:
    """Carrier changes of one interface, for a select/poll loop.

    Subscribe first, then read the initial state, so no change can slip in
    between.  ``carrier`` is the last known state; :meth:`read` returns the
    transitions seen since the previous call (oldest first), e.g. ``[False]``
    or ``[False, True]`` if the link bounced.  If the interface is deleted
    (or moved to another namespace) ``read`` reports ``False`` once and
    ``gone`` becomes true; a recreated interface needs a new monitor.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.gone = False
        # Non-blocking: read() is called when poll says readable and must
        # never stall the loop; CLOEXEC: helpers we spawn must not inherit it.
        self._sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_ROUTE,
        )
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NETLINK_RCVBUF)
            self._sock.bind((0, RTMGRP_LINK))
            info = interface_info(ifname)
        except BaseException:
            self._sock.close()
            raise
        self.index = info.index
        self.carrier = info.carrier
        self.mtu = info.mtu  # the last MTU the kernel reported
        self._mtu_taken = info.mtu  # the last one take_mtu_change() returned

    def take_mtu_change(self) -> int | None:
        """The interface's MTU if it changed since the last call (or since the monitor
        was made), else None.  Read after :meth:`read`, which collects the changes."""
        if self.mtu == self._mtu_taken or self.gone:
            return None
        self._mtu_taken = self.mtu
        return self.mtu

    def fileno(self) -> int:
        """The netlink socket's descriptor: readable when events are queued."""
        return self._sock.fileno()

    def read(self) -> list[bool]:
        """Drain pending link events; return the carrier transitions, in order."""
        changes: list[bool] = []
        for _ in range(MAX_DATAGRAMS_PER_READ):
            try:
                data, (sender, _groups) = self._sock.recvfrom(RECV_BUFSIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped events: our view may be stale, so ask
                # for the current state and report it if it differs.
                self._resync(changes)
                continue
            if sender != 0:
                continue  # only the kernel speaks for link state
            self._parse(data, changes)
        return changes

    def _parse(self, data: bytes, changes: list[bool]) -> None:
        offset, end = 0, len(data)
        while offset + NLMSGHDR.size <= end and not self.gone:
            length, msg_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size or offset + length > end:
                return  # malformed; the kernel never sends this, do not loop
            if msg_type in (RTM_NEWLINK, RTM_DELLINK) and length >= NLMSGHDR.size + IFINFOMSG.size:
                _fam, _pad, _type, index, flags, _change = IFINFOMSG.unpack_from(
                    data, offset + NLMSGHDR.size
                )
                if index == self.index:
                    if msg_type == RTM_DELLINK:
                        self.gone = True
                        self._note(False, changes)
                    else:
                        self._note(bool(flags & IFF_LOWER_UP), changes)
                        mtu = _attr_u32(data, offset + NLMSGHDR.size + IFINFOMSG.size,
                                        offset + length, IFLA_MTU)
                        if mtu is not None:
                            self.mtu = mtu
            offset += (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)

    def _note(self, carrier: bool, changes: list[bool]) -> None:
        if carrier != self.carrier:
            self.carrier = carrier
            changes.append(carrier)

    def _resync(self, changes: list[bool]) -> None:
        try:
            info = interface_info(self.ifname)
        except InterfaceNotFound:
            self.gone = True
            self._note(False, changes)
            return
        if info.index != self.index:  # deleted and recreated while we were blind
            self.gone = True
            self._note(False, changes)
            return
        self._note(info.carrier, changes)
        if info.mtu is not None:
            self.mtu = info.mtu

    def close(self) -> None:
        """Close the netlink socket (idempotent)."""
        self._sock.close()

    def __enter__(self) -> "CarrierMonitor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CarrierMonitor({self.ifname!r}, index={self.index}, carrier={self.carrier})"
