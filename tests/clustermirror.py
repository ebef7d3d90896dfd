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

from mirrorpair import REPO, files_equal, mirrorctl_argv

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
            self.wait(node, lambda s: s["connection"] == "connected"
                      and s["disk"] == "up-to-date" and s["peer"] is not None
                      and s["peer"]["disk"] == "up-to-date", timeout,
                      "connected, both disks up to date")

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
