"""The floor under a mirrored write: what the machine must spend before any protocol.

Issue 3's goal is mirrored sequential throughput at least 0.70 of the same daemon
standalone, with both "boxes" and the client on this machine's CPUs.  This benchmark asks
what that goal leaves for the replication protocol.  It measures, interleaved in one run:

- **standalone**: bench/volume.py's sequential fio job (1 MiB, QD16, closing fsync)
  against one mirrord primary with no peer.  CPU = daemon + fio, per GB written.
- **mirrored C**: the same job against a mirrored pair at MTU 9000, both backing files
  compared afterwards.  CPU = primary + secondary + fio, per GB written.
- **link**: frames of MTU size over a fresh veth pair at MTU 9000, no protocol on them, by
  two paths of bench/raw_link.py (LINK_PATHS): its plain baseline, one ``send`` per
  prebuilt frame and one ``recv_into`` per frame; and the daemon's own rings,
  ``PacketSocket.send_batch`` into the TX ring and ``recv_batch`` off the RX ring.  CPU of
  sender + receiver per GB of frames; the cheaper path counts.  On veth the receiver's
  enqueue runs in the sender's system call.  A path that drops frames (the RX ring can
  overflow under this unpaced stream) looks cheaper than it is, which favours the goal.
- **disk copy**: 1 MiB ``pwrite``\\s over a preallocated /dev/shm file of the volume's
  size, what the secondary must do with each byte at least.  CPU per GB.

The floor is standalone + link + disk copy: what any mirror that keeps a second copy
on the other side of this link costs here, with nothing for checksums, sequence numbers,
acks, message assembly or thread hand-offs.  From it:

- **ceiling**: the rate at which the floor would fill every CPU of the machine, with no
  steal and no idle moment: ``ncpu / floor``, and that over standalone.
- **left for the protocol at the goal**: a mirrored run at 0.70 of standalone may spend at
  most ``ncpu / (0.70 x standalone)`` CPU-s per GB in all (every CPU busy all the time);
  minus the floor, what remains for the protocol and its glue on both sides, also per
  9000-byte frame.  Compare it with what the mirrored run spends above the floor, and
  with bench/protocol_cost.py (the protocol alone, in memory, no sockets), run here too.

Every assumption favours the goal: a real run is never 100% busy and this VM's hypervisor
takes 10-20% (steal).  The figures say how much room the goal leaves, not what to expect.

    python3 bench/floor.py [--size 1G] [--repeats 3] [--json]     # root; ~2 minutes

MB is 10**6 bytes, GB 10**9.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import raw_link  # noqa: E402
import volume  # noqa: E402  (puts tests/ and the repository on sys.path)

MTU = volume.MTU
GOAL = 0.70  # issue 3: mirrored sequential >= 0.70 of standalone
RAW_SECONDS = 2.0
DISK_CHUNK = 1 << 20


def disk_copy_cpu(path: str, size: int) -> float:
    """CPU seconds per GB of 1 MiB pwrites over `path` (already `size` bytes)."""
    chunk = os.urandom(DISK_CHUNK)
    fd = os.open(path, os.O_WRONLY)
    try:
        start = time.thread_time()
        for offset in range(0, size, DISK_CHUNK):
            os.pwrite(fd, chunk, offset)
        spent = time.thread_time() - start
    finally:
        os.close(fd)
    return spent / (size / 1e9)


# (sender mode, receiver) pairs of bench/raw_link.py measured as the link's floor: its
# plain baseline, and the daemon's own rings with no protocol on them.
LINK_PATHS = {"raw": ("send", "recv"), "rings": ("ring", "ring")}


def raw_link_cpu() -> dict:
    """Sender + receiver CPU seconds per GB of MTU-sized frames over a fresh veth pair,
    by each of LINK_PATHS; the cheaper one is the floor's."""
    paths = {}
    for name, (mode, receive) in LINK_PATHS.items():
        r = raw_link.measure_raw(MTU, RAW_SECONDS, mode=mode, receive=receive)
        per_frame_us = r["send_cpu_us_per_frame"] + r["recv_cpu_us_per_frame"]
        paths[name] = {"cpu_s_per_gb": round(per_frame_us * (1e9 / MTU) / 1e6, 3),
                       "send_cpu_us_per_frame": r["send_cpu_us_per_frame"],
                       "recv_cpu_us_per_frame": r["recv_cpu_us_per_frame"],
                       "delivered_mb_s": r["delivered_mb_s"], "loss": r["loss"]}
    best = min(paths, key=lambda name: paths[name]["cpu_s_per_gb"])
    return {**paths[best], "path": best, "paths": paths}


def protocol_cost() -> dict:
    """bench/protocol_cost.py at MTU 9000 (its own process: it tunes the allocator)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "protocol_cost.py"),
                          "--mtu", str(MTU)], capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fio_sample(target, size: int) -> dict:
    """One sequential fio run: MB/s and the CPU of every process involved, per GB."""
    s = volume.seq_sample(target.uri, size, target.pids())
    target.check()
    cpu = sum(v for k, v in s.items() if k.endswith("_cpu_s_per_gb"))
    return {"mb_s": s["mb_s"], "cpu_s_per_gb": round(cpu, 3),
            "machine_busy": s["machine_busy"], "machine_steal": s["machine_steal"]}


def analyse(standalone: dict, mirrored: dict, link: dict, disk: float, ncpu: int) -> dict:
    """The floor, its ceiling, and the goal's room above it (module docstring)."""
    floor = standalone["cpu_s_per_gb"] + link["cpu_s_per_gb"] + disk
    ceiling_mb_s = ncpu / floor * 1e3
    at_goal = ncpu / (GOAL * standalone["mb_s"] / 1e3)  # CPU-s per GB on all CPUs
    frames_per_gb = 1e9 / MTU
    return {
        "floor_cpu_s_per_gb": round(floor, 3),
        "ceiling_mb_s": round(ceiling_mb_s, 1),
        "ceiling_over_standalone": round(ceiling_mb_s / standalone["mb_s"], 3),
        "goal_cpu_s_per_gb": round(at_goal, 3),
        "left_at_goal_cpu_s_per_gb": round(at_goal - floor, 3),
        "left_at_goal_us_per_frame": round((at_goal - floor) / frames_per_gb * 1e6, 2),
        "mirrored_above_floor_cpu_s_per_gb": round(mirrored["cpu_s_per_gb"] - floor, 3),
        "mirrored_above_floor_us_per_frame": round(
            (mirrored["cpu_s_per_gb"] - floor) / frames_per_gb * 1e6, 2),
        "mirrored_over_standalone": round(mirrored["mb_s"] / standalone["mb_s"], 3),
    }


def run(args) -> dict:
    size = args.size
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ncpu = os.cpu_count() or 1
    rounds = []
    targets = []
    scratch = tempfile.mkdtemp(prefix="floor-bench-", dir="/dev/shm")
    try:
        copy_target = os.path.join(scratch, "copy.img")
        volume.preallocate(copy_target, size)
        targets = [volume.MirrordTarget(size, None), volume.MirrordTarget(size, "C")]
        standalone, mirrored = targets
        steps = ["standalone", "mirrored", "link", "disk"]
        for rep in range(args.repeats):
            got = {}
            for step in steps[rep % len(steps):] + steps[:rep % len(steps)]:
                if step == "standalone":
                    got[step] = fio_sample(standalone, size)
                elif step == "mirrored":
                    got[step] = fio_sample(mirrored, size)
                elif step == "link":
                    got[step] = raw_link_cpu()
                else:
                    got[step] = round(disk_copy_cpu(copy_target, size), 3)
            got["analysis"] = analyse(got["standalone"], got["mirrored"], got["link"],
                                      got["disk"], ncpu)
            rounds.append(got)
            a = got["analysis"]
            log(f"repeat {rep + 1}: standalone {got['standalone']['mb_s']} MB/s "
                f"({got['standalone']['cpu_s_per_gb']} s/GB), mirrored "
                f"{got['mirrored']['mb_s']} MB/s ({got['mirrored']['cpu_s_per_gb']} s/GB), "
                f"link {got['link']['cpu_s_per_gb']} s/GB, disk {got['disk']} s/GB; floor "
                f"{a['floor_cpu_s_per_gb']} s/GB, ceiling {a['ceiling_over_standalone']} of "
                f"standalone, left at the goal {a['left_at_goal_us_per_frame']} us/frame")
        proto = protocol_cost()
    finally:
        for t in reversed(targets):
            try:
                t.close()
            except Exception as exc:  # noqa: BLE001 - close the other one too
                log(f"closing {t.name}: {exc}")
        shutil.rmtree(scratch, ignore_errors=True)

    def med(path):
        values = rounds
        for key in path:
            values = [v[key] for v in values]
        return round(statistics.median(values), 3)

    keys = {
        "standalone_mb_s": ("standalone", "mb_s"),
        "standalone_cpu_s_per_gb": ("standalone", "cpu_s_per_gb"),
        "mirrored_mb_s": ("mirrored", "mb_s"),
        "mirrored_cpu_s_per_gb": ("mirrored", "cpu_s_per_gb"),
        "mirrored_machine_busy": ("mirrored", "machine_busy"),
        "mirrored_machine_steal": ("mirrored", "machine_steal"),
        "link_cpu_s_per_gb": ("link", "cpu_s_per_gb"),
        "link_send_cpu_us_per_frame": ("link", "send_cpu_us_per_frame"),
        "link_recv_cpu_us_per_frame": ("link", "recv_cpu_us_per_frame"),
        "disk_cpu_s_per_gb": ("disk",),
    }
    summary = {name: med(path) for name, path in keys.items()}
    for key in rounds[0]["analysis"]:
        summary[key] = med(("analysis", key))
    return {"when": when,
            "command": " ".join([os.path.relpath(sys.argv[0], volume.REPO)] + sys.argv[1:]),
            "size_bytes": size, "repeats": args.repeats, "ncpu": ncpu, "mtu": MTU,
            "summary": summary, "protocol_cost": proto, "rounds": rounds,
            "loadavg": open("/proc/loadavg").read().split()[:3],
            "runtime_s": round(time.monotonic() - started, 1)}


def markdown(r: dict) -> str:
    s, p = r["summary"], r["protocol_cost"]
    both = p["sender_us_per_frame"] + p["receiver_us_per_frame"]
    lines = [
        f"{r['when']}, {r['ncpu']} CPUs, medians of {r['repeats']} interleaved rounds "
        f"({r['size_bytes'] >> 20} MiB per fio run):",
        "",
        "| part | CPU-s per GB |",
        "|---|---|",
        f"| standalone (daemon + fio), {s['standalone_mb_s']:,.0f} MB/s "
        f"| {s['standalone_cpu_s_per_gb']:.2f} |",
        f"| link, sender + receiver ({s['link_send_cpu_us_per_frame']:.2f} + "
        f"{s['link_recv_cpu_us_per_frame']:.2f} µs per frame) | {s['link_cpu_s_per_gb']:.2f} |",
        f"| disk copy on the secondary (1 MiB pwrite, tmpfs) | {s['disk_cpu_s_per_gb']:.2f} |",
        f"| **floor** | **{s['floor_cpu_s_per_gb']:.2f}** |",
        f"| mirrored C (primary + secondary + fio), {s['mirrored_mb_s']:,.0f} MB/s, "
        f"{s['mirrored_over_standalone']:.2f} of standalone "
        f"| {s['mirrored_cpu_s_per_gb']:.2f} |",
        "",
        f"- Ceiling (the floor on every CPU, never idle, no steal): "
        f"{s['ceiling_mb_s']:,.0f} MB/s, **{s['ceiling_over_standalone']:.2f}** of standalone.",
        f"- At the goal ({GOAL:.2f} of standalone) the whole mirrored run may spend "
        f"{s['goal_cpu_s_per_gb']:.2f} CPU-s per GB; above the floor that leaves "
        f"**{s['left_at_goal_cpu_s_per_gb']:.2f} s/GB, {s['left_at_goal_us_per_frame']:.1f} µs "
        f"per frame** for the protocol and its glue on both boxes.",
        f"- The mirrored run spends {s['mirrored_above_floor_cpu_s_per_gb']:.2f} s/GB above "
        f"the floor ({s['mirrored_above_floor_us_per_frame']:.1f} µs per frame), at "
        f"{s['mirrored_machine_busy']:.0%} busy and {s['mirrored_machine_steal']:.0%} steal.",
        f"- bench/protocol_cost.py, the protocol alone in memory: "
        f"{p['sender_us_per_frame']:.2f} µs (sender) + {p['receiver_us_per_frame']:.2f} µs "
        f"(receiver) = {both:.2f} µs per frame.",
        "",
        f"Load average at the end {' '.join(r['loadavg'])}; run took {r['runtime_s']} s.",
    ]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"floor: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=volume.parse_size, default=volume.parse_size("1G"),
                   help="volume size and bytes per fio run (default 1G)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the full results as JSON too")
    args = p.parse_args(argv)
    if not 1 <= args.repeats <= 50:
        p.error("--repeats: 1..50")
    if os.geteuid() != 0:
        log("run as root (it makes network namespaces)")
        return 2
    for tool in ("fio", "qemu-io", "cmp"):
        if shutil.which(tool) is None:
            log(f"{tool} not found")
            return 2
    signal.signal(signal.SIGTERM, volume._interrupted)  # unwind like Ctrl-C: targets close
    result = run(args)
    print(markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
