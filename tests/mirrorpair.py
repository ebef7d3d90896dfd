"""Two real `mirrord` daemons, one per network namespace, serving one resource.

    pair = MirrorPair(netns_pair, workdir, size=64 << 20)
    pair.start_all(); pair.promote("alpha", force=True); pair.wait_synced()
    subprocess.run(["nbdcopy", "--flush", SRC, pair.uri("alpha")])

The disks are files on tmpfs (/dev/shm) so tests measure the daemon, not a disk; each
daemon's stderr goes to a log file that failing assertions print.  Daemons are stopped
by PID when the namespace pair closes (tests/netns.py), and the disks are removed by
close().
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = ("alpha", "beta")
ENV = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")


def mirrord_argv(config: str, node: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mirrord.daemon", "--config", config, "--node", node, *extra]


def mirrorctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mirrord.mirrorctl", *args]


class MirrorPair:
    def __init__(self, netns_pair, *, size: int = 64 << 20, protocol: str = "C",
                 resource: str = "r0", extra_resource: str = "", disk_dir: str | None = None,
                 node_extra: dict | None = None, disk_dirs: dict | None = None) -> None:
        self.net = netns_pair
        self.size = size
        self.resource = resource
        self.workdir = tempfile.mkdtemp(prefix="mirrord-test-", dir="/tmp")
        self.diskdir = tempfile.mkdtemp(prefix="mirrord-disks-", dir=disk_dir or "/dev/shm")
        self.ns = {"alpha": netns_pair.ns_a, "beta": netns_pair.ns_b}
        self.ifname = {"alpha": netns_pair.if_a, "beta": netns_pair.if_b}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        self._starts = {n: 0 for n in NODES}
        self.paths = {}
        for node in NODES:
            self.paths[node] = {
                "disk": os.path.join((disk_dirs or {}).get(node, self.diskdir), f"{node}.img"),
                "metadata": os.path.join(self.workdir, f"{node}.meta"),
                "nbd_socket": os.path.join(self.workdir, f"{node}.nbd"),
                "control_socket": os.path.join(self.workdir, f"{node}.ctl"),
            }
            with open(self.paths[node]["disk"], "wb") as f:
                f.truncate(size)
        self.config = os.path.join(self.workdir, f"{resource}.toml")
        lines = ["[resource]", f'name = "{resource}"', f'protocol = "{protocol}"',
                 extra_resource, ""]
        for node in NODES:
            lines.append(f"[nodes.{node}]")
            lines.append(f'interface = "{self.ifname[node]}"')
            for key, value in self.paths[node].items():
                lines.append(f'{key} = "{value}"')
            for key, value in (node_extra or {}).get(node, {}).items():
                lines.append(f"{key} = {value}")
            lines.append("")
        with open(self.config, "w") as f:
            f.write("\n".join(lines))

    # --- processes ----------------------------------------------------------------

    def create_md(self, node: str, *extra: str) -> None:
        subprocess.run(mirrorctl_argv("--config", self.config, "--node", node, "create-md",
                                      *extra), check=True, env=ENV, cwd=REPO, timeout=30,
                       capture_output=True)

    def start(self, node: str, *extra: str, wait: bool = True) -> subprocess.Popen:
        if not os.path.exists(self.paths[node]["metadata"]):
            self.create_md(node)
        self._starts[node] += 1
        log_path = os.path.join(self.workdir, f"{node}.{self._starts[node]}.log")
        self.logs[node] = log_path
        log = open(log_path, "w")
        proc = self.net.popen(self.ns[node], mirrord_argv(self.config, node, *extra),
                              stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        log.close()
        self.procs[node] = proc
        if wait:
            self.wait(node, lambda s: True, 20, "the control socket answers")
        return proc

    def start_all(self, *extra: str) -> None:
        for node in NODES:
            self.start(node, *extra, wait=False)
        for node in NODES:
            self.wait(node, lambda s: True, 20, "the control socket answers")

    def kill(self, node: str, sig: int = signal.SIGKILL, timeout: float = 20) -> int:
        proc = self.procs[node]
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def log(self, node: str) -> str:
        try:
            with open(self.logs[node]) as f:
                return f.read()
        except (KeyError, OSError):
            return ""

    def logs_text(self) -> str:
        return "\n".join(f"--- {n} log ---\n{self.log(n)}" for n in NODES)

    # --- control ------------------------------------------------------------------

    def ctl(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            mirrorctl_argv("--socket", self.paths[node]["control_socket"], *args),
            capture_output=True, text=True, timeout=30, env=ENV, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"mirrorctl {' '.join(args)} on {node} exited "
                                 f"{result.returncode}: {result.stderr}\n{self.logs_text()}")
        return result

    def status(self, node: str) -> dict | None:
        result = self.ctl(node, "status", "--json", check=False)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def wait(self, node: str, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            proc = self.procs.get(node)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"mirrord on {node} exited {proc.returncode} while "
                                     f"waiting for: {what}\n{self.logs_text()}")
            last = self.status(node)
            if last is not None and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"{node}: not within {timeout} s: {what}; last status "
                             f"{last}\n{self.logs_text()}")

    def promote(self, node: str, force: bool = False) -> None:
        self.ctl(node, "primary", *(["--force"] if force else []))

    def wait_connected(self, timeout: float = 30) -> None:
        for node in NODES:
            self.wait(node, in_sync, timeout, "connected, both disks up to date")

    # --- data ---------------------------------------------------------------------

    def uri(self, node: str) -> str:
        return f"nbd+unix:///{self.resource}?socket={self.paths[node]['nbd_socket']}"

    def disk(self, node: str) -> str:
        return self.paths[node]["disk"]

    def disks_equal(self) -> bool:
        return files_equal(self.disk("alpha"), self.disk("beta"))

    def random_writes(self, node: str, seed: int, **kw) -> subprocess.Popen:
        """random_writes() into `node`'s export, returning once they reach its disk."""
        return random_writes(self.uri(node), seed, disk=self.disk(node), **kw)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        shutil.rmtree(self.diskdir, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def random_writes(uri: str, seed: int, runtime: float = 20, bs: str = "16k",
                  disk: str | None = None) -> subprocess.Popen:
    """fio writing `bs` blocks at random offsets of an export, 16 in flight, for up to
    `runtime` s; stop it with kill(), which stops the writes at once.  `bs` is fio's
    bssplit: one size ("16k") or a mix ("16k/50:1m/50").

    With `disk` (the primary's backing file), returns once the writes reach it: fio
    takes a while to start on a busy machine, and a test that crashes a box "under
    writes" after a fixed delay could otherwise crash it before the first write.

    --thread keeps fio's job in this one process.  Forked (fio's default), the job is a
    child in a session of its own: it outlives a kill of its parent and goes on writing,
    so a test comparing the disks afterwards would see them change under it.
    """
    before = os.stat(disk).st_mtime_ns if disk is not None else None
    fio = subprocess.Popen(
        ["fio", "--name=writes", "--thread", "--ioengine=nbd", f"--uri={uri}",
         "--rw=randwrite", f"--bssplit={bs}", "--iodepth=16", "--time_based",
         f"--runtime={runtime}", f"--randseed={seed}", "--output=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if disk is not None:
        try:
            _wait_for_change(fio, disk, before, timeout=30)
        except BaseException:
            fio.kill()
            fio.wait(10)
            raise
    return fio


def _wait_for_change(fio: subprocess.Popen, disk: str, before: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.stat(disk).st_mtime_ns == before:
        if fio.poll() is not None:
            raise AssertionError(f"fio exited ({fio.returncode}) before writing to {disk}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no write reached {disk} within {timeout:g} s")
        time.sleep(0.01)


def in_sync(status: dict) -> bool:
    """A node's status says: connected, both disks up to date."""
    return (status["connection"] == "connected" and status["disk"] == "up-to-date"
            and status["peer"] is not None and status["peer"]["disk"] == "up-to-date")


def files_equal(a: str, b: str, chunk: int = 4 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def first_difference(a: str, b: str, chunk: int = 1 << 20) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                for i, (p, q) in enumerate(zip(x, y)):
                    if p != q:
                        return offset + i
                return offset + min(len(x), len(y))
            if not x:
                return None
            offset += len(x)
