"""Outdating the peer through corosync: real daemons in a real two-node corosync cluster
(tests/cluster.py, corosync alone: no Pacemaker here; tests/test_failover.py has it).

What the operator relies on: when only the replication link fails, the primary gets the
secondary to mark its disk outdated before any write completes without it; an outdated
disk refuses promotion, also after its peer died, and says why; when the link returns
the resync makes it up to date again.  When the peer box itself dies, the primary waits
only until corosync says so, then goes on.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest

from clustermirror import ClusterMirror

pytestmark = [pytest.mark.netns, pytest.mark.cluster]


@pytest.fixture
def config_dir():
    path = tempfile.mkdtemp(prefix="mirrord-cfg-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def started(cluster, config_dir, **options) -> ClusterMirror:
    c = cluster(pacemaker=False)
    m = ClusterMirror(c, config_dir, **options)
    m.start_all()
    for node in c.nodes:
        m.wait(node, lambda s: s["cluster"]["joined"] and s["cluster"]["peer_present"], 15,
               "both daemons in the cluster group")
    m.ctl("alpha", "primary", "--force")
    m.wait_connected()
    return m


def qemu_write(m, node: str, offset: int, pattern: int = 0x5A) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 64k",
                           "-c", "flush", m.uri(node)], capture_output=True, text=True,
                          timeout=60)


def test_link_cut_outdates_the_secondary_before_a_write_completes(cluster, config_dir):
    m = started(cluster, config_dir)
    c = m.c
    c.set_replication_link("alpha", False)
    written = qemu_write(m, "alpha", 1 << 20)
    assert written.returncode == 0, written.stdout + written.stderr
    # The write returned: beta's disk must already be outdated (alpha waited for it).
    beta = m.status("beta")
    assert beta["disk"] == "outdated", beta
    assert beta["outdated"]["by"] == "alpha" and "without this node" in beta["outdated"]["reason"]
    assert beta["cluster"]["peer_present"]  # the cluster still sees alpha
    alpha = m.status("alpha")
    assert alpha["fencing"]["state"] == "peer-fenced"
    assert "outdated through the cluster" in alpha["fencing"]["detail"]
    assert alpha["connection"] in ("connecting", "standalone") and not alpha["io_frozen"]

    refused = m.ctl("beta", "primary", check=False)
    assert refused.returncode == 1 and "outdated" in refused.stderr, refused.stderr
    assert "disk outdated" in m.ctl("beta", "status").stdout

    # Alpha dies for good: beta is still not promotable without --force.
    c.crash("alpha")
    m.wait("beta", lambda s: not s["cluster"]["peer_present"], 10, "alpha gone from the group")
    refused = m.ctl("beta", "primary", check=False)
    assert refused.returncode == 1 and "outdated" in refused.stderr
    m.kill("beta")
    m.start("beta")  # the outdated mark is in the metadata: it survives a restart
    assert m.status("beta")["disk"] == "outdated"

    # Alpha comes back; the link too: a resync makes beta up to date again.
    c.boot("alpha")
    c.set_replication_link("alpha", True)
    m.start("alpha")
    m.ctl("alpha", "primary")  # it crashed as primary with good data
    m.wait_connected(timeout=60)
    assert m.status("beta")["outdated"] is None
    assert m.disks_equal()


def test_a_dead_peer_holds_writes_only_until_corosync_says_it_is_gone(cluster, config_dir):
    m = started(cluster, config_dir)
    c = m.c
    started_at = time.monotonic()
    c.crash("beta")  # its link ends go down: alpha sees carrier loss at once
    written = qemu_write(m, "alpha", 2 << 20)
    took = time.monotonic() - started_at
    assert written.returncode == 0, written.stdout + written.stderr
    alpha = m.status("alpha")
    assert alpha["fencing"]["state"] == "failed"  # nothing could outdate a dead box
    assert "left the cluster group" in alpha["fencing"]["detail"], alpha["fencing"]
    assert not alpha["io_frozen"]
    assert took < 8, f"the write waited {took:.1f} s (corosync token 1 s: ~2.2 s expected)"
    print(f"write held {took:.2f} s after the peer's power-off")


def test_an_outdate_request_to_a_primary_is_refused(cluster, config_dir):
    """Both nodes primary and the link down (a split brain in the making): neither
    outdates itself, and the first primary goes on as the policy says."""
    m = started(cluster, config_dir)
    c = m.c
    c.set_replication_link("alpha", False)
    m.wait("beta", lambda s: s["peer"] is None, 10, "beta lost the link")
    m.wait("alpha", lambda s: s["fencing"]["state"] in ("peer-fenced", "failed"), 15,
           "alpha fenced beta")
    m.ctl("beta", "primary", "--force")  # the operator insists
    m.wait("beta", lambda s: s["fencing"]["state"] in ("peer-fenced", "failed"), 15,
           "beta tried to fence alpha")
    beta = m.status("beta")
    assert beta["fencing"]["state"] == "failed" and "alpha is primary" in beta["fencing"]["detail"]
    assert m.status("alpha")["disk"] == "up-to-date"  # alpha refused to outdate itself
