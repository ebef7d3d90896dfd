"""Resync time and bytes: mirrord's full, bitmap and checksum resync against nbdcopy and rsync.

One run, one pair of network namespaces joined by veth at MTU 9000, every file on
/dev/shm (tmpfs), the volume 4 GiB by default:
1. **full sync**: alpha's disk full of non-zero data (a 1 MiB random chunk repeated,
   each 4 KiB block stamped with its own offset so that no two blocks are equal), beta's
   fresh (written with zeros beforehand), both daemons started, then `primary --force` on
   alpha: the time until both disks are up to date and nothing is out of sync. A first
   sync is a checksum resync, which here soon copies outright: once nearly every block
   compared differs, only one chunk in 16 is compared first (mirrord/sync_source.py).
2. **bitmap resync after 1% dirty**: the link cut (alpha's veth end down), 1% of the
   volume written at distinct random 4 KiB-aligned offsets through alpha's NBD export
   (libnbd, one request at a time, then a FLUSH), the link restored: the time from
   link-up until in sync again. Bytes sent must be at most 1.1 x the bytes dirtied.
3. **checksum resync**: `invalidate` on beta (the volumes are identical): the time until
   in sync again; bytes sent (digests and any differing block) / volume size.
   After each mirrord phase the two backing files are compared byte for byte (`cmp`).
4. **nbdcopy** (baseline for 1): the daemons stopped and beta's disk deleted, the veth
   ends get 10.213.0.1/24 (alpha) and .2 (beta); `nbdkit -r file` serves alpha's disk on
   TCP in namespace alpha and `nbdcopy --flush nbd://10.213.0.1:PORT copy.img` runs in
   namespace beta, into a file written with zeros beforehand: nbdcopy's defaults
   (4 connections, since nbdkit file offers multi-conn), then `--connections=1` (one
   stream, as mirrord's).
5. **rsync** (baseline for 2): the copy from 4 is beta's stale copy; alpha's disk gets
   another 1% of random 4 KiB writes (straight into the file); an `rsync --daemon` in
   namespace alpha serves it read-only and namespace beta pulls it:
   `rsync --inplace --no-whole-file --ignore-times --stats
   rsync://10.213.0.1:PORT/vol/alpha.img copy.img` (rsync's delta transfer, its defaults
   otherwise: xxh128 block checksums, blocks of about sqrt(file size); --ignore-times
   because here both files may have the same size and mtime second).

Reported: time, bytes sent (mirrord's `resync_sent_bytes`; for the tools, what the
server side sent as rsync's --stats or the byte counters say) and the bytes that
crossed the veth each way (`ip -s link`), MB/s, CPU seconds of each process and the
machine's busy share, a CPU probe (bench/probe.py) around every phase, and the ratios
the issue asks for: full sync MB/s / nbdcopy MB/s (goal >= 0.8) and rsync time /
bitmap resync time (goal >= 20).  Time is measured by polling alpha's control socket
(50 ms apart for the bitmap resync, 100 ms for the others), and includes reconnecting
for phases 2 and 3.

    python3 bench/resync.py                  # 4G: 70 s quiet, 150 s busy; /dev/shm 2 x size
    python3 bench/resync.py --size 1G --json
    python3 bench/resync.py --profile        # + py-spy record of both daemons during 1

`--profile` attaches py-spy (--nonblocking, 200 Hz, every thread) to both daemons during
the full sync and reports each thread's CPU (/proc) and top frames; that run's full-sync
figure is then not clean.  Needs root (namespaces), nbdkit, nbdcopy, rsync, cmp, ip,
libnbd's Python binding; py-spy for --profile.  MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from mirrord.control import ControlClient  # noqa: E402
from mirrorpair import MirrorPair, first_difference  # noqa: E402
from netns import NetnsPair  # noqa: E402
from probe import cpu_probe  # noqa: E402
from volume import (PROFILE_RATE, machine_cpu, parse_size, preallocate,  # noqa: E402
                    process_cpu, summarise_raw, thread_cpu)

MTU = 9000
BLOCK = 4096
ADDR = {"alpha": "10.213.0.1", "beta": "10.213.0.2"}
NBD_PORT = 10809
RSYNC_PORT = 10873
START_TIMEOUT_S = 30
SYNC_TIMEOUT_S = 300  # one mirrord phase; the whole 4 GiB at 15 MB/s would still fit
TOOL_TIMEOUT_S = 300  # one nbdcopy or rsync run
CMP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15
POLL_FAST_S = 0.05
POLL_S = 0.1
GOAL_FULL = 0.8
GOAL_BITMAP = 20.0
MAX_SHM = 14 << 30  # two volumes at once must stay under this


def log(msg: str) -> None:
    print(f"resync: {msg}", file=sys.stderr, flush=True)


# --- small helpers -----------------------------------------------------------------


def fill(path: str, size: int, seed: int) -> None:
    """Non-zero data, no two 4 KiB blocks equal: a random 1 MiB chunk, each block's first
    8 bytes its own offset."""
    chunk = bytearray(random.Random(seed).randbytes(1 << 20))
    fd = os.open(path, os.O_WRONLY)
    try:
        for base in range(0, size, 1 << 20):
            for off in range(0, 1 << 20, BLOCK):
                struct.pack_into("<Q", chunk, off, base + off + 1)
            os.pwrite(fd, chunk, base)
    finally:
        os.close(fd)


def dirty_blocks(size: int, seed: int) -> list[int]:
    """1% of the volume's 4 KiB blocks, distinct, in random order: their byte offsets."""
    rng = random.Random(seed)
    return [b * BLOCK for b in rng.sample(range(size // BLOCK), size // 100 // BLOCK)]


def link_tx(net: NetnsPair, ns: str) -> int:
    """Bytes sent so far by the veth end in `ns`."""
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", net.ifname(ns)],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_with_children(pid: int) -> float:
    """CPU seconds of `pid` plus its reaped children (rsync's daemon forks per client)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def check_identical(a: str, b: str, what: str) -> None:
    if subprocess.run(["cmp", "-s", a, b], timeout=CMP_TIMEOUT_S).returncode != 0:
        raise RuntimeError(f"{what}: {a} and {b} differ, first at byte {first_difference(a, b)}")


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process (group) we started, by PID; SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: group id = PID
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_tcp(net: NetnsPair, ns: str, addr: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with net.enter(ns):
            try:
                socket.create_connection((addr, port), timeout=1).close()
                return
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on {addr}:{port} "
                               f"(server exit status {proc.poll()})")
        time.sleep(0.05)


class Meter:
    """CPU of given processes, of the whole machine, and veth bytes over one phase."""

    def __init__(self, net: NetnsPair, pids: dict[str, int], with_children=()) -> None:
        self.net, self.pids, self.with_children = net, pids, set(with_children)
        self.cpu0 = {k: self._cpu(k, p) for k, p in pids.items()}
        self.kids0 = children_cpu()
        self.tx0 = {n: link_tx(net, net.ns_a if n == "alpha" else net.ns_b)
                    for n in ("alpha", "beta")}
        self.machine0 = machine_cpu()
        self.t0 = time.monotonic()

    def _cpu(self, key: str, pid: int) -> float:
        return cpu_with_children(pid) if key in self.with_children else process_cpu(pid)

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy, steal = machine_cpu()
        ncpu = os.cpu_count() or 1
        out = {f"{k}_cpu_s": round(self._cpu(k, p) - self.cpu0[k], 2)
               for k, p in self.pids.items()}
        out["client_cpu_s"] = round(children_cpu() - self.kids0, 2)  # nbdcopy / rsync
        out["wire_alpha_to_beta"] = link_tx(self.net, self.net.ns_a) - self.tx0["alpha"]
        out["wire_beta_to_alpha"] = link_tx(self.net, self.net.ns_b) - self.tx0["beta"]
        out["machine_busy"] = round((busy - self.machine0[0]) / (ncpu * wall), 3)
        out["machine_steal"] = round((steal - self.machine0[1]) / (ncpu * wall), 3)
        return out


# --- mirrord phases ----------------------------------------------------------------


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.size = args.size
        self.net: NetnsPair | None = None
        self.pair: MirrorPair | None = None
        self.ctl: dict[str, ControlClient] = {}
        self.servers: list[subprocess.Popen] = []
        self.scratch_shm = tempfile.mkdtemp(prefix="resync-bench-", dir="/dev/shm")
        self.scratch_tmp = tempfile.mkdtemp(prefix="resync-bench-", dir="/tmp")
        self.probes: list[float] = []

    def status(self, node: str) -> dict:
        reply = self.ctl[node].request("status")
        if not reply["ok"]:
            raise RuntimeError(f"status on {node}: {reply}")
        return reply["status"]

    def command(self, node: str, command: str, **args) -> str:
        reply = self.ctl[node].request(command, **args)
        if not reply["ok"]:
            raise RuntimeError(f"{command} on {node} refused: {reply}\n{self.pair.logs_text()}")
        return reply.get("message", "")

    def alive(self) -> None:
        for node, proc in self.pair.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"mirrord on {node} exited {proc.returncode}\n"
                                   f"{self.pair.logs_text()}")

    def wait_in_sync(self, t0: float, poll: float, sent_before: int) -> dict:
        """Poll alpha until connected, both disks up to date, nothing out of sync, no
        sync running, and some resync bytes sent; the seconds since t0 and a timeline."""
        deadline = t0 + SYNC_TIMEOUT_S
        timeline: dict = {}
        last_sync = None
        while True:
            self.alive()
            s = self.status("alpha")
            now = time.monotonic() - t0
            if s["peer"] is not None:
                timeline.setdefault("peer_seen_s", round(now, 3))
            if s["sync"] is not None:
                timeline.setdefault("sync_seen_s", round(now, 3))
                last_sync = s["sync"]
            if (s["connection"] == "connected" and s["disk"] == "up-to-date"
                    and s["peer"] is not None and s["peer"]["disk"] == "up-to-date"
                    and s["out_of_sync_bytes"] == 0 and s["sync"] is None
                    and s["resync_sent_bytes"] > sent_before):
                timeline["done_s"] = round(now, 3)
                return {"seconds": now, "status": s, "timeline": timeline,
                        "last_sync": last_sync}
            if time.monotonic() > deadline:
                raise RuntimeError(f"not in sync within {SYNC_TIMEOUT_S} s: {s}\n"
                                   f"{self.pair.logs_text()}")
            time.sleep(poll)

    def mirrord_phase(self, name: str, trigger, poll: float, profile: bool = False) -> dict:
        """Run `trigger()` and time until in sync; bytes, CPU; then compare the disks."""
        self.probes.append(cpu_probe())
        pids = {n: self.pair.procs[n].pid for n in ("alpha", "beta")}
        sent0 = self.status("alpha")["resync_sent_bytes"]
        threads0 = {n: (process_cpu(p), thread_cpu(p)) for n, p in pids.items()}
        spies = self.start_profile(pids) if profile else {}
        meter = Meter(self.net, pids)
        t0 = time.monotonic()
        try:
            trigger()
            done = self.wait_in_sync(t0, poll, sent0)
        finally:
            prof = self.stop_profile(spies, time.monotonic() - t0) if spies else None
        cpu = meter.stop()
        threads1 = {n: (process_cpu(p), thread_cpu(p)) for n, p in pids.items()}
        self.pair.wait_connected(30)  # beta agrees (untimed)
        self.probes.append(cpu_probe())
        sent = done["status"]["resync_sent_bytes"] - sent0
        check_identical(self.pair.disk("alpha"), self.pair.disk("beta"), name)
        seconds = done["seconds"]
        out = {"seconds": round(seconds, 3), "sent_bytes": sent,
               "timeline": done["timeline"],
               "checksums": (done["last_sync"] or {}).get("checksums"),
               "sync_total_bytes": (done["last_sync"] or {}).get("total_bytes"),
               "identical": True, **cpu,
               "thread_cpu_share": {n: thread_shares(threads0[n], threads1[n], seconds)
                                    for n in pids}}
        if prof is not None:
            out["profile"] = prof
        log(f"{name}: {seconds:.2f} s, sent {sent / 1e6:,.1f} MB, "
            f"timeline {done['timeline']}, busy {cpu['machine_busy']:.0%}, "
            f"probe {self.probes[-2]}/{self.probes[-1]} ms")
        return out

    # --- py-spy ---

    def start_profile(self, pids: dict[str, int]) -> dict:
        spies = {}
        for node, pid in pids.items():
            raw = os.path.join(self.scratch_tmp, f"pyspy-{node}.txt")
            argv = ["py-spy", "record", "--pid", str(pid), "--rate", str(PROFILE_RATE),
                    "--format", "raw", "--output", raw, "--threads", "--nonblocking"]
            spies[node] = (raw, pid, (process_cpu(pid), thread_cpu(pid)), subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True))
        time.sleep(1.0)  # attach before the sync starts
        for raw, _, _, spy in spies.values():
            if spy.poll() is not None:
                raise RuntimeError(f"py-spy exited: {spy.stderr.read()!r}")
        return spies

    def stop_profile(self, spies: dict, wall: float) -> dict:
        for raw, pid, _, spy in spies.values():
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        out = {}
        for node, (raw, pid, before, spy) in spies.items():
            after = (process_cpu(pid), thread_cpu(pid))
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop(spy)
            if not os.path.exists(raw):
                continue
            summary = summarise_raw(raw, wall)
            names = summary.pop("thread_names")
            # A thread that ended (the sync-source thread does, with the sync) is gone
            # from /proc: what the process used beyond its living threads is its.
            names["exited"] = "exited threads (sync-source)"
            summary["thread_cpu_share"] = {
                names.get(tid, f"tid {tid}"): share
                for tid, share in thread_shares(before, after, wall, named=True).items()
                if share > 0.01}
            summary.pop("top_inclusive", None)
            out[node] = summary
        return out

    # --- the run ---

    def run(self) -> dict:
        size = self.size
        results: dict = {}
        self.net = NetnsPair(mtu=MTU)
        self.pair = MirrorPair(self.net, size=size, disk_dir=self.scratch_shm)
        alpha_disk, beta_disk = self.pair.disk("alpha"), self.pair.disk("beta")
        t = time.monotonic()
        preallocate(alpha_disk, size)
        preallocate(beta_disk, size)
        fill(alpha_disk, size, seed=1)
        log(f"filled alpha's {size >> 20} MiB in {time.monotonic() - t:.1f} s")

        self.pair.start_all()
        for node in ("alpha", "beta"):
            self.ctl[node] = ControlClient(self.pair.paths[node]["control_socket"], timeout=30)
        # Both daemons see each other before the clock starts (both disks inconsistent).
        self.pair.wait("alpha", lambda s: s["peer"] is not None, START_TIMEOUT_S, "peer seen")

        # 1. full sync
        results["full_sync"] = self.mirrord_phase(
            "full sync", lambda: self.command("alpha", "primary", force=True), POLL_S,
            profile=self.args.profile)

        # 2. bitmap resync after 1% dirty
        self.net.set_link(self.net.ns_a, False)
        for node in ("alpha", "beta"):
            self.pair.wait(node, lambda s: s["peer"] is None, 10, "peer lost")
        offsets = dirty_blocks(size, seed=2)
        import nbdclient
        nbd = nbdclient.load()
        handle = nbd.NBD()
        handle.connect_uri(self.pair.uri("alpha"))
        rng = random.Random(3)
        t = time.monotonic()
        for off in offsets:
            handle.pwrite(rng.randbytes(BLOCK), off)
        handle.flush()
        handle.shutdown()
        dirty = len(offsets) * BLOCK
        write_s = time.monotonic() - t
        marked = self.status("alpha")["out_of_sync_bytes"]
        if marked != dirty:
            raise RuntimeError(f"{dirty} bytes written while cut, {marked} marked out of sync")
        log(f"wrote {len(offsets)} random 4 KiB blocks ({dirty / 1e6:.1f} MB) while cut in "
            f"{write_s:.1f} s; {marked} bytes marked")
        time.sleep(0.5)  # the resync's rate controller counts writes of the last 0.2 s
        r = self.mirrord_phase("bitmap resync", lambda: self.net.set_link(self.net.ns_a, True),
                               POLL_FAST_S)
        r["dirty_bytes"] = dirty
        r["dirty_write_s"] = round(write_s, 2)  # the 4 KiB QD1 writes while cut (untimed)
        r["sent_over_dirty"] = round(r["sent_bytes"] / dirty, 4)
        if r["sent_bytes"] > 1.1 * dirty:
            raise RuntimeError(f"bitmap resync sent {r['sent_bytes']} bytes for {dirty} dirty")
        results["bitmap_resync"] = r

        # 3. checksum resync of identical volumes
        r = self.mirrord_phase("checksum resync", lambda: self.command("beta", "invalidate"),
                               POLL_S)
        r["sent_over_size"] = round(r["sent_bytes"] / size, 5)
        results["checksum_resync"] = r

        # The daemons stop; beta's disk goes (tmpfs: two volumes at a time at most).
        for client in self.ctl.values():
            client.close()
        for node in ("alpha", "beta"):
            stop(self.pair.procs[node])
        os.unlink(beta_disk)

        # 4. nbdcopy over TCP, alpha's disk to a copy in namespace beta
        for node, ns in (("alpha", self.net.ns_a), ("beta", self.net.ns_b)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ADDR[node]}/24", "dev",
                            self.net.ifname(ns)], check=True, timeout=10)
        copy_dir = os.path.join(self.scratch_shm, "beta")
        os.mkdir(copy_dir)
        copy = os.path.join(copy_dir, "copy.img")
        preallocate(copy, size)
        nbdkit = self.net.popen(self.net.ns_a, [
            "nbdkit", "--exit-with-parent", "--foreground", "-r", "-p", str(NBD_PORT),
            "-i", ADDR["alpha"], "file", f"file={alpha_disk}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.servers.append(nbdkit)
        wait_tcp(self.net, self.net.ns_b, ADDR["alpha"], NBD_PORT, nbdkit)
        uri = f"nbd://{ADDR['alpha']}:{NBD_PORT}"
        for key, extra in (("nbdcopy", []), ("nbdcopy_1conn", ["--connections=1"])):
            argv = ["nbdcopy", "--flush", *extra, uri, copy]
            results[key] = self.tool_phase(key, argv, {"nbdkit": nbdkit.pid})
            check_identical(alpha_disk, copy, key)
            results[key]["identical"] = True
            results[key]["mb_s"] = round(size / results[key]["seconds"] / 1e6, 1)
        stop(nbdkit)

        # 5. rsync: copy.img is beta's stale copy; alpha's disk moves on by another 1%
        rng = random.Random(5)
        fd = os.open(alpha_disk, os.O_WRONLY)
        try:
            for off in dirty_blocks(size, seed=4):
                os.pwrite(fd, rng.randbytes(BLOCK), off)
        finally:
            os.close(fd)
        conf = os.path.join(self.scratch_tmp, "rsyncd.conf")
        with open(conf, "w") as f:
            f.write(f"use chroot = no\nreverse lookup = no\n"
                    f"log file = {os.path.join(self.scratch_tmp, 'rsyncd.log')}\n"
                    f"[vol]\n    path = {os.path.dirname(alpha_disk)}\n    read only = yes\n"
                    f"    uid = root\n    gid = root\n")
        rsyncd = self.net.popen(self.net.ns_a, [
            "rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={RSYNC_PORT}",
            f"--address={ADDR['alpha']}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.servers.append(rsyncd)
        wait_tcp(self.net, self.net.ns_b, ADDR["alpha"], RSYNC_PORT, rsyncd)
        time.sleep(0.2)  # the probe connection's child is reaped
        # --ignore-times: the stale copy and alpha's disk may carry the same size and
        # mtime second here (rsync would then skip the file); on real boxes they would not.
        argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats",
                f"rsync://{ADDR['alpha']}:{RSYNC_PORT}/vol/{os.path.basename(alpha_disk)}", copy]
        r = self.tool_phase("rsync", argv, {"rsyncd": rsyncd.pid}, with_children=("rsyncd",),
                            settle=0.3)
        r.update(parse_rsync_stats(r.pop("stdout")))
        r["sent_bytes"] = r.get("total_bytes_received")  # what the daemon (alpha) sent
        check_identical(alpha_disk, copy, "rsync")
        r["identical"] = True
        results["rsync"] = r
        stop(rsyncd)
        return results

    def tool_phase(self, name: str, argv: list[str], servers: dict[str, int],
                   with_children=(), settle: float = 0.0) -> dict:
        self.probes.append(cpu_probe())
        meter = Meter(self.net, servers, with_children)
        t0 = time.monotonic()
        result = self.net.run(self.net.ns_b, argv, capture_output=True, text=True,
                              check=False, timeout=TOOL_TIMEOUT_S)
        seconds = time.monotonic() - t0
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n"
                               f"{result.stderr}{result.stdout}")
        time.sleep(settle)  # rsync's daemon reaps its child: its CPU lands in cutime
        cpu = meter.stop()
        self.probes.append(cpu_probe())
        out = {"seconds": round(seconds, 3), "command": " ".join(argv), **cpu,
               "stdout": result.stdout}
        if name != "rsync":
            out.pop("stdout")
            out["sent_bytes"] = cpu["wire_alpha_to_beta"]
        log(f"{name}: {seconds:.2f} s, wire a->b {cpu['wire_alpha_to_beta'] / 1e6:,.1f} MB, "
            f"busy {cpu['machine_busy']:.0%}, probe {self.probes[-2]}/{self.probes[-1]} ms")
        return out

    def close(self) -> None:
        for client in self.ctl.values():
            client.close()
        for proc in self.servers:
            stop(proc)
        try:
            if self.pair is not None:
                self.pair.close()  # daemons by PID, then its disk and work directories
        finally:
            try:
                if self.net is not None:
                    self.net.close()  # anything else started in the namespaces; the namespaces
            finally:
                shutil.rmtree(self.scratch_shm, ignore_errors=True)
                shutil.rmtree(self.scratch_tmp, ignore_errors=True)


def thread_shares(before, after, wall: float, named: bool = False):
    """Each thread's CPU over the phase as a share of one core, busiest first (a list; a
    dict by thread id when `named`); threads that ended count together as "exited"."""
    (proc0, threads0), (proc1, threads1) = before, after
    used = {tid: cpu - threads0.get(tid, 0.0) for tid, cpu in threads1.items()}
    gone = proc1 - proc0 - sum(used.values())
    if gone > 0.01:
        used["exited"] = gone
    ranked = sorted(used.items(), key=lambda kv: -kv[1])
    if named:
        return {tid: round(v / wall, 3) for tid, v in ranked}
    return [round(v / wall, 3) for _, v in ranked[:4]]


def parse_rsync_stats(text: str) -> dict:
    """The numbers of rsync's --stats that matter here."""
    keys = {"Literal data": "literal_bytes", "Matched data": "matched_bytes",
            "Total bytes sent": "total_bytes_sent",
            "Total bytes received": "total_bytes_received"}
    out = {}
    for line in text.splitlines():
        label, _, value = line.partition(":")
        if label.strip() in keys:
            m = re.match(r"\s*([\d,]+)", value)
            if m:
                out[keys[label.strip()]] = int(m.group(1).replace(",", ""))
    return out


# --- report ------------------------------------------------------------------------


def summarise(results: dict, size: int) -> dict:
    full, nbdcopy = results["full_sync"], results["nbdcopy"]
    full["mb_s"] = round(size / full["seconds"] / 1e6, 1)
    bitmap, rsync = results["bitmap_resync"], results["rsync"]
    return {
        "full_over_nbdcopy": round(full["mb_s"] / nbdcopy["mb_s"], 3),
        "full_over_nbdcopy_1conn": round(full["mb_s"] / results["nbdcopy_1conn"]["mb_s"], 3),
        "rsync_over_bitmap": round(rsync["seconds"] / bitmap["seconds"], 1),
        "bitmap_sent_over_dirty": bitmap["sent_over_dirty"],
        "checksum_sent_over_size": results["checksum_resync"]["sent_over_size"],
    }


def gb(n: int) -> float:
    return n / 1e9


def markdown(r: dict) -> str:
    res, q, size = r["results"], r["ratios"], r["size_bytes"]
    full, bm, cs = res["full_sync"], res["bitmap_resync"], res["checksum_resync"]
    nc, nc1, rs = res["nbdcopy"], res["nbdcopy_1conn"], res["rsync"]
    gib = size / (1 << 30)

    def mb(n):
        return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"

    def wire(x):
        return f"{mb(x['wire_alpha_to_beta'])} / {mb(x['wire_beta_to_alpha'])}"

    def cpu(x, keys):
        return ", ".join(f"{k} {x[k + '_cpu_s']:.1f}" for k in keys)

    lines = [
        f"| phase ({gib:g} GiB volume, MTU {r['mtu']}) | time | bytes sent | on the veth a→b / b→a "
        "| MB/s (volume / time) | CPU s | machine busy |",
        "|---|---|---|---|---|---|---|",
        f"| mirrord full sync (first sync, all blocks differ) | {full['seconds']:.2f} s "
        f"| {mb(full['sent_bytes'])} | {wire(full)} | **{full['mb_s']:,.0f}** "
        f"| {cpu(full, ('alpha', 'beta'))} | {full['machine_busy']:.0%} |",
        f"| nbdcopy over TCP (4 connections, its default) | {nc['seconds']:.2f} s "
        f"| {mb(nc['sent_bytes'])} | {wire(nc)} | **{nc['mb_s']:,.0f}** "
        f"| nbdkit {nc['nbdkit_cpu_s']:.1f}, nbdcopy {nc['client_cpu_s']:.1f} "
        f"| {nc['machine_busy']:.0%} |",
        f"| nbdcopy over TCP, `--connections=1` | {nc1['seconds']:.2f} s "
        f"| {mb(nc1['sent_bytes'])} | {wire(nc1)} | {nc1['mb_s']:,.0f} "
        f"| nbdkit {nc1['nbdkit_cpu_s']:.1f}, nbdcopy {nc1['client_cpu_s']:.1f} "
        f"| {nc1['machine_busy']:.0%} |",
        f"| mirrord bitmap resync, 1% dirty ({mb(bm['dirty_bytes'])}) | **{bm['seconds']:.2f} s** "
        f"| {mb(bm['sent_bytes'])} ({bm['sent_over_dirty']:.3f} × dirty) | {wire(bm)} | — "
        f"| {cpu(bm, ('alpha', 'beta'))} | {bm['machine_busy']:.0%} |",
        f"| rsync --inplace --no-whole-file, 1% dirty | **{rs['seconds']:.2f} s** "
        f"| {mb(rs['sent_bytes'])} (literal {mb(rs.get('literal_bytes', 0))}) | {wire(rs)} | — "
        f"| rsyncd {rs['rsyncd_cpu_s']:.1f}, rsync {rs['client_cpu_s']:.1f} "
        f"| {rs['machine_busy']:.0%} |",
        f"| mirrord checksum resync (`invalidate`, identical volumes) | {cs['seconds']:.2f} s "
        f"| {mb(cs['sent_bytes'])} ({cs['sent_over_size']:.2%} of the volume) | {wire(cs)} "
        f"| {size / cs['seconds'] / 1e6:,.0f} | {cpu(cs, ('alpha', 'beta'))} "
        f"| {cs['machine_busy']:.0%} |",
        "",
        f"- full sync / nbdcopy: **{q['full_over_nbdcopy']:.2f}** (goal ≥ {GOAL_FULL}: "
        f"{'met' if q['full_over_nbdcopy'] >= GOAL_FULL else 'NOT met'}); "
        f"/ nbdcopy with one connection: {q['full_over_nbdcopy_1conn']:.2f}.",
        f"- rsync time / bitmap resync time: **{q['rsync_over_bitmap']:.1f}** (goal ≥ "
        f"{GOAL_BITMAP:g}: {'met' if q['rsync_over_bitmap'] >= GOAL_BITMAP else 'NOT met'}).",
        f"- checksum resync sent {q['checksum_sent_over_size']:.2%} of the volume; "
        f"bitmap resync sent {q['bitmap_sent_over_dirty']:.3f} × the dirty bytes (limit 1.1).",
        "- timelines (s after the trigger; peer seen, sync seen, done): "
        + "; ".join(f"{k} {v['timeline'].get('peer_seen_s')}, {v['timeline'].get('sync_seen_s')}, "
                    f"{v['timeline']['done_s']}"
                    for k, v in (("full", full), ("bitmap", bm), ("checksum", cs))) + ".",
        f"- CPU per GB of volume copied: mirrord full sync alpha "
        f"{full['alpha_cpu_s'] / gb(size):.2f} + beta {full['beta_cpu_s'] / gb(size):.2f} = "
        f"**{(full['alpha_cpu_s'] + full['beta_cpu_s']) / gb(size):.2f} s/GB**; nbdcopy nbdkit "
        f"{nc['nbdkit_cpu_s'] / gb(size):.2f} + nbdcopy {nc['client_cpu_s'] / gb(size):.2f} = "
        f"**{(nc['nbdkit_cpu_s'] + nc['client_cpu_s']) / gb(size):.2f} s/GB** (one connection: "
        f"{(nc1['nbdkit_cpu_s'] + nc1['client_cpu_s']) / gb(size):.2f} s/GB).",
        f"- busiest threads' share of a core during the full sync: alpha "
        f"{full['thread_cpu_share']['alpha']}, beta {full['thread_cpu_share']['beta']}.",
        "- the two backing files (and nbdcopy's and rsync's copy against alpha's) were "
        "identical after every phase (`cmp`).",
    ]
    p = r["cpu_probe_ms"]
    lines.append(f"- CPU probe {min(p)}–{max(p)} ms over {len(p)} probes "
                 f"({'steady' if max(p) <= 1.15 * min(p) else 'unsteady: figures suspect'}); "
                 f"load average at the end {' '.join(r['loadavg'])}; run took "
                 f"{r['runtime_s']} s.")
    prof = full.get("profile")
    if prof:
        lines.append("")
        lines.append("py-spy during the full sync (threads' CPU from /proc as a share of one "
                     "core; frames are shares of that thread's samples):")
        for node, summ in prof.items():
            lines.append(f"- {node} threads' CPU: " + ", ".join(
                f"{t} {v:.0%} ({v * full['seconds'] / gb(size):.2f} s/GB)"
                for t, v in summ["thread_cpu_share"].items() if v >= 0.02))
            for thread, frames in summ["top_self"].items():
                if summ["threads"].get(thread, 0) >= 0.05:
                    lines.append(f"- {node} {thread} (sampled busy {summ['threads'][thread]:.0%})"
                                 ", top self: " + "; ".join(
                                     f"{f} {v:.0%}" for f, v in frames if v >= 0.03))
    return "\n".join(lines)


def _interrupted(*_) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("4G"),
                   help="volume size (default 4G); /dev/shm holds two volumes at a time")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record both daemons during the full sync")
    p.add_argument("--json", action="store_true", help="print the full results as JSON too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        log("run as root (it makes network namespaces)")
        return 2
    if args.size < 64 << 20:
        p.error("--size: at least 64M")
    free = shutil.disk_usage("/dev/shm").free
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    if 2 * args.size > min(MAX_SHM, free, avail - (2 << 30)):
        p.error(f"--size: two volumes ({2 * args.size >> 20} MiB) must fit in /dev/shm "
                f"({free >> 20} MiB free), in memory ({avail >> 20} MiB available, less 2 GiB) "
                f"and under {MAX_SHM >> 30} GiB")
    for tool in ("nbdkit", "nbdcopy", "rsync", "cmp", "ip", *(["py-spy"] if args.profile else [])):
        if shutil.which(tool) is None:
            log(f"{tool} not found")
            return 2
    signal.signal(signal.SIGTERM, _interrupted)  # unwind like Ctrl-C: close() runs
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bench = Bench(args)
    bench.probes.append(cpu_probe())
    try:
        results = bench.run()
    finally:
        bench.close()
    bench.probes.append(cpu_probe())
    result = {
        "when": when,
        "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)]
                            + sys.argv[1:]),
        "size_bytes": args.size, "mtu": MTU, "results": results,
        "ratios": summarise(results, args.size),
        "rsync_version": subprocess.run(["rsync", "--version"], capture_output=True,
                                        text=True, timeout=10).stdout.splitlines()[0],
        "cpu_probe_ms": bench.probes, "loadavg": open("/proc/loadavg").read().split()[:3],
        "runtime_s": round(time.monotonic() - started, 1),
    }
    print(markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
