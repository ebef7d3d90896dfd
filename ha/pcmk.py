"""Pacemaker's command-line tools (crm_attribute, cibadmin), run with a timeout.

The agent and the fence handler reach Pacemaker only through these tools, as the stock
agents do.  They are looked up in $HA_SBIN_DIR (what ocf-shellfuncs uses), then on PATH,
then in /usr/sbin and /sbin: Pacemaker runs agents with a minimal PATH, and the daemon
that runs the fence handler may have been started with any.

"No cluster" is a result of its own: a tool that is not installed, or that exits with
Pacemaker's CRM_EX_NOT_CONNECTED (102, "Could not connect to the CIB"), means this
node is not running a cluster stack; callers decide whether that is an error (the fence
handler: yes) or a warning (the agent outside a cluster, as under ocf-tester).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["CRM_EX_NOSUCH", "CRM_EX_NOT_CONNECTED", "ToolResult", "find_tool", "run_tool"]

CRM_EX_NOT_CONNECTED = 102  # crm_exit_t: could not connect to the CIB / the cluster
CRM_EX_NOSUCH = 105  # crm_exit_t: no such object (e.g. querying an absent attribute)
CRM_EX_TIMEOUT = 124  # crm_exit_t (and timeout(1)): used here for a tool that never finished
TOOL_TIMEOUT = 15.0  # a CIB round trip takes milliseconds; this means a wedged cluster
SBIN_FALLBACK = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class ToolResult:
    code: int | None  # the exit code; None if the tool could not be run at all
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def no_cluster(self) -> bool:
        """Not installed, or cannot reach the CIB: no cluster on this node."""
        return self.code is None or self.code == CRM_EX_NOT_CONNECTED

    def why(self) -> str:
        """One line saying what went wrong, for a log or an exit reason."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        detail = text[-1] if text else "no output"
        return detail if self.code is None else f"exit status {self.code}: {detail}"


def find_tool(name: str) -> str | None:
    dirs = [os.environ.get("HA_SBIN_DIR", ""), *os.environ.get("PATH", "").split(os.pathsep),
            *SBIN_FALLBACK]
    return shutil.which(name, path=os.pathsep.join(d for d in dirs if d))


def run_tool(name: str, args: list[str], *, timeout: float = TOOL_TIMEOUT,
             stdin: str | None = None) -> ToolResult:
    """Run Pacemaker tool `name` with `args`; never raises for the tool's failures."""
    path = find_tool(name)
    if path is None:
        return ToolResult(None, stderr=f"{name} not found (is pacemaker-cli-utils "
                                       f"installed?)")
    try:
        proc = subprocess.run([path, *args], input=stdin, capture_output=True, text=True,
                              timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        return ToolResult(CRM_EX_TIMEOUT, stderr=f"{name} did not finish within {timeout:g} s")
    except OSError as err:
        return ToolResult(None, stderr=f"{path}: {err.strerror or err}")
    return ToolResult(proc.returncode, proc.stdout, proc.stderr)
