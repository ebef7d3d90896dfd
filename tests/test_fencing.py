"""Fencing and hooks with real daemons on a real link, without a cluster.

What the operator relies on: a primary that loses its peer acknowledges no write before
the peer is fenced (here by the fence_peer handler alone: no corosync runs in these
namespaces), goes on as its policy says, and undoes the fence once the peer is back in
sync; the hooks run with the resource and the event in their environment.  The cluster
half (the peer outdated through corosync) is tests/test_failover.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from test_mirror import MiB, assert_identical, started_pair

pytestmark = pytest.mark.netns


def script(path, body: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + textwrap.dedent(body))
    os.chmod(path, 0o755)
    return str(path)


def env_dump(directory) -> str:
    """A command that saves its MIRRORD_* environment (and $1) into `directory`."""
    return (f'f={directory}/$MIRRORD_NODE.$MIRRORD_EVENT.$(date +%s%N); '
            f'{{ echo "ARG1=$1"; env | grep ^MIRRORD_; }} > $f.tmp && mv $f.tmp $f')


def dumps(directory, node: str, event: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(f"{node}.{event}.") and not name.endswith(".tmp"):
            with open(os.path.join(directory, name)) as f:
                out.append(dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line))
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def write_async(pair, node="alpha", offset=0) -> subprocess.Popen:
    """A client write of 64 KiB (with FLUSH) through the export, in the background."""
    return subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 64k",
                             "-c", "flush", pair.uri(node)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cut(pair):
    pair.net.set_link(pair.ns["alpha"], False)
    for node in ("alpha", "beta"):
        pair.wait(node, lambda s: s["peer"] is None, 5, "peer lost")


def test_hooks_run_for_disconnect_and_role_change_with_the_right_environment(
        mirror_pair, tmp_path):
    out = tmp_path / "hooks"
    out.mkdir()
    dump = script(tmp_path / "dump.sh", env_dump(out) + "\n")
    hooks = (f"\n[hooks]\nexec = '{dump}'\n"
             f"disconnect = 'echo \"$MIRRORD_REASON\" > {out}/$MIRRORD_NODE.disconnect-reason'\n")
    pair = started_pair(mirror_pair, size=8 * MiB, extra_resource=hooks)
    promoted = wait_for(lambda: dumps(out, "alpha", "role-change"), 10, "role-change hook")
    (env,) = promoted
    assert env["ARG1"] == "role-change"
    assert env["MIRRORD_EVENT"] == "role-change" and env["MIRRORD_RESOURCE"] == "r0"
    assert env["MIRRORD_NODE"] == "alpha" and env["MIRRORD_PEER"] == "beta"
    assert env["MIRRORD_ROLE"] == "primary" and env["MIRRORD_OLD_ROLE"] == "secondary"
    assert env["MIRRORD_CONFIG"] == pair.config
    wait_for(lambda: dumps(out, "beta", "sync-done"), 10, "sync-done hook on the target")
    assert dumps(out, "beta", "sync-done")[0]["MIRRORD_SYNC_ROLE"] == "target"
    assert dumps(out, "alpha", "connect")[0]["MIRRORD_PEER_ROLE"] in ("secondary", "unknown")

    cut(pair)
    for node in ("alpha", "beta"):
        (env,) = wait_for(lambda: dumps(out, node, "disconnect"), 10, f"disconnect on {node}")
        assert env["MIRRORD_CONNECTION"] in ("connecting", "standalone")
        assert "carrier" in env["MIRRORD_REASON"]
        reason = wait_for(lambda: (out / f"{node}.disconnect-reason").exists(), 10,
                          "the per-event command ran too")
        assert reason
    pair.ctl("alpha", "secondary")
    changes = wait_for(lambda: len(dumps(out, "alpha", "role-change")) == 2
                       and dumps(out, "alpha", "role-change"), 10, "second role-change hook")
    assert changes[1]["MIRRORD_ROLE"] == "secondary"
    assert changes[1]["MIRRORD_OLD_ROLE"] == "primary"
    status = pair.status("alpha")
    assert status["role"] == "secondary"


def test_a_failing_or_hanging_hook_is_logged_and_changes_nothing(mirror_pair, tmp_path):
    hooks = "\n[hooks]\ntimeout = 1\ndisconnect = 'sleep 30'\nrole-change = 'exit 3'\n"
    pair = started_pair(mirror_pair, size=8 * MiB, extra_resource=hooks)
    cut(pair)
    wait_for(lambda: "still running after 1 s: killed" in pair.log("alpha"), 10,
             "the hung hook killed")
    assert "exited 3" in pair.log("alpha")
    assert pair.status("alpha")["role"] == "primary"


def test_writes_wait_for_the_fence_peer_handler_and_the_fence_is_undone_after_resync(
        mirror_pair, tmp_path):
    release = tmp_path / "release"
    fenced = tmp_path / "fenced.env"
    unfenced = tmp_path / "unfenced.env"
    fence = script(tmp_path / "fence.sh", f"""\
        env | grep ^MIRRORD_ > {fenced}
        for i in $(seq 200); do [ -e {release} ] && exit 0; sleep 0.1; done
        exit 1
        """)
    unfence = script(tmp_path / "unfence.sh", f"env | grep ^MIRRORD_ > {unfenced}\n")
    pair = started_pair(mirror_pair, size=16 * MiB,
                        extra_resource=f'fence_peer = "{fence}"\nunfence_peer = "{unfence}"\n'
                                       f'fence_timeout = 30')
    cut(pair)
    writer = write_async(pair)
    wait_for(fenced.exists, 10, "the fence_peer handler started")
    time.sleep(1.0)
    assert writer.poll() is None, "a write completed while the peer was not fenced"
    status = pair.status("alpha")
    assert status["io_frozen"] and status["fencing"]["state"] == "fencing"
    env = dict(line.strip().split("=", 1) for line in open(fenced))
    assert env["MIRRORD_PEER"] == "beta" and env["MIRRORD_NODE"] == "alpha"
    assert "lost" in env["MIRRORD_REASON"]
    release.touch()
    assert writer.wait(20) == 0, writer.stdout.read()
    status = pair.status("alpha")
    assert not status["io_frozen"]
    assert status["fencing"]["state"] == "peer-fenced" and status["fencing"]["peer_fenced"]
    assert not unfenced.exists()

    pair.net.set_link(pair.ns["alpha"], True)
    pair.wait_connected(timeout=30)
    wait_for(unfenced.exists, 10, "unfence_peer ran once the peer was in sync")
    pair.wait("alpha", lambda s: not s["fencing"]["peer_fenced"], 10, "peer_fenced cleared")
    assert_identical(pair)


def test_resource_and_stonith_keeps_writes_frozen_until_resume_io(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=16 * MiB,
                        extra_resource='fencing = "resource-and-stonith"\n'
                                       'fence_peer = "exit 1"\nfence_timeout = 2')
    cut(pair)
    writer = write_async(pair)
    pair.wait("alpha", lambda s: s["fencing"]["state"] == "failed", 10, "fencing failed")
    time.sleep(0.5)
    assert writer.poll() is None, "a write completed although the peer could not be fenced"
    assert pair.status("alpha")["io_frozen"]
    result = pair.ctl("alpha", "resume-io")
    assert "resumed" in result.stdout
    assert writer.wait(20) == 0, writer.stdout.read()
    assert not pair.status("alpha")["io_frozen"]


def test_resource_and_stonith_thaws_when_the_peer_comes_back(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=16 * MiB,
                        extra_resource='fencing = "resource-and-stonith"\n'
                                       'fence_peer = "exit 1"\nfence_timeout = 2')
    cut(pair)
    writer = write_async(pair, offset=4 * MiB)
    pair.wait("alpha", lambda s: s["fencing"]["state"] == "failed", 10, "fencing failed")
    assert writer.poll() is None
    pair.net.set_link(pair.ns["alpha"], True)
    assert writer.wait(30) == 0, writer.stdout.read()
    pair.wait_connected(timeout=30)
    assert_identical(pair)  # the held write reached beta through the resync


def test_without_a_cluster_or_handler_resource_only_goes_on_and_says_why(mirror_pair):
    pair = started_pair(mirror_pair, size=16 * MiB)
    cut(pair)
    writer = write_async(pair)
    assert writer.wait(20) == 0, writer.stdout.read()
    fencing = pair.status("alpha")["fencing"]
    assert fencing["policy"] == "resource-only" and fencing["state"] == "failed"
    assert "not in a cluster" in fencing["detail"]
    assert pair.status("alpha")["cluster"]["joined"] is False


def test_fencing_none_never_waits(mirror_pair):
    pair = started_pair(mirror_pair, size=16 * MiB,
                        extra_resource='fencing = "none"\nfence_peer = "sleep 60"')
    cut(pair)
    writer = write_async(pair)
    assert writer.wait(20) == 0, writer.stdout.read()
    assert pair.status("alpha")["fencing"]["state"] == "idle"
