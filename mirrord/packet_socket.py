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
* Batches: ``send_batch`` copies each frame into the next free slot of a
  PACKET_TX_RING (TPACKET_V2, 1 MiB, mapped into our memory) and asks the
  kernel once per batch to send them (``send(b"", MSG_DONTWAIT)``): one
  system call per 64 frames instead of one each.  The kernel sends a slot's
  pages without copying them (a NIC DMAs from them; veth copies them when it
  hands the frame to the peer), so a slot is rewritten only after the kernel
  has set its status back to AVAILABLE -- on veth usually before the send
  call returns, on a NIC at TX completion.  The ring lives on a second
  socket, bound with protocol 0 (it receives nothing): once a socket has a TX
  ring, every send on it only flushes the ring, and ``send`` must keep
  working.  Frames are handed over strictly in order and none is left queued
  in the ring between calls, so ``send`` and ``send_batch`` keep call order
  on the wire.  If the ring cannot be set up (old kernel, no memory, a
  seccomp filter) send_batch falls back to one ``send`` per frame and says
  so once in the log.
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

Sending through the TX ring (``python3 bench/raw_link.py --ring --pin``: one
sender process and one raw receiver pinned to the two CPUs, medians of 7
interleaved 2 s rounds on a quiet VM; wall time per frame including the
send call, which on veth includes the peer's socket enqueue):

    per frame              MTU 9000   MTU 1500
    raw send(frame)        3.9 us     2.65 us   (the baseline: prebuilt frame)
    sendmsg((hdr, data))   4.3 us     3.2 us
    PacketSocket.send()    4.5 us     3.3 us
    send_batch() of 64     3.55 us    2.8 us    (copy into the ring ~0.4-0.6 us)

On a busier VM every figure was 20-40% higher and send_batch stayed 12-15%
below PacketSocket.send.  End to end (bench/link_goodput.py, MTU 9000,
2 GiB, before/after runs alternated) goodput went from 47-48% to 52-55% of
the raw baseline (~1000 -> ~1050 MB/s); interleaved A/B runs gave +0..15%.
The gain is smaller than the sender's saving because on a 2-CPU VM the
receiver is now about as busy as the sender (py-spy: both ~97% busy).
The RX ring (TPACKET_V3) was measured too and not adopted: it cut the
receiver's cost per jumbo frame from 3.2 to 1.4 us, but on veth the kernel's
copy into the ring runs in the *sender's* softirq (+0.5 us per frame there),
end to end it was -3%..+4% against the TX ring alone, and V3 blocks hold a
lone frame (an ack) until the block retire timeout (>= 1 ms).

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
import logging
import mmap
import select
import socket
import struct
import time

__all__ = ["PacketSocket", "ETHERTYPE", "ETH_HLEN", "BROADCAST"]

log = logging.getLogger(__name__)

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

# ---- TX ring (PACKET_TX_RING, TPACKET_V2) for send_batch --------------------
PACKET_VERSION = 10
PACKET_TX_RING = 13
TPACKET_V2 = 1  # fixed-size slots; V3's variable blocks only pay off on receive
# Slot sizes and the data offset must be multiples of this (linux/if_packet.h).
TPACKET_ALIGNMENT = 16
# sizeof(struct tpacket2_hdr), already a multiple of TPACKET_ALIGNMENT.  Without
# PACKET_TX_HAS_OFF the kernel reads a TX frame right after it (tp_hdrlen minus
# the sockaddr_ll that only RX frames carry), so a slot must hold
# TPACKET2_HDRLEN + ETH_HLEN + MTU bytes, rounded up to TPACKET_ALIGNMENT.
TPACKET2_HDRLEN = 32
# Slot status words, owned by user space while AVAILABLE and by the kernel
# from SEND_REQUEST until it sets AVAILABLE again.  While a slot is SENDING the
# kernel still references its pages (zero-copy: a real NIC DMAs straight from
# the ring), so a slot is rewritten only once it reads AVAILABLE.
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4
# Ring size: 1 MiB, i.e. 112 jumbo slots (MTU 9000) or 672 at MTU 1500.  Small
# enough to stay in the CPU's L2 cache: every frame is written into a slot and read
# out of it again by the kernel, and a ring that cycles through more memory than the
# cache holds makes both copies miss (4 MiB measured ~10% less link goodput at MTU
# 9000, docs/BENCHMARKS.md).  On veth a slot is released before the send call
# returns, so a batch larger than the ring only costs one more send call per lap; on
# a 10 Gbit/s NIC 1 MiB is ~0.8 ms of transmission, far longer than the kernel takes
# to give back a sent slot.  Pinned kernel memory besides.
TX_RING_BYTES = 1 << 20
# Ring blocks are physically contiguous power-of-two allocations (the kernel
# falls back to vmalloc when that fails) and slots never straddle blocks:
# 64 KiB holds 7 jumbo or 42 standard slots, wasting ~3% at the tail.
TX_BLOCK_MIN = 64 << 10
# A larger block (up to 8x the smallest that fits a slot) is used when the
# tail would waste more than 1/16 of it, e.g. for a 64 KiB MTU (1 MiB blocks).
TX_BLOCK_MAX_FACTOR = 8
TX_BLOCK_WASTE = 1 / 16
# When the ring stays full we re-check the oldest slot this often while
# waiting for up to SEND_WAIT_MS (poll(POLLOUT) returns at once whenever the
# socket's send buffer has room, so it cannot be the only wait).
TX_WAIT_SLICE_S = 0.0002
# The kernel stops at a frame it cannot send; these errnos mean the link is
# down or gone: the frames still queued in the ring are dropped and counted.
_LINK_GONE_ERRNOS = frozenset({errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.ENETUNREACH})
# Slot head: tp_status, tp_len, the rest of struct tpacket2_hdr (ignored on
# TX without PACKET_TX_HAS_OFF; written as zeros), then the Ethernet header.
_TX_SLOT_HEAD = struct.Struct(f"=II{TPACKET2_HDRLEN - 8}x{ETH_HLEN}s")
_TX_REQ = struct.Struct("=IIII")  # struct tpacket_req: block size/nr, frame size/nr

_tx_ring_failure_logged = False


def _tx_ring_geometry(mtu: int, ring_bytes: int = TX_RING_BYTES) -> tuple[int, int, int]:
    """(block_size, block_count, slot_size) for a TX ring carrying ``mtu``-byte payloads."""
    slot = -(-(TPACKET2_HDRLEN + ETH_HLEN + mtu) // TPACKET_ALIGNMENT) * TPACKET_ALIGNMENT
    block = TX_BLOCK_MIN
    while block < slot:
        block *= 2
    largest = block * TX_BLOCK_MAX_FACTOR
    # The smallest block that wastes at most TX_BLOCK_WASTE of itself, else the largest.
    while block < largest and (block % slot) / block > TX_BLOCK_WASTE:
        block *= 2
    return block, max(1, ring_bytes // block), slot


def _log_tx_ring_failure(ifname: str, exc: BaseException) -> None:
    global _tx_ring_failure_logged
    if not _tx_ring_failure_logged:  # once per process: every socket would fail alike
        _tx_ring_failure_logged = True
        log.warning("%s: no PACKET_TX_RING (%s); send_batch sends frame by frame", ifname, exc)


class _TxRing:
    """A PACKET_TX_RING on its own socket: the mapping, its slots, and the write head.

    A separate socket because once a socket has a TX ring every send on it
    only flushes the ring (the kernel ignores the data passed), and
    PacketSocket.send must keep working.  The socket is bound with protocol 0,
    so it receives nothing and costs nothing on the receive path.
    """

    def __init__(self, ifname: str, mtu: int, sndbuf: int) -> None:
        block, blocks, slot = _tx_ring_geometry(mtu)
        per_block = block // slot
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            sock.setsockopt(SOL_PACKET, PACKET_TX_RING,
                            _TX_REQ.pack(block, blocks, slot, blocks * per_block))
            # In-flight frames are bounded by the ring; let the send buffer not
            # stop the kernel first (each frame is charged its truesize).
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(sndbuf, 2 * block * blocks))
            self.mm = mmap.mmap(sock.fileno(), block * blocks, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            sock.bind((ifname, 0))
            sock.setblocking(False)
        except BaseException:
            mm = getattr(self, "mm", None)
            if mm is not None:
                mm.close()
            sock.close()
            raise
        self.sock = sock
        self.slot_size = slot
        self.nslots = blocks * per_block
        # Byte offset of each slot, in the kernel's ring order.
        self.offsets = [(i // per_block) * block + (i % per_block) * slot
                        for i in range(self.nslots)]
        self.view = memoryview(self.mm)  # what frames are written through
        self.words = self.view.cast("I")  # status word of slot i: offsets[i] >> 2
        self.head = 0  # next slot to fill; equal to the kernel's head between calls
        self.poll_out = select.poll()
        self.poll_out.register(sock.fileno(), select.POLLOUT)

    def close(self) -> None:
        if self.mm.closed:
            return
        self.words.release()
        self.view.release()
        self.mm.close()
        self.sock.close()

# ---- RX ring (PACKET_RX_RING, TPACKET_V2) for recv_batch --------------------
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
# Where the kernel puts a received frame in an RX slot: after the tpacket2_hdr and a
# sockaddr_ll (52 bytes), at the 16-aligned offset that leaves 16 bytes for the link
# header: the network header at 80, the Ethernet header 14 bytes before it.
RX_NETOFF = 80
# Room for a VLAN tag beyond the MTU, so that a tagged frame is not cut short either.
RX_SLOT_SLACK = 4
# Ring size: 32 MiB, i.e. ~3,600 jumbo slots (MTU 9000) or ~21,000 at MTU 1500: the
# protocol's receive window (32 MiB) and 20-30 ms of the link at full speed, the same
# order as the 64 MiB socket buffer (~4,000 jumbo frames) it replaces.  Pinned kernel
# memory, allocated at open.
RX_RING_BYTES = 32 << 20
_RX_SLOT_HEAD = struct.Struct("=IIIH")  # tp_status, tp_len, tp_snaplen, tp_mac

_rx_ring_failure_logged = False


def _rx_ring_geometry(mtu: int, ring_bytes: int = RX_RING_BYTES) -> tuple[int, int, int]:
    """(block_size, block_count, slot_size) for an RX ring receiving ``mtu``-byte payloads."""
    return _tx_ring_geometry(RX_NETOFF + mtu + RX_SLOT_SLACK - TPACKET2_HDRLEN - ETH_HLEN,
                             ring_bytes)


class _RxRing:
    """A PACKET_RX_RING on the receiving socket (set up before it is bound).

    The kernel copies each accepted frame into the next slot and sets its status to
    USER; recv_batch copies the payload out and hands the slot back (status KERNEL), in
    ring order, so poll() keeps meaning "a frame is waiting".  No system call per frame.
    """

    def __init__(self, sock: socket.socket, mtu: int, ring_bytes: int) -> None:
        block, blocks, slot = _rx_ring_geometry(mtu, ring_bytes)
        per_block = block // slot
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING,
                        _TX_REQ.pack(block, blocks, slot, blocks * per_block))
        try:
            self.mm = mmap.mmap(sock.fileno(), block * blocks, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _TX_REQ.pack(0, 0, 0, 0))
            raise
        self.slot_size = slot
        self.nslots = blocks * per_block
        self.offsets = [(i // per_block) * block + (i % per_block) * slot
                        for i in range(self.nslots)]
        self.view = memoryview(self.mm)
        self.words = self.view.cast("I")
        self.head = 0  # next slot to read

    def close(self) -> None:
        if self.mm.closed:
            return
        self.words.release()
        self.view.release()
        self.mm.close()


def _log_rx_ring_failure(ifname: str, exc: BaseException) -> None:
    global _rx_ring_failure_logged
    if not _rx_ring_failure_logged:
        _rx_ring_failure_logged = True
        log.warning("%s: no PACKET_RX_RING (%s); recv_batch reads frame by frame", ifname, exc)


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


def _interface_mtu(sock: socket.socket, ifname: str) -> int:
    try:
        ifreq = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, struct.pack("16si12x", ifname.encode(), 0))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            from .iface import InterfaceNotFound
            raise InterfaceNotFound(ifname) from None
        raise
    return struct.unpack_from("16si", ifreq)[1]


def _attach_pkttype_filter(sock: socket.socket) -> None:
    insns = b"".join(struct.pack("HBBI", *insn) for insn in _BPF_PROGRAM)
    program = ctypes.create_string_buffer(insns)  # must outlive setsockopt
    fprog = struct.pack("HP", len(_BPF_PROGRAM), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _copy_into(view, offset: int, limit: int, payload) -> int:
    """send_batch's writer for a payload given as bytes: copy it into the slot."""
    n = len(payload)
    if n > limit:
        raise ValueError(f"payload of {n} bytes exceeds the MTU ({limit})")
    view[offset:offset + n] = payload
    return n


class _Described:
    """Frames still to send, as items and the function that writes each (send_batch)."""

    __slots__ = ("items", "build")

    def __init__(self, items, build) -> None:
        self.items = items
        self.build = build


class PacketSocket:
    """An AF_PACKET SOCK_RAW socket bound to one interface and one EtherType.

    Non-blocking; use :meth:`fileno` with poll/select.  ``mac`` is the
    interface's address and ``mtu`` its MTU when the socket was opened (the
    largest payload :meth:`send` accepts).  ``counters`` counts frames that
    were dropped here rather than raised: ``send_dropped`` (link down, queue
    full), ``recv_errors`` (e.g. the link went down) and ``runts`` (frames
    shorter than an Ethernet header); and for :meth:`send_batch`,
    ``tx_ring_full`` (frames sent one by one because every ring slot stayed
    in flight) and ``tx_wrong_format`` (frames the kernel refused from the
    ring, also counted as dropped).

    ``tx_ring`` (default True) sets up the PACKET_TX_RING that send_batch
    uses; if that fails, send_batch sends frame by frame (``.tx_ring`` tells
    which).  Not thread-safe: one thread sends and receives.
    """

    def __init__(self, ifname: str, ethertype: int = ETHERTYPE, *,
                 rcvbuf: int = DEFAULT_RCVBUF, sndbuf: int = DEFAULT_SNDBUF,
                 tx_ring: bool = True, rx_ring: bool = True,
                 rx_ring_bytes: int = RX_RING_BYTES) -> None:
        if not 0x0600 <= ethertype <= 0xFFFF:
            raise ValueError(f"ethertype must be an EtherType (0x0600..0xffff), got {ethertype:#x}")
        self.ifname = ifname
        self.ethertype = ethertype
        self.counters = {"send_dropped": 0, "recv_errors": 0, "runts": 0, "truncated": 0,
                         "tx_ring_full": 0, "tx_wrong_format": 0}
        # Protocol 0: receive nothing until bind() (see the module docstring).
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            _attach_pkttype_filter(sock)
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            rx = None
            if rx_ring:
                # Before bind: no frame can have been queued outside the ring yet.
                try:
                    rx = _RxRing(sock, _interface_mtu(sock, ifname), rx_ring_bytes)
                except (OSError, ValueError) as exc:
                    _log_rx_ring_failure(ifname, exc)
            try:
                sock.bind((ifname, ethertype))
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    from .iface import InterfaceNotFound
                    raise InterfaceNotFound(ifname) from None
                raise
            sock.setblocking(False)
            self.mac: bytes = sock.getsockname()[4]
            self.mtu: int = _interface_mtu(sock, ifname)
        except BaseException:
            if rx is not None:
                rx.close()
            sock.close()
            raise
        self._sock = sock
        self._rx: _RxRing | None = rx
        self._ethertype = struct.pack("!H", ethertype)
        self._headers: dict[bytes | None, bytes] = {}
        self._scratch = bytearray(RECV_SCRATCH)  # reused by every recv_into
        self._build_scratch: memoryview | None = None  # send_batch(build=) without a ring
        self._poll_out = select.poll()
        self._poll_out.register(sock.fileno(), select.POLLOUT)
        self._tx: _TxRing | None = None
        if tx_ring:
            try:
                self._tx = _TxRing(ifname, self.mtu, sndbuf)
            except (OSError, ValueError) as exc:
                _log_tx_ring_failure(ifname, exc)

    @property
    def rx_ring(self) -> bool:
        """Whether recv_batch reads a PACKET_RX_RING (else one recv per frame)."""
        return self._rx is not None

    @property
    def tx_ring(self) -> bool:
        """Whether send_batch goes through a PACKET_TX_RING (else one send per frame)."""
        return self._tx is not None

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

    def send_batch(self, frames, build=None) -> int:
        """Send ``[(payload, dst_mac), ...]`` in order; return how many frames the kernel took.

        The pairs are what :meth:`send` takes (``dst_mac`` None: broadcast),
        e.g. the list ``Connection.frames_to_send`` returns; payloads are
        bytes-like objects of single bytes, not modified or kept.  With the TX
        ring each frame is copied into the next free ring slot and the kernel
        is asked once to send them all (``send`` with MSG_DONTWAIT); without it
        (``tx_ring=False`` or the ring could not be set up) this is one
        :meth:`send` per frame.

        Frames are dropped and counted in ``counters["send_dropped"]``, not
        raised, when the link is down or gone, or the device stays busy for
        SEND_WAIT_MS.  When every ring slot is still in flight after
        SEND_WAIT_MS the rest of the batch goes out frame by frame (counted in
        ``tx_ring_full``); a frame the kernel refuses (its payload exceeds an
        MTU lowered after the socket was opened) is dropped and counted in
        ``tx_wrong_format``.  A payload larger than ``mtu`` or a malformed MAC
        raises ValueError; the frames before it have been sent.

        Frames may also be described rather than given as bytes, to be written
        straight into the slots (the data is then copied once, into the memory
        the kernel sends from, instead of being joined into a frame first):

        * a tuple payload is built by ``build(view, offset, limit, payload)``,
          which writes at most ``limit`` bytes into the writable memoryview
          ``view`` at ``offset`` and returns how many, or raises ValueError
          having written nothing -- e.g. ``protocol.frames.encode_frame_into``;
        * a payload with ``items`` and ``build`` (``protocol.frames.DataFrames``,
          from ``Connection.frames_to_send(in_place=True)``) is one frame per
          item, each written by ``payload.build(view, offset, limit, item)``.
        """
        ring = self._tx
        if ring is None:
            return self._send_each(frames, build)
        headers = self._headers
        mtu = self.mtu
        view = ring.view
        words = ring.words
        offsets = ring.offsets
        nslots = ring.nslots
        pack_head = _TX_SLOT_HEAD.pack_into
        data = TPACKET2_HDRLEN + ETH_HLEN  # payload offset within a slot
        head = ring.head
        filled = 0  # slots filled since the kernel was last asked to send
        sent = 0
        todo = iter(frames)
        try:
            for payload, dst in todo:
                try:
                    header = headers[dst]
                except (KeyError, TypeError):  # TypeError: an unhashable bytearray MAC
                    header = self._header_for(dst)
                kind = type(payload)
                if kind is tuple:
                    if build is None:
                        raise TypeError("send_batch: a tuple payload needs build=")
                    items, writer = (payload,), build
                elif kind is bytes or kind is bytearray or kind is memoryview:
                    items, writer = (payload,), _copy_into
                else:
                    items, writer = payload.items, payload.build
                pending = iter(items)
                for item in pending:
                    off = offsets[head]
                    if words[off >> 2]:  # not AVAILABLE: the kernel still owns this slot
                        if filled:  # ours, not yet handed over (a full lap), or in flight
                            ring.head = head
                            queued, filled = filled, 0
                            try:
                                sent += self._tx_flush(queued)
                            finally:
                                head = ring.head  # the flush may give slots back
                            off = offsets[head]
                        if not self._tx_wait_slot(off):
                            rest = [item, *pending]
                            self.counters["tx_ring_full"] += len(rest)
                            sent += self._send_each(
                                [(_Described(rest, writer), dst), *todo], build)
                            return sent
                    # The status word goes last: the kernel takes nothing from a slot that
                    # reads AVAILABLE, so a build that raises leaves nothing to undo.
                    n = writer(view, off + data, mtu, item)
                    pack_head(view, off, TP_STATUS_SEND_REQUEST, n + ETH_HLEN, header)
                    filled += 1
                    head += 1
                    if head == nslots:
                        head = 0
        finally:
            ring.head = head
            if filled:
                sent += self._tx_flush(filled)
        return sent

    def _send_each(self, frames, build=None) -> int:
        send = self.send
        sent = 0
        for payload, dst in frames:
            kind = type(payload)
            if kind is bytes or kind is bytearray or kind is memoryview:
                if send(payload, dst):
                    sent += 1
                continue
            if kind is tuple:
                if build is None:
                    raise TypeError("send_batch: a tuple payload needs build=")
                items, writer = (payload,), build
            else:
                items, writer = payload.items, payload.build
            scratch = self._build_scratch
            if scratch is None:
                scratch = self._build_scratch = memoryview(bytearray(self.mtu))
            for item in items:
                if send(scratch[:writer(scratch, 0, self.mtu, item)], dst):
                    sent += 1
        return sent

    def _tx_flush(self, queued: int) -> int:
        """Have the kernel send the ``queued`` slots before the ring's head.

        Returns how many it took.  On return none is left waiting: the
        kernel's own head is the ring's head again (frames it could not take
        are dropped, counted, and their slots given back), so the next batch
        starts in step with it and no stale frame goes out later.
        """
        ring = self._tx
        words = ring.words
        offsets = ring.offsets
        nslots = ring.nslots
        counters = self.counters
        sent = 0
        deadline = None
        # Bounded: each turn either settles, drops a frame, or waits ~0.2-1 ms
        # against a SEND_WAIT_MS deadline.
        for _ in range(queued + 1000):
            error = None
            try:
                ring.sock.send(b"", socket.MSG_DONTWAIT)
            except OSError as exc:  # BlockingIOError included
                error = exc
            # The kernel takes slots strictly in ring order: if it took the
            # last one it took them all.
            first = (ring.head - queued) % nslots
            status = words[offsets[(ring.head - 1) % nslots] >> 2]
            if status != TP_STATUS_SEND_REQUEST and status != TP_STATUS_WRONG_FORMAT:
                return sent + queued
            taken = 0
            while taken < queued:
                status = words[offsets[(first + taken) % nslots] >> 2]
                if status == TP_STATUS_SEND_REQUEST or status == TP_STATUS_WRONG_FORMAT:
                    break
                taken += 1
            sent += taken
            queued -= taken
            if not queued:
                return sent
            first = (first + taken) % nslots
            if status == TP_STATUS_WRONG_FORMAT:
                # The kernel refused this frame and stays stuck on it: drop it.
                self._tx_remove_slot(first, queued)
                queued -= 1
                counters["tx_wrong_format"] += 1
                counters["send_dropped"] += 1
                if not queued:
                    return sent
                continue
            # The kernel stopped before `first`: link down, or no room yet.
            code = error.errno if error is not None else None
            if code in _LINK_GONE_ERRNOS:
                self._tx_reclaim(first, queued)
                return sent
            if code is not None and code not in TRANSIENT_ERRNOS:
                self._tx_reclaim(first, queued)
                raise error
            if deadline is None:
                deadline = time.monotonic() + SEND_WAIT_MS / 1000
            if not self._tx_pause(deadline):
                self._tx_reclaim(first, queued)
                return sent
        self._tx_reclaim((ring.head - queued) % nslots, queued)  # not reached in practice
        return sent

    def _tx_reclaim(self, first: int, count: int) -> None:
        """Take back the last ``count`` slots (from ``first``), unsent: drop them."""
        ring = self._tx
        words, offsets, nslots = ring.words, ring.offsets, ring.nslots
        for i in range(count):
            words[offsets[(first + i) % nslots] >> 2] = TP_STATUS_AVAILABLE
        ring.head = first
        self.counters["send_dropped"] += count

    def _tx_remove_slot(self, first: int, count: int) -> None:
        """Remove the refused frame in slot ``first``, moving the ``count - 1`` after it down.

        The kernel's head stays on a WRONG_FORMAT slot, so the next frame must
        be in that very slot; only the error path ever copies slots.
        """
        ring = self._tx
        mm, words, offsets, nslots = ring.mm, ring.words, ring.offsets, ring.nslots
        size = ring.slot_size
        for i in range(count - 1):
            dst = offsets[(first + i) % nslots]
            src = offsets[(first + i + 1) % nslots]
            mm[dst:dst + size] = mm[src:src + size]  # status SEND_REQUEST moves with it
        last = (first + count - 1) % nslots
        words[offsets[last] >> 2] = TP_STATUS_AVAILABLE
        ring.head = last

    def _tx_wait_slot(self, off: int) -> bool:
        """Wait up to SEND_WAIT_MS for the kernel to give back the slot at ``off``."""
        words = self._tx.words
        deadline = time.monotonic() + SEND_WAIT_MS / 1000
        while words[off >> 2] != TP_STATUS_AVAILABLE:
            if not self._tx_pause(deadline):
                return words[off >> 2] == TP_STATUS_AVAILABLE
        return True

    def _tx_pause(self, deadline: float) -> bool:
        """Sleep a little (at most ~1 ms) before ``deadline``; False once it has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if self._tx.poll_out.poll(min(remaining, 0.001) * 1000):
            # POLLOUT may only mean "the send buffer has room": don't spin.
            time.sleep(min(remaining, TX_WAIT_SLICE_S))
        return True

    # ---- receive

    def recv_batch(self, max_frames: int, pending_error: bool = True
                   ) -> list[tuple[bytearray, bytes]]:
        """Read up to ``max_frames`` frames that are waiting; never blocks.

        Returns ``[(payload, source_mac), ...]`` in arrival order: each payload
        a fresh bytearray holding only the Ethernet payload (the caller may
        mutate and keep it), each source MAC 6 bytes.  Stops early at EAGAIN.
        Frames shorter than an Ethernet header are skipped and counted.

        With the RX ring (the default) frames are read from the ring's slots,
        with no system call per frame: one copy of each payload, out of the
        slot, which goes back to the kernel at once.  A frame longer than the
        slot (an MTU raised after the socket was opened) is counted in
        ``truncated`` and skipped.

        When the ring is empty, one recv collects an error the kernel may have left
        pending on the socket (ENETDOWN when the link went down), which would otherwise
        keep poll() returning at once.  A caller that polls the socket can pass
        ``pending_error=False`` unless poll reported POLLERR, and save that system
        call (and the exception it raises) on every turn that finds the ring empty.
        """
        if self._rx is not None:
            frames = self._recv_ring(max_frames)
            if frames or not pending_error:
                return frames
            return self._recv_each(1)
        return self._recv_each(max_frames)

    def _recv_ring(self, max_frames: int) -> list[tuple[bytearray, bytes]]:
        ring = self._rx
        view = ring.view
        words = ring.words
        offsets = ring.offsets
        nslots = ring.nslots
        head = ring.head
        unpack_head = _RX_SLOT_HEAD.unpack_from
        source_of = _SOURCE_MAC.unpack_from
        frames: list[tuple[bytearray, bytes]] = []
        append = frames.append
        for _ in range(max_frames):
            off = offsets[head]
            if not words[off >> 2] & TP_STATUS_USER:
                break
            _, length, snaplen, mac = unpack_head(view, off)
            start = off + mac
            if snaplen < length:
                self.counters["truncated"] += 1
            elif snaplen < ETH_HLEN:
                self.counters["runts"] += 1
            else:
                append((bytearray(view[start + ETH_HLEN:start + snaplen]),
                        source_of(view, start)[0]))
            words[off >> 2] = TP_STATUS_KERNEL
            head += 1
            if head == nslots:
                head = 0
        ring.head = head
        return frames

    def _recv_each(self, max_frames: int) -> list[tuple[bytearray, bytes]]:
        """recv_batch without the ring: one recv_into per frame, then a slice copy."""
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
        """Close the socket and its TX ring (idempotent)."""
        self._sock.close()
        if self._tx is not None:
            self._tx.close()
        if self._rx is not None:
            self._rx.close()

    def __enter__(self) -> "PacketSocket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PacketSocket({self.ifname!r}, ethertype={self.ethertype:#06x}, "
                f"mac={self.mac.hex(':')}, mtu={self.mtu}, tx_ring={self.tx_ring})")
