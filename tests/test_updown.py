"""`mirrorctl up`, `down` and `check` against real daemons in network namespaces.

`up` starts the daemon detached (its own session, not a child of the test), so
:class:`Detached` finds every daemon it may have started through its control socket
(SO_PEERCRED gives the PID) and stops those by PID at teardown.  tests/test_ocf_agent.py
uses it too.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time

import pytest

from mirrorpair import ENV, NODES, REPO, mirrorctl_argv
from mirrord.config import load_config
from mirrord.control import ControlClient, ControlUnavailable
from mirrord.metafile import MetaStore

pytestmark = pytest.mark.netns

STOP_WAIT = 10.0  # teardown: SIGTERM, then SIGKILL after this long


class Detached:
    """The daemons of one MirrorPair that `mirrorctl up` (or the OCF agent) started."""

    def __init__(self, pair) -> None:
        self.pair = pair
        self.pids: set[int] = set()

    def log_file(self, node: str) -> str:
        return os.path.join(self.pair.workdir, "logs", f"{node}.log")

    def run(self, node: str, argv: list[str], timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """`argv` inside the node's namespace; output captured; no traceback allowed."""
        proc = self.pair.net.run(self.pair.ns[node], argv, capture_output=True, text=True,
                                 env=env or ENV, cwd=REPO, check=False, timeout=timeout)
        assert "Traceback" not in proc.stderr, proc.stderr
        self.remember(node)
        return proc

    def ctl(self, node: str, *args: str, config: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(node, mirrorctl_argv("--config", config or self.pair.config,
                                             "--node", node, *args), timeout=timeout)

    def up(self, node: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.ctl(node, "up", "--log-file", self.log_file(node), *args, **kw)

    def pid(self, node: str) -> int | None:
        """The PID of the daemon answering on the node's control socket, or None."""
        try:
            with ControlClient(self.pair.paths[node]["control_socket"], timeout=2) as c:
                c.request("status")
                return c.peer_pid()
        except ControlUnavailable:
            return None

    def remember(self, node: str) -> None:
        pid = self.pid(node)
        if pid is not None:
            self.pids.add(pid)

    def close(self) -> None:
        for node in NODES:
            self.remember(node)
        for pid in self.pids:
            stop_pid(pid)


def is_mirrord(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mirrord.daemon" in f.read()
    except OSError:
        return False


def gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` has exited (absent, or a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL: only a process that is still a mirrord daemon."""
    if not is_mirrord(pid):
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return
            if select.select([fd], [], [], STOP_WAIT)[0]:
                return
    finally:
        os.close(fd)


@pytest.fixture
def detached(mirror_pair):
    """``make(**MirrorPair options) -> Detached`` with metadata created on both nodes;
    every daemon `up` started is stopped at teardown (before the namespaces go)."""
    made: list[Detached] = []

    def make(**options) -> Detached:
        pair = mirror_pair(mtu=1500, **options)
        for node in NODES:
            pair.create_md(node)
        d = Detached(pair)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.close()


def started_pid(proc: subprocess.CompletedProcess) -> int:
    m = re.search(r"\(pid (\d+)", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1))


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.rstrip("\n")


def config_with(pair, name: str, old: str, new: str) -> str:
    """A copy of the pair's config, named `name` in its workdir, with `old` replaced by `new`."""
    with open(pair.config) as f:
        text = f.read()
    assert old in text, f"{old!r} is not in {pair.config}"
    path = os.path.join(pair.workdir, name)
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return path


def metadata(pair, node: str):
    cfg = load_config(pair.config, node)
    store = MetaStore.open(pair.paths[node]["metadata"], size=pair.size, node=node,
                           volume_id=cfg.volume_id)
    try:
        return store.meta
    finally:
        store.close()


# -- up ---------------------------------------------------------------------------------

def test_up_starts_a_detached_daemon_and_status_answers(detached):
    d = detached()
    log = os.path.join(d.pair.workdir, "new", "dir", "alpha.log")  # up creates the dirs
    proc = d.ctl("alpha", "up", "--log-file", log)
    assert proc.returncode == 0, proc.stderr
    pid = started_pid(proc)
    assert one_line(proc.stdout) == f"r0 on alpha: started (pid {pid}, log {log})"
    assert d.pid("alpha") == pid and is_mirrord(pid)
    # Detached: its own session, stdin from /dev/null, output into the log.
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == log == os.readlink(f"/proc/{pid}/fd/2")
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    with open(log) as f:
        assert "r0 on alpha: started" in f.read()

    status = d.ctl("alpha", "status", "--json")
    assert status.returncode == 0, status.stderr
    got = json.loads(status.stdout)
    assert (got["resource"], got["node"], got["role"]) == ("r0", "alpha", "secondary")


def test_up_twice_is_idempotent(detached):
    d = detached()
    first = d.up("alpha")
    assert first.returncode == 0, first.stderr
    pid = started_pid(first)
    again = d.up("alpha")
    assert again.returncode == 0, again.stderr
    assert one_line(again.stdout) == f"r0 on alpha: already running (pid {pid})"
    assert d.pid("alpha") == pid
    with open(d.log_file("alpha")) as f:
        assert f.read().count("r0 on alpha: started") == 1  # one daemon ever started


def test_up_with_a_broken_config_exits_2_with_one_line(detached):
    d = detached()
    broken = config_with(d.pair, "broken.toml", 'protocol = "C"', 'protocol = "D"')
    proc = d.ctl("alpha", "up", config=broken)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(f"mirrorctl: {broken}: resource.protocol: ")
    assert proc.stdout == ""

    # What this box lacks is found before anything is started, in one line too.
    broken = config_with(d.pair, "broken.toml", d.pair.disk("alpha"), "/nonexistent/alpha.img")
    proc = d.ctl("alpha", "up", config=broken)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (f"mirrorctl: {broken}: nodes.alpha.disk: "
                                     f"/nonexistent/alpha.img: does not exist")
    assert d.pid("alpha") is None


def test_up_when_the_daemon_dies_at_start_shows_the_log_tail(detached):
    d = detached()
    os.unlink(d.pair.paths["alpha"]["metadata"])  # mirrord refuses to start without it
    proc = d.up("alpha")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"mirrorctl: r0 on alpha: mirrord exited at start with status 2 "
                        f"(a configuration error); the end of {d.log_file('alpha')}:")
    assert any("does not exist: create it with `mirrorctl create-md`" in line
               for line in lines[1:]), proc.stderr
    assert all(line.startswith("  ") for line in lines[1:])
    assert d.pid("alpha") is None


def test_up_needs_config(detached):
    d = detached()
    proc = d.run("alpha", mirrorctl_argv("--socket", d.pair.paths["alpha"]["control_socket"],
                                         "up"))
    assert proc.returncode == 2
    assert one_line(proc.stderr) == "mirrorctl: up needs --config FILE (not --socket)"


# -- down -------------------------------------------------------------------------------

def test_down_stops_it_and_the_metadata_records_a_clean_stop(detached):
    d = detached()
    assert d.up("alpha").returncode == 0
    d.ctl("alpha", "primary", "--force")
    # The check below can fail: a primary that dies without a clean stop stays marked.
    pid = d.pid("alpha")
    os.kill(pid, signal.SIGKILL)
    assert gone(pid)
    assert metadata(d.pair, "alpha").primary is True

    proc = d.up("alpha")
    assert proc.returncode == 0, proc.stderr
    pid = started_pid(proc)
    assert d.ctl("alpha", "primary").returncode == 0  # consistent now: no --force
    proc = d.ctl("alpha", "down")
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stdout) == "r0 on alpha: stopped"
    # Returned once the process had exited, so the metadata is final by now.
    assert gone(pid, timeout=0.5)
    assert d.pid("alpha") is None
    ctl_socket = d.pair.paths["alpha"]["control_socket"]
    assert not os.path.exists(ctl_socket)
    meta = metadata(d.pair, "alpha")
    assert meta.primary is False and meta.consistent is True

    proc = d.ctl("alpha", "down")
    assert proc.returncode == 0 and one_line(proc.stdout) == "r0: not running"
    proc = d.run("alpha", mirrorctl_argv("--socket", ctl_socket, "down"))
    assert proc.returncode == 0 and one_line(proc.stdout) == f"{ctl_socket}: not running"

    # The next start knows it stopped cleanly (no crashed-primary resync).
    assert d.up("alpha").returncode == 0
    with open(d.log_file("alpha")) as f:
        last_start = f.read().rsplit("r0 on alpha: started", 1)[1]
    assert "without a clean shutdown" not in last_start


def test_down_is_refused_while_an_nbd_client_is_connected(detached):
    import nbdclient

    try:
        nbd = nbdclient.load()
    except ImportError as exc:
        pytest.skip(f"no NBD client library: {exc}")
    d = detached()
    assert d.up("alpha").returncode == 0
    pid = d.pid("alpha")
    handle = nbd.NBD()
    handle.connect_uri(d.pair.uri("alpha"))
    try:
        proc = d.ctl("alpha", "down")
        assert proc.returncode == 1
        assert proc.stderr == (
            "mirrorctl: refused: 1 NBD client(s) are connected to the export\n"
            "  what to do: stop them first (umount the filesystem, stop nbdfuse or qemu), "
            "or use --force to cut them off\n")
        assert d.pid("alpha") == pid  # still serving
        assert handle.pread(4096, 0) == bytes(4096)

        proc = d.ctl("alpha", "down", "--force")
        assert proc.returncode == 0, proc.stderr
        assert one_line(proc.stdout) == "r0 on alpha: stopped"
        assert gone(pid, timeout=0.5)
    finally:
        try:
            handle.shutdown()
        except nbd.Error:
            pass  # --force cut it off: there is no server left to say goodbye to


def test_down_of_a_stuck_daemon_exits_3(detached):
    d = detached()
    assert d.up("alpha").returncode == 0
    pid = d.pid("alpha")
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = d.ctl("alpha", "down", "--timeout", "1")
        assert proc.returncode == 3
        assert "not answering" in one_line(proc.stderr)
        status = d.ctl("alpha", "status", "--json", "--timeout", "0.5")
        assert status.returncode == 3
        assert json.loads(status.stdout)["unreachable"] == "no-answer"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not gone(pid, timeout=0.2)


# -- status --json when unreachable, check --------------------------------------------

def test_status_json_says_not_running(tmp_path):
    proc = subprocess.run(mirrorctl_argv("--socket", str(tmp_path / "absent.ctl"), "status",
                                         "--json"), capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=30)
    assert proc.returncode == 3
    assert json.loads(proc.stdout) == {
        "unreachable": "not-running",
        "error": f"control socket {tmp_path / 'absent.ctl'}: does not exist; mirrord may "
                 f"not be running"}
    # A stale socket file (bound, nobody listening) is "not running" too.
    path = str(tmp_path / "stale.ctl")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    try:
        proc = subprocess.run(mirrorctl_argv("--socket", path, "status", "--json"),
                              capture_output=True, text=True, env=ENV, cwd=REPO, timeout=30)
    finally:
        s.close()
    assert proc.returncode == 3 and json.loads(proc.stdout)["unreachable"] == "not-running"


def test_check_good_and_bad_configs(detached):
    d = detached()
    proc = d.ctl("alpha", "check")
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stdout) == f"{d.pair.config}: r0 on alpha: config OK"

    bad = config_with(d.pair, "bad.toml", 'protocol = "C"', 'protocl = "C"')
    proc = d.ctl("alpha", "check", config=bad)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr) == (f"mirrorctl: {bad}: resource.protocl: unknown key "
                                     f"(did you mean 'protocol'?)")

    # The interface lives in the node's namespace: from the root namespace it is absent.
    proc = subprocess.run(mirrorctl_argv("--config", d.pair.config, "--node", "alpha",
                                         "check"), capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=30)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(f"mirrorctl: {d.pair.config}: "
                                            f"nodes.alpha.interface: no interface ")

    proc = d.run("alpha", mirrorctl_argv("check"))
    assert proc.returncode == 2 and "check needs --config FILE" in one_line(proc.stderr)
