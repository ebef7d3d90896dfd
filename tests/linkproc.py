"""Drive real `mirrord-link` processes inside test namespaces.

A LinkProcess wraps one process started through a NetnsPair/NetnsSegment (which stops
it by PID at teardown), collects its JSON lines on stdout and its stderr log on
threads, and lets a test wait, with a deadline, for the line it expects.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def link_argv(ifname: str, node: str, *options: str) -> list[str]:
    """argv for mirrord-link run from this checkout."""
    return [sys.executable, "-m", "mirrord.linktool", "--interface", ifname, "--node", node,
            *options]


class LinkProcess:
    """One mirrord-link process and what it has printed."""

    def __init__(self, group, ns: str, argv: list[str], repo: str = REPO) -> None:
        """`repo`: the checkout whose mirrord/ and protocol/ the process runs (benchmarks
        compare trees)."""
        env = dict(os.environ, PYTHONPATH=repo, PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen = group.popen(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=repo
        )
        self.lines: queue.Queue = queue.Queue()
        self.all_lines: list[dict] = []
        self.stderr_lines: list[str] = []
        self._readers = [threading.Thread(target=self._pump_stdout, daemon=True),
                         threading.Thread(target=self._pump_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _pump_stdout(self) -> None:
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"unparsed": raw}
            self.all_lines.append(line)
            self.lines.put(line)

    def _pump_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait_line(self, predicate, timeout: float) -> dict:
        """The next stdout line satisfying `predicate`, or AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line within {timeout} s; stderr:\n{self.stderr}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(line):
                return line

    def wait_event(self, name: str, timeout: float) -> dict:
        return self.wait_line(lambda line: line.get("event") == name, timeout)

    def finish(self, timeout: float) -> tuple[int, dict | None]:
        """Wait for exit; the return code and the last JSON line printed."""
        rc = self.proc.wait(timeout=timeout)
        for reader in self._readers:  # the pipes are at EOF: the readers end promptly
            reader.join(timeout=5)
        return rc, (self.all_lines[-1] if self.all_lines else None)
