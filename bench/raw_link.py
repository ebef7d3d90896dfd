"""Raw AF_PACKET baseline for the dedicated link: what Python can push over veth.

Strategy
--------
Two fresh namespaces joined by a veth pair (tests/netns.py, loaded by path so
the namespace code lives in one place), one receiver process in one and one
sender process in the other, both plain ``socket.socket(AF_PACKET)`` with no
project code in the loop: the sender does one ``send`` per full-MTU frame of a
prebuilt buffer, the receiver one ``recv_into`` per frame into a reused buffer.
This is the ceiling every mirrord figure is reported against, measured in the
same run (absolute numbers on this kind of VM are noisy).

Reported per MTU:
  sender_frames_per_s / sender_mb_s   -- what the sender handed to the kernel
  send_us_per_frame                   -- the sender's wall time per frame
  send_cpu_us_per_frame               -- its CPU time (user + system) per
                                         frame: less sensitive than wall time
                                         to other load on a shared machine
  recv_cpu_us_per_frame               -- the receiver's CPU time per frame
                                         received (bench/floor.py adds the two)
  delivered_mb_s                      -- payload bytes the receiver got, over
                                         its first-to-last-frame time
  loss                                -- frames sent but not received (the
                                         receiver's socket buffer overflowing)

``measure_socket_costs`` is the per-call cost of mirrord.packet_socket itself
(send, recv_batch per frame, and the sendmsg alternative), one process, both
sockets opened in their namespaces: the figures quoted in that module.

``measure_send_paths`` (``--ring``) compares, on one pair of namespaces and
interleaved over several rounds, the ways the sender can hand frames to the
kernel, all against the same raw receiver:
  send     -- the raw baseline above: ``sock.send(frame)``, a prebuilt frame
  sendmsg  -- ``sock.sendmsg((header, payload))`` per frame, the call
              PacketSocket.send makes for jumbo payloads
  psend    -- ``PacketSocket.send(payload, dst)`` per frame (its Python included)
  ring     -- ``PacketSocket.send_batch`` of RING_BATCH frames through the
              PACKET_TX_RING (copy into slots + one kick per batch)

``measure_raw(..., receive="ring")`` swaps the raw receiver for the daemon's own receive
path (PacketSocket.recv_batch off its RX ring, a poll only when the ring is empty);
with ``mode="ring"`` too it is the cheapest way this code base moves frames, with no
protocol on them (bench/floor.py).

    python3 bench/raw_link.py                  # MTU 1500 and 9000, 2 s each
    python3 bench/raw_link.py --frames 200000 --mtu 9000
    python3 bench/raw_link.py --costs          # PacketSocket per-frame costs
    python3 bench/raw_link.py --ring --repeats 7 --pin   # send paths, pinned CPUs

MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETHERTYPE = 0x88B5
ETH_HLEN = 14

# A data frame starts with KIND_DATA; the sender ends with KIND_END frames.
KIND_DATA = 0x00
KIND_END = 0x01
# End markers can be dropped by a full receive buffer, so several are sent,
# spaced out; the receiver's idle timeout is the backstop.
END_MARKERS = 20
END_MARKER_GAP_S = 0.005
# The receiver stops when nothing arrived for this long after the first frame.
RECV_IDLE_S = 0.5
# ...and never runs longer than the requested duration plus this margin.
RECV_MARGIN_S = 15.0
# Sender checks the clock once per this many frames (duration mode): cheap
# enough not to show in the per-frame cost, fine enough for a 2 s run.
CLOCK_EVERY = 256
# Hard caps so a typo cannot run for hours.
MAX_SECONDS = 60.0
MAX_FRAMES = 50_000_000
# Receive buffer for the baseline receiver, as PacketSocket uses (see there).
RCVBUF = 64 << 20
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
# How long to wait for a role process to report.
PROCESS_TIMEOUT_S = MAX_SECONDS + 30.0
# Sender variants (see the module docstring) and the batch send_batch gets:
# the link loop's SEND_BATCH.
SEND_MODES = ("send", "sendmsg", "psend", "ring")
RECEIVERS = ("recv", "ring")  # --role names of the receiver variants
RING_BATCH = 64


def load_netns():
    """Import tests/netns.py by path (one namespace helper for tests and bench)."""
    if "netns" in sys.modules:
        return sys.modules["netns"]
    path = os.path.join(REPO, "tests", "netns.py")
    spec = importlib.util.spec_from_file_location("netns", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns"] = module
    spec.loader.exec_module(module)
    return module


# ---- the two role processes (run inside the namespaces) --------------------


def _cpu_seconds() -> float:
    """User + system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _role_recv(ifname: str, limit_s: float) -> dict:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.bind((ifname, ETHERTYPE))
    buf = bytearray(65536 + ETH_HLEN)
    recv_into = sock.recv_into
    print(json.dumps({"ready": True}), flush=True)
    frames = payload_bytes = 0
    first = last = 0.0
    cpu_start = _cpu_seconds()  # waiting blocked for the first frame costs nothing
    deadline = time.monotonic() + limit_s
    sock.settimeout(min(limit_s, 5.0))
    # Wait for the first frame (bounded by the deadline).
    while True:
        try:
            n = recv_into(buf)
            break
        except socket.timeout:
            if time.monotonic() > deadline:
                return {"frames": 0, "payload_bytes": 0, "seconds": 0.0, "timeout": True}
    first = time.perf_counter()
    sock.settimeout(RECV_IDLE_S)
    ended = timed_out = False
    while True:
        if buf[ETH_HLEN] == KIND_END:
            ended = True
            break
        frames += 1
        payload_bytes += n - ETH_HLEN
        last = time.perf_counter()
        if frames % CLOCK_EVERY == 0 and time.monotonic() > deadline:
            timed_out = True
            break
        try:
            n = recv_into(buf)
        except socket.timeout:
            break
    # struct tpacket_stats: frames queued to the socket / dropped at it (full
    # receive buffer) since the last read; reading resets them.
    _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return {"frames": frames, "payload_bytes": payload_bytes,
            "seconds": max(last - first, 1e-9), "cpu_seconds": _cpu_seconds() - cpu_start,
            "ended_by_marker": ended,
            "timeout": timed_out, "socket_drops": drops}


def _role_recv_ring(ifname: str, limit_s: float) -> dict:
    """The receiver with the daemon's own receive path: PacketSocket.recv_batch off its
    RX ring (one copy of each payload out of the ring, no system call per frame), and a
    poll only when the ring is empty.  The cheapest receiver this code base has."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from mirrord.packet_socket import PacketSocket

    psock = PacketSocket(ifname, ETHERTYPE, tx_ring=False)
    if not psock.rx_ring:
        raise RuntimeError("PACKET_RX_RING unavailable")
    poller = select.poll()
    poller.register(psock.fileno(), select.POLLIN)
    recv_batch = psock.recv_batch
    print(json.dumps({"ready": True}), flush=True)
    frames = payload_bytes = 0
    first = last = None
    cpu_start = _cpu_seconds()
    deadline = time.monotonic() + limit_s
    ended = timed_out = False
    while not ended:
        batch = recv_batch(RING_BATCH * 4, False)
        if not batch:
            if time.monotonic() > deadline:
                timed_out = True
                break
            wait_ms = int((RECV_IDLE_S if first is not None else min(limit_s, 5.0)) * 1000)
            if not poller.poll(wait_ms) and first is not None:
                break  # idle after the stream: the end markers were lost
            continue
        if first is None:
            first = time.perf_counter()
        for payload, _ in batch:
            if payload[0] == KIND_END:
                ended = True
                break
            frames += 1
            payload_bytes += len(payload)
        last = time.perf_counter()
    cpu = _cpu_seconds() - cpu_start
    psock.close()
    if first is None:
        return {"frames": 0, "payload_bytes": 0, "seconds": 0.0, "cpu_seconds": cpu,
                "timeout": True}
    return {"frames": frames, "payload_bytes": payload_bytes,
            "seconds": max(last - first, 1e-9), "cpu_seconds": cpu,
            "ended_by_marker": ended, "timeout": timed_out}


def _role_send(ifname: str, dst: bytes, mtu: int, frames: int | None, seconds: float | None,
               mode: str = "send") -> dict:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, ETHERTYPE))
    src = sock.getsockname()[4]
    header = dst + src + ETHERTYPE.to_bytes(2, "big")
    payload = bytes([KIND_DATA]) + os.urandom(mtu - 1)
    frame = header + payload
    psock = None
    if mode == "send":
        send = sock.send

        def step(count: int) -> int:  # frames the kernel took, out of count
            ok = 0
            for _ in range(count):
                try:
                    send(frame)
                    ok += 1
                except OSError:  # ENOBUFS and friends: count, keep going
                    pass
            return ok
    elif mode == "sendmsg":
        sendmsg = sock.sendmsg
        parts = (header, payload)

        def step(count: int) -> int:
            ok = 0
            for _ in range(count):
                try:
                    sendmsg(parts)
                    ok += 1
                except OSError:
                    pass
            return ok
    elif mode in ("psend", "ring"):
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        from mirrord.packet_socket import PacketSocket

        psock = PacketSocket(ifname, tx_ring=(mode == "ring"))
        if mode == "ring" and not psock.tx_ring:
            raise RuntimeError("PACKET_TX_RING unavailable")
        if mode == "psend":
            psend = psock.send

            def step(count: int) -> int:
                ok = 0
                for _ in range(count):
                    if psend(payload, dst):
                        ok += 1
                return ok
        else:
            send_batch = psock.send_batch
            batch = [(payload, dst)] * RING_BATCH

            def step(count: int) -> int:
                ok = 0
                for _ in range(count // RING_BATCH):
                    ok += send_batch(batch)
                if count % RING_BATCH:
                    ok += send_batch(batch[:count % RING_BATCH])
                return ok
    else:
        raise ValueError(f"unknown send mode {mode!r}")
    sent = attempted = 0
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    if frames is not None:
        sent = step(frames)
        attempted = frames
    else:
        stop = start + seconds
        while True:
            sent += step(CLOCK_EVERY)  # a multiple of RING_BATCH
            attempted += CLOCK_EVERY
            if time.perf_counter() >= stop:
                break
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    counters = dict(psock.counters) if psock is not None else None
    if psock is not None:
        psock.close()
    end = header + bytes([KIND_END]) + bytes(63)
    for _ in range(END_MARKERS):
        time.sleep(END_MARKER_GAP_S)
        try:
            sock.send(end)
        except OSError:
            pass
    result = {"frames": sent, "errors": attempted - sent, "seconds": elapsed, "cpu_seconds": cpu}
    if counters is not None:
        result["counters"] = counters
    return result


# ---- orchestration (root namespace) ----------------------------------------


def _json_line(proc: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"process {proc.pid} printed nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=5)
        raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}): "
                           f"{proc.stderr.read() if proc.stderr else ''}")
    return json.loads(line)


def measure_raw(mtu: int, seconds_or_frames: float | int = 2.0, *, pair=None,
                mode: str = "send", pin: bool = False, receive: str = "recv") -> dict:
    """Raw AF_PACKET throughput between two namespaces at ``mtu``.

    ``seconds_or_frames``: an ``int`` is a frame count, a ``float`` a duration
    in seconds.  With ``pair`` (a tests/netns.py NetnsPair whose MTU is at
    least ``mtu``) the caller's namespaces are used, so another benchmark can
    measure its baseline on the very same link; otherwise a fresh pair is
    made and removed.  ``mode`` picks the sender (SEND_MODES; "send" is the
    raw baseline).  ``pin`` runs the sender on CPU 0 and the receiver on
    CPU 1 (when there are two): the sender's figures then vary by a few
    percent between rounds instead of +-25% on a shared 2-CPU VM, but the
    receiver is slower (every frame is copied across CPUs), so loss is
    higher; "delivered" is only comparable between runs pinned alike.
    ``receive`` is "recv" (the raw baseline: one ``recv_into`` per frame) or "ring"
    (PacketSocket's RX ring, as the daemon receives).
    """
    if receive not in RECEIVERS:
        raise ValueError(f"receive must be one of {RECEIVERS}")
    if mode not in SEND_MODES:
        raise ValueError(f"mode must be one of {SEND_MODES}")
    if isinstance(seconds_or_frames, bool) or not isinstance(seconds_or_frames, (int, float)):
        raise TypeError("seconds_or_frames must be an int (frames) or a float (seconds)")
    if isinstance(seconds_or_frames, int):
        if not 1 <= seconds_or_frames <= MAX_FRAMES:
            raise ValueError(f"frames must be 1..{MAX_FRAMES}")
        amount = ["--frames", str(seconds_or_frames)]
        limit = MAX_SECONDS
    else:
        if not 0 < seconds_or_frames <= MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS}]")
        amount = ["--seconds", repr(seconds_or_frames)]
        limit = seconds_or_frames
    own_pair = pair is None
    if own_pair:
        pair = load_netns().NetnsPair(mtu=mtu)
    elif pair.mtu < mtu:
        raise ValueError(f"pair MTU {pair.mtu} is below the requested {mtu}")
    try:
        me = [sys.executable, os.path.abspath(__file__)]
        pins = ([["--cpu", "1"], ["--cpu", "0"]] if pin and (os.cpu_count() or 1) >= 2
                else [[], []])
        receiver = pair.popen(pair.ns_b, me + ["--role", receive, "--ifname", pair.if_b,
                                                "--limit", repr(limit + RECV_MARGIN_S)] + pins[0],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _json_line(receiver, 10.0)  # {"ready": true}
        sender = pair.popen(pair.ns_a, me + ["--role", "send", "--ifname", pair.if_a,
                                              "--dst", pair.mac_b.hex(), "--mtu", str(mtu),
                                              "--mode", mode] + amount + pins[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sent = _json_line(sender, PROCESS_TIMEOUT_S)
        got = _json_line(receiver, PROCESS_TIMEOUT_S)
        sender.wait(timeout=10)
        receiver.wait(timeout=10)
    finally:
        if own_pair:
            pair.close()
    return {
        "mtu": mtu,
        "mode": mode,
        "receive": receive,
        "frames_sent": sent["frames"],
        "send_errors": sent["errors"],
        "sender_seconds": round(sent["seconds"], 4),
        "sender_frames_per_s": round(sent["frames"] / sent["seconds"]),
        "sender_mb_s": round(sent["frames"] * mtu / sent["seconds"] / 1e6, 1),
        "send_us_per_frame": round(sent["seconds"] / max(sent["frames"], 1) * 1e6, 3),
        "send_cpu_us_per_frame": round(sent["cpu_seconds"] / max(sent["frames"], 1) * 1e6, 3),
        "frames_delivered": got["frames"],
        "delivered_mb_s": round(got["payload_bytes"] / got["seconds"] / 1e6, 1),
        "recv_cpu_us_per_frame": round(got["cpu_seconds"] / max(got["frames"], 1) * 1e6, 3),
        "loss": round(1 - got["frames"] / sent["frames"], 5) if sent["frames"] else None,
        "receiver_socket_drops": got.get("socket_drops"),
        **({"counters": sent["counters"]} if "counters" in sent else {}),
    }


def measure_send_paths(mtu: int, seconds: float = 2.0, repeats: int = 5, *, pair=None,
                       modes=SEND_MODES, pin: bool = False) -> dict:
    """Every send path (SEND_MODES) at ``mtu``, ``repeats`` interleaved rounds, one link.

    The order of the modes rotates from round to round so that drift on a
    shared machine does not favour one of them.  Medians per mode, and each
    mode's median sender rate relative to the raw ``send`` baseline.
    """
    own_pair = pair is None
    if own_pair:
        pair = load_netns().NetnsPair(mtu=mtu)
    try:
        samples: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                samples[mode].append(measure_raw(mtu, float(seconds), pair=pair, mode=mode,
                                                 pin=pin))
    finally:
        if own_pair:
            pair.close()
    summary = {}
    for mode, runs in samples.items():
        summary[mode] = {
            "send_us_per_frame": statistics.median(x["send_us_per_frame"] for x in runs),
            "send_cpu_us_per_frame": statistics.median(x["send_cpu_us_per_frame"] for x in runs),
            "sender_mb_s": statistics.median(x["sender_mb_s"] for x in runs),
            "delivered_mb_s": statistics.median(x["delivered_mb_s"] for x in runs),
            "loss": statistics.median(x["loss"] for x in runs),
            "samples_us_per_frame": [x["send_us_per_frame"] for x in runs],
            "samples_cpu_us_per_frame": [x["send_cpu_us_per_frame"] for x in runs],
            "samples_delivered_mb_s": [x["delivered_mb_s"] for x in runs],
        }
    if "send" in summary:
        base = summary["send"]
        for mode, row in summary.items():
            row["sender_vs_send"] = round(row["sender_mb_s"] / base["sender_mb_s"], 3)
            row["delivered_vs_send"] = round(row["delivered_mb_s"] / base["delivered_mb_s"], 3)
    return {"mtu": mtu, "seconds": seconds, "repeats": repeats, "pinned": pin, "modes": summary}


# glibc mallopt parameter and the value used for the "no heap trim" variant:
# with the default 128 KiB trim threshold, freeing a batch of 9 KB payloads
# hands the heap top back to the kernel and the next batch page-faults it in
# again (~5 us per 9 KB allocation instead of ~0.65 us).
M_TRIM_THRESHOLD = -1
DEFAULT_TRIM_THRESHOLD = 128 * 1024
NO_TRIM_THRESHOLD = 256 << 20


def _set_trim_threshold(value: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(M_TRIM_THRESHOLD, value) != 1:
        raise OSError("mallopt(M_TRIM_THRESHOLD) failed")


def measure_socket_costs(mtu: int, frames: int = 3000, rounds: int = 7, *, pair=None) -> dict:
    """Per-frame cost of mirrord.packet_socket's send and recv_batch at ``mtu``.

    Each round sends ``frames`` full-MTU frames from A to B (B's 64 MiB buffer
    holds them all) and then drains them with recv_batch; medians over
    ``rounds``.  Also times ``sendmsg([header, payload])`` directly, and a
    64-byte frame (an ack).  ``recv_us_no_trim`` repeats the receive rounds
    with glibc's heap trimming effectively off (mallopt M_TRIM_THRESHOLD), to
    show what freeing and re-faulting payload memory costs; the threshold is
    restored afterwards.
    """
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from mirrord.packet_socket import PacketSocket

    own_pair = pair is None
    if own_pair:
        pair = load_netns().NetnsPair(mtu=mtu)
    try:
        with pair.enter(pair.ns_a):
            a = PacketSocket(pair.if_a)
        with pair.enter(pair.ns_b):
            b = PacketSocket(pair.if_b)
        result = {"mtu": mtu}
        try:
            for label, size in (("full", mtu), ("small", 64)):
                payload = bytearray(os.urandom(size))
                header = pair.mac_b + a.mac + ETHERTYPE.to_bytes(2, "big")
                send_t, sendmsg_t, recv_t = [], [], []
                for _ in range(rounds):
                    for variant, times in (("send", send_t), ("sendmsg", sendmsg_t)):
                        start = time.perf_counter()
                        if variant == "send":
                            send, dst = a.send, pair.mac_b
                            for _ in range(frames):
                                send(payload, dst)
                        else:
                            sendmsg = a._sock.sendmsg  # the rejected alternative
                            for _ in range(frames):
                                sendmsg((header, payload))
                        times.append((time.perf_counter() - start) / frames)
                        time.sleep(0.01)
                        got = 0
                        start = time.perf_counter()
                        for _ in range(frames):  # bounded: at most one batch per frame
                            batch = b.recv_batch(256)
                            if not batch:
                                break
                            got += len(batch)
                        if variant == "send" and got:
                            recv_t.append((time.perf_counter() - start) / got)
                no_trim_t = []
                _set_trim_threshold(NO_TRIM_THRESHOLD)
                try:
                    for _ in range(rounds):
                        for _ in range(frames):
                            a.send(payload, pair.mac_b)
                        time.sleep(0.01)
                        got = 0
                        start = time.perf_counter()
                        for _ in range(frames):
                            batch = b.recv_batch(256)
                            if not batch:
                                break
                            got += len(batch)
                        if got:
                            no_trim_t.append((time.perf_counter() - start) / got)
                finally:
                    _set_trim_threshold(DEFAULT_TRIM_THRESHOLD)
                result[label] = {
                    "payload": size,
                    "send_us": round(statistics.median(send_t) * 1e6, 2),
                    "sendmsg_us": round(statistics.median(sendmsg_t) * 1e6, 2),
                    "recv_us": round(statistics.median(recv_t) * 1e6, 2) if recv_t else None,
                    "recv_us_no_trim": (round(statistics.median(no_trim_t) * 1e6, 2)
                                        if no_trim_t else None),
                }
        finally:
            a.close()
            b.close()
    finally:
        if own_pair:
            pair.close()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mtu", type=int, action="append", help="MTU to measure (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--seconds", type=float)
    group.add_argument("--frames", type=int)
    p.add_argument("--costs", action="store_true", help="PacketSocket per-frame costs instead")
    p.add_argument("--ring", action="store_true",
                   help="compare send paths: send, sendmsg, PacketSocket.send, send_batch")
    p.add_argument("--repeats", type=int, default=5, help="rounds for --ring (default 5)")
    p.add_argument("--pin", action="store_true",
                   help="--ring: sender on CPU 0, receiver on CPU 1 (steadier sender figures)")
    # Internal: the role processes started inside the namespaces.
    p.add_argument("--role", choices=["send", *RECEIVERS], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=SEND_MODES, default="send", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ifname", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.role in RECEIVERS:
        role = _role_recv if args.role == "recv" else _role_recv_ring
        print(json.dumps(role(args.ifname, args.limit)), flush=True)
        return 0
    if args.role == "send":
        print(json.dumps(_role_send(args.ifname, bytes.fromhex(args.dst), args.mtu[0],
                                    args.frames, args.seconds, args.mode)), flush=True)
        return 0

    mtus = args.mtu or [1500, 9000]
    if args.costs:
        results = [measure_socket_costs(mtu) for mtu in mtus]
    elif args.ring:
        if args.frames is not None:
            p.error("--ring measures for --seconds, not --frames")
        if not 1 <= args.repeats <= 50:
            p.error("--repeats must be 1..50")
        results = [measure_send_paths(mtu, args.seconds or 2.0, args.repeats, pin=args.pin)
                   for mtu in mtus]
        for r in results:
            for mode, row in r["modes"].items():
                print(f"MTU {r['mtu']:5} {mode:8} {row['send_us_per_frame']:6.2f} us/frame "
                      f"(cpu {row['send_cpu_us_per_frame']:5.2f})  "
                      f"sender {row['sender_mb_s']:7.1f} MB/s  "
                      f"delivered {row['delivered_mb_s']:7.1f} MB/s  loss {row['loss']:.4f}  "
                      f"sender/raw {row.get('sender_vs_send', 0):.3f}", file=sys.stderr)
    else:
        amount = args.frames if args.frames is not None else (args.seconds or 2.0)
        results = [measure_raw(mtu, amount) for mtu in mtus]
    print(json.dumps({"python": sys.version.split()[0], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
