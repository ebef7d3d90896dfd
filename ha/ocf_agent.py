"""The OCF resource agent for mirrord, a Pacemaker promotable clone.

    python3 -m ha.ocf_agent start|stop|promote|demote|monitor|notify|validate-all|meta-data

Installed as /usr/lib/ocf/resource.d/mirrord/mirrord (class ocf, provider mirrord, type
mirrord) by deploy/install.sh, which bakes in the Python that has this package.

Strategy
--------
The agent holds no state and no daemon internals.  It drives the daemon only by running
`mirrorctl` (as DRBD's agent runs drbdadm), and Pacemaker only through crm_attribute:

    start     mirrorctl up, then status; set the promotion score
    stop      if primary: mirrorctl secondary; then mirrorctl down (not running: done)
    promote   mirrorctl primary (never --force); refused -> OCF_ERR_GENERIC, the
              daemon's reason in the log and the exit reason
    demote    mirrorctl secondary
    monitor   mirrorctl status --json: 7 not running (no control socket, or nobody
              listening), 1 not answering, else by role and disk (ha/ocf_scores.py)
    notify    success; the score is refreshed
    validate-all  mirrorctl check

Every action that finds the daemon running refreshes the promotion score
(``crm_attribute --promotion``, as ocf:pacemaker:Stateful does in Pacemaker 2.1: the
node attribute for OCF_RESOURCE_INSTANCE, lifetime reboot), and logs the reason whenever
it changes, including why a node is not promotable.

Outside a cluster (ocf-tester, or a node whose cluster stack is down) crm_attribute
fails with CRM_EX_NOT_CONNECTED (102) or is not installed: the agent logs a warning that
the score was not recorded and the action's result is unaffected.  Any other
crm_attribute failure is logged as an error and does not fail the action either: the
action's own outcome is what Pacemaker must act on.

Which error: OCF_ERR_CONFIGURED makes Pacemaker stop the resource on every node, so it
is kept for what is wrong cluster-wide: the CIB's own parameters (no `config`, a
`mirrorctl` that does not parse) and validate-all's verdict on the config.  When the
resource file, or what it names on this box (disk, metadata, interface), stops an
action, the agent says OCF_ERR_INSTALLED: this node only, so that one box's typo or
missing metadata never stops the other box's primary.  A probe (monitor, interval 0) on
a box that does not have the file yet says OCF_NOT_RUNNING.

Every subprocess gets at most what is left of the action's timeout
(OCF_RESKEY_CRM_meta_timeout, in ms), so the agent answers before Pacemaker kills it.
Log lines go to stderr (Pacemaker's executor logs them); a failure also prints an
``ocf-exit-reason:`` line, which crm_mon shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from . import pcmk
from .ocf_metadata import ACTIONS, meta_data
from .ocf_scores import OCF, assess, monitor_result

__all__ = ["Agent", "main"]

DEFAULT_TIMEOUT = 20.0  # seconds, when Pacemaker passes none (by hand, ocf-tester sets 20)
MARGIN = 1.0  # seconds kept back from the action's timeout for the agent's own exit
STATUS_TIMEOUT = 10.0  # a status request: mirrorctl's own default
ACTION_TIMEOUTS = {name: float(t.rstrip("s")) for name, t, _ in ACTIONS}
# The mirrorctl of this Python (-P: not the working directory's modules: we run as root).
DEFAULT_MIRRORCTL = [sys.executable, "-P", "-m", "mirrord.mirrorctl"]
# mirrorctl's exit codes (mirrord/mirrorctl.py)
CTL_OK, CTL_REFUSED, CTL_USAGE, CTL_UNREACHABLE = 0, 1, 2, 3
CTL_TIMEOUT = -1  # ours: mirrorctl did not finish within the action's time

USAGE = """\
usage: {prog} ACTION

ACTION: start stop promote demote monitor notify validate-all meta-data usage
Parameters come from the OCF environment: OCF_RESKEY_config (required), OCF_RESKEY_node,
OCF_RESKEY_log_file, OCF_RESKEY_mirrorctl.
"""


@dataclass(frozen=True)
class Ctl:
    """One mirrorctl run."""

    code: int
    stdout: str
    stderr: str

    def reason(self) -> str:
        """mirrorctl's message in one line, without its "mirrorctl: " prefix: its first
        line, and its last (the hint of a refusal, or the last line of the daemon's log
        when it exited at start: the error itself)."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        if not lines:
            return f"mirrorctl exited {self.code}"
        text = lines[0]
        if len(lines) > 1:
            text += (" " if text.endswith(":") else "; ") + lines[-1]
        return text.removeprefix("mirrorctl: ")


@dataclass(frozen=True)
class Probe:
    """What `mirrorctl status --json` found."""

    state: str  # "running" | "not-running" | "no-answer" | "config" | "failed"
    status: dict | None = None
    reason: str = ""


class Agent:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.config = env.get("OCF_RESKEY_config", "").strip() or None
        self.node = env.get("OCF_RESKEY_node", "").strip() or None
        self.log_file = env.get("OCF_RESKEY_log_file", "").strip() or None
        self.instance = env.get("OCF_RESOURCE_INSTANCE", "mirrord")
        self.interval_ms = _int(env.get("OCF_RESKEY_CRM_meta_interval"), 0)
        self.timeout_ms = _int(env.get("OCF_RESKEY_CRM_meta_timeout"), 0)
        self.debug = env.get("HA_debug", "0") not in ("", "0")
        command = env.get("OCF_RESKEY_mirrorctl", "").strip()
        self.mirrorctl_error = ""
        try:
            self.mirrorctl = shlex.split(command) if command else DEFAULT_MIRRORCTL
        except ValueError as err:  # unbalanced quotes
            self.mirrorctl = []
            self.mirrorctl_error = f"parameter mirrorctl={command!r}: {err}"
        self.deadline = time.monotonic() + DEFAULT_TIMEOUT - MARGIN
        self._warned_no_cluster = False

    # -- entry ----------------------------------------------------------------------

    def run(self, action: str) -> int:
        if action == "meta-data":
            sys.stdout.write(meta_data())
            return OCF.SUCCESS
        if action in ("usage", "help"):
            sys.stdout.write(USAGE.format(prog="mirrord"))
            return OCF.SUCCESS
        handler = {
            "start": self.start, "stop": self.stop, "promote": self.promote,
            "demote": self.demote, "monitor": self.monitor, "notify": self.notify,
            "validate-all": self.validate_all,
        }.get(action)
        if handler is None:
            sys.stderr.write(USAGE.format(prog="mirrord"))
            return OCF.ERR_UNIMPLEMENTED
        budget = self.timeout_ms / 1000 if self.timeout_ms > 0 else ACTION_TIMEOUTS.get(
            action, DEFAULT_TIMEOUT)
        self.deadline = time.monotonic() + max(budget - MARGIN, 1.0)
        problem = self.precheck()
        if problem is not None:
            return self.fail(*problem)
        if action == "monitor" and self.is_probe() and not os.path.exists(self.config):
            # Nothing of ours can run from a file that is not there (not deployed yet).
            self.log("info", f"probe: {self.config} does not exist on this node: "
                             f"not running")
            return OCF.NOT_RUNNING
        return handler()

    def precheck(self) -> tuple[OCF, str] | None:
        """What stops every action: no config parameter, no mirrorctl."""
        if not self.config:
            return OCF.ERR_CONFIGURED, "the config parameter is required (the resource's " \
                                       "TOML file)"
        if not self.mirrorctl:
            return OCF.ERR_CONFIGURED, self.mirrorctl_error
        if self.mirrorctl == DEFAULT_MIRRORCTL:
            if importlib.util.find_spec("mirrord") is None:
                return OCF.ERR_INSTALLED, f"the mirrord package is not installed for " \
                                          f"{sys.executable} (run deploy/install.sh)"
        elif shutil.which(self.mirrorctl[0]) is None:
            return OCF.ERR_INSTALLED, f"mirrorctl command {self.mirrorctl[0]!r} not found " \
                                      f"or not executable"
        return None

    # -- actions --------------------------------------------------------------------

    def start(self) -> int:
        args = ["up", "--timeout", self.seconds(self.left() - 1)]
        if self.log_file:
            args += ["--log-file", self.log_file]
        result = self.ctl(*args)
        if result.code != CTL_OK:
            for line in result.stderr.splitlines()[1:-1]:  # the daemon's log, for the record
                self.log("info", f"start: {line.strip()}")
            code = OCF.ERR_INSTALLED if result.code == CTL_USAGE else OCF.ERR_GENERIC
            return self.fail(code, f"start: {result.reason()}")
        self.log("info", result.stdout.strip())
        found = self.probe()
        if found.state != "running":
            return self.fail(OCF.ERR_GENERIC, f"start: the daemon started but then: "
                                              f"{found.reason}")
        if found.status.get("role") == "primary":
            self.log("warning", "start: the daemon was already running as primary")
        self.refresh_score(found.status)
        return OCF.SUCCESS

    def stop(self) -> int:
        found = self.probe()
        if found.state == "not-running":
            self.delete_score()
            return OCF.SUCCESS
        if found.state == "config":
            return self.fail(OCF.ERR_INSTALLED, f"stop: {found.reason}")
        self.delete_score()  # first: a node on its way out must not look promotable
        if found.state == "running" and found.status.get("role") == "primary":
            result = self.ctl("secondary")
            if result.code != CTL_OK:
                return self.fail(OCF.ERR_GENERIC, f"stop: cannot demote: {result.reason()}")
            self.log("info", result.stdout.strip())
        result = self.ctl("down", "--timeout", self.seconds(self.left() - 1))
        if result.code != CTL_OK:
            return self.fail(OCF.ERR_GENERIC, f"stop: {result.reason()}")
        self.log("info", result.stdout.strip())
        return OCF.SUCCESS

    def promote(self) -> int:
        found = self.probe()
        if found.state != "running":
            return self.not_running("promote", found)
        if found.status.get("role") == "primary":
            self.refresh_score(found.status)
            return OCF.SUCCESS
        result = self.ctl("primary")  # never --force: a stale disk must stay secondary
        after = self.probe()
        if after.state == "running":
            self.refresh_score(after.status)
        if result.code != CTL_OK:
            return self.fail(OCF.ERR_GENERIC, f"promote: {result.reason()}")
        self.log("info", result.stdout.strip())
        return OCF.SUCCESS

    def demote(self) -> int:
        found = self.probe()
        if found.state != "running":
            return self.not_running("demote", found)
        if found.status.get("role") != "primary":
            self.refresh_score(found.status)
            return OCF.SUCCESS
        result = self.ctl("secondary")
        if result.code != CTL_OK:
            return self.fail(OCF.ERR_GENERIC, f"demote: {result.reason()}")
        self.log("info", result.stdout.strip())
        after = self.probe()
        if after.state == "running":
            self.refresh_score(after.status)
        return OCF.SUCCESS

    def monitor(self) -> int:
        found = self.probe()
        if found.state == "not-running":
            return OCF.NOT_RUNNING
        if found.state == "config":
            return self.fail(OCF.ERR_INSTALLED, f"monitor: {found.reason}")
        if found.state != "running":
            return self.fail(OCF.ERR_GENERIC, f"monitor: {found.reason}")
        self.refresh_score(found.status)
        if found.status.get("io_frozen"):
            self.log("warning", "I/O is frozen (the daemon waits for its fence handler)")
        code, reason = monitor_result(found.status)
        if reason:
            return self.fail(code, f"monitor: {reason}")
        return code

    def notify(self) -> int:
        kind = self.env.get("OCF_RESKEY_CRM_meta_notify_type", "?")
        operation = self.env.get("OCF_RESKEY_CRM_meta_notify_operation", "?")
        if self.debug:
            self.log("debug", f"notify: {kind}-{operation}")
        found = self.probe()
        if found.state == "running":
            self.refresh_score(found.status)  # a peer came or went: the score may move
        return OCF.SUCCESS

    def validate_all(self) -> int:
        result = self.ctl("check")
        if result.code == CTL_OK:
            return OCF.SUCCESS
        code = OCF.ERR_CONFIGURED if result.code == CTL_USAGE else OCF.ERR_GENERIC
        return self.fail(code, f"validate-all: {result.reason()}")

    # -- the daemon, through mirrorctl ------------------------------------------------

    def ctl(self, *args: str) -> Ctl:
        argv = [*self.mirrorctl, "--config", self.config,
                *(["--node", self.node] if self.node else []), *args]
        budget = self.left()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=budget, env=self.env)
        except subprocess.TimeoutExpired:
            return Ctl(CTL_TIMEOUT, "", f"mirrorctl {args[0]} did not finish within "
                                        f"{budget:.1f} s (the action's timeout)")
        except OSError as err:
            return Ctl(CTL_USAGE, "", f"cannot run {argv[0]}: {err.strerror or err}")
        if self.debug:
            self.log("debug", f"{shlex.join(argv)}: exit {proc.returncode}")
        return Ctl(proc.returncode, proc.stdout, proc.stderr)

    def probe(self) -> Probe:
        timeout = min(STATUS_TIMEOUT, self.left() / 2)
        result = self.ctl("status", "--json", "--timeout", self.seconds(timeout))
        if result.code == CTL_OK:
            try:
                status = json.loads(result.stdout)
            except ValueError:
                status = None
            if isinstance(status, dict):
                return Probe("running", status)
            return Probe("failed", reason="mirrorctl status --json printed no status")
        if result.code == CTL_UNREACHABLE:
            try:
                state = json.loads(result.stdout).get("unreachable")
            except (ValueError, AttributeError):
                state = None
            if state == "not-running":
                return Probe("not-running", reason=result.reason())
            return Probe("no-answer", reason=result.reason())
        if result.code == CTL_USAGE:
            return Probe("config", reason=result.reason())
        return Probe("failed", reason=result.reason())

    def not_running(self, action: str, found: Probe) -> int:
        if found.state == "not-running":
            return self.fail(OCF.NOT_RUNNING, f"{action}: the daemon is not running")
        if found.state == "config":
            return self.fail(OCF.ERR_INSTALLED, f"{action}: {found.reason}")
        return self.fail(OCF.ERR_GENERIC, f"{action}: {found.reason}")

    # -- the promotion score, through crm_attribute ---------------------------------------

    def refresh_score(self, status: dict) -> None:
        verdict = assess(status)
        current = self.query_score()
        if current is _NO_CLUSTER:
            return
        if current == verdict.score:
            return
        was = "none" if current is None else str(current)
        if verdict.score is None:
            result = pcmk.run_tool("crm_attribute", ["--promotion", "-D"],
                                   timeout=self.left())
            self.log("warning", f"not promotable: {verdict.why} (promotion score {was} "
                                f"removed)")
        else:
            result = pcmk.run_tool("crm_attribute", ["--promotion", "-v", str(verdict.score)],
                                   timeout=self.left())
            self.log("info", f"promotion score {was} -> {verdict.score}: {verdict.why}")
        self.check_tool(result, "set the promotion score")

    def delete_score(self) -> None:
        result = pcmk.run_tool("crm_attribute", ["--promotion", "-D"], timeout=self.left())
        self.check_tool(result, "remove the promotion score")

    def query_score(self):
        """The recorded promotion score: an int, None (absent or unreadable: the caller
        then sets it), or _NO_CLUSTER."""
        result = pcmk.run_tool("crm_attribute", ["--promotion", "-G", "-q"],
                               timeout=self.left())
        if result.ok:
            return _int(result.stdout.strip(), None)
        if result.code == pcmk.CRM_EX_NOSUCH:
            return None
        if not self.check_tool(result, "read the promotion score"):
            return _NO_CLUSTER
        return None

    def check_tool(self, result: pcmk.ToolResult, what: str) -> bool:
        """Log a crm_attribute failure; False when there is no cluster at all."""
        if result.ok:
            return True
        if result.no_cluster:
            if not self._warned_no_cluster:
                self.log("warning", f"not in a cluster, cannot {what} "
                                    f"(crm_attribute: {result.why()})")
                self._warned_no_cluster = True
            return False
        self.log("error", f"cannot {what}: crm_attribute {result.why()}")
        return True

    # -- helpers ----------------------------------------------------------------------

    def is_probe(self) -> bool:
        return self.interval_ms == 0

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.5)

    @staticmethod
    def seconds(value: float) -> str:
        return f"{max(value, 0.5):.1f}"

    def log(self, level: str, message: str) -> None:
        if message:
            print(f"mirrord({self.instance})[{os.getpid()}]: {level.upper()}: {message}",
                  file=sys.stderr, flush=True)

    def fail(self, code: int, reason: str) -> int:
        """Log `reason` and give it to Pacemaker as the exit reason; return `code`."""
        self.log("info" if code == OCF.NOT_RUNNING else "error", reason)
        print(f"ocf-exit-reason:{reason}", file=sys.stderr, flush=True)
        return code


_NO_CLUSTER = object()  # query_score(): crm_attribute cannot reach a cluster


def _int(text, default):
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    action = argv[0] if argv else os.environ.get("__OCF_ACTION", "")
    try:
        return int(Agent(dict(os.environ)).run(action))
    except KeyboardInterrupt:
        return OCF.ERR_GENERIC


if __name__ == "__main__":
    sys.exit(main())
