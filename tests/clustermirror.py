"""A mirrord resource on a test cluster (tests/cluster.py): one daemon per node, the
nodes' replication veth pair as the dedicated link, the same config file for both.

    c = cluster(pacemaker=False)
    m = ClusterMirror(c, shared_dir)          # writes r0.toml, disks, create-md
    m.start_all(); m.ctl("alpha", "primary", "--force"); m.wait_connected()

The config lives in a host directory both nodes see at one path (a Pacemaker clone has
one `config` parameter); disks, metadata and sockets in each node's own directory, so a
crashed node's files persist like a real disk.  Daemons started here run inside their
node (they die with it); `ctl` runs mirrorctl inside the node too, as an operator would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from mirrorpair import REPO, files_equal, in_sync, mirrorctl_argv

ENV = {"PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}


class ClusterMirror:
    def __init__(self, c, config_dir: str, *, size: int = 16 << 20, resource: str = "r0",
                 extra_resource: str = "", log_dir: str | None = None) -> None:
        self.c = c
        self.size = size
        self.resource = resource
        self.config = os.path.join(config_dir, f"{resource}.toml")
        self.procs: dict[str, subprocess.Popen] = {}
        self.paths: dict[str, dict[str, str]] = {}
        lines = ["[resource]", f'name = "{resource}"', 'protocol = "C"', extra_resource, ""]
        for node in c.nodes:
            files = c.node_dir(node)
            self.paths[node] = {
                "disk": f"{files}/{resource}.img", "metadata": f"{files}/{resource}.meta",
                "nbd_socket": f"{files}/{resource}.nbd",
                "control_socket": f"{files}/{resource}.ctl",
                "log": f"{files}/{resource}.log",
            }
            with open(self.paths[node]["disk"], "wb") as f:
                f.truncate(size)
            lines.append(f"[nodes.{node}]")
            lines.append(f'interface = "{c.replication_ifname(node)}"')
            for key in ("disk", "metadata", "nbd_socket", "control_socket"):
                lines.append(f'{key} = "{self.paths[node][key]}"')
            lines.append("")
        with open(self.config, "w") as f:
            f.write("\n".join(lines))
        for node in c.nodes:
            subprocess.run(mirrorctl_argv("--config", self.config, "--node", node, "create-md"),
                           check=True, capture_output=True, timeout=30, cwd=REPO)

    # --- daemons ------------------------------------------------------------------

    def start(self, node: str, wait: bool = True) -> subprocess.Popen:
        log = open(self.paths[node]["log"], "a")
        proc = self.c.popen(node, [sys.executable, "-m", "mirrord.daemon", "--config",
                                   self.config, "--node", node], env=ENV,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[node] = proc
        if wait:
            self.wait(node, lambda s: True, 20, "the control socket answers")
        return proc

    def start_all(self) -> None:
        for node in self.c.nodes:
            self.start(node, wait=False)
        for node in self.c.nodes:
            self.wait(node, lambda s: True, 20, "the control socket answers")

    def kill(self, node: str) -> None:
        proc = self.procs.pop(node)
        proc.kill()
        proc.wait(10)

    # --- control -------------------------------------------------------------------

    def ctl(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """mirrorctl inside the node (its hostname picks its section of the config)."""
        proc = self.c.run(node, [sys.executable, "-m", "mirrord.mirrorctl", "--config",
                                 self.config, *args], env=ENV, check=False, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"mirrorctl {' '.join(args)} on {node} exited "
                                 f"{proc.returncode}: {proc.stderr}\n{self.logs()}")
        return proc

    def status(self, node: str) -> dict | None:
        if not self.c.is_up(node):
            return None
        proc = self.ctl(node, "status", "--json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def wait(self, node: str, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status(node)
            if last is not None and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"{node}: not within {timeout} s: {what}; last status {last}\n"
                             f"{self.logs()}")

    def wait_connected(self, timeout: float = 30) -> None:
        for node in self.c.nodes:
            self.wait(node, in_sync, timeout, "connected, both disks up to date")

    def uri(self, node: str) -> str:
        """The export, reachable from the host too (a unix socket in the node's dir)."""
        return f"nbd+unix:///{self.resource}?socket={self.paths[node]['nbd_socket']}"

    def disks_equal(self) -> bool:
        a, b = self.c.nodes
        return files_equal(self.paths[a]["disk"], self.paths[b]["disk"])

    def log(self, node: str) -> str:
        try:
            with open(self.paths[node]["log"]) as f:
                return f.read()
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- {n} mirrord log ---\n{self.log(n)[-6000:]}" for n in self.c.nodes)


# --- under Pacemaker: ocf:mirrord:mirrord as a promotable clone ------------------------

CLONE, PRIMITIVE = "mirrord-r0-clone", "mirrord-r0"  # as in deploy/pacemaker/r0-clone.xml
DAEMON_LOG = "/run/mirrord/r0.log"  # inside each node: its own /run (tmpfs)
CRM_ATTRIBUTE = "/usr/sbin/crm_attribute"
CRM_RESOURCE = "/usr/sbin/crm_resource"
CIBADMIN = "/usr/sbin/cibadmin"
SETTLE_S = 30.0  # start, monitors (3 s / 4 s here) and a transition
# The documented monitors (10 s promoted, 20 s unpromoted), shorter here so that the
# tests see a change sooner; everything else is deploy/pacemaker/r0-clone.xml as it is.
TEST_MONITORS = {"Promoted": "3s", "Unpromoted": "4s"}


def clone_xml(config: str) -> str:
    """deploy/pacemaker/r0-clone.xml for this resource file (and a daemon log file)."""
    import xml.etree.ElementTree as ET

    with open(os.path.join(REPO, "deploy", "pacemaker", "r0-clone.xml")) as f:
        clone = ET.fromstring(f.read())
    params = clone.find("primitive/instance_attributes")
    for nvpair in params.iter("nvpair"):
        if nvpair.get("name") == "config":
            nvpair.set("value", config)
    ET.SubElement(params, "nvpair", id=f"{PRIMITIVE}-log_file", name="log_file",
                  value=DAEMON_LOG)
    for op in clone.iter("op"):
        if op.get("name") == "monitor":
            op.set("interval", TEST_MONITORS[op.get("role")])
    return ET.tostring(clone, encoding="unicode")


def install_agent(dest: str) -> None:
    """deploy/install.sh --agent-only into `dest` (bind-mounted over
    /usr/lib/ocf/resource.d/mirrord in the nodes), running this checkout."""
    os.chmod(dest, 0o755)
    subprocess.run(["sh", os.path.join(REPO, "deploy", "install.sh"), "--agent-only",
                    "--dest", dest, "--source-tree"], check=True, capture_output=True,
                   timeout=60)


CRM_FENCE = (f'fence_peer = "{sys.executable} -m ha.crm_fence fence"\n'
             f'unfence_peer = "{sys.executable} -m ha.crm_fence unfence"')


class PacemakerMirror(ClusterMirror):
    """The resource run by Pacemaker through the agent (daemons started by it)."""

    def log(self, node: str) -> str:
        if not self.c.is_up(node):
            return "(node down)"
        proc = self.c.run(node, ["/usr/bin/tail", "-n", "60", DAEMON_LOG], check=False)
        return proc.stdout + proc.stderr + "\n--- its agent's actions (pacemaker.log) ---\n" \
            + self.agent_log(node)

    def agent_log(self, node: str, lines: int = 40) -> str:
        """The last lines of pacemaker.log about the agent: what it said and each action's
        result, which says why Pacemaker recovered or moved the resource."""
        try:
            text = self.pacemaker_log(node)
        except OSError as err:
            return f"(pacemaker.log: {err})"
        about = [line for line in text.splitlines()
                 if "mirrord(" in line or "ocf-exit-reason" in line
                 or ("Result of" in line and PRIMITIVE in line)]
        return "\n".join(about[-lines:])

    def score(self, node: str) -> str:
        proc = self.c.run(node, [CRM_ATTRIBUTE, f"--promotion={PRIMITIVE}", "--node", node,
                                 "-G", "-q"], check=False, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def pacemaker_log(self, node: str) -> str:
        with open(os.path.join(self.c.node_dir(node), "..", "log-pacemaker", "pacemaker.log"),
                  errors="replace") as f:
            return f.read()

    def maintenance(self, on: bool) -> None:
        """The clone's maintenance flag, then `crm_resource --wait` as the README does:
        the CIB changes at once, but a monitor already running or due before the
        controller cancels it still reports.  One that saw the forced primary would be
        taken for a promotion once the flag is off (and recovered by a restart)."""
        node = self.c.nodes[0]
        self.c.run(node, [CRM_RESOURCE, "--resource", CLONE, "--meta", "--set-parameter",
                          "maintenance", "--parameter-value", "true" if on else "false"])
        self.c.run(node, [CRM_RESOURCE, "--wait", f"--timeout={SETTLE_S:g}s"],
                   timeout=SETTLE_S + 10)

    def fence_constraint(self, node: str) -> bool:
        """Whether node's CIB holds the fence handler's constraint."""
        import xml.etree.ElementTree as ET

        proc = self.c.run(node, [CIBADMIN, "--query", "--scope", "constraints"])
        return any(e.get("id") == f"mirrord-fence-{self.resource}"
                   for e in ET.fromstring(proc.stdout).iter("rsc_location"))

    def promoted(self, asking: str) -> list[str]:
        return self.c.promoted(asking, CLONE)

    def daemon_pid(self, node: str) -> int:
        """The daemon's PID as this (the host's) PID namespace sees it."""
        from mirrord.control import ControlClient

        with ControlClient(self.paths[node]["control_socket"], timeout=10) as client:
            client.request("status")
            pid = client.peer_pid()
        assert pid, f"no PID for {node}'s daemon"
        return pid


def bring_up(cluster, agent_dir: str, config_dir: str, *, size: int = 16 << 20,
             extra_resource: str = "", hold_s: float = 0.0):
    """A cluster running the clone, after the documented first promotion: (m, promoted,
    other).  Fresh disks are never promoted (checked for `hold_s` seconds)."""
    install_agent(agent_dir)
    c = cluster(start=False, resources_xml=clone_xml(os.path.join(config_dir, "r0.toml")),
                binds={agent_dir: "/usr/lib/ocf/resource.d/mirrord"})
    m = PacemakerMirror(c, config_dir, size=size, extra_resource=extra_resource)
    c.start()
    c.wait(lambda: c.roles(c.nodes[0], CLONE) == {n: "Unpromoted" for n in c.nodes},
           SETTLE_S, "both instances started, unpromoted")
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        assert m.promoted(c.nodes[0]) == [], m.logs()
        time.sleep(0.5)
    assert m.score(c.nodes[0]) == m.score(c.nodes[1]) == ""
    # The initial sync, by hand, with the clone in maintenance (its monitors paused):
    # deploy/pacemaker/README.md, "First promotion".
    m.maintenance(True)
    m.ctl(c.nodes[0], "primary", "--force")
    m.wait_connected(timeout=SETTLE_S)
    m.ctl(c.nodes[0], "secondary")
    m.maintenance(False)
    (promoted,) = c.wait(lambda: m.promoted(c.nodes[0]) or None, SETTLE_S,
                         "one node promoted by its score")
    other = c.peer(promoted)
    c.wait(lambda: m.score(promoted) == m.score(other) == "10000", SETTLE_S,
           "both scores 10000: up to date and connected")
    m.wait(promoted, lambda s: s["role"] == "primary", 10, "the daemon is primary")
    return m, promoted, other


class AckedWriter:
    """A client on the host writing numbered 4 KiB blocks (FUA) into [start, end) of an
    export until it fails or is stopped; `acknowledged` lists the blocks whose write
    completed.  Block i holds its number repeated, so a check needs no copy."""

    def __init__(self, uri: str, start: int, end: int) -> None:
        import threading

        import nbdclient

        self.nbd = nbdclient.load()
        self.handle = self.nbd.NBD()
        self.handle.connect_uri(uri)
        self.start, self.blocks = start, (end - start) // 4096
        self.acknowledged: list[int] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def payload(i: int) -> bytes:
        return i.to_bytes(8, "big") * 512

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                n = i % self.blocks
                self.handle.pwrite(self.payload(i), self.start + n * 4096,
                                   self.nbd.CMD_FLAG_FUA)
                self.acknowledged.append(i)
                i += 1
        except Exception as exc:  # noqa: BLE001 - the server goes away under it
            self.error = exc

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        try:
            self.handle.shutdown()
        except Exception:  # noqa: BLE001 - already broken: nothing to close cleanly
            pass

    def missing_on(self, disk: str) -> list[int]:
        """Acknowledged writes not on `disk` (the latest write of each block counts;
        the one write in flight when the server went away may have landed over it)."""
        latest: dict[int, int] = {}
        for i in self.acknowledged:
            latest[i % self.blocks] = i
        in_flight = self.acknowledged[-1] + 1 if self.acknowledged else 0
        missing = []
        with open(disk, "rb") as f:
            for n, i in latest.items():
                f.seek(self.start + n * 4096)
                data = f.read(4096)
                if data != self.payload(i) and not (
                        in_flight % self.blocks == n and data == self.payload(in_flight)):
                    missing.append(i)
        return missing
