"""The installed OCF agent (deploy/install.sh --agent-only into a temporary directory)
against real daemons in network namespaces, with the environment Pacemaker gives an
agent: a minimal PATH and only OCF variables (the wrapper names its own Python).

Every action's exit code, the promotion refused for a fresh disk (the agent never
forces), a hung daemon, and resource-agents' `ocf-tester`.  There is no cluster here:
crm_attribute fails to reach a CIB, which the agent must log and survive.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import pytest

from mirrorpair import REPO
from test_updown import detached, gone  # noqa: F401  (detached is a fixture)

pytestmark = pytest.mark.netns

OCF_ROOT = "/usr/lib/ocf"
RA_DIR = "/usr/share/resource-agents"  # ra-api-1.dtd and metadata.rng
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what Pacemaker's executor gives an agent
OCF = {"SUCCESS": 0, "ERR_GENERIC": 1, "ERR_UNIMPLEMENTED": 3, "ERR_INSTALLED": 5,
       "ERR_CONFIGURED": 6, "NOT_RUNNING": 7, "RUNNING_PROMOTED": 8}


@pytest.fixture(scope="module")
def agent():
    """The agent as install.sh installs it, in a directory anyone may enter (ocf-tester
    runs meta-data as nobody)."""
    dest = tempfile.mkdtemp(prefix="mirrord-ocf-", dir="/tmp")
    os.chmod(dest, 0o755)
    try:
        subprocess.run(["sh", os.path.join(REPO, "deploy", "install.sh"), "--agent-only",
                        "--dest", dest, "--source-tree"], check=True, capture_output=True,
                       timeout=60)
        yield os.path.join(dest, "mirrord")
    finally:
        shutil.rmtree(dest, ignore_errors=True)


class Agent:
    """Runs the agent for one node of a Detached pair, as Pacemaker would."""

    def __init__(self, path: str, d, node: str) -> None:
        self.path, self.d, self.node = path, d, node

    def env(self, **params: str) -> dict[str, str]:
        env = {"PATH": PATH, "OCF_ROOT": OCF_ROOT, "OCF_RESOURCE_INSTANCE": "mirrord-r0",
               "OCF_RESKEY_CRM_meta_timeout": "60000", "OCF_RESKEY_CRM_meta_interval": "0",
               "OCF_RESKEY_config": self.d.pair.config, "OCF_RESKEY_node": self.node,
               "OCF_RESKEY_log_file": self.d.log_file(self.node)}
        for key, value in params.items():
            name = key if key.startswith("OCF_") else f"OCF_RESKEY_{key}"
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def __call__(self, action: str, **params) -> subprocess.CompletedProcess:
        return self.d.run(self.node, [self.path, action], env=self.env(**params), timeout=90)

    def expect(self, action: str, code: int, **params) -> subprocess.CompletedProcess:
        proc = self(action, **params)
        assert proc.returncode == code, (f"{action}: exit {proc.returncode}, expected {code}"
                                         f"\n{proc.stderr}\n{self.d.pair.logs_text()}")
        return proc


def exit_reason(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ocf-exit-reason:")]
    assert len(lines) == 1, proc.stderr
    return lines[0].removeprefix("ocf-exit-reason:")


def synced_pair(detached, agent_path):  # noqa: F811
    """Both daemons up, alpha up to date (forced once, by hand, as with DRBD's initial
    sync), beta resynced from it; then alpha secondary again and stopped: what the agent
    takes over on alpha."""
    d = detached()
    for node in ("alpha", "beta"):
        assert d.up(node).returncode == 0
    assert d.ctl("alpha", "primary", "--force").returncode == 0
    d.pair.wait_connected(timeout=60)
    assert d.ctl("alpha", "secondary").returncode == 0
    assert d.ctl("alpha", "down").returncode == 0
    return d, Agent(agent_path, d, "alpha")


# -- meta-data ------------------------------------------------------------------------------

def test_meta_data_is_valid_ocf_1_1(agent):
    proc = subprocess.run([agent, "meta-data"], capture_output=True, text=True, timeout=30,
                          env={"PATH": PATH})
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring(proc.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "mirrord"
    assert root.findtext("version") == "1.1"
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert set(params) == {"config", "node", "log_file", "mirrorctl"}
    assert (params["config"].get("required"), params["config"].get("unique")) == ("1", "1")
    assert all(params[p].get("required") == "0" for p in ("node", "log_file", "mirrorctl"))
    actions = [a.attrib for a in root.iter("action")]
    assert {a["name"] for a in actions} == {"start", "stop", "promote", "demote", "notify",
                                            "monitor", "meta-data", "validate-all"}
    assert all(a["timeout"].endswith("s") for a in actions)
    monitors = {a["role"]: a for a in actions if a["name"] == "monitor"}
    assert set(monitors) == {"Promoted", "Unpromoted"}
    assert monitors["Promoted"]["interval"] != monitors["Unpromoted"]["interval"]
    assert all(m["depth"] == "0" for m in monitors.values())

    if shutil.which("xmllint") is None:
        pytest.skip("xmllint not installed (libxml2-utils): cannot check the grammars")
    for lint in (["--valid"], ["--relaxng", os.path.join(RA_DIR, "metadata.rng")]):
        check = subprocess.run(["xmllint", "--noout", *lint, "-"], input=proc.stdout,
                               capture_output=True, text=True, cwd=RA_DIR, timeout=30)
        assert check.returncode == 0, (lint, check.stderr)


def test_meta_data_without_the_interpreter(agent, tmp_path):
    # As nobody (who cannot enter /root, where pyenv's Python lives) or with the Python
    # gone, meta-data still works from the copy made at install time; the rest says 5.
    expected = subprocess.run([agent, "meta-data"], capture_output=True, text=True,
                              timeout=30).stdout
    broken = tmp_path / "mirrord"
    with open(agent) as f:
        text = f.read()
    broken.write_text(text.replace("PYTHON='", "PYTHON='/nonexistent", 1))
    broken.chmod(0o755)
    proc = subprocess.run([str(broken), "meta-data"], capture_output=True, text=True,
                          timeout=30, env={"PATH": PATH})
    assert proc.returncode == 0 and proc.stdout == expected
    for action in ("start", "monitor", "validate-all"):
        proc = subprocess.run([str(broken), action], capture_output=True, text=True,
                              timeout=30, env={"PATH": PATH})
        assert proc.returncode == OCF["ERR_INSTALLED"]
        assert "is missing or not executable" in exit_reason(proc)
    if os.geteuid() == 0 and shutil.which("su"):
        proc = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"{agent} meta-data"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout == expected, proc.stderr


# -- validate-all -----------------------------------------------------------------------

def test_validate_all(detached, agent):  # noqa: F811
    d = detached()
    a = Agent(agent, d, "alpha")
    a.expect("validate-all", OCF["SUCCESS"])

    bad = os.path.join(d.pair.workdir, "bad.toml")
    with open(d.pair.config) as f:
        text = f.read()
    with open(bad, "w") as f:
        f.write(text.replace('protocol = "C"', 'protocol = "Z"'))
    proc = a.expect("validate-all", OCF["ERR_CONFIGURED"], config=bad)
    assert exit_reason(proc).startswith(f"validate-all: {bad}: resource.protocol: ")

    proc = a.expect("validate-all", OCF["ERR_CONFIGURED"], config="/nonexistent/r0.toml")
    assert "cannot read" in exit_reason(proc)
    proc = a.expect("validate-all", OCF["ERR_CONFIGURED"], config=None)
    assert exit_reason(proc) == "the config parameter is required (the resource's TOML file)"
    proc = a.expect("validate-all", OCF["ERR_INSTALLED"], mirrorctl="/nonexistent/mirrorctl")
    assert "'/nonexistent/mirrorctl' not found" in exit_reason(proc)
    # An explicit mirrorctl command is honoured.
    a.expect("validate-all", OCF["SUCCESS"], mirrorctl=f"{sys.executable} -m mirrord.mirrorctl")


# -- every action -------------------------------------------------------------------------

def test_every_action(detached, agent):  # noqa: F811
    d = detached()
    a = Agent(agent, d, "alpha")
    # Probes before the daemon ever ran, then a recurring monitor.
    a.expect("monitor", OCF["NOT_RUNNING"])
    a.expect("monitor", OCF["NOT_RUNNING"], CRM_meta_interval="20000")
    assert d.up("beta").returncode == 0

    proc = a.expect("start", OCF["SUCCESS"])
    # No cluster here: the score is not recorded, and that is only a warning.
    assert "WARNING: not in a cluster, cannot read the promotion score" in proc.stderr
    assert "ocf-exit-reason" not in proc.stderr
    pid = d.pid("alpha")
    assert pid is not None and os.getsid(pid) == pid  # detached from the agent
    a.expect("monitor", OCF["SUCCESS"], CRM_meta_interval="20000")

    # A fresh disk is inconsistent: the agent never forces, so promotion is refused...
    proc = a.expect("promote", OCF["ERR_GENERIC"])
    assert exit_reason(proc).startswith("promote: refused: the disk of alpha is inconsistent")
    a.expect("monitor", OCF["SUCCESS"])
    # ...until an operator forces the first one (DRBD's initial sync); then, demoted by
    # hand, the agent can promote it.
    assert d.ctl("alpha", "primary", "--force").returncode == 0
    d.pair.wait_connected(timeout=60)
    assert d.ctl("alpha", "secondary").returncode == 0

    a.expect("promote", OCF["SUCCESS"])
    a.expect("monitor", OCF["RUNNING_PROMOTED"], CRM_meta_interval="10000")
    a.expect("monitor", OCF["RUNNING_PROMOTED"])  # a probe says the same
    a.expect("promote", OCF["SUCCESS"])  # already promoted
    a.expect("notify", OCF["SUCCESS"], CRM_meta_notify_type="post",
             CRM_meta_notify_operation="promote")
    a.expect("demote", OCF["SUCCESS"])
    a.expect("monitor", OCF["SUCCESS"])
    a.expect("demote", OCF["SUCCESS"])  # already demoted

    # The peer cannot be promoted while alpha is: the daemon says why.
    b = Agent(agent, d, "beta")
    a.expect("promote", OCF["SUCCESS"])
    proc = b.expect("promote", OCF["ERR_GENERIC"])
    assert exit_reason(proc) == ("promote: refused: the peer alpha is primary; what to do: "
                                 "demote it first: mirrorctl secondary on alpha")

    # Stop while promoted: demotes, then stops; the process is gone.
    a.expect("stop", OCF["SUCCESS"])
    assert gone(pid)
    a.expect("monitor", OCF["NOT_RUNNING"])
    a.expect("monitor", OCF["NOT_RUNNING"], CRM_meta_interval="20000")
    a.expect("stop", OCF["SUCCESS"])  # stopping a stopped resource
    a.expect("promote", OCF["NOT_RUNNING"])
    a.expect("demote", OCF["NOT_RUNNING"])
    a.expect("notify", OCF["SUCCESS"])

    a.expect("migrate_to", OCF["ERR_UNIMPLEMENTED"])
    a.expect("frobnicate", OCF["ERR_UNIMPLEMENTED"])
    a.expect("start", OCF["ERR_CONFIGURED"], config=None)

    # A start that cannot work on this node says why, from the daemon's log; it is
    # this node's problem (5), not the cluster's (6: Pacemaker would stop the resource
    # on the peer too).
    os.unlink(d.pair.paths["alpha"]["metadata"])
    proc = a.expect("start", OCF["ERR_INSTALLED"])
    assert "mirrord exited at start with status 2" in exit_reason(proc)
    broken = os.path.join(d.pair.workdir, "broken.toml")
    with open(broken, "w") as f:
        f.write("[resource\n")
    proc = a.expect("start", OCF["ERR_INSTALLED"], config=broken)
    assert "TOML syntax error" in exit_reason(proc)
    a.expect("monitor", OCF["ERR_INSTALLED"], config=broken, CRM_meta_interval="20000")
    a.expect("monitor", OCF["NOT_RUNNING"], config="/nonexistent/r0.toml")  # a probe


def test_monitor_of_a_hung_daemon_is_a_generic_error(detached, agent):  # noqa: F811
    d = detached()
    a = Agent(agent, d, "alpha")
    a.expect("start", OCF["SUCCESS"])
    pid = d.pid("alpha")
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        proc = a.expect("monitor", OCF["ERR_GENERIC"], CRM_meta_timeout="4000",
                        CRM_meta_interval="20000")
        assert time.monotonic() - began < 4.0  # within the operation's timeout
        assert "no reply within" in exit_reason(proc)
    finally:
        os.kill(pid, signal.SIGCONT)
    a.expect("monitor", OCF["SUCCESS"])
    a.expect("stop", OCF["SUCCESS"])
    assert gone(pid)


def test_ocf_tester_passes(detached, agent):  # noqa: F811
    tester = shutil.which("ocf-tester", path=PATH)
    if tester is None:
        pytest.skip("ocf-tester not installed (resource-agents)")
    if shutil.which("xmllint", path=PATH) is None:
        pytest.skip("xmllint not installed (libxml2-utils): ocf-tester needs it")
    d, a = synced_pair(detached, agent)
    # ocf-tester starts, promotes, demotes and stops the resource itself (without
    # --force: alpha is up to date, beta secondary).
    proc = d.run("alpha", [tester, "-n", "mirrord-r0", "-o", f"config={d.pair.config}",
                           "-o", "node=alpha", "-o", f"log_file={d.log_file('alpha')}",
                           agent], env={"PATH": PATH}, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{d.pair.logs_text()}"
    assert f"{agent} passed all tests" in proc.stdout
    assert d.pid("alpha") is None  # it ends stopped


# -- install.sh -------------------------------------------------------------------------

def test_install_into_a_root_is_complete_and_idempotent(tmp_path):
    root = tmp_path / "root"
    (root / "etc" / "systemd").mkdir(parents=True)
    argv = ["sh", os.path.join(REPO, "deploy", "install.sh"), "--root", str(root),
            "--source-tree", "--python", "python3"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    agent = root / "usr/lib/ocf/resource.d/mirrord/mirrord"
    handler = root / "usr/lib/mirrord/crm-fence"
    unit = root / "etc/systemd/system/mirrord@.service"
    files = {p: p.read_bytes() for p in (agent, handler, unit)}
    assert oct(agent.stat().st_mode & 0o777) == oct(handler.stat().st_mode & 0o777) == "0o755"
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    # The interpreter is named by its real path (sys.executable, not a pyenv shim or
    # whatever python3 is on PATH), in every wrapper.
    python = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isabs(python) and "/shims/" not in python
    assert f"PYTHON='{python}'" in files[agent].decode()
    assert f"exec '{python}' -P -m ha.crm_fence" in files[handler].decode()
    text = files[unit].decode()
    assert "ExecStart=/usr/local/bin/mirrord" not in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("-P -m mirrord.daemon --config /etc/mirrord/%i.toml")
    assert f"Environment=PYTHONPATH={REPO}" in text

    # The installed handler and agent run with Pacemaker's plain environment.
    proc = subprocess.run([str(handler), "--help"], capture_output=True, text=True,
                          timeout=30, env={"PATH": PATH}, cwd="/")
    assert proc.returncode == 0 and "fence" in proc.stdout, proc.stderr
    proc = subprocess.run([str(agent), "meta-data"], capture_output=True, text=True,
                          timeout=30, env={"PATH": PATH}, cwd="/")
    assert proc.returncode == 0 and "<resource-agent" in proc.stdout

    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert {p: p.read_bytes() for p in files} == files
    assert not list(root.rglob("*.new"))  # no half-written file left behind


def test_install_refuses_bad_options(tmp_path):
    script = os.path.join(REPO, "deploy", "install.sh")
    for argv, words in ((["--dest", str(tmp_path)], "--dest goes with --agent-only"),
                        (["--frobnicate"], "unknown option --frobnicate"),
                        (["--agent-only", "--dest", str(tmp_path), "--python",
                          "/nonexistent/python3"], "no /nonexistent/python3")):
        proc = subprocess.run(["sh", script, *argv], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, (argv, proc.stderr)
