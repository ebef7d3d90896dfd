"""Failover under a real Pacemaker: ocf:mirrord:mirrord as a promotable clone over real
daemons, in a real two-node Corosync + Pacemaker cluster (tests/cluster.py) whose
replication link is its own veth pair, apart from the cluster network.

What the operator relies on:
- the cluster promotes one node by the agent's scores, and never a fresh disk;
- when the primary's box dies, the other is promoted within 10 s with every write
  acknowledged under protocol C, and a filesystem made on the old primary is clean on
  the new one; the old primary returns as secondary, resyncs what changed, ends equal;
- when only the replication link fails, the primary outdates its peer and goes on; if
  it then dies, the outdated peer is never promoted and says why;
- when only the daemon dies, Pacemaker recovers the resource and no acknowledged write
  is lost.
The agent is installed with deploy/install.sh --agent-only into a temporary directory
bind-mounted over /usr/lib/ocf/resource.d/mirrord inside the nodes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from clustermirror import CLONE, CRM_FENCE, SETTLE_S, AckedWriter, bring_up
from fuseblock import mounted, nbd_block_device
from test_mirror_ext4 import read_digests, write_files

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

MiB = 1 << 20
FAILOVER_GOAL_S = 10.0  # the bound: power-off to the survivor promoted
HOLD_S = 8.0  # "never promoted" must last over two monitors of each node


@pytest.fixture
def dirs():
    made = [tempfile.mkdtemp(prefix=f"mirrord-{what}-", dir="/tmp") for what in ("ocf", "cfg")]
    for path in made:
        os.chmod(path, 0o755)
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def run(argv, timeout=120):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
    return result


def hold_unpromoted(m, node: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert m.promoted(node) == [], m.logs()
        time.sleep(0.5)


def test_power_off_of_the_primary_fails_over_with_every_acknowledged_write(
        cluster, dirs, tmp_path):
    agent_dir, config_dir = dirs
    m, primary, survivor = bring_up(cluster, agent_dir, config_dir, size=384 * MiB,
                                    extra_resource=CRM_FENCE, hold_s=HOLD_S)
    c = m.c
    fs_dir = tmp_path / "fs"  # made and removed by mounted()
    # ext4 on the first 96 MiB of the old primary's export (nodiscard: no TRIM of the
    # whole volume), 200 files (~60 MiB) written and flushed, then unmounted.
    with nbd_block_device(m.uri(primary), str(tmp_path)) as dev:
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev, "96M"])
        with mounted(dev, str(fs_dir)):
            files = write_files(str(fs_dir), random.Random(5))
            run(["sync", "-f", str(fs_dir)])
    # A client keeps writing numbered blocks in 200..208 MiB while the box loses power.
    writer = AckedWriter(m.uri(primary), 200 * MiB, 208 * MiB)
    time.sleep(1.0)
    crashed_at = time.monotonic()
    c.crash(primary)
    c.wait(lambda: m.promoted(survivor) == [survivor], FAILOVER_GOAL_S,
           f"{survivor} promoted within {FAILOVER_GOAL_S:g} s of {primary}'s power-off")
    took = time.monotonic() - crashed_at
    writer.stop()
    assert len(writer.acknowledged) > 50, "the writer hardly wrote: the test proves little"
    assert writer.missing_on(m.paths[survivor]["disk"]) == [], \
        "writes acknowledged under protocol C are missing on the new primary"
    m.wait(survivor, lambda s: s["role"] == "primary" and not s["io_frozen"], 10,
           "the new primary serves")
    print(f"\nfailover: {survivor} promoted {took:.2f} s after {primary}'s power-off; "
          f"{len(writer.acknowledged)} acknowledged writes checked")
    # The fence handler forbade promoting the dead node (until it is in sync again).
    assert m.fence_constraint(survivor)

    # The filesystem made on the old primary mounts on the new one and is clean.
    with nbd_block_device(m.uri(survivor), str(tmp_path)) as dev:
        with mounted(dev, str(fs_dir)):
            assert read_digests(str(fs_dir)) == files
            os.makedirs(fs_dir / "new")
            with open(fs_dir / "new" / "on-the-new-primary", "wb") as f:
                f.write(os.urandom(100_000))
        run(["e2fsck", "-fn", dev])

    # The old primary comes back: secondary, a bitmap resync, byte-identical disks.
    sent_before = m.status(survivor)["resync_sent_bytes"]
    c.boot(primary)
    c.wait(lambda: c.roles(survivor, CLONE) == {survivor: "Promoted",
                                                     primary: "Unpromoted"},
           SETTLE_S * 2, f"{primary} back, unpromoted")
    m.wait_connected(timeout=60)
    sent = m.status(survivor)["resync_sent_bytes"] - sent_before
    assert 0 < sent < m.size // 2, f"the resync sent {sent} bytes of a {m.size}-byte volume"
    assert m.disks_equal()
    c.wait(lambda: not m.fence_constraint(survivor), 20, "the fence constraint removed")
    print(f"the old primary's resync sent {sent / MiB:.1f} MiB of {m.size // MiB} MiB")


@pytest.mark.parametrize("handler", ["outdate-only", "with-crm-fence"])
def test_an_outdated_secondary_is_never_promoted(cluster, dirs, handler):
    """The data-safety case: the replication link fails, the primary goes on writing,
    then the primary dies.  Twice in a row, with the roles as they fall."""
    agent_dir, config_dir = dirs
    m, primary, secondary = bring_up(cluster, agent_dir, config_dir,
                                     extra_resource=CRM_FENCE if handler != "outdate-only"
                                     else "")
    c = m.c
    for round_no in range(2):
        c.set_replication_link(primary, False)
        # The primary keeps serving writes; each is acknowledged only once the peer is
        # outdated (tests/test_cluster_outdate.py checks that ordering).
        writer = AckedWriter(m.uri(primary), 0, 4 * MiB)
        c.wait(lambda: len(writer.acknowledged) > 20, 20, "writes go on after the cut")
        writer.stop()
        status = m.status(secondary)
        assert status["disk"] == "outdated" and status["outdated"]["by"] == primary, status
        c.wait(lambda: m.score(secondary) == "", SETTLE_S,
               f"{secondary}'s promotion score removed (at its next monitor)")
        if handler == "with-crm-fence":
            assert m.fence_constraint(primary)

        c.crash(primary)
        c.wait(lambda: primary not in c.online(secondary), 20, f"{secondary} sees {primary} gone")
        hold_unpromoted(m, secondary, HOLD_S)
        status = m.status(secondary)
        assert status["role"] == "secondary" and status["disk"] == "outdated"
        human = m.ctl(secondary, "status").stdout
        assert f"disk outdated: {primary} went on writing without this node" in human
        refused = m.ctl(secondary, "primary", check=False)
        assert refused.returncode == 1 and "outdated" in refused.stderr

        # The primary returns with the link: it is promoted again, the peer resynced.
        c.boot(primary)
        c.set_replication_link(primary, True)
        c.wait(lambda: m.promoted(secondary) == [primary], SETTLE_S * 2,
               f"{primary} promoted again after its return")
        m.wait_connected(timeout=60)
        assert m.status(secondary)["outdated"] is None
        assert m.disks_equal()


def test_killing_only_the_daemon_on_the_primary_loses_no_acknowledged_write(cluster, dirs):
    agent_dir, config_dir = dirs
    m, primary, secondary = bring_up(cluster, agent_dir, config_dir, size=64 * MiB,
                                     extra_resource=CRM_FENCE)
    c = m.c
    writer = AckedWriter(m.uri(primary), 8 * MiB, 16 * MiB)
    time.sleep(1.0)
    os.kill(m.daemon_pid(primary), signal.SIGKILL)
    writer.stop()
    assert len(writer.acknowledged) > 50
    # The monitor notices; Pacemaker recovers the resource (restart or failover).
    (failure, *_) = c.wait(lambda: c.crm_mon(secondary)["failures"] or None, SETTLE_S,
                           "the monitor reported the dead daemon")
    assert "monitor" in failure.get("op_key", ""), failure
    (promoted,) = c.wait(lambda: m.promoted(secondary) or None, SETTLE_S * 2,
                         "the resource promoted again")
    m.wait_connected(timeout=60)
    for node in c.nodes:
        assert writer.missing_on(m.paths[node]["disk"]) == [], \
            f"acknowledged writes missing on {node} (promoted: {promoted})"
    assert m.disks_equal()
    print(f"\nafter the daemon's kill -9 on {primary}: {promoted} promoted, "
          f"{len(writer.acknowledged)} acknowledged writes on both disks")
