"""Raw Ethernet frames on the dedicated link: one AF_PACKET socket per interface.

Strategy
--------
Per-frame cost is what limits a Python link (design notes, "Speed in
Python"), so the socket does the least Python work per frame and pushes
filtering into the kernel:

* The socket is opened with protocol 0 (it receives nothing yet), configured,
  and only then bound to (ifname, ethertype).  Opening it with the EtherType
  directly would start queueing matching frames from *every* interface before
  bind() narrows it to ours.
* A 4-instruction classic BPF filter drops frames whose packet type is not
  HOST, BROADCAST or MULTICAST -- i.e. unicast frames addressed to another MAC
  (which arrive when the interface is promiscuous or on a hub segment) -- and
  PACKET_IGNORE_OUTGOING drops our own transmissions as seen by other packet
  sockets.  Python never sees those frames, at no per-frame cost.
* Receive: ``recv_into`` a reused 64 KiB scratch buffer (never truncates,
  whatever the MTU becomes), then one slice copy ``scratch[14:n]`` gives the
  caller a fresh, exactly sized, writable bytearray holding only the payload.
  Measured here, a slice copy (70 ns small / 250 ns at 9 KB) beats both
  receiving into a fresh mtu-sized bytearray (370-460 ns: the zero-fill costs
  as much as the copy, and small frames keep a 9 KB buffer alive) and
  ``recv`` + ``bytearray(...)`` (two copies).  The source MAC comes out with
  one ``struct.unpack_from`` (70 ns; ``bytes(mv[6:12])`` is 190 ns).
* Send: the 14-byte header is built once per destination and cached.  For
  payloads under SENDMSG_MIN_PAYLOAD (6 KiB) ``send(header + payload)``:
  the user-space copy (0.12 us at 1.5 KB) is cheaper than the ~0.25 us of
  argument handling ``sendmsg`` adds.  For larger (jumbo) payloads
  ``sendmsg([header, payload])``, which skips the copy: measured between two
  namespaces, concatenation wins by 0.15-0.3 us at 64 B-4 KB, the two tie
  at ~6 KB, and sendmsg wins by 0.05-0.2 us at 9 KB.
* Errors that a link going down or a full device queue produce (ENETDOWN,
  ENXIO, ENOBUFS, EAGAIN after a short wait) are counted and reported as
  "not sent"/"nothing received" rather than raised: the protocol already
  treats the link as lossy, and the carrier monitor reports the outage.
  Beware: when the interface goes down the kernel also leaves ENETDOWN
  pending on the socket, returned once by the next send or recv even after
  the link is back; send() retries once so that stale error loses nothing.

Measured per-frame cost (`python3 bench/raw_link.py --costs`: python 3.11,
both sockets in one process, veth between two namespaces, 2-CPU VM; medians
of 7 rounds of 3000 frames, three runs agreeing within 5%).  The kernel's
veth transmit and the peer's socket enqueue run inside the send call:

    payload           send()    recv_batch(), per frame
    9000 B (MTU 9000) 4.6 us    9.0 us  (3.8 us with heap trimming off)
    1500 B (MTU 1500) 3.1 us    1.9 us
      64 B (an ack)   2.75 us   1.6 us

The 9000-byte receive figure is dominated by glibc, not the socket: with the
default 128 KiB M_TRIM_THRESHOLD, freeing a batch of 9 KB payloads returns
the top of the heap to the kernel and the next batch page-faults it back in
(~5 us per payload).  The daemon should raise the threshold once at start
(``mallopt(M_TRIM_THRESHOLD, 256 MiB)`` via ctypes, or
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=268435456``) or recycle payload
buffers; this module leaves process-wide allocator policy to the daemon.
Link throughput baseline: bench/raw_link.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import select
import socket
import struct

__all__ = ["PacketSocket", "ETHERTYPE", "ETH_HLEN", "BROADCAST"]

# IEEE 802 "local experimental" EtherType 1; the project's wire protocol.
ETHERTYPE = 0x88B5
ETH_HLEN = 14  # dst MAC, src MAC, EtherType
BROADCAST = b"\xff" * 6

# Linux constants Python's socket module does not export.
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SIOCGIFMTU = 0x8921
PACKET_MULTICAST = 2  # pkttype values: HOST 0, BROADCAST 1, MULTICAST 2, OTHERHOST 3, ...

# Receive buffer: 64 MiB.  A 9000-byte frame occupies ~12-16 KiB of buffer
# accounting (skb truesize), so this holds ~4,000 jumbo frames, i.e. 20-40 ms
# of the link at 1.5-2 GB/s: enough to ride out a GC pause or a slow disk
# write in the receiving thread without dropping frames.  The default
# (~200 KiB, a dozen jumbo frames) drops frames under any hiccup.
# SO_RCVBUFFORCE (root) ignores net.core.rmem_max; the kernel doubles it.
DEFAULT_RCVBUF = 64 << 20
# Send buffer: 4 MiB.  On veth an skb leaves our accounting as soon as the
# peer queues it, but on a real NIC it stays charged until the TX ring
# completes it; the default would allow only ~20 jumbo frames in flight.
DEFAULT_SNDBUF = 4 << 20
# When the send buffer is full we wait this long for room (backpressure)
# before dropping the frame: long enough for a NIC to drain a ring, short
# enough not to stall the single-threaded link loop.
SEND_WAIT_MS = 10
# From this payload size on, copying the payload to prepend the header costs
# more than sendmsg's fixed argument handling (~0.2-0.3 us): measured, the
# two tie at 6 KB, concatenation wins below (by 0.3 us at 64 B), sendmsg
# wins above (by 0.05-0.2 us for a 9000-byte jumbo payload).
SENDMSG_MIN_PAYLOAD = 6 * 1024
# Largest frame we can ever receive: 64 KiB (the largest veth/loopback MTU)
# plus header and a VLAN tag.  The scratch buffer is reused, so its size
# costs nothing per frame and no frame is ever silently truncated.
RECV_SCRATCH = 65536 + ETH_HLEN + 4
# Destination headers are cached; a link talks to one or two MACs, the bound
# only keeps a misbehaving caller from growing the cache without limit.
HEADER_CACHE_MAX = 64

# errnos that mean "the link is down or busy right now", not a bug: count them.
TRANSIENT_ERRNOS = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS,
                              errno.EAGAIN, errno.ENODEV, errno.ENETUNREACH})

_SOURCE_MAC = struct.Struct("6x6s")  # skip dst, read src

# cBPF: accept pkttype HOST/BROADCAST/MULTICAST, drop the rest (OTHERHOST:
# unicast to someone else; OUTGOING: our own frames seen by a second socket).
#   ld  [SKF_AD_OFF + SKF_AD_PKTTYPE]
#   jgt #PACKET_MULTICAST, drop
#   ret #0x40000      (accept the whole frame)
#   drop: ret #0
_SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF
_BPF_PROGRAM = [
    (0x20, 0, 0, _SKF_AD_PKTTYPE),  # BPF_LD | BPF_W | BPF_ABS
    (0x25, 1, 0, PACKET_MULTICAST),  # BPF_JMP | BPF_JGT | BPF_K: true -> skip 1
    (0x06, 0, 0, 0x40000),  # BPF_RET | BPF_K
    (0x06, 0, 0, 0),  # BPF_RET | BPF_K
]


def _attach_pkttype_filter(sock: socket.socket) -> None:
    insns = b"".join(struct.pack("HBBI", *insn) for insn in _BPF_PROGRAM)
    program = ctypes.create_string_buffer(insns)  # must outlive setsockopt
    fprog = struct.pack("HP", len(_BPF_PROGRAM), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class PacketSocket:
    """An AF_PACKET SOCK_RAW socket bound to one interface and one EtherType.

    Non-blocking; use :meth:`fileno` with poll/select.  ``mac`` is the
    interface's address and ``mtu`` its MTU when the socket was opened (the
    largest payload :meth:`send` accepts).  ``counters`` counts frames that
    were dropped here rather than raised: ``send_dropped`` (link down, queue
    full), ``recv_errors`` (e.g. the link went down) and ``runts`` (frames
    shorter than an Ethernet header).
    """

    def __init__(self, ifname: str, ethertype: int = ETHERTYPE, *,
                 rcvbuf: int = DEFAULT_RCVBUF, sndbuf: int = DEFAULT_SNDBUF) -> None:
        if not 0x0600 <= ethertype <= 0xFFFF:
            raise ValueError(f"ethertype must be an EtherType (0x0600..0xffff), got {ethertype:#x}")
        self.ifname = ifname
        self.ethertype = ethertype
        self.counters = {"send_dropped": 0, "recv_errors": 0, "runts": 0}
        # Protocol 0: receive nothing until bind() (see the module docstring).
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            _attach_pkttype_filter(sock)
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            try:
                sock.bind((ifname, ethertype))
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    from .iface import InterfaceNotFound
                    raise InterfaceNotFound(ifname) from None
                raise
            sock.setblocking(False)
            self.mac: bytes = sock.getsockname()[4]
            ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, struct.pack("16si12x", ifname.encode(), 0))
            self.mtu: int = struct.unpack_from("16si", ifreq)[1]
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ethertype = struct.pack("!H", ethertype)
        self._headers: dict[bytes | None, bytes] = {}
        self._scratch = bytearray(RECV_SCRATCH)  # reused by every recv_into
        self._poll_out = select.poll()
        self._poll_out.register(sock.fileno(), select.POLLOUT)

    # ---- send

    def _header_for(self, dst_mac) -> bytes:
        dst = BROADCAST if dst_mac is None else bytes(dst_mac)
        if len(dst) != 6:
            raise ValueError(f"destination MAC must be 6 bytes, got {len(dst)}")
        header = dst + self.mac + self._ethertype
        if len(self._headers) >= HEADER_CACHE_MAX:
            self._headers.clear()
        self._headers[dst_mac if dst_mac is None else dst] = header
        return header

    def send(self, payload, dst_mac: bytes | None = None) -> bool:
        """Send one frame carrying ``payload`` to ``dst_mac`` (None: broadcast).

        ``payload`` is any bytes-like object of at most ``mtu`` bytes; it is
        not modified or kept.  Returns True when the kernel took the frame,
        False when it was dropped because the link is down or its queue stayed
        full (counted in ``counters["send_dropped"]``).  A payload larger than
        the MTU raises ValueError.
        """
        try:
            header = self._headers[dst_mac]
        except (KeyError, TypeError):  # TypeError: an unhashable bytearray MAC
            header = self._header_for(dst_mac)
        try:
            if len(payload) < SENDMSG_MIN_PAYLOAD:
                self._sock.send(header + payload)
            else:
                self._sock.sendmsg((header, payload))
            return True
        except BlockingIOError:
            return self._send_after_wait(header, payload)
        except OSError as exc:
            if exc.errno == errno.ENETDOWN:
                return self._send_after_netdown(header, payload)
            return self._send_failed(exc, payload)

    def _send_after_netdown(self, header: bytes, payload) -> bool:
        # When the interface goes down the kernel also leaves ENETDOWN pending
        # on the socket (sk_err), and the next send or recv reports it once --
        # even if the link is back up by then.  Retry once: a link that is
        # really down fails again, a stale error does not.
        try:
            self._sock.sendmsg((header, payload))
            return True
        except OSError as exc:
            return self._send_failed(exc, payload)

    def _send_after_wait(self, header: bytes, payload) -> bool:
        # The send buffer is full: give the device a moment to drain it.
        if self._poll_out.poll(SEND_WAIT_MS):
            try:
                self._sock.sendmsg((header, payload))
                return True
            except OSError as exc:
                return self._send_failed(exc, payload)
        self.counters["send_dropped"] += 1
        return False

    def _send_failed(self, exc: OSError, payload) -> bool:
        if exc.errno == errno.EMSGSIZE:
            raise ValueError(f"{self.ifname}: payload of {len(payload)} bytes exceeds "
                             f"the MTU ({self.mtu})") from None
        if exc.errno in TRANSIENT_ERRNOS:
            self.counters["send_dropped"] += 1
            return False
        raise exc

    # ---- receive

    def recv_batch(self, max_frames: int) -> list[tuple[bytearray, bytes]]:
        """Read up to ``max_frames`` frames that are waiting; never blocks.

        Returns ``[(payload, source_mac), ...]`` in arrival order: each payload
        a fresh bytearray holding only the Ethernet payload (the caller may
        mutate and keep it), each source MAC 6 bytes.  Stops early at EAGAIN.
        Frames shorter than an Ethernet header are skipped and counted.
        """
        frames: list[tuple[bytearray, bytes]] = []
        append = frames.append
        recv_into = self._sock.recv_into
        scratch = self._scratch
        source_of = _SOURCE_MAC.unpack_from
        for _ in range(max_frames):
            try:
                n = recv_into(scratch)
            except BlockingIOError:
                break
            except OSError as exc:
                # ENETDOWN is left pending once when the interface goes down
                # (see _send_after_netdown); the socket keeps working when the
                # link comes back, so count it and let the caller poll again.
                if exc.errno in TRANSIENT_ERRNOS:
                    self.counters["recv_errors"] += 1
                    break
                raise
            if n < ETH_HLEN:
                self.counters["runts"] += 1
                continue
            append((scratch[ETH_HLEN:n], source_of(scratch)[0]))
        return frames

    # ---- plumbing

    def fileno(self) -> int:
        """The socket's descriptor (readable when frames are waiting)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()

    def __enter__(self) -> "PacketSocket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PacketSocket({self.ifname!r}, ethertype={self.ethertype:#06x}, "
                f"mac={self.mac.hex(':')}, mtu={self.mtu})")
