"""A real two-node Corosync + Pacemaker cluster in network namespaces, for tests.

What a test gets
----------------
::

    with Cluster(resources_xml=STATEFUL_CLONE) as c:   # or the `cluster` fixture
        c.start()                                      # both nodes: holder, corosync, pacemaker
        c.wait(lambda: c.promoted("alpha", "stateful-clone"), 15, "one promoted")
        c.run("alpha", ["/usr/sbin/crm_attribute", "--query", "--name", "x"], check=False)
        c.crash("alpha")                               # power off: the whole node dies at once
        c.boot("alpha")                                # power on: its disk (dirs) persisted

API (node names are lowercase; they are the hostnames *and* the corosync and
Pacemaker node names; nodeids are 1 and 2 in the order given):

* ``Cluster(nodes=("alpha", "beta"), *, resources_xml="", constraints_xml="",
  binds=None, replication_mtu=9000, pacemaker=True)`` -- nothing runs until
  :meth:`Cluster.start`.  ``resources_xml``/``constraints_xml`` are CIB
  fragments placed inside ``<resources>``/``<constraints>`` of the initial CIB;
  ``binds`` maps a host directory to a path inside every node (e.g. our OCF
  agent to ``/usr/lib/ocf/resource.d/mirrord``; a missing target is created
  inside the node only, on an overlay, never on the host);
  ``pacemaker=False`` runs corosync alone (faster, for the CPG bindings).
* ``start()`` (returns once both nodes are in one cluster: corosync answers
  everywhere and, with Pacemaker, every Pacemaker sees every node online;
  resources may still be starting), ``crash(node, links_down=True)``,
  ``boot(node)`` (same wait), ``close()``; ``nodes``, ``peer(node)``,
  ``nodeid(node)``, ``is_up(node)``.  Call start()/boot() from a thread that
  outlives the cluster (the test's own): the nodes' death signal is tied to
  the thread that started them.
* ``run(node, argv, *, check=True, timeout=30, env=None, input=None)`` ->
  CompletedProcess (text; a failure raises ClusterCommandError, whose str()
  has the node and stderr); ``popen(node, argv, *, env=None,
  inherit_env=True, **popen_kw)`` -> NodeProcess.
  Both go through ``nsenter`` into the node's mount, network, UTS and PID
  namespaces; pass absolute paths (the working directory is /).  ``env``
  entries are *added* to this process's environment.  A NodeProcess is a
  Popen whose signals reach the command itself (nsenter does not forward).
* ``cluster_ifname(node)``, ``address(node)``, ``set_cluster_link(node, up)``:
  the cluster network (corosync's ring0, MTU 1500); ``replication_ifname(node)`` and
  ``set_replication_link(node, up)``: a second veth pair between the same two
  namespaces, MTU ``replication_mtu``, no addresses, no IPv6: the dedicated
  replication link for mirrord; ``namespace(node)``: the netns name.
* ``node_dir(node)``: a per-node host directory for the test's files (disks,
  configs), visible **at the same path inside the node**.
* ``crm_mon(node)`` -> dict, ``promoted(node_asking, resource_id)`` -> list,
  ``roles(node_asking, resource_id)`` -> {node: role}, ``online(node_asking)``;
  ``wait(predicate, timeout, what)`` (returns the predicate's truthy value;
  on timeout an AssertionError with crm_mon and log tails); ``logs(node)``;
  ``diagnostics()``.  :func:`parse_crm_mon` is the pure parser.

How a node is built (see /work/shared/CLUSTER-TESTING.md, verified here)
------------------------------------------------------------------------
One network namespace per node (from tests/netns.py, so names are unique to
the run and the namespaces are registered for cleanup), and per node a
*holder*: ``ip netns exec NS unshare --kill-child=KILL --pid --mount-proc
--mount --uts --propagation private python3 cluster_init.py SPEC`` whose
PID 1 (tests/cluster_init.py) sets the hostname, mounts a tmpfs on
/run and /dev/shm (corosync/pacemaker pid files and libqb's IPC shared
memory), bind-mounts the node's own directories over /etc/corosync,
/var/lib/corosync, /var/lib/pacemaker, /var/log/corosync and
/var/log/pacemaker, creates /run/crm, /run/lock and /run/resource-agents, then
only reaps children.  Everything else on the node runs under ``nsenter -t
PID1 -m -n -u -p``; plain ``ip netns exec`` would give a fresh mount
namespace where the clients cannot reach the daemons.

A crash is SIGKILL of that PID 1: the kernel kills every process of the PID
namespace at once, like a power cut; ``links_down`` then sets the node's veth
ends down so the peer sees carrier loss as with a real box.  The node's
directories (its "disk": CIB, logs, node_dir) survive for :meth:`boot`.

Nothing outlives the test: the holder runs under ``setpriv --pdeathsig KILL``
(if this process dies, so do the nodes; PID 1 is then left unreaped, since
this machine's init does not reap orphans), PID 1 exits by itself after
NODE_LIFETIME_S, every Cluster is registered and closed at exit, and its
namespaces sit in netns.py's registry.  All mounts live only in the nodes'
mount namespaces, so they vanish with them.  Processes are stopped by PID,
never by name.  tests/cluster_config.py holds the node's files (directory
layout, corosync.conf, the initial CIB) and tests/cluster_init.py its PID 1.
"""

from __future__ import annotations

import atexit
import grp
import itertools
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Mapping, Sequence

import cluster_config as config
import netns

__all__ = ["Cluster", "ClusterCommandError", "ClusterError", "NodeProcess", "parse_crm_mon",
           "unusable_reason"]

# -- limits and fixed values ---------------------------------------------------

# Corosync's two_node mode (and the replication link) is for exactly two boxes.
NODE_COUNT = 2
# The holder's PID 1 gives up after this long: a safety net if this process
# dies in a way its pdeathsig misses; no test keeps a cluster for an hour.
NODE_LIFETIME_S = 3600
# Holder setup is a handful of mounts: milliseconds.  10 s means it is stuck.
HOLDER_READY_TIMEOUT_S = 10.0
# corosync -f answers corosync-cfgtool in ~0.1 s; 20 s means it will not.
COROSYNC_READY_TIMEOUT_S = 20.0
# Both Pacemakers see both nodes online ~3 s after start (dc-deadtime=2s).
ONLINE_TIMEOUT_S = 60.0
# Polling period of every wait: short against the ~1 s token timeout.
POLL_S = 0.1
# Default timeout for run(): any CLI tool of the cluster answers in < 1 s.
RUN_TIMEOUT_S = 30.0
# After a SIGKILL the kernel tears a PID namespace down in milliseconds.
KILL_REAP_S = 10.0
# How long to wait for nsenter to have forked the command before signalling.
CHILD_LOOKUP_S = 5.0
# Lines of each log in failure messages.
LOG_TAIL_LINES = 40
# The cluster network: plain MTU; the replication link's MTU is the caller's.
CLUSTER_MTU = 1500
# Fixed ifindexes for the replication veth ends, distinct from each other and
# from netns.NetnsPair's (10/20): distinct ends report carrier loss at once.
REPL_IFINDEX = (11, 21)

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Absolute paths: nsenter resets the working directory and PATH is minimal.
COROSYNC = "/usr/sbin/corosync"
COROSYNC_CFGTOOL = "/usr/sbin/corosync-cfgtool"
COROSYNC_CMAPCTL = "/usr/sbin/corosync-cmapctl"
PACEMAKERD = "/usr/sbin/pacemakerd"
CRM_MON = "/usr/sbin/crm_mon"
NSENTER = "/usr/bin/nsenter"
UNSHARE = "/usr/bin/unshare"
SETPRIV = "/usr/bin/setpriv"
REQUIRED_TOOLS = (COROSYNC, COROSYNC_CFGTOOL, COROSYNC_CMAPCTL, PACEMAKERD, CRM_MON,
                  "/usr/sbin/cibadmin", NSENTER, UNSHARE, SETPRIV)
HOLDER_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster_init.py")

_counter = itertools.count()


class ClusterError(RuntimeError):
    """The harness could not build or drive the cluster; the message has the logs."""


class ClusterCommandError(subprocess.CalledProcessError):
    """A command run inside a node failed; str() names the node and shows stderr."""

    def __init__(self, node: str, returncode: int, cmd, output=None, stderr=None) -> None:
        super().__init__(returncode, cmd, output, stderr)
        self.node = node

    def __str__(self) -> str:
        tail = (self.stderr or self.output or "").strip()[-2000:]
        return f"on {self.node}: {' '.join(map(str, self.cmd))} exited {self.returncode}: {tail}"


def unusable_reason() -> str | None:
    """Why a cluster cannot run here (None when it can): root, namespaces, tools."""
    reason = netns.unusable_reason()
    if reason is not None:
        return reason
    missing = [tool for tool in REQUIRED_TOOLS if not os.access(tool, os.X_OK)]
    if missing:
        return (f"missing {', '.join(missing)} (apt-get install corosync pacemaker "
                "pacemaker-cli-utils; tests/run.sh does it)")
    for name, lookup in ((config.HACLUSTER_USER, pwd.getpwnam),
                         (config.HACLIENT_GROUP, grp.getgrnam)):
        try:
            lookup(name)
        except KeyError:
            return f"no {name!r} user/group (installed by the pacemaker package)"
    return None


def _child_pids(pid: int) -> list[int]:
    """Host PIDs whose parent is ``pid`` (this kernel has no /proc/PID/task/TID/children)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200 * lines))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"({exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def parse_crm_mon(xml_text: str) -> dict[str, Any]:
    """The parts of ``crm_mon --output-as=xml`` that tests look at.

    ``{"dc": name|None, "quorate": bool, "nodes": {name: {"online", "standby",
    "unclean", "maintenance": bool}}, "resources": {id: {node: role}},
    "failures": [attributes of each failed action], "xml": xml_text}``.
    ``resources`` is keyed by clone id *and* primitive id (an instance suffix
    like ":0" removed); roles are Pacemaker's ("Promoted", "Unpromoted",
    "Started", ...); a node where the resource does not run is absent.
    """
    root = ET.fromstring(xml_text)
    dc = root.find("summary/current_dc")
    view: dict[str, Any] = {
        "dc": dc.get("name") if dc is not None and dc.get("present") == "true" else None,
        "quorate": dc is not None and dc.get("with_quorum") == "true",
        "nodes": {},
        "resources": {},
        "failures": [dict(f.attrib) for f in root.iterfind("failures/failure")],
        "xml": xml_text,
    }
    for el in root.iterfind("nodes/node"):
        view["nodes"][el.get("name")] = {
            key: el.get(key) == "true" for key in ("online", "standby", "unclean", "maintenance")}
    resources = view["resources"]

    def collect(parent: ET.Element, owners: tuple[str, ...]) -> None:
        for el in parent:
            if el.tag == "resource":
                ids = (el.get("id", "").split(":")[0], *owners)
                for rid in ids:
                    roles = resources.setdefault(rid, {})
                    for running in el.iterfind("node"):
                        roles[running.get("name")] = el.get("role")
            elif el.tag in ("clone", "group", "bundle"):
                collect(el, (*owners, el.get("id")))

    section = root.find("resources")
    if section is not None:
        collect(section, ())
    return view


class NodeProcess(subprocess.Popen):
    """A command running inside a node, started as ``nsenter ... CMD``.

    ``pid`` is nsenter's.  nsenter forks the command into the node's PID
    namespace and waits for it without forwarding signals, so
    :meth:`send_signal` (and terminate/kill) find the command -- nsenter's
    child -- and signal it; nsenter then exits with the command's status.
    """

    node: str = ""

    def command_pid(self, timeout: float = CHILD_LOOKUP_S) -> int | None:
        """Host PID of the command itself; None once it has exited."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            children = _child_pids(self.pid)
            if children:
                return children[0]
            if time.monotonic() > deadline:
                raise ClusterError(f"nsenter {self.pid} has no child after {timeout}s")
            time.sleep(0.01)
        return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        pid = self.command_pid()
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class _Node:
    """Book-keeping for one node: its names, directories and live processes."""

    def __init__(self, name: str, nodeid: int, ns: str, cluster_if: str, repl_if: str,
                 addr: str, root: str) -> None:
        self.name = name
        self.nodeid = nodeid
        self.ns = ns
        self.cluster_if = cluster_if
        self.repl_if = repl_if
        self.addr = addr
        self.root = root  # host directory holding everything of this node
        self.files = os.path.join(root, config.FILES_DIR)
        self.holder: subprocess.Popen | None = None
        self.pid1: int | None = None  # host PID of the holder's PID 1
        self.procs: list[NodeProcess] = []
        self.links_down = False

    def state(self, key: str) -> str:
        return os.path.join(self.root, key)

    @property
    def up(self) -> bool:
        return self.pid1 is not None


_live: dict[int, "Cluster"] = {}
_live_lock = threading.Lock()


def close_all() -> None:
    """Close every Cluster still open in this process (atexit safety net)."""
    with _live_lock:
        clusters = list(_live.values())
    for cluster in clusters:
        try:
            cluster.close()
        except Exception as exc:  # keep closing the others
            print(f"cluster.close_all: {exc}", file=sys.stderr)


atexit.register(close_all)


class Cluster:
    """Two cluster nodes in network namespaces; see the module docstring for the API."""

    def __init__(self, nodes: Sequence[str] = ("alpha", "beta"), *, resources_xml: str = "",
                 constraints_xml: str = "", binds: Mapping[str, str] | None = None,
                 replication_mtu: int = 9000, pacemaker: bool = True) -> None:
        nodes = tuple(nodes)
        if len(nodes) != NODE_COUNT or len(set(nodes)) != NODE_COUNT:
            raise ValueError(f"a cluster has exactly {NODE_COUNT} distinct nodes, got {nodes}")
        for name in nodes:
            if not (name.isascii() and name.isalnum() and name.islower() and name[0].isalpha()):
                raise ValueError(f"node names must be lowercase alphanumerics, got {name!r}")
        self.binds = {}
        for host_dir, inside in (binds or {}).items():
            if not (os.path.isabs(host_dir) and os.path.isdir(host_dir)):
                raise ValueError(f"bind source {host_dir!r} is not an existing absolute directory")
            if not os.path.isabs(inside) or os.path.normpath(inside) == "/":
                raise ValueError(f"bind target {inside!r} must be an absolute path below /")
            self.binds[os.path.abspath(host_dir)] = os.path.normpath(inside)
        # Built (and checked) first: a malformed fragment fails before any namespace exists.
        self._cib = config.cib_xml(resources_xml, constraints_xml)
        self.replication_mtu = replication_mtu
        self.pacemaker = pacemaker
        self._closed = False
        self.name = ""  # the run-unique stem, set by _build()
        self._nodes: dict[str, _Node] = {}
        self._pair: netns.NetnsPair | None = None
        self._base: str | None = None
        with _live_lock:
            _live[id(self)] = self
        try:
            self._build(nodes)
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------

    def _build(self, nodes: tuple[str, ...]) -> None:
        self._pair = pair = netns.NetnsPair(mtu=CLUSTER_MTU)
        base = pair.if_a[:-2]  # the run-unique stem netns.py picked
        self.name = base
        # A private /24 unique to this run (the namespaces are isolated anyway,
        # but a unique subnet keeps captures and logs unambiguous).
        tag = (os.getpid() * 64 + next(_counter)) % 4096
        subnet = f"172.{16 + tag % 16}.{tag // 16}"
        self._base = tempfile.mkdtemp(prefix=f"{base}-cluster-")
        os.chmod(self._base, 0o755)
        namespaces = (pair.ns_a, pair.ns_b)
        cluster_ifs = (pair.if_a, pair.if_b)
        repl_ifs = (base + "ra", base + "rb")
        netns._ip("link", "add", repl_ifs[0], "index", str(REPL_IFINDEX[0]),
                  "mtu", str(self.replication_mtu), "type", "veth",
                  "peer", "name", repl_ifs[1], "index", str(REPL_IFINDEX[1]),
                  "mtu", str(self.replication_mtu), "netns", namespaces[1], ns=namespaces[0])
        for i, name in enumerate(nodes):
            node = _Node(name, i + 1, namespaces[i], cluster_ifs[i], repl_ifs[i],
                         f"{subnet}.{i + 1}", os.path.join(self._base, name))
            self._nodes[name] = node
            netns._ip("link", "set", "dev", "lo", "up", ns=node.ns)
            netns._ip("addr", "add", f"{node.addr}/24", "dev", node.cluster_if, ns=node.ns)
            netns._ip("link", "set", "dev", node.repl_if, "up", ns=node.ns)
            config.make_node_dirs(node.root)
        for node in self._nodes.values():
            self._write_config(node)

    def _write_config(self, node: _Node) -> None:
        nodes = [(n.name, n.nodeid, n.addr) for n in self._nodes.values()]
        config.write_node_files(node.root, config.corosync_conf(self.name, nodes), self._cib)

    # -- lookups -----------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    def _node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a node of this cluster {self.nodes}") from None

    def peer(self, node: str) -> str:
        """The other node."""
        self._node(node)
        return next(n for n in self._nodes if n != node)

    def nodeid(self, node: str) -> int:
        return self._node(node).nodeid

    def namespace(self, node: str) -> str:
        """The node's network namespace (``ip netns`` name)."""
        return self._node(node).ns

    def address(self, node: str) -> str:
        """The node's IPv4 address on the cluster network (corosync's ring0_addr)."""
        return self._node(node).addr

    def cluster_ifname(self, node: str) -> str:
        return self._node(node).cluster_if

    def replication_ifname(self, node: str) -> str:
        """The node's end of the dedicated replication veth pair (MTU replication_mtu)."""
        return self._node(node).repl_if

    def node_dir(self, node: str) -> str:
        """A per-node host directory for the test's files, at the same path inside the node."""
        return self._node(node).files

    def is_up(self, node: str) -> bool:
        return self._node(node).up

    # -- bringing nodes up -------------------------------------------------

    def start(self) -> None:
        """Boot every node (holder, corosync, pacemaker) and wait until they form a cluster.

        Returns once corosync answers on both nodes and (with pacemaker) both
        Pacemakers see both nodes online; resources may still be starting.
        """
        if any(n.up for n in self._nodes.values()):
            raise ClusterError("start(): already started; use boot(node) after a crash")
        self._boot(list(self._nodes.values()))

    def boot(self, node: str) -> None:
        """Power a crashed node on again: links up, holder, corosync, pacemaker.

        Returns once it is back in the cluster (see :meth:`start`).
        """
        n = self._node(node)
        if n.up:
            raise ClusterError(f"boot({node!r}): the node is running")
        self._boot([n])

    def _boot(self, nodes: list[_Node]) -> None:
        self._check_open()
        for n in nodes:
            if n.links_down:
                self._set_link(n, n.cluster_if, True)
                self._set_link(n, n.repl_if, True)
                n.links_down = False
            self._spawn_holder(n)
        for n in nodes:
            self._await_holder(n)
        for n in nodes:
            self._spawn_daemon(n, "corosync", [COROSYNC, "-f"], {})
        self.wait(lambda: all(self._corosync_answers(n) for n in nodes),
                  COROSYNC_READY_TIMEOUT_S, "corosync to answer on " + self._names(nodes))
        if self.pacemaker:
            for n in nodes:
                # Pacemaker's own log file; no syslog in a test node.
                self._spawn_daemon(n, "pacemakerd", [PACEMAKERD], {
                    "PCMK_logfacility": "none", "PCMK_logfile": config.PACEMAKER_LOG})
            up = [n.name for n in self._nodes.values() if n.up]
            self.wait(lambda: all(set(up) <= self.online(asker) for asker in up),
                      ONLINE_TIMEOUT_S, f"{', '.join(up)} online in every node's Pacemaker")
        else:
            self.wait(lambda: all(self._members(n.name) == {m.nodeid for m in self._nodes.values()
                                                          if m.up} for n in nodes),
                      COROSYNC_READY_TIMEOUT_S, "corosync membership of every running node")

    @staticmethod
    def _names(nodes) -> str:
        return ", ".join(n.name for n in nodes)

    def _spawn_holder(self, n: _Node) -> None:
        spec_path = n.state("holder.json")
        with open(spec_path, "w") as f:
            json.dump(config.holder_spec(n.root, n.name, self.binds, NODE_LIFETIME_S), f)
        with open(n.state("holder.log"), "ab") as log:
            # setpriv --pdeathsig: if this process dies, the holder (and with
            # it the whole node) gets SIGKILL; it survives the execs of ip and
            # unshare.  unshare --kill-child does the same for PID 1.
            n.holder = subprocess.Popen(
                [SETPRIV, "--pdeathsig", "KILL", "ip", "netns", "exec", n.ns,
                 UNSHARE, "--kill-child=KILL", "--pid", "--mount-proc", "--mount", "--uts",
                 "--propagation", "private",
                 sys.executable, "-S", "-E", HOLDER_PROGRAM, spec_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env={"PATH": PATH}, start_new_session=True)

    def _await_holder(self, n: _Node) -> None:
        holder = n.holder
        assert holder is not None and holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], HOLDER_READY_TIMEOUT_S)
        line = holder.stdout.readline() if ready else b""
        holder.stdout.close()
        if line.strip() != b"ready":
            self._kill_holder(n)
            raise ClusterError(f"holder of {n.name} not ready after {HOLDER_READY_TIMEOUT_S}s "
                               f"(got {line!r}):\n{_tail(n.state('holder.log'))}")
        # unshare (our child, exec'd by setpriv and ip) forked PID 1.
        children = _child_pids(holder.pid)
        if len(children) != 1:
            self._kill_holder(n)
            raise ClusterError(f"holder of {n.name}: expected one PID 1, found {children}")
        n.pid1 = children[0]

    def _spawn_daemon(self, n: _Node, name: str, argv: list[str], env: dict) -> None:
        log_dir = n.state("log-pacemaker" if name.startswith("pacemaker") else "log-corosync")
        with open(os.path.join(log_dir, f"{name}.stdout"), "ab") as out:
            self.popen(n.name, argv, stdin=subprocess.DEVNULL, stdout=out,
                       stderr=subprocess.STDOUT, env={"PATH": PATH, "LC_ALL": "C", **env},
                       inherit_env=False)

    def _corosync_answers(self, n: _Node) -> bool:
        return self.run(n.name, [COROSYNC_CFGTOOL, "-s"], check=False, timeout=5).returncode == 0

    def _members(self, node: str) -> set[int]:
        """Nodeids in ``node``'s corosync membership (from corosync-cmapctl)."""
        out = self.run(node, [COROSYNC_CMAPCTL, "-b", "runtime.members"],
                       check=False, timeout=5).stdout
        members = set()
        for line in out.splitlines():
            # runtime.members.2.status (str) = joined
            parts = line.split(".")
            if len(parts) > 3 and parts[3].startswith("status") and line.endswith("= joined"):
                members.add(int(parts[2]))
        return members

    # -- running things on a node -----------------------------------------

    def _nsenter(self, n: _Node) -> list[str]:
        if n.pid1 is None:
            raise ClusterError(f"node {n.name} is not running (crashed or not started)")
        return [NSENTER, "-t", str(n.pid1), "-m", "-n", "-u", "-p", "--"]

    def popen(self, node: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              inherit_env: bool = True, **popen_kw) -> NodeProcess:
        """Start ``argv`` inside ``node``; it dies with the node (crash/close).

        ``env`` entries are added to this process's environment (or, with
        ``inherit_env=False``, are the whole environment).  Other keywords go
        to Popen; the command gets its own session.
        """
        self._check_open()
        n = self._node(node)
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update(env or {})
        popen_kw.setdefault("start_new_session", True)
        proc = NodeProcess([*self._nsenter(n), *argv], env=full_env, **popen_kw)
        proc.node = node
        n.procs = [p for p in n.procs if p.poll() is None]
        n.procs.append(proc)
        return proc

    def run(self, node: str, argv: Sequence[str], *, check: bool = True,
            timeout: float = RUN_TIMEOUT_S, env: Mapping[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion inside ``node``; text output captured.

        On timeout the command is killed (inside the node, by PID) and
        TimeoutExpired raised; with ``check`` a non-zero exit raises
        :class:`ClusterCommandError`.
        """
        proc = self.popen(node, argv, env=env, text=True,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=KILL_REAP_S)
            raise
        if check and proc.returncode != 0:
            raise ClusterCommandError(node, proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    # -- faults ------------------------------------------------------------

    def crash(self, node: str, *, links_down: bool = True) -> None:
        """Power ``node`` off: SIGKILL its PID 1 (the kernel kills the whole PID
        namespace), then with ``links_down`` set its ends of both veth pairs down
        so the peer sees carrier loss, as when a real box loses power."""
        n = self._node(node)
        if not n.up:
            raise ClusterError(f"crash({node!r}): the node is not running")
        self._kill_holder(n)
        if links_down:
            self._set_link(n, n.cluster_if, False)
            self._set_link(n, n.repl_if, False)
            n.links_down = True

    def _kill_holder(self, n: _Node) -> None:
        """SIGKILL PID 1; reap the holder and every nsenter of the node.

        Only PID 1 is killed: unshare, its parent, must live to reap it.  Killed
        first, it would leave PID 1 to the machine's init, which here (no
        systemd) does not reap: a zombie per crash.
        """
        pids = [n.pid1] if n.pid1 is not None else []
        if not pids and n.holder is not None and n.holder.poll() is None:
            pids = _child_pids(n.holder.pid)  # a holder that failed before "ready"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if n.holder is not None:
            try:
                n.holder.wait(timeout=KILL_REAP_S)
            except subprocess.TimeoutExpired:  # not expected: do not hang the suite
                n.holder.kill()
                n.holder.wait(timeout=KILL_REAP_S)
        # Every command of the node died with its PID namespace; nsenter follows.
        for proc in n.procs:
            try:
                proc.wait(timeout=KILL_REAP_S)
            except subprocess.TimeoutExpired:  # not expected: report, do not hang
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=KILL_REAP_S)
        n.procs.clear()
        n.holder = None
        n.pid1 = None

    def set_replication_link(self, node: str, up: bool) -> None:
        """Cut or restore only the node's end of the replication link."""
        n = self._node(node)
        self._set_link(n, n.repl_if, up)

    def set_cluster_link(self, node: str, up: bool) -> None:
        """Cut or restore only the node's end of the cluster network."""
        n = self._node(node)
        self._set_link(n, n.cluster_if, up)

    @staticmethod
    def _set_link(n: _Node, ifname: str, up: bool) -> None:
        netns._ip("link", "set", "dev", ifname, "up" if up else "down", ns=n.ns)

    # -- observing ---------------------------------------------------------

    def crm_mon(self, node: str) -> dict[str, Any]:
        """``node``'s Pacemaker view: ``crm_mon --output-as=xml``, see :func:`parse_crm_mon`."""
        return parse_crm_mon(self.run(node, [CRM_MON, "-1", "--output-as=xml", "--inactive"],
                                      timeout=10).stdout)

    def online(self, node_asking: str) -> set[str]:
        """Nodes ``node_asking``'s Pacemaker sees online."""
        return {name for name, st in self.crm_mon(node_asking)["nodes"].items() if st["online"]}

    def roles(self, node_asking: str, resource_id: str) -> dict[str, str]:
        """{node: role} of a resource (clone or primitive id) as ``node_asking`` sees it."""
        return dict(self.crm_mon(node_asking)["resources"].get(resource_id, {}))

    def promoted(self, node_asking: str, resource_id: str) -> list[str]:
        """Sorted nodes where ``resource_id`` is promoted, as ``node_asking`` sees it."""
        return sorted(node for node, role in self.roles(node_asking, resource_id).items()
                      if role in ("Promoted", "Master"))

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = POLL_S) -> Any:
        """Poll ``predicate`` until it returns a truthy value, which is returned.

        Exceptions from the predicate count as "not yet" (a node still booting
        refuses crm_mon).  On timeout raise AssertionError naming ``what``,
        the last value or error, and :meth:`diagnostics`.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except Exception as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                     f"last: {last!r}\n{self.diagnostics()}")
            time.sleep(interval)

    def logs(self, node: str, lines: int = LOG_TAIL_LINES) -> str:
        """Tails of the node's corosync and pacemaker logs (for failure messages)."""
        n = self._node(node)
        parts = []
        for label, path in (
            ("holder", n.state("holder.log")),
            ("corosync stdout", os.path.join(n.state("log-corosync"), "corosync.stdout")),
            ("corosync.log", os.path.join(n.state("log-corosync"), "corosync.log")),
            ("pacemakerd stdout", os.path.join(n.state("log-pacemaker"), "pacemakerd.stdout")),
            ("pacemaker.log", os.path.join(n.state("log-pacemaker"), "pacemaker.log")),
        ):
            if os.path.exists(path):
                parts.append(f"--- {node} {label} ({path}):\n{_tail(path, lines)}")
        return "\n".join(parts)

    def diagnostics(self) -> str:
        """crm_mon of every running node and every node's log tails."""
        parts = []
        for name, n in self._nodes.items():
            if n.up and self.pacemaker:
                try:
                    out = self.run(name, [CRM_MON, "-1", "-r", "-f"], check=False,
                                   timeout=10).stdout
                except Exception as exc:
                    out = repr(exc)
                parts.append(f"--- crm_mon on {name}:\n{out}")
            elif not n.up:
                parts.append(f"--- {name} is down")
            parts.append(self.logs(name))
        return "\n".join(parts)

    # -- teardown ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError("the cluster is closed")

    def close(self) -> None:
        """Kill every node, delete namespaces and directories (idempotent).

        Every step is attempted even if one fails; the first error is raised.
        """
        if self._closed:
            return
        self._closed = True
        first: Exception | None = None
        for n in self._nodes.values():
            try:
                self._kill_holder(n)
            except Exception as exc:
                first = first or exc
        try:
            if self._pair is not None:
                self._pair.close()
        except Exception as exc:
            first = first or exc
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
        with _live_lock:
            _live.pop(id(self), None)
        if first is not None:
            raise first

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name}({n.ns}, {'up' if n.up else 'down'})"
                          for n in self._nodes.values())
        return f"Cluster({self.name}: {nodes})"
