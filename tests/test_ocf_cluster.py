"""The OCF agent run by a real Pacemaker (tests/cluster.py): ocf:mirrord:mirrord as a
promotable clone over real daemons on the cluster's replication link.

The agent is installed with deploy/install.sh --agent-only into a temporary directory
bind-mounted over /usr/lib/ocf/resource.d/mirrord inside the nodes, and the clone is the
documented one (deploy/pacemaker/r0-clone.xml).  What it shows:
fresh (inconsistent) disks are never promoted; after the initial sync, forced by hand
with the clone in maintenance (the documented procedure), Pacemaker promotes one node
with the scores the agent set (10000 each: up to date and connected); when the
promoted node is powered off, the survivor (1000: peer unknown) is promoted; the fence
handler finds the clone by its config path in the live CIB; the crashed node returns
unpromoted.  And when only the replication link fails, the secondary (outdated by the
primary through the cluster) loses its score and is not promoted when the primary dies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import pytest

from mirrorpair import REPO, mirrorctl_argv

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

CLONE, PRIMITIVE = "mirrord-r0-clone", "mirrord-r0"
DISK_SIZE = 16 << 20
SETTLE_S = 60.0  # start, monitors (every 10 s / 20 s) and a transition
HOLD_S = 8.0  # "never promoted" lasts past the start and its first transitions
FAILOVER_S = 40.0  # corosync notices (~2-3 s), a transition, the promotion
CRM_ATTRIBUTE = "/usr/sbin/crm_attribute"
CRM_RESOURCE = "/usr/sbin/crm_resource"
CIBADMIN = "/usr/sbin/cibadmin"
DAEMON_LOG = "/run/mirrord/r0.log"  # inside each node: its own /run (tmpfs)


DEPLOY_XML = os.path.join(REPO, "deploy", "pacemaker", "r0-clone.xml")


def clone_xml(config: str) -> str:
    """The documented configuration (deploy/pacemaker/r0-clone.xml) as it is, but for
    this test's resource file and a daemon log in the node's own /run."""
    with open(DEPLOY_XML) as f:
        xml = f.read()
    ours = (f'<nvpair id="{PRIMITIVE}-config" name="config" value="{config}"/>'
            f'<nvpair id="{PRIMITIVE}-log_file" name="log_file" value="{DAEMON_LOG}"/>')
    documented = f'<nvpair id="{PRIMITIVE}-config" name="config" value="/etc/mirrord/r0.toml"/>'
    assert documented in xml
    return xml.replace(documented, ours)


@pytest.fixture
def agent_dir():
    dest = tempfile.mkdtemp(prefix="mirrord-ocf-", dir="/tmp")
    os.chmod(dest, 0o755)
    try:
        subprocess.run(["sh", os.path.join(REPO, "deploy", "install.sh"), "--agent-only",
                        "--dest", dest, "--source-tree"], check=True, capture_output=True,
                       timeout=60)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture
def shared_dir():
    """The resource file, at one path both nodes see (the clone has one `config`)."""
    path = tempfile.mkdtemp(prefix="mirrord-cfg-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_resource(c, config: str) -> None:
    lines = ['[resource]', 'name = "r0"', 'protocol = "C"', '']
    for node in c.nodes:
        files = c.node_dir(node)
        with open(os.path.join(files, "r0.img"), "wb") as f:
            f.truncate(DISK_SIZE)
        lines += [f"[nodes.{node}]", f'interface = "{c.replication_ifname(node)}"',
                  f'disk = "{files}/r0.img"', f'metadata = "{files}/r0.meta"',
                  f'nbd_socket = "{files}/r0.nbd"', f'control_socket = "{files}/r0.ctl"', ""]
    with open(config, "w") as f:
        f.write("\n".join(lines))
    for node in c.nodes:
        subprocess.run(mirrorctl_argv("--config", config, "--node", node, "create-md"),
                       check=True, capture_output=True, timeout=30, cwd=REPO)


def ctl(c, node: str, config: str, *args: str) -> subprocess.CompletedProcess:
    """mirrorctl on the node, by hand (an operator); the node name is its hostname."""
    return c.run(node, [sys.executable, "-m", "mirrord.mirrorctl", "--config", config, *args],
                 env={"PYTHONPATH": REPO}, check=False, timeout=60)


def status(c, node: str, config: str) -> dict | None:
    proc = ctl(c, node, config, "status", "--json")
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def score(c, node: str) -> str:
    proc = c.run(node, [CRM_ATTRIBUTE, f"--promotion={PRIMITIVE}", "--node", node, "-G", "-q"],
                 check=False, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def daemon_logs(c) -> str:
    parts = []
    for node in c.nodes:
        if c.is_up(node):
            proc = c.run(node, ["/usr/bin/tail", "-n", "30", DAEMON_LOG], check=False)
            parts.append(f"--- {node} {DAEMON_LOG}:\n{proc.stdout}{proc.stderr}")
    return "\n".join(parts)


def maintenance(c, on: bool) -> None:
    c.run("alpha", [CRM_RESOURCE, "--resource", CLONE, "--meta", "--set-parameter",
                    "maintenance", "--parameter-value", "true" if on else "false"])


def bring_up(cluster, agent_dir: str, shared_dir: str, hold: bool = False):
    """A cluster running the documented clone, after its initial sync: one node
    promoted by its score.  -> (cluster, config, promoted, other)."""
    config = os.path.join(shared_dir, "r0.toml")
    c = cluster(start=False, resources_xml=clone_xml(config),
                binds={agent_dir: "/usr/lib/ocf/resource.d/mirrord"})
    write_resource(c, config)
    c.start()
    # Fresh disks are inconsistent: both run, neither is ever promoted.
    c.wait(lambda: c.roles("alpha", CLONE) == {"alpha": "Unpromoted", "beta": "Unpromoted"},
           SETTLE_S, "both instances started, unpromoted")
    deadline = time.monotonic() + (HOLD_S if hold else 0)
    while time.monotonic() < deadline:
        assert c.promoted("alpha", CLONE) == [], daemon_logs(c)
        time.sleep(0.5)
    assert score(c, "alpha") == score(c, "beta") == ""

    # The initial sync, by hand, with the clone in maintenance (its monitors paused).
    maintenance(c, True)
    assert ctl(c, "alpha", config, "primary", "--force").returncode == 0
    c.wait(lambda: all((s := status(c, n, config)) and s["disk"] == "up-to-date"
                       and s["connection"] == "connected" for n in c.nodes),
           SETTLE_S, "the initial sync done")
    assert ctl(c, "alpha", config, "secondary").returncode == 0
    maintenance(c, False)

    (promoted,) = c.wait(lambda: c.promoted("alpha", CLONE) or None, SETTLE_S,
                         "one node promoted by its score")
    other = c.peer(promoted)
    c.wait(lambda: score(c, promoted) == score(c, other) == "10000", SETTLE_S,
           "both scores 10000: up to date and connected")
    assert status(c, promoted, config)["role"] == "primary"
    assert c.crm_mon(other)["failures"] == []
    return c, config, promoted, other


def pacemaker_log(c, node: str) -> str:
    with open(os.path.join(c.node_dir(node), "..", "log-pacemaker", "pacemaker.log"),
              errors="replace") as f:
        return f.read()


def test_pacemaker_promotes_by_the_agents_scores_and_fails_over(cluster, agent_dir,
                                                                 shared_dir):
    c, config, promoted, survivor = bring_up(cluster, agent_dir, shared_dir, hold=True)
    try:
        # Power off the promoted node: the survivor cannot see its peer (1000) and is
        # promoted all the same (then, primary, it scores 10000 again).
        c.crash(promoted)
        c.wait(lambda: c.promoted(survivor, CLONE) == [survivor], FAILOVER_S,
               f"{survivor} promoted after {promoted} was powered off")
        assert status(c, survivor, config)["role"] == "primary"
        c.wait(lambda: score(c, survivor) == "10000", SETTLE_S, "the primary's score")
        assert "promotion score 10000 -> 1000: disk up to date as far as this node " \
               "knows; peer unknown" in pacemaker_log(c, survivor)

        # The fence handler (as the daemon would run it) finds the clone by config.
        fence = c.run(survivor, [sys.executable, "-m", "ha.crm_fence", "fence"],
                      env={"PYTHONPATH": REPO, "MIRRORD_RESOURCE": "r0",
                           "MIRRORD_NODE": survivor, "MIRRORD_PEER": promoted,
                           "MIRRORD_CONFIG": config}, check=False)
        assert fence.returncode == 0, fence.stderr
        assert f"{CLONE} may be promoted only on {survivor}" in fence.stdout

        # The crashed node returns, unpromoted (and may not be promoted while fenced).
        c.boot(promoted)
        c.wait(lambda: c.roles(survivor, CLONE) == {survivor: "Promoted",
                                                    promoted: "Unpromoted"},
               SETTLE_S * 2, f"{promoted} back, unpromoted")
        proc = c.run(survivor, [CIBADMIN, "--query", "--scope", "constraints"])
        assert any(e.get("id") == "mirrord-fence-r0" and e.get("rsc") == CLONE
                   for e in ET.fromstring(proc.stdout).iter("rsc_location"))
        unfence = c.run(survivor, [sys.executable, "-m", "ha.crm_fence", "unfence"],
                        env={"PYTHONPATH": REPO, "MIRRORD_RESOURCE": "r0"}, check=False)
        assert unfence.returncode == 0, unfence.stderr
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{daemon_logs(c)}") from None


def test_an_outdated_secondary_is_never_promoted(cluster, agent_dir, shared_dir):
    c, config, primary, secondary = bring_up(cluster, agent_dir, shared_dir)
    try:
        # Only the replication link fails: the primary goes on alone and outdates its
        # peer through the cluster; the secondary's agent then withdraws its score.
        c.set_replication_link(primary, False)
        c.wait(lambda: (status(c, secondary, config) or {}).get("disk") == "outdated",
               SETTLE_S, f"{secondary}'s disk outdated by {primary}")
        c.wait(lambda: score(c, secondary) == "", SETTLE_S,
               f"{secondary}'s promotion score removed (at its next monitor)")
        assert f"not promotable: the disk is outdated (by {primary}: " \
               in pacemaker_log(c, secondary)

        # The primary dies: the outdated survivor stays unpromoted.
        c.crash(primary)
        c.wait(lambda: primary not in c.online(secondary), FAILOVER_S,
               f"{secondary} sees {primary} gone")
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            assert c.promoted(secondary, CLONE) == [], daemon_logs(c)
            time.sleep(0.5)
        assert c.roles(secondary, CLONE) == {secondary: "Unpromoted"}
        assert status(c, secondary, config)["role"] == "secondary"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{daemon_logs(c)}") from None
