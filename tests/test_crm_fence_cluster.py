"""ha/crm_fence.py against a real two-node Corosync + Pacemaker cluster (tests/cluster.py).

The clone is the stock ocf:pacemaker:Stateful (it has no `config` parameter, so the
handler is told the clone with --clone).  After `fence` on the unpromoted node, Pacemaker
moves the Promoted role to it and, with that node in standby, leaves the peer unpromoted
rather than promote it; after `unfence` it promotes the peer again.
"""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET

import pytest

from cluster_config import STATEFUL_CLONE, STATEFUL_CLONE_ID as CLONE
from mirrorpair import REPO

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

SETTLE_S = 20.0  # Pacemaker acts on a CIB change within a transition (about a second)
HOLD_S = 6.0  # how long "not promoted" must last: several monitor intervals and transitions
CIBADMIN = "/usr/sbin/cibadmin"
CRM_ATTRIBUTE = "/usr/sbin/crm_attribute"


def handler(c, node: str, action: str, *args: str):
    env = {"MIRRORD_RESOURCE": "r0", "MIRRORD_NODE": node, "MIRRORD_PEER": c.peer(node),
           "MIRRORD_CONFIG": "/etc/mirrord/r0.toml", "PYTHONPATH": REPO}
    proc = c.run(node, [sys.executable, "-m", "ha.crm_fence", action, *args], env=env,
                 check=False, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def constraint(c, node: str) -> ET.Element | None:
    proc = c.run(node, [CIBADMIN, "--query", "--scope", "constraints"], timeout=30)
    return next((e for e in ET.fromstring(proc.stdout).iter("rsc_location")
                 if e.get("id") == "mirrord-fence-r0"), None)


def test_fence_moves_and_holds_the_promoted_role_and_unfence_releases_it(cluster):
    c = cluster(resources_xml=STATEFUL_CLONE)
    (old,) = c.wait(lambda: c.promoted("alpha", CLONE) or None, SETTLE_S, "one promoted")
    survivor = c.peer(old)  # the node that goes on alone: it fences `old`

    proc = handler(c, survivor, "fence", "--clone", CLONE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"mirrord-crm-fence: mirrord-fence-r0: placed: {CLONE} may be "
                           f"promoted only on {survivor} (peer {old} fenced)\n")
    # The constraint is in the CIB, seen from both nodes, as the handler wrote it.
    for node in c.nodes:
        location = constraint(c, node)
        assert location is not None and location.get("rsc") == CLONE
        rule = location.find("rule")
        assert (rule.get("role"), rule.get("score")) == ("Promoted", "-INFINITY")
        assert rule.find("expression").attrib["value"] == survivor
    # Pacemaker demotes the fenced node and promotes the survivor instead.
    c.wait(lambda: c.promoted(survivor, CLONE) == [survivor], SETTLE_S,
           f"the Promoted role moved to {survivor}")

    again = handler(c, survivor, "fence", "--clone", CLONE)
    assert again.returncode == 0, again.stderr
    assert "already in place" in again.stdout

    # With the survivor in standby, the fenced node stays unpromoted: nothing is
    # promoted at all rather than it.
    c.run(survivor, [CRM_ATTRIBUTE, "--type", "nodes", "--node", survivor, "--name",
                     "standby", "--update", "on"])
    c.wait(lambda: c.roles(old, CLONE) == {old: "Unpromoted"}, SETTLE_S,
           f"{survivor} in standby, {old} running unpromoted")
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        assert c.promoted(old, CLONE) == [], c.diagnostics()
        time.sleep(0.5)

    proc = handler(c, old, "unfence")  # from either node: the CIB is the cluster's
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "mirrord-crm-fence: mirrord-fence-r0: removed\n"
    assert constraint(c, survivor) is None
    c.wait(lambda: c.promoted(old, CLONE) == [old], SETTLE_S,
           f"{old} promoted once the constraint is gone")

    proc = handler(c, old, "unfence")
    assert proc.returncode == 0 and "not there" in proc.stdout


def test_fence_refusals_and_a_replaced_constraint(cluster):
    c = cluster(resources_xml=STATEFUL_CLONE)
    # Found by config: Stateful is not ocf:mirrord:mirrord, so there is no such clone.
    proc = handler(c, "alpha", "fence")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("mirrord-crm-fence: no clone in the CIB runs ocf:mirrord:mirrord "
                           "with config=/etc/mirrord/r0.toml (pass --clone ID to name it)\n")
    proc = handler(c, "alpha", "fence", "--clone", "stateful")  # the primitive, not a clone
    assert proc.returncode == 1 and "no clone with id stateful" in proc.stderr
    assert constraint(c, "alpha") is None

    # Fenced from one node, then from the other (the roles flipped since): the
    # constraint is replaced, not duplicated, and names the node that fenced last.
    assert handler(c, "alpha", "fence", "--clone", CLONE).returncode == 0
    proc = handler(c, "beta", "fence", "--clone", CLONE)
    assert proc.returncode == 0, proc.stderr
    assert "placed" in proc.stdout
    proc = c.run("alpha", [CIBADMIN, "--query", "--scope", "constraints"], timeout=30)
    locations = [e for e in ET.fromstring(proc.stdout).iter("rsc_location")
                 if e.get("id") == "mirrord-fence-r0"]
    assert len(locations) == 1
    assert locations[0].find("rule/expression").get("value") == "beta"
