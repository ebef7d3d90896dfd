"""The replication link demo, deploy/link-demo.sh, run as a user would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from netns import unusable_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "deploy", "link-demo.sh")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason())),
]


def _linktool_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if "mirrord.linktool" in line}


def _demo_namespaces(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"md{pid}")]


def _start(env_extra: dict) -> subprocess.Popen:
    env = {**os.environ, "DEMO_BYTES": "128M", "DEMO_FAULT_BYTES": "32M", **env_extra}
    return subprocess.Popen(["bash", DEMO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def test_demo_runs_end_to_end_and_leaves_nothing_behind():
    before = _linktool_pids()
    proc = _start({})
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert out.count("digests match") == 2, out
    assert "link carrier lost" in out
    assert "new session" in out
    assert "failed authentication" in out
    assert _demo_namespaces(proc.pid) == []
    assert _linktool_pids() - before == set(), "demo left mirrord-link processes running"


def test_interrupted_demo_cleans_up():
    before = _linktool_pids()
    proc = _start({"DEMO_BYTES": "64G"})  # long enough to be interrupted mid-transfer
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "== 1." not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "== 1." in seen, seen
        time.sleep(1.0)  # mid-transfer
        assert _linktool_pids() - before, "the transfer should be running"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _linktool_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _linktool_pids() - before == set(), "interrupted demo left processes running"
    assert _demo_namespaces(proc.pid) == []
