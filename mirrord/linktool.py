"""`mirrord-link`: exercise and measure a dedicated replication link.

What iperf is to TCP, this is to mirrord's link protocol: before a volume is configured,
an operator runs `mirrord-link … receive` on one box and `mirrord-link … send` on the
other, and learns whether the link connects, authenticates, and how fast it carries
data.  Tests and benchmarks use it as a real process on each side.

    mirrord-link --interface mir0 --node beta  receive --bytes 1G
    mirrord-link --interface mir0 --node alpha send    --bytes 1G --message-size 1M
    mirrord-link --interface mir0 --node alpha monitor --seconds 60

`send` and `receive` print one JSON report on stdout (bytes, seconds, goodput, an xxh3-128
digest of the stream, every counter); `monitor` prints one JSON line per connection event
and periodic counter lines.  Logs go to stderr.  Exit codes: 0 done, 1 the transfer
failed (link lost, timeout, digest or order error), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import time

import xxhash

from protocol import (
    Connected, Connection, ConnectionConfig, ConnectionLost, HandshakeRefused, MessageReceived,
    MessagesAcknowledged, ProtocolError,
)

from .faults import FaultInjector, parse_fault_spec
from .iface import InterfaceError
from .link import Link
from .process import tune_allocator

log = logging.getLogger("mirrord-link")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Messages queued ahead of the peer's acknowledgement: keeps the window full without
# queueing the whole transfer in memory.
MAX_OUTSTANDING = 64
# Memory the sender's message slots may take (see Payloads).
OUTSTANDING_BYTES = 16 << 20
_INDEX_BYTES = 8  # every message starts with its index: the receiver checks the order
# After the last byte, the receiver keeps acking this long so the sender hears it.
LINGER = 1.0


class UsageError(argparse.ArgumentTypeError):
    """A bad option value: one line on stderr, exit 2 (argparse reports it as is)."""


def parse_size(text: str) -> int:
    """'256M' -> 268435456; K, M, G, T are binary multiples."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body, unit = text.strip().upper().rstrip("IB"), ""
    if body and body[-1] in units:
        body, unit = body[:-1], body[-1]
    try:
        value = int(float(body) * units[unit])
    except ValueError:
        raise UsageError(f"{text!r} is not a size (examples: 4096, 64K, 256M, 1G)") from None
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


def parse_mac(text: str) -> bytes:
    try:
        mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise UsageError(f"--peer-mac {text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return mac


def format_mac(mac) -> str | None:
    return ":".join(f"{b:02x}" for b in mac) if isinstance(mac, (bytes, bytearray)) else None


class Payloads:
    """The deterministic byte stream a sender sends, without a copy per message.

    Stamped (the default): message i is slot i % slots, a fixed pseudo-random block
    (different per slot) whose first 8 bytes are overwritten with i, so the receiver can
    check order and the digest covers content.  A slot is rewritten only when message
    i + slots is queued; the sender keeps fewer than `slots` messages unacknowledged, so
    by then message i has been acknowledged and will never be retransmitted from the slot.

    Unstamped (--no-verify, where nothing checks content or order): every message is the
    same block, never rewritten, as iperf sends one buffer over and over.  The sender then
    reads bytes that stay in the cache, as the raw baseline does with its one frame and as
    the daemon does with a write that has just arrived; the stamped stream cycles through
    more memory than the caches hold (~1 µs a jumbo frame of cache misses, measured).
    """

    def __init__(self, seed: int, message_size: int, slots: int, stamped: bool = True) -> None:
        rnd = random.Random(seed)
        self.stamped = stamped
        self.slots = [bytearray(rnd.randbytes(message_size)) for _ in range(slots if stamped else 1)]

    def message(self, index: int, size: int) -> memoryview:
        slot = self.slots[index % len(self.slots)]
        if self.stamped:
            slot[:_INDEX_BYTES] = index.to_bytes(_INDEX_BYTES, "big")
        return memoryview(slot)[:size]


def outstanding_limit(message_size: int) -> int:
    """Messages queued ahead of acknowledgement: MAX_OUTSTANDING, or fewer for large
    messages so the sender's slots stay within OUTSTANDING_BYTES."""
    return max(2, min(MAX_OUTSTANDING, OUTSTANDING_BYTES // message_size))


def build(args) -> tuple[Link, Connection]:
    """The link and connection the options describe."""
    secret = None
    if args.secret_file:
        try:
            with open(args.secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as err:
            raise UsageError(f"--secret-file {args.secret_file}: {err.strerror}") from None
    faults = None
    if args.faults:
        try:
            faults = parse_fault_spec(args.faults)
        except ValueError as err:
            raise UsageError(f"--faults: {err}") from None
    try:
        link = Link(args.interface, faults=faults)
    except InterfaceError as err:
        raise UsageError(str(err)) from None
    config = ConnectionConfig(
        node=args.node, volume=args.volume, mtu=link.mtu, peer_node=args.peer_node,
        peer_address=parse_mac(args.peer_mac) if args.peer_mac else None, secret=secret,
        dead_peer_timeout=args.dead_peer_timeout,
    )
    try:
        conn = Connection(config)
    except ProtocolError as err:
        link.close()
        raise UsageError(str(err)) from None
    link.add(conn)
    return link, conn


def report(link: Link, conn: Connection, **fields) -> dict:
    fields["counters"] = conn.counters.as_dict()
    fields["link"] = dict(link.counters)
    if link.faults is not None:
        fields["faults"] = link.faults.counters()
    fields["mtu"] = link.mtu
    rtt = conn.rtt()
    fields["rtt_ms"] = round(rtt * 1000, 3) if rtt is not None else None
    return fields


def describe(event) -> dict | None:
    """A JSON-able line for a connection event (None for data-path events)."""
    if isinstance(event, Connected):
        return {"event": "connected", "session": f"{event.session_id:08x}", "peer": event.peer_node,
                "peer_mac": format_mac(event.peer_address), "mtu": event.mtu}
    if isinstance(event, ConnectionLost):
        return {"event": "lost", "session": f"{event.session_id:08x}", "reason": event.reason}
    if isinstance(event, HandshakeRefused):
        return {"event": "refused", "peer": event.peer_node, "reason": event.reason}
    return None


def log_event(event) -> None:
    line = describe(event)
    if line is None:
        return
    if line["event"] == "connected":
        log.info("connected to %s (%s), session %s, mtu %d", line["peer"], line["peer_mac"],
                 line["session"], line["mtu"])
    elif line["event"] == "lost":
        log.warning("connection lost (session %s): %s", line["session"], line["reason"])
    else:
        log.error("handshake refused: %s", line["reason"])


class Stop:
    """SIGTERM/SIGINT end the loop cleanly (the peer is told with a CLOSE frame)."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_):
        self.requested = True


def start_and_connect(args, link: Link, stop: Stop) -> bool:
    """Start the handshake and wait for the peer (--connect-timeout); log if none came."""
    link.start()
    deadline = time.monotonic() + args.connect_timeout
    while time.monotonic() < deadline and not stop.requested:
        for _, event in link.step(0.05):
            log_event(event)
            if isinstance(event, Connected):
                return True
    log.error("no peer answered on %s within %.0f s", link.ifname, args.connect_timeout)
    return False


def finish_transfer(link: Link, conn: Connection, role: str, nbytes: int, seconds: float,
                    digest, failure: str | None, **extra) -> int:
    """Print the JSON report of a send or receive; the exit code."""
    seconds = max(seconds, 1e-9)
    result = report(link, conn, role=role, bytes=nbytes, seconds=round(seconds, 6),
                    goodput_mb_s=round(nbytes / seconds / 1e6, 1),
                    digest=digest.hexdigest() if digest is not None else None,
                    ok=failure is None, error=failure,
                    # user + system time of this process since it started: with the bytes,
                    # the CPU a transfer costs each end (benchmarks compare it).
                    process_cpu_seconds=round(time.process_time(), 3), **extra)
    print(json.dumps(result), flush=True)
    if failure:
        log.error("transfer failed: %s", failure)
        return EXIT_FAILED
    return EXIT_OK


def run_send(args, link: Link, conn: Connection, stop: Stop) -> int:
    total = args.bytes
    size = args.message_size
    verify = not args.no_verify
    limit = outstanding_limit(size)
    payloads = Payloads(args.seed, size, limit + 1, stamped=verify)
    count = -(-total // size)
    if not start_and_connect(args, link, stop):
        return EXIT_FAILED
    digest = xxhash.xxh3_128()
    sent = acked = 0
    start = time.monotonic()
    deadline = start + args.timeout
    failure = None
    while acked < count:
        now = time.monotonic()
        if now > deadline or stop.requested:
            failure = "timed out" if now > deadline else "stopped"
            break
        while sent < count and sent - acked < limit:
            if args.rate and sent * size > (now - start) * args.rate:
                break  # --rate: the next message is not due yet
            message = payloads.message(sent, min(size, total - sent * size))
            if verify:
                digest.update(message)
            conn.send_message(message, now=now)
            sent += 1
        for _, event in link.step(0.005 if args.rate else 0.05):
            if isinstance(event, MessagesAcknowledged):
                acked = event.up_to
            else:
                log_event(event)
                if isinstance(event, ConnectionLost):
                    failure = f"connection lost: {event.reason}"
        if failure:
            break
    seconds = time.monotonic() - start
    code = finish_transfer(link, conn, "send", min(acked * size, total), seconds,
                           digest if verify else None, failure, messages=acked)
    if conn.session_id is not None:
        conn.close("transfer finished", now=time.monotonic())
        link.flush()
    return code


def run_receive(args, link: Link, conn: Connection, stop: Stop) -> int:
    total = args.bytes
    verify = not args.no_verify
    if not start_and_connect(args, link, stop):
        return EXIT_FAILED
    digest = xxhash.xxh3_128()
    received = messages = order_errors = 0
    start = first = None
    deadline = time.monotonic() + args.timeout
    failure = None
    while received < total:
        if time.monotonic() > deadline or stop.requested:
            failure = "timed out" if not stop.requested else "stopped"
            break
        for _, event in link.step(0.05):
            if isinstance(event, MessageReceived):
                if first is None:
                    first = time.monotonic()
                if verify:
                    for part in event.parts:
                        digest.update(part)
                    index = int.from_bytes(bytes(event.parts[0][:_INDEX_BYTES]), "big")
                    if index != messages:
                        order_errors += 1
                messages += 1
                received += len(event)
            else:
                log_event(event)
                if isinstance(event, ConnectionLost) and received < total:
                    failure = f"connection lost: {event.reason}"
        if failure:
            break
    end = time.monotonic()
    start = first or end
    # Keep acking until the sender says goodbye, so its last messages are confirmed.
    linger_until = time.monotonic() + LINGER
    while failure is None and conn.session_id is not None and time.monotonic() < linger_until:
        for _, event in link.step(0.05):
            log_event(event)
    seconds = end - start
    if order_errors:
        failure = f"{order_errors} messages out of order"
    return finish_transfer(link, conn, "receive", received, seconds, digest if verify else None,
                           failure,
                           messages=messages, order_errors=order_errors)


def run_monitor(args, link: Link, conn: Connection, stop: Stop) -> int:
    link.start()
    end = time.monotonic() + args.seconds if args.seconds else None
    next_stats = time.monotonic() + args.stats_interval
    while not stop.requested and (end is None or time.monotonic() < end):
        for _, event in link.step(0.05):
            line = describe(event)
            if line is not None:
                log_event(event)
                line["t"] = time.monotonic()
                print(json.dumps(line), flush=True)
        if time.monotonic() >= next_stats:
            next_stats += args.stats_interval
            print(json.dumps(report(link, conn, event="stats", t=time.monotonic(),
                                    session=f"{conn.session_id:08x}" if conn.session_id else None)),
                  flush=True)
    if conn.session_id is not None:
        conn.close("monitor stopped", now=time.monotonic())
        link.flush()
    print(json.dumps(report(link, conn, event="stats", t=time.monotonic(), final=True)), flush=True)
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrord-link", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interface", required=True, help="the dedicated link's interface")
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--peer-node", help="the expected peer's name (default: any other)")
    p.add_argument("--peer-mac", help="pin the peer's MAC instead of discovering it")
    p.add_argument("--volume", type=int, default=0, help="volume id to use on the wire")
    p.add_argument("--secret-file", help="file holding the shared secret (both sides)")
    p.add_argument("--faults", help="inject faults: loss=0.05,dup=0.01,reorder=0.02,corrupt=0.001,seed=7")
    p.add_argument("--dead-peer-timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("send", "receive"):
        s = sub.add_parser(name)
        s.add_argument("--bytes", type=parse_size, required=True)
        s.add_argument("--connect-timeout", type=float, default=10.0)
        s.add_argument("--timeout", type=float, default=600.0, help="give up after (s)")
        s.add_argument("--no-verify", action="store_true",
                       help="no digest (nor order check): measures the link alone, as iperf does "
                            "(the sender sends one unchanging buffer)")
        if name == "send":
            s.add_argument("--message-size", type=parse_size, default=1 << 20)
            s.add_argument("--seed", type=int, default=1)
            s.add_argument("--rate", type=parse_size, default=0,
                           help="bytes per second to offer (default: as fast as it goes)")
    m = sub.add_parser("monitor")
    m.add_argument("--seconds", type=float, default=0, help="stop after (default: on SIGTERM)")
    m.add_argument("--stats-interval", type=float, default=1.0)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)  # exits 2 with one line on a bad option
    if args.command == "send" and not 8 <= args.message_size <= 8 << 20:
        p.error("--message-size must be between 8 bytes and 8M")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s {args.node} %(levelname)s %(message)s")
    try:
        link, conn = build(args)
    except UsageError as err:
        print(f"mirrord-link: {err}", file=sys.stderr)
        return EXIT_USAGE
    tune_allocator()
    stop = Stop()
    try:
        return {"send": run_send, "receive": run_receive, "monitor": run_monitor}[args.command](
            args, link, conn, stop)
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
