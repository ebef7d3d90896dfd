"""The README's first command, deploy/demo.sh (the mirrored volume on two boxes), run as a
user would run it: end to end, and interrupted half-way with Ctrl-C.

Each run's namespaces are named md<PID of the script>…, and everything else it makes
(disks, sockets, logs, FUSE and ext4 mount points, the files under the loop devices) is
in the work dir it prints; that is how these tests find what a run left behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time

import pytest

from fuseblock import loops_backed_by, mounts_under
from netns import unusable_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "deploy", "demo.sh")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason())),
]

RUN_TIMEOUT_S = 180     # the demo takes about 30 s here; it promises well under 2 minutes
CLEANUP_TIMEOUT_S = 90  # from Ctrl-C to exit: about 25 s when the server hangs (a 10 s
#                         SIGTERM grace for the stopped daemon), a few s otherwise


class Demo:
    """deploy/demo.sh in its own session (so a Ctrl-C can go to its whole group), with
    its output read by a thread so that every wait here has a deadline."""

    def __init__(self, **env: str) -> None:
        self.proc = subprocess.Popen(
            ["bash", DEMO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env}, start_new_session=True)
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def workdir(self) -> str:
        match = re.search(r"^work dir: (\S+)$", self.output, re.M)
        assert match, f"the demo did not print its work dir:\n{self.output}"
        return match.group(1)

    def wait_for(self, pattern: str, timeout: float, after: str | None = None) -> None:
        """Until a line matches `pattern` (after a line matching `after`, if given)."""
        regex, start = re.compile(pattern), re.compile(after) if after else None
        seen_start = start is None
        for line in self.lines:  # what has arrived already
            seen_start = seen_start or bool(start and start.search(line))
            if seen_start and regex.search(line):
                return
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                                     f"{self.output}") from None
            if line is None:
                raise AssertionError(f"the demo exited ({self.proc.wait(timeout=10)}) "
                                     f"before printing {pattern!r}:\n{self.output}")
            seen_start = seen_start or bool(start and start.search(line))
            if seen_start and regex.search(line):
                return

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        """After a failed test: Ctrl-C, so that the demo still takes down what it made;
        SIGKILL if it does not exit in time (its daemons and nbdfuse run in their own
        sessions and survive that: the leftover checks then report them)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=CLEANUP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def processes_using(workdir: str) -> list[str]:
    """mirrord / nbdfuse processes whose command line names the run's work dir."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True,
                         timeout=10).stdout
    return [line.strip() for line in out.splitlines()
            if workdir in line and ("mirrord" in line or "nbdfuse" in line)]


def _is_demo_process(pid: int, workdir: str) -> bool:
    """Whether PID is still one of the run's processes (and not a reused PID)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return workdir.encode() in f.read()
    except OSError:
        return False


def namespaces_of(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"md{pid}")]


def leftovers(demo: Demo, workdir: str) -> dict:
    """Everything the run made that still exists, waiting (bounded) for processes that
    are on their way out."""
    deadline = time.monotonic() + 10
    while processes_using(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    found = {
        "namespaces": namespaces_of(demo.proc.pid),
        "processes": processes_using(workdir),
        "loop devices": loops_backed_by(workdir + "/"),
        "mounts": mounts_under(workdir),
        "work dir": [workdir] if os.path.exists(workdir) else [],
    }
    return {what: items for what, items in found.items() if items}


def test_demo_runs_end_to_end_and_leaves_nothing_behind():
    demo = Demo()
    try:
        code = demo.wait(RUN_TIMEOUT_S)
    finally:
        demo.stop()
    out = demo.output
    assert code == 0, out
    workdir = demo.workdir()

    # Both syncs were shown in progress: the initial full sync, and the resync after
    # the link came back (percent, rate, eta from `mirrorctl status`).
    progress = re.compile(r"^  \[ *[\d.]+s\] r0 on alpha: primary, disk up-to-date, sync-source"
                          r" \| out of sync: [\d.]+ [KMG]?i?B \| sync: [\d.]+% at [\d.]+ "
                          r"[KMG]iB/s, eta \d+ s$", re.M)
    initial, _, rest = out.partition("== Restore the link")
    assert progress.search(initial), out
    assert progress.search(rest), out
    assert re.search(r"^  \[ *[\d.]+s\] r0 on alpha: primary, disk up-to-date, connected \| "
                     r"out of sync: 0 B$", rest, re.M), out
    # The cut: alpha goes on as primary without its peer, with a non-empty bitmap.
    assert re.search(r"^r0 on alpha: primary, disk up-to-date, (connecting|standalone), "
                     r"protocol C\n  peer: unknown\n  out of sync: [\d.]+ [KMG]iB$", out, re.M), out
    # The switch, then the same files on beta's copy, and a clean filesystem.
    assert "alpha is now secondary" in out and "beta is now primary" in out, out
    beta_part = out.partition("== The same filesystem on beta's export")[2]
    assert re.search(r"^/dev/loop\d+: 93/\d+ files \(.*\), \d+/\d+ blocks$", beta_part, re.M), out
    assert "e2fsck: no errors on beta's copy (exit 0)" in beta_part, out
    assert "files/f001: OK\n" in beta_part and "files/f080: OK\n" in beta_part, out
    assert "beta holds all 80 of 80 files, every checksum matches" in beta_part, out
    assert "the two boxes' disks are byte-identical" in beta_part, out

    assert leftovers(demo, workdir) == {}, out


@pytest.mark.parametrize("moment", ["mounted", "resync", "hung-server"])
def test_interrupted_demo_cleans_up(moment):
    """Ctrl-C right after ext4 is mounted on alpha's export (files being written), in the
    middle of the resync, or while alpha's mirrord hangs (SIGSTOP) under the mounted
    filesystem, so that the step running is stuck in D state until the demo aborts the
    FUSE connection."""
    demo = Demo()
    stopped = None
    try:
        demo.wait_for(r"^work dir: ", 120)  # after the pip install
        workdir = demo.workdir()
        if moment == "resync":  # a second into the resync after the link came back
            demo.wait_for(r"^  \[ *1\.\ds\] r0 on alpha: .*sync-source", 90,
                          after=r"== Restore the link")
        else:  # ext4 on alpha's export just mounted: the whole stack up
            demo.wait_for(r"^writing 50 files", 60)
        running = processes_using(workdir)
        for what in ("--node alpha", "--node beta", "nbdfuse"):
            assert any(what in line for line in running), (what, running, demo.output)
        assert mounts_under(workdir) and loops_backed_by(workdir + "/"), demo.output
        if moment == "hung-server":
            stopped = int(re.search(r"--node alpha &   \(pid (\d+)\)", demo.output).group(1))
            os.kill(stopped, signal.SIGSTOP)
            time.sleep(1.0)
        os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        code = demo.wait(CLEANUP_TIMEOUT_S)
        left = leftovers(demo, workdir)  # before the safety net below
    finally:
        demo.stop()
        if stopped is not None and _is_demo_process(stopped, workdir):
            os.kill(stopped, signal.SIGKILL)  # the demo should have; if not, do it here
    assert code == 130, demo.output
    assert "interrupted: cleaning up" in demo.output
    assert "beta holds all" not in demo.output  # it really was cut short
    assert left == {}, demo.output
