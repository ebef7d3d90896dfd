"""Volume throughput and latency through the NBD export: mirrored vs standalone vs nbdkit.

Three (or five) targets are set up once and measured in one run, with the same client
and the same storage (files on /dev/shm, tmpfs, allocated in full before the run), the
link at MTU 9000:
- **nbdkit**: `nbdkit file` on a /dev/shm file, over a unix socket. The reference server
  (C, multi-threaded): what an NBD export on this machine can do at all.
- **standalone**: one `mirrord` (primary, forced, its peer never started): the daemon's
  own cost without replication.
- **mirrored C** (and with `--protocols A,B,C` also A and B): two `mirrord` daemons in
  two network namespaces joined by veth at MTU 9000, the primary serving the export.

Per target and repeat, with fio's nbd engine (one connection, `--output-format=json`):
1. sequential 1 MiB writes over the whole volume, queue depth 16, then a FLUSH
   (`--end_fsync=1`, included in fio's runtime and so in the MB/s): the mirrored figure
   includes both boxes having the data (protocol C replies once the peer applied it and
   the FLUSH reaches the peer's disk).
2. 4 KiB random writes at queue depth 1 for a fixed time: IOPS and completion latency
   p50 / p99 (fio's clat percentiles).

fio rather than `nbdcopy` for (1): one tool for both measurements, its JSON gives
throughput and per-request latency, and it needs no source file (nbdcopy would read a
pre-generated 1 GiB file from tmpfs in the same CPU budget, with up to 4 connections
only when the server offers multi-conn, which mirrord does not, so nbdkit and mirrord
would not be driven alike).

Targets are interleaved (the order rotates each repeat) and every sample is bracketed
by a CPU probe (the same pure-Python loop as bench/link_goodput.py: steady on a quiet
machine, growing when something else takes the CPUs).  Medians are reported, and ratios
mirrored/standalone and standalone/nbdkit.  During each sequential run the CPU time of
the server processes (from /proc), fio's own, and the whole machine's busy share are
recorded: on a 2-vCPU VM that hosts both "boxes" and the client, the mirrored figure is
bounded by the CPU the pair needs per GB.  After each mirrored sample the export is
flushed and the two backing files are compared byte for byte (`cmp`); the run fails if
they differ.

    python3 bench/volume.py                          # 1G, 3 repeats, protocol C
    python3 bench/volume.py --size 512M --repeats 5 --protocols A,B,C --json
    python3 bench/volume.py --profile                # + py-spy of both daemons, seq, C

`--profile` adds, after the measured repeats, two sequential mirrored C runs (not
counted) with py-spy (--nonblocking, 200 Hz) attached to both daemons: one sampling
every running thread, one only the thread holding the GIL; each thread's CPU time over
the run is read from /proc/PID/task.  Needs root (namespaces), fio, nbdkit, qemu-io and
cmp; py-spy for --profile.  MB is 10**6 bytes.  A default run takes about 1.5 minutes,
2 with --profile.
"""

from __future__ import annotations

import argparse
import collections
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
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

from probe import cpu_probe  # noqa: E402
from mirrorpair import MirrorPair, first_difference  # noqa: E402
from netns import NetnsPair  # noqa: E402

MTU = 9000
SEQ_BS = "1M"
SEQ_QD = 16
RAND_BS = "4k"
RAND_QD = 1
FIO_TIMEOUT_S = 300  # one fio run; the whole volume at 10 MB/s would still fit
START_TIMEOUT_S = 20
SYNC_TIMEOUT_S = 180  # the initial full resync of a fresh mirrored pair
PROFILE_RATE = 200  # py-spy samples per second
PROFILE_TOP = 12


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in units else ""
    value = int(float(text[:-1] if unit else text) * units[unit])
    if value <= 0 or value % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text!r}: a positive whole number of MiB")
    return value


def preallocate(path: str, size: int) -> None:
    """Write the whole file with zeros now, so that no measured write is the first to
    touch its memory: a sparse file made the first repeat's sequential run ~3x slower.

    Zeros, not posix_fallocate: on this VM the first write into memory the guest has
    never used is slow whether or not tmpfs allocated the page (2 GiB into a fresh
    fallocated file: 320-805 MB/s; into one written with zeros first: 4.6-4.9 GB/s).
    The cost then fell on whichever phase wrote first, and not on one that reused the
    pages of a deleted file (nbdcopy's copy in bench/resync.py, after beta's disk)."""
    zeros = bytes(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[:size - offset], offset)
    finally:
        os.close(fd)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process `pid`."""
    return process_cpu_path(f"/proc/{pid}/stat")  # utime + stime


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each thread of process `pid`, by native thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = process_cpu_path(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended
    return out


def process_cpu_path(path: str) -> float:
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all CPUs."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class CpuMeter:
    """CPU used by the target's processes and by the whole machine over one sample."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {role: process_cpu(pid) for role, pid in pids.items()}
        self.machine = machine_cpu()
        self.t0 = time.monotonic()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy, steal = machine_cpu()
        ncpu = os.cpu_count() or 1
        out = {f"{role}_cpu_s": round(process_cpu(pid) - self.start[role], 3)
               for role, pid in self.pids.items()}
        out["machine_busy"] = round((busy - self.machine[0]) / (ncpu * wall), 3)
        out["machine_steal"] = round((steal - self.machine[1]) / (ncpu * wall), 3)
        return out


# --- targets ------------------------------------------------------------------------


class NbdkitTarget:
    """`nbdkit file` on a sparse file in /dev/shm, on a unix socket; stopped by PID."""

    name = "nbdkit file"

    def __init__(self, size: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="volume-bench-nbdkit-", dir="/dev/shm")
        self.sock_dir = tempfile.mkdtemp(prefix="volume-bench-", dir="/tmp")
        self.image = os.path.join(self.dir, "disk.img")
        self.sock = os.path.join(self.sock_dir, "nbdkit.sock")
        preallocate(self.image, size)
        self.proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "--foreground", "-U", self.sock,
             "file", f"file={self.image}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"nbdkit did not start (exit status {self.proc.poll()})")
            time.sleep(0.05)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def pids(self) -> dict[str, int]:
        return {"server": self.proc.pid}

    def check(self) -> None:
        pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


class MirrordTarget:
    """A mirrord primary: alone (peer never started) or mirrored with `protocol`."""

    def __init__(self, size: int, protocol: str | None) -> None:
        self.protocol = protocol
        self.name = "mirrord standalone" if protocol is None else f"mirrored {protocol}"
        self.net = NetnsPair(mtu=MTU)
        self.pair = None
        try:
            self.pair = MirrorPair(self.net, size=size, protocol=protocol or "C")
            for node in ("alpha", "beta"):
                preallocate(self.pair.disk(node), size)
            if protocol is None:
                self.pair.start("alpha")
                self.pair.promote("alpha", force=True)
                self.pair.wait("alpha", lambda s: s["role"] == "primary", START_TIMEOUT_S,
                               "primary")
            else:
                self.pair.start_all()
                self.pair.promote("alpha", force=True)
                self.pair.wait_connected(SYNC_TIMEOUT_S)  # after the initial full resync
            self.uri = self.pair.uri("alpha")
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        # `ip netns exec` execs in place: the PIDs we hold are the daemons' own.
        pids = {"server": self.pair.procs["alpha"].pid}
        if self.protocol is not None:
            pids["secondary"] = self.pair.procs["beta"].pid
        return pids

    def check(self) -> None:
        """Mirrored: flush, then the two backing files must be byte-for-byte equal."""
        if self.protocol is None:
            return
        status = self.pair.status("alpha")
        if not status or status["connection"] != "connected":
            raise RuntimeError(f"{self.name}: not connected after the sample: {status}\n"
                               f"{self.pair.logs_text()}")
        # A FLUSH completes only after the peer applied (and synced) every earlier
        # write, whatever the protocol: after it, the two disks must be equal.
        subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", self.uri], check=True,
                       timeout=60, capture_output=True)
        a, b = self.pair.disk("alpha"), self.pair.disk("beta")
        if subprocess.run(["cmp", "-s", a, b], timeout=120).returncode != 0:
            raise RuntimeError(f"{self.name}: the two backing files differ, first at byte "
                               f"{first_difference(a, b)}\n{self.pair.logs_text()}")

    def close(self) -> None:
        try:
            if self.pair is not None:
                self.pair.close()
        finally:
            self.net.close()


# --- fio ------------------------------------------------------------------------------


def run_fio(uri: str, size: int, job: list[str]) -> dict:
    """One fio job on one NBD connection; its JSON job record."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="volume-fio-") as out:
        argv = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
                "--output-format=json", f"--output={out.name}", *job]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=FIO_TIMEOUT_S)
        text = out.read()
    if result.returncode != 0:
        raise RuntimeError(f"fio failed ({result.returncode}): {' '.join(argv)}\n"
                           f"{result.stderr}{result.stdout}")
    record = json.loads(text[text.index("{"):])["jobs"][0]
    if record["error"]:
        raise RuntimeError(f"fio job error {record['error']}: {' '.join(argv)}")
    return record


def seq_job() -> list[str]:
    return ["--rw=write", f"--bs={SEQ_BS}", f"--iodepth={SEQ_QD}", "--end_fsync=1"]


def rand_job(runtime: float) -> list[str]:
    return ["--rw=randwrite", f"--bs={RAND_BS}", f"--iodepth={RAND_QD}", "--time_based",
            f"--runtime={runtime}s", "--norandommap", "--randrepeat=0"]


def seq_sample(uri: str, size: int, pids: dict[str, int] | None = None) -> dict:
    meter = CpuMeter(pids or {})
    job = run_fio(uri, size, seq_job())
    cpu = meter.stop()
    w = job["write"]
    if w["io_bytes"] != size:
        raise RuntimeError(f"fio wrote {w['io_bytes']} bytes, not {size}")
    pct = w["clat_ns"]["percentile"]
    gb = size / 1e9
    cpu["fio_cpu_s"] = round((job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000, 3)
    return {"mb_s": round(w["bw_bytes"] / 1e6, 1), "runtime_ms": w["runtime"],
            "clat_p50_us": round(pct["50.000000"] / 1000, 1),
            "clat_p99_us": round(pct["99.000000"] / 1000, 1),
            **cpu, **{k.replace("_cpu_s", "_cpu_s_per_gb"): round(v / gb, 3)
                      for k, v in cpu.items() if k.endswith("_cpu_s")}}


def rand_sample(uri: str, size: int, runtime: float) -> dict:
    w = run_fio(uri, size, rand_job(runtime))["write"]
    pct = w["clat_ns"]["percentile"]
    return {"iops": round(w["iops"]), "clat_p50_us": round(pct["50.000000"] / 1000, 1),
            "clat_p99_us": round(pct["99.000000"] / 1000, 1)}


# --- profile --------------------------------------------------------------------------


def profile_seq(target: MirrordTarget, size: int, gil: bool, out_dir: str) -> dict:
    """A sequential run with py-spy on both daemons: busy share and top functions per thread."""
    spies = {}
    try:
        for node in ("alpha", "beta"):
            raw = os.path.join(out_dir, f"pyspy-{node}-{'gil' if gil else 'threads'}.txt")
            argv = ["py-spy", "record", "--pid", str(target.pair.procs[node].pid),
                    "--rate", str(PROFILE_RATE), "--format", "raw", "--output", raw,
                    "--threads", "--nonblocking", *(["--gil"] if gil else [])]
            spies[node] = (raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE,
                                                 start_new_session=True))
        time.sleep(1.0)  # attach
        for raw, spy in spies.values():
            if spy.poll() is not None:
                raise RuntimeError(f"py-spy exited: {spy.stderr.read()!r}")
        pids = {node: target.pair.procs[node].pid for node in spies}
        before = {node: (process_cpu(pid), thread_cpu(pid)) for node, pid in pids.items()}
        start = time.monotonic()
        sample = seq_sample(target.uri, size)
        wall = time.monotonic() - start
        after = {node: (process_cpu(pid), thread_cpu(pid)) for node, pid in pids.items()}
    finally:
        for raw, spy in spies.values():
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for raw, spy in spies.values():
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(timeout=10)
    nodes = {}
    for node, (raw, _) in spies.items():
        summary = summarise_raw(raw, wall)
        # CPU actually used per thread (from /proc), named from py-spy's "thread (TID): name".
        names = summary.pop("thread_names")
        (proc0, threads0), (proc1, threads1) = before[node], after[node]
        cpu = {tid: used - threads0.get(tid, 0.0) for tid, used in threads1.items()}
        # The NBD client's thread ends with fio's connection: what the process used
        # beyond its living threads is that thread's.
        gone = proc1 - proc0 - sum(cpu.values())
        nbd = [n for n in names.values() if n.startswith("nbd-client")]
        if gone > 0:
            cpu["exited"] = gone
            names["exited"] = (nbd[-1] if nbd else "exited threads") + " (exited)"
        summary["thread_cpu_share"] = {
            names.get(tid, f"tid {tid}"): round(v / wall, 3)
            for tid, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        summary["thread_cpu_s_per_gb"] = {
            names.get(tid, f"tid {tid}"): round(v / (size / 1e9), 3)
            for tid, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        nodes["primary" if node == "alpha" else "secondary"] = summary
    return {"mode": "gil" if gil else "threads", "seq": sample, "wall_s": round(wall, 2),
            "nodes": nodes}


def summarise_raw(path: str, wall: float) -> dict:
    """py-spy raw (collapsed) stacks → per thread: busy share, top self and inclusive frames.

    Busy share is of one core's time over the run (py-spy counts a thread that is running
    or runnable, so on a busy machine it exceeds the CPU the thread got); the frames'
    shares are of that thread's samples.
    """
    per_thread = collections.Counter()
    self_time: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    names = {}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            # "thread (TID): name"; py-spy sometimes gives no name: key by TID, name later.
            tid, _, name = frames[0].removeprefix("thread (").partition(")")
            name = name.removeprefix(": ")
            if tid.isdigit() and name:
                names[int(tid)] = name
            thread = tid
            per_thread[thread] += n
            # Frames look like "func (file.py:123)": aggregate by function and file.
            funcs = [_func(fr) for fr in frames[1:]] or ["?"]
            self_time[thread][funcs[-1]] += n
            for func in set(funcs):
                inclusive[thread][func] += n
    possible = wall * PROFILE_RATE  # samples one always-busy thread would give
    label = lambda t: names.get(int(t), f"thread {t}") if t.isdigit() else t  # noqa: E731
    ranked = per_thread.most_common()
    return {
        "samples": sum(per_thread.values()),
        "thread_names": names,
        "threads": {label(t): round(n / possible, 3) for t, n in ranked},
        "top_self": {label(t): [(f, round(k / n, 3))
                                for f, k in self_time[t].most_common(PROFILE_TOP)]
                     for t, n in ranked},
        "top_inclusive": {label(t): [(f, round(k / n, 3))
                                     for f, k in inclusive[t].most_common(PROFILE_TOP * 2)]
                          for t, n in ranked},
    }


def _func(frame: str) -> str:
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({file})"


# --- the run --------------------------------------------------------------------------


def median(values):
    return round(statistics.median(values), 1)


def run(args) -> dict:
    size = args.size
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    probes = [cpu_probe()]
    targets = []
    results: dict[str, dict] = {}
    try:
        targets.append(NbdkitTarget(size))
        targets.append(MirrordTarget(size, None))
        for protocol in args.protocols:
            targets.append(MirrordTarget(size, protocol))
        setup_s = time.monotonic() - started
        log(f"setup {setup_s:.1f} s (incl. initial resync); measuring")
        for t in targets:
            results[t.name] = {"seq": [], "rand": []}
        for rep in range(args.repeats):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            for t in order:
                probes.append(cpu_probe())
                s = seq_sample(t.uri, size, t.pids())
                t.check()
                probes.append(cpu_probe())
                r = rand_sample(t.uri, size, args.rand_runtime)
                t.check()
                results[t.name]["seq"].append(s)
                results[t.name]["rand"].append(r)
                log(f"repeat {rep + 1} {t.name:20s} seq {s['mb_s']:7.1f} MB/s "
                    f"(busy {s['machine_busy']:.0%}, server {s['server_cpu_s_per_gb']} s/GB)  "
                    f"4k QD1 {r['iops']:6d} IOPS p50 {r['clat_p50_us']} us "
                    f"p99 {r['clat_p99_us']} us   probe {probes[-1]} ms")
        probes.append(cpu_probe())
        profiles = []
        if args.profile:
            mirrored = next(t for t in targets if getattr(t, "protocol", None) == "C")
            with tempfile.TemporaryDirectory(prefix="volume-pyspy-") as scratch:
                out_dir = args.profile_dir or scratch  # raw stacks kept only when asked
                os.makedirs(out_dir, exist_ok=True)
                for gil in (False, True):
                    profiles.append(profile_seq(mirrored, size, gil, out_dir))
                    mirrored.check()
    finally:
        for t in reversed(targets):
            try:
                t.close()
            except Exception as exc:  # noqa: BLE001 - close the others too
                log(f"closing {t.name}: {exc}")

    summary = {}
    for name, res in results.items():
        summary[name] = {
            "seq_mb_s": median([s["mb_s"] for s in res["seq"]]),
            "seq_samples": [s["mb_s"] for s in res["seq"]],
            "seq_clat_p50_us": median([s["clat_p50_us"] for s in res["seq"]]),
            "seq_clat_p99_us": median([s["clat_p99_us"] for s in res["seq"]]),
            "iops": median([r["iops"] for r in res["rand"]]),
            "iops_samples": [r["iops"] for r in res["rand"]],
            "clat_p50_us": median([r["clat_p50_us"] for r in res["rand"]]),
            "clat_p99_us": median([r["clat_p99_us"] for r in res["rand"]]),
        }
        for key in ("server_cpu_s_per_gb", "secondary_cpu_s_per_gb", "fio_cpu_s_per_gb",
                    "machine_busy", "machine_steal"):
            if key in res["seq"][0]:
                summary[name]["seq_" + key] = round(
                    statistics.median([x[key] for x in res["seq"]]), 3)
    base, alone = summary["nbdkit file"], summary["mirrord standalone"]
    ratios = {"standalone/nbdkit": {"seq": round(alone["seq_mb_s"] / base["seq_mb_s"], 3),
                                    "iops": round(alone["iops"] / base["iops"], 3)}}
    for protocol in args.protocols:
        m = summary[f"mirrored {protocol}"]
        ratios[f"mirrored {protocol}/standalone"] = {
            "seq": round(m["seq_mb_s"] / alone["seq_mb_s"], 3),
            "iops": round(m["iops"] / alone["iops"], 3)}
    return {
        "when": when, "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "size_bytes": size, "repeats": args.repeats, "rand_runtime_s": args.rand_runtime,
        "mtu": MTU, "summary": summary, "ratios": ratios, "samples": results,
        "cpu_probe_ms": probes, "loadavg": open("/proc/loadavg").read().split()[:3],
        "profiles": profiles, "runtime_s": round(time.monotonic() - started, 1),
    }


def markdown(r: dict) -> str:
    s, q = r["summary"], r["ratios"]
    lines = [
        "| target | seq 1 MiB QD16 + flush | samples | ratio | 4 KiB QD1 IOPS | samples | ratio "
        "| clat p50 | clat p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        if name == "nbdkit file":
            ratio_s = ratio_i = "baseline"
        elif name == "mirrord standalone":
            ratio_s = f"{q['standalone/nbdkit']['seq']:.2f} of nbdkit"
            ratio_i = f"{q['standalone/nbdkit']['iops']:.2f} of nbdkit"
        else:
            key = f"{name}/standalone"
            ratio_s = f"**{q[key]['seq']:.2f}** of standalone"
            ratio_i = f"{q[key]['iops']:.2f} of standalone"
        seq_samples = ", ".join(f"{x:.0f}" for x in v["seq_samples"])
        iops_samples = ", ".join(str(x) for x in v["iops_samples"])
        lines.append(
            f"| {name} | {v['seq_mb_s']:,.0f} MB/s | {seq_samples} | {ratio_s} "
            f"| {v['iops']:,.0f} | {iops_samples} | {ratio_i} "
            f"| {v['clat_p50_us']:.0f} µs | {v['clat_p99_us']:.0f} µs |")
    lines.append("")
    for key, v in q.items():
        if key.startswith("mirrored"):
            lines.append(f"{key}: sequential {v['seq']:.2f} (goal ≥ 0.70: "
                         f"{'met' if v['seq'] >= 0.70 else 'NOT met'}), 4 KiB QD1 IOPS "
                         f"{v['iops']:.2f}.  ")
    lines += ["", "CPU during the sequential runs (medians; CPU seconds per GB written, "
              "all threads, user + system):", "",
              "| target | server (primary) | secondary | fio | machine busy (2 CPUs = 100%) "
              "| steal |", "|---|---|---|---|---|---|"]
    for name, v in s.items():
        sec = v.get("seq_secondary_cpu_s_per_gb")
        lines.append(f"| {name} | {v['seq_server_cpu_s_per_gb']:.2f} s/GB | "
                     f"{'—' if sec is None else f'{sec:.2f} s/GB'} | "
                     f"{v['seq_fio_cpu_s_per_gb']:.2f} s/GB | {v['seq_machine_busy']:.0%} "
                     f"| {v['seq_machine_steal']:.0%} |")
    lines.append("")
    p = r["cpu_probe_ms"]
    lines.append(f"CPU probe {min(p)}–{max(p)} ms over {len(p)} probes "
                 f"({'steady' if max(p) <= 1.15 * min(p) else 'unsteady: figures suspect'}); "
                 f"load average at the end {' '.join(r['loadavg'])}; run took {r['runtime_s']} s.")
    for prof in r["profiles"]:
        lines.append("")
        mode = "thread holding the GIL only" if prof["mode"] == "gil" else "busy threads"
        lines.append(f"py-spy ({mode}), "
                     f"seq mirrored C at {prof['seq']['mb_s']:.0f} MB/s over {prof['wall_s']} s; "
                     f"threads' shares are of one core, frames' of that thread's samples:")
        for node, summ in prof["nodes"].items():
            lines.append(f"- {node} threads sampled busy: " + ", ".join(
                f"{t} {v:.0%}" for t, v in summ["threads"].items() if v >= 0.01))
            lines.append(f"- {node} threads' CPU (/proc): " + ", ".join(
                f"{t} {v:.0%} ({summ['thread_cpu_s_per_gb'][t]:.2f} s/GB)"
                for t, v in summ["thread_cpu_share"].items() if v >= 0.01))
            for thread, frames in summ["top_self"].items():
                if summ["threads"][thread] >= 0.05:
                    lines.append(f"- {node} {thread}, top self: " + "; ".join(
                        f"{f} {v:.0%}" for f, v in frames if v >= 0.02))
    return "\n".join(lines)


def log(msg: str) -> None:
    print(f"volume: {msg}", file=sys.stderr, flush=True)


def _interrupted(*_) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="volume size and bytes per sequential run (default 1G)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rand-runtime", type=float, default=5.0,
                   help="seconds per 4 KiB QD1 sample (default 5)")
    p.add_argument("--protocols", default="C",
                   help="mirrored protocols to measure, comma-separated (default C)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy both daemons during two extra sequential mirrored C runs")
    p.add_argument("--profile-dir", help="keep py-spy's raw (collapsed) stacks here")
    p.add_argument("--json", action="store_true", help="print the full results as JSON too")
    args = p.parse_args(argv)
    args.protocols = [x.strip().upper() for x in args.protocols.split(",") if x.strip()]
    if not args.protocols or any(x not in "ABC" or len(x) != 1 for x in args.protocols):
        p.error("--protocols: a comma-separated subset of A,B,C")
    if args.profile and "C" not in args.protocols:
        p.error("--profile needs protocol C among --protocols")
    if not 1 <= args.repeats <= 50:
        p.error("--repeats: 1..50")
    if os.geteuid() != 0:
        log("run as root (it makes network namespaces)")
        return 2
    for tool in ("fio", "nbdkit", "qemu-io", "cmp", *(["py-spy"] if args.profile else [])):
        if shutil.which(tool) is None:
            log(f"{tool} not found")
            return 2
    # SIGTERM unwinds like Ctrl-C, so the targets' close() runs.
    signal.signal(signal.SIGTERM, _interrupted)
    result = run(args)
    print(markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
