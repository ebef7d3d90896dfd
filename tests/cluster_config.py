"""What a test cluster node's "disk" holds, and how its PID 1 mounts it (tests/cluster.py).

Each node owns one host directory ``root``:

    root/files/          node_dir(): the test's files, same path inside the node
    root/etc-corosync/   -> /etc/corosync      corosync.conf (+ packaged uidgid.d)
    root/lib-corosync/   -> /var/lib/corosync
    root/lib-pacemaker/  -> /var/lib/pacemaker cib/cib.xml, pengine, blackbox, cores
    root/log-corosync/   -> /var/log/corosync  corosync.log, corosync.stdout
    root/log-pacemaker/  -> /var/log/pacemaker pacemaker.log, pacemakerd.stdout
    root/overlay/        upper layers for binds whose target is missing on the host
    root/holder.json, root/holder.log

They persist across a crash and boot, like a disk; /run and /dev/shm are a
fresh tmpfs at every boot, like RAM.  The settings that make the cluster fast
come from /work/shared/CLUSTER-TESTING.md: knet without crypto, token 1000 ms,
two_node, and in the CIB stonith-enabled=false and dc-deadtime=2s.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import xml.etree.ElementTree as ET
from typing import Iterable, Mapping

HACLUSTER_USER = "hacluster"
HACLIENT_GROUP = "haclient"
FILES_DIR = "files"
# Host subdirectory -> (path inside the node, owner, mode).
STATE_DIRS = {
    "etc-corosync": ("/etc/corosync", ("root", "root"), 0o755),
    "lib-corosync": ("/var/lib/corosync", ("root", "root"), 0o755),
    "lib-pacemaker": ("/var/lib/pacemaker", ("root", "root"), 0o755),
    "log-corosync": ("/var/log/corosync", ("root", "root"), 0o755),
    "log-pacemaker": ("/var/log/pacemaker", (HACLUSTER_USER, HACLIENT_GROUP), 0o770),
}
# The packaged /var/lib/pacemaker and /var/log/pacemaker layout (all hacluster:haclient).
PACEMAKER_SUBDIRS = {"lib-pacemaker": (("cib", "pengine", "blackbox", "cores"), 0o750),
                     "log-pacemaker": (("bundles",), 0o770)}
# Created by PID 1 on the fresh /run: path -> (owner, mode).
RUN_DIRS = {
    "/run/crm": ((HACLUSTER_USER, HACLIENT_GROUP), 0o750),
    "/run/lock": (("root", "root"), 0o1777),
    "/run/resource-agents": (("root", "root"), 0o755),
}
# tmpfs mounts of every boot: path, mode.
TMPFS_MOUNTS = (("/run", "0755"), ("/dev/shm", "1777"))
PACKAGED_COROSYNC_ETC = "/etc/corosync"
COROSYNC_LOG = "/var/log/corosync/corosync.log"
PACEMAKER_LOG = "/var/log/pacemaker/pacemaker.log"

COROSYNC_CONF = """\
# Written by tests/cluster.py for one test run.
totem {{
    version: 2
    cluster_name: {cluster_name}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}}
nodelist {{
{nodes}}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
logging {{
    to_logfile: yes
    logfile: {logfile}
    to_stderr: no
    to_syslog: no
    timestamp: on
}}
"""
COROSYNC_NODE = """\
    node {{
        name: {name}
        nodeid: {nodeid}
        ring0_addr: {addr}
    }}
"""
# No crm_feature_set: a value above this Pacemaker's makes it discard every
# update ("feature set greater than our own"); it fills in its own.
# dc-deadtime=2s: the default 20 s would be paid at every start.
CIB_XML = """\
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="cib-bootstrap-options-dc-deadtime" name="dc-deadtime" value="2s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>{resources}</resources>
    <constraints>{constraints}</constraints>
  </configuration>
  <status/>
</cib>
"""


# The stock ocf:pacemaker:Stateful agent as a promotable clone: the reference the
# harness and the fence handler are tested with (CLUSTER-TESTING.md).
STATEFUL_CLONE_ID = "stateful-clone"
STATEFUL_CLONE = f"""
<clone id="{STATEFUL_CLONE_ID}">
  <meta_attributes id="{STATEFUL_CLONE_ID}-meta">
    <nvpair id="{STATEFUL_CLONE_ID}-promotable" name="promotable" value="true"/>
    <nvpair id="{STATEFUL_CLONE_ID}-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="{STATEFUL_CLONE_ID}-clone-max" name="clone-max" value="2"/>
    <nvpair id="{STATEFUL_CLONE_ID}-clone-node-max" name="clone-node-max" value="1"/>
  </meta_attributes>
  <primitive id="stateful" class="ocf" provider="pacemaker" type="Stateful">
    <operations>
      <op id="stateful-monitor-promoted" name="monitor" interval="3s" role="Promoted"/>
      <op id="stateful-monitor-unpromoted" name="monitor" interval="4s" role="Unpromoted"/>
    </operations>
  </primitive>
</clone>
"""


def ids(owner: tuple[str, str]) -> tuple[int, int]:
    """(uid, gid) of a (user, group) pair."""
    return pwd.getpwnam(owner[0]).pw_uid, grp.getgrnam(owner[1]).gr_gid


def _mkdir(path: str, owner: tuple[str, str], mode: int) -> None:
    os.makedirs(path)
    os.chown(path, *ids(owner))
    os.chmod(path, mode)


def make_node_dirs(root: str) -> None:
    """Create a node's directory tree (the module docstring) under a new ``root``."""
    os.makedirs(os.path.join(root, FILES_DIR))
    for key, (_inside, owner, mode) in STATE_DIRS.items():
        _mkdir(os.path.join(root, key), owner, mode)
    uidgid = os.path.join(PACKAGED_COROSYNC_ETC, "uidgid.d")
    if os.path.isdir(uidgid):
        shutil.copytree(uidgid, os.path.join(root, "etc-corosync", "uidgid.d"))
    for key, (subdirs, mode) in PACEMAKER_SUBDIRS.items():
        for sub in subdirs:
            _mkdir(os.path.join(root, key, sub), (HACLUSTER_USER, HACLIENT_GROUP), mode)


def corosync_conf(cluster_name: str, nodes: Iterable[tuple[str, int, str]]) -> str:
    """corosync.conf for ``nodes`` given as (name, nodeid, ring0 address)."""
    entries = "".join(COROSYNC_NODE.format(name=name, nodeid=nodeid, addr=addr)
                      for name, nodeid, addr in nodes)
    return COROSYNC_CONF.format(cluster_name=cluster_name, nodes=entries, logfile=COROSYNC_LOG)


def cib_xml(resources: str, constraints: str) -> str:
    """The initial CIB with the caller's fragments; ValueError if it is not well-formed."""
    cib = CIB_XML.format(resources=resources, constraints=constraints)
    try:
        ET.fromstring(cib)  # fail here, not as a CIB Pacemaker silently replaces
    except ET.ParseError as exc:
        raise ValueError(f"resources_xml/constraints_xml do not make a valid CIB: {exc}") from exc
    return cib


def write_node_files(root: str, corosync: str, cib: str) -> None:
    """Write corosync.conf and the initial cib.xml (hacluster:haclient 0600)."""
    with open(os.path.join(root, "etc-corosync", "corosync.conf"), "w") as f:
        f.write(corosync)
    path = os.path.join(root, "lib-pacemaker", "cib", "cib.xml")
    with open(path, "w") as f:
        f.write(cib)
    os.chown(path, *ids((HACLUSTER_USER, HACLIENT_GROUP)))
    os.chmod(path, 0o600)


def holder_spec(root: str, hostname: str, binds: Mapping[str, str], lifetime: float) -> dict:
    """What tests/cluster_init.py (PID 1) mounts and creates, as JSON-able data."""
    return {
        "hostname": hostname,
        "tmpfs": [list(t) for t in TMPFS_MOUNTS],
        "mounts": [[os.path.join(root, key), inside]
                   for key, (inside, _owner, _mode) in STATE_DIRS.items()],
        "binds": [[source, target] for source, target in binds.items()],
        "overlay_dir": os.path.join(root, "overlay"),
        "dirs": [[path, *ids(owner), mode] for path, (owner, mode) in RUN_DIRS.items()],
        "lifetime": lifetime,
    }
