"""tests/cluster.py itself: a real Corosync + Pacemaker pair in namespaces.

With the stock ``ocf:pacemaker:Stateful`` agent as a promotable clone (the
reference for the OCF contract our agent will follow): bring-up to "both
online, one promoted", failover when the promoted node is powered off, and
its return as unpromoted.  Then the replication link (its MTU, and that no
one but the test puts a frame on it), a bind into the nodes that leaves the
host untouched, and that close() leaves nothing behind.

The measured times are printed (bring-up, crash detection, failover, boot,
teardown); CLUSTER-TESTING.md has the figures to compare with.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import cluster_config
from cluster import Cluster, parse_crm_mon
from cluster_config import STATEFUL_CLONE, STATEFUL_CLONE_ID as CLONE


# The brief's budgets; CLUSTER-TESTING.md measured ~5 s and 2.2-3.3 s here.
PROMOTED_TIMEOUT_S = 15.0
FAILOVER_TIMEOUT_S = 10.0
REJOIN_TIMEOUT_S = 30.0
REPLICATION_MTU = 4000  # not the default 9000: shows the parameter is honoured


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[cluster] {text}", end="")


# A trimmed `crm_mon -1 --output-as=xml --inactive` of Pacemaker 2.1.5, with a failure.
CRM_MON_XML = """<pacemaker-result api-version="2.25" request="crm_mon">
  <summary>
    <current_dc present="true" version="2.1.5" name="alpha" id="1" with_quorum="true"/>
  </summary>
  <nodes>
    <node name="alpha" id="1" online="true" standby="false" maintenance="false" unclean="false"/>
    <node name="beta" id="2" online="false" standby="false" maintenance="false" unclean="false"/>
  </nodes>
  <resources>
    <clone id="stateful-clone" multi_state="true">
      <resource id="stateful" role="Promoted" active="true" nodes_running_on="1">
        <node name="alpha" id="1" cached="true"/>
      </resource>
      <resource id="stateful" role="Stopped" active="false" nodes_running_on="0"/>
    </clone>
    <resource id="ip" resource_agent="ocf:heartbeat:Dummy" role="Started" nodes_running_on="1">
      <node name="alpha" id="1" cached="true"/>
    </resource>
  </resources>
  <failures>
    <failure op_key="stateful_monitor_3000" node="alpha" exitstatus="error" exitreason=""/>
  </failures>
  <status code="0" message="OK"/>
</pacemaker-result>"""


def test_parse_crm_mon():
    view = parse_crm_mon(CRM_MON_XML)
    assert view["dc"] == "alpha" and view["quorate"] is True
    assert view["nodes"]["alpha"]["online"] and not view["nodes"]["beta"]["online"]
    assert view["resources"][CLONE] == {"alpha": "Promoted"}  # a stopped instance: absent
    assert view["resources"]["stateful"] == {"alpha": "Promoted"}
    assert view["resources"]["ip"] == {"alpha": "Started"}
    assert view["failures"] == [{"op_key": "stateful_monitor_3000", "node": "alpha",
                                 "exitstatus": "error", "exitreason": ""}]


def test_initial_cib_and_corosync_conf():
    cib = cluster_config.cib_xml(STATEFUL_CLONE, "")
    assert 'name="dc-deadtime" value="2s"' in cib and 'name="stonith-enabled" value="false"' in cib
    assert "crm_feature_set" not in cib  # Pacemaker discards updates above its own
    with pytest.raises(ValueError, match="valid CIB"):
        cluster_config.cib_xml("<primitive id='x'>", "")
    conf = cluster_config.corosync_conf("mtx", [("alpha", 1, "172.16.0.1"),
                                                ("beta", 2, "172.16.0.2")])
    for line in ("transport: knet", "crypto_cipher: none", "token: 1000", "two_node: 1",
                 "name: beta", "nodeid: 2", "ring0_addr: 172.16.0.2"):
        assert line in conf


@pytest.mark.netns
@pytest.mark.cluster
def test_promotable_clone_fails_over_and_the_crashed_node_returns_unpromoted(cluster, capsys):
    began = time.monotonic()
    c = cluster(resources_xml=STATEFUL_CLONE)
    online_s = time.monotonic() - began
    promoted = c.wait(lambda: c.promoted("alpha", CLONE) if
                      c.promoted("alpha", CLONE) == c.promoted("beta", CLONE) else None,
                      PROMOTED_TIMEOUT_S - online_s, "one promoted instance, both nodes agreeing")
    promoted_s = time.monotonic() - began
    assert len(promoted) == 1
    victim = promoted[0]
    survivor = c.peer(victim)
    view = c.crm_mon(survivor)
    assert {n for n, st in view["nodes"].items() if st["online"]} == {"alpha", "beta"}
    assert view["resources"][CLONE] == {victim: "Promoted", survivor: "Unpromoted"}
    assert view["quorate"] and view["failures"] == []
    report(capsys, f"bring-up: both online {online_s:.1f} s, one promoted {promoted_s:.1f} s")

    crashed = time.monotonic()
    c.crash(victim)
    c.wait(lambda: victim not in c.online(survivor), FAILOVER_TIMEOUT_S,
           f"{survivor} to see {victim} offline")
    detected_s = time.monotonic() - crashed
    c.wait(lambda: c.promoted(survivor, CLONE) == [survivor], FAILOVER_TIMEOUT_S - detected_s,
           f"{survivor} promoted after {victim}'s crash")
    failover_s = time.monotonic() - crashed
    assert c.crm_mon(survivor)["quorate"]  # two_node: the survivor keeps quorum
    report(capsys, f"crash of the promoted node: seen offline {detected_s:.1f} s, "
                   f"survivor promoted {failover_s:.1f} s")

    booted = time.monotonic()
    c.boot(victim)
    boot_s = time.monotonic() - booted
    roles = c.wait(lambda: (r := c.roles(survivor, CLONE)).get(victim) == "Unpromoted" and r,
                   REJOIN_TIMEOUT_S, f"{victim} back, unpromoted")
    rejoin_s = time.monotonic() - booted
    assert roles == {survivor: "Promoted", victim: "Unpromoted"}
    assert c.online(victim) == {"alpha", "beta"}
    assert c.promoted(victim, CLONE) == [survivor]
    report(capsys, f"boot of the crashed node: online {boot_s:.1f} s, "
                   f"running unpromoted {rejoin_s:.1f} s")


def _link(c: Cluster, node: str) -> dict:
    """`ip -j -s addr` of the node's replication end, asked from the host."""
    out = subprocess.run(["ip", "-n", c.namespace(node), "-j", "-s", "addr", "show", "dev",
                          c.replication_ifname(node)], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return json.loads(out)[0]


@pytest.mark.netns
@pytest.mark.cluster
def test_replication_link_and_binds(cluster, tmp_path, capsys):
    agent_dir = tmp_path / "agents"
    agent_dir.mkdir()
    (agent_dir / "marker").write_text("from the host\n")
    # A target that does not exist on the host: created inside the nodes only.
    inside = f"/usr/lib/ocf/resource.d/mt{os.getpid()}"
    assert not os.path.exists(inside)
    c = cluster(replication_mtu=REPLICATION_MTU, binds={str(agent_dir): inside})

    for node in c.nodes:
        # The bind is there inside each node, the host's tree is untouched, and the
        # stock agents beside it are still visible (overlay, not a tmpfs over them).
        assert c.run(node, ["/bin/cat", f"{inside}/marker"]).stdout == "from the host\n"
        listing = c.run(node, ["/bin/ls", "/usr/lib/ocf/resource.d/pacemaker"]).stdout
        assert "Stateful" in listing.split()
        assert c.run(node, ["/bin/hostname"]).stdout.strip() == node
        # node_dir is the same path inside.
        path = os.path.join(c.node_dir(node), "disk.img")
        c.run(node, ["/usr/bin/truncate", "-s", "1M", path])
        assert os.path.getsize(path) == 1 << 20
    assert not os.path.exists(inside)

    links = {node: _link(c, node) for node in c.nodes}
    for node, link in links.items():
        assert link["mtu"] == REPLICATION_MTU
        assert link["operstate"] == "UP"
        assert link.get("addr_info", []) == []  # no IPv4, and IPv6 is off in the namespace
    # The cluster ran for seconds (corosync, pacemaker) and nothing used this link.
    time.sleep(1.0)
    for node in c.nodes:
        stats = _link(c, node)["stats64"]
        assert (stats["rx"]["packets"], stats["tx"]["packets"]) == (0, 0), (node, stats)

    # Cutting it: this end down, the peer loses carrier; the cluster does not notice.
    c.set_replication_link("alpha", False)
    assert _link(c, "alpha")["operstate"] == "DOWN"
    assert "NO-CARRIER" in _link(c, "beta")["flags"]
    c.set_replication_link("alpha", True)
    c.wait(lambda: _link(c, "beta")["operstate"] == "UP", 5, "beta's end up again")
    assert c.online("beta") == {"alpha", "beta"}


def _pids_in_pid_namespace(pid1: int) -> list[int]:
    """Host PIDs of every process in the PID namespace whose init is ``pid1``."""
    target = os.readlink(f"/proc/{pid1}/ns/pid")
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == target:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


@pytest.mark.netns
@pytest.mark.cluster
def test_close_leaves_no_namespace_process_mount_or_directory(cluster, capsys):
    c = cluster(resources_xml=STATEFUL_CLONE)
    namespaces = [c.namespace(node) for node in c.nodes]
    holders = [c._node(node).holder.pid for node in c.nodes]
    inside = []
    for node in c.nodes:
        pids = _pids_in_pid_namespace(c._node(node).pid1)
        assert len(pids) >= 5, pids  # PID 1, corosync, pacemakerd and its daemons
        inside += pids
    base = c._base
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(ns in listed for ns in namespaces)

    began = time.monotonic()
    c.close()
    teardown_s = time.monotonic() - began
    c.close()  # idempotent

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces), listed
    assert not [pid for pid in holders + inside if os.path.exists(f"/proc/{pid}")]
    with open("/proc/self/mountinfo") as f:
        assert base not in f.read()
    assert not os.path.exists(base)
    report(capsys, f"teardown {teardown_s:.2f} s")
