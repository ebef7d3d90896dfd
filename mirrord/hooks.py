"""Hooks: the operator's commands, run when something happens to the resource.

For sites without Pacemaker (and for alerting with it), the way HAST's `exec` works:
the config names a shell command per event (run with `/bin/sh -c`) and/or one `exec`
program for all of them (run with the event name as its one argument, as HAST does), with
the resource and the event in the environment:

    MIRRORD_EVENT       connect | disconnect | sync-start | sync-done | split-brain |
                        role-change
    MIRRORD_RESOURCE, MIRRORD_NODE, MIRRORD_PEER
    MIRRORD_ROLE, MIRRORD_DISK, MIRRORD_CONNECTION      the state after the event
    and per event: MIRRORD_OLD_ROLE (role-change), MIRRORD_REASON (disconnect,
    split-brain), MIRRORD_SYNC_ROLE source|target (sync-start, sync-done),
    MIRRORD_THIS_NODE_BYTES / MIRRORD_PEER_BYTES (split-brain: what each side changed)

Hooks run one at a
time, in the order of the events, in a thread of their own: the engine never waits for
a script.  A hook that runs longer than its timeout is killed; its exit status and the
first lines of its output go to the log.  Events beyond MAX_QUEUED waiting hooks are
dropped, with a log line, rather than piling up behind a stuck script.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EVENTS = ("connect", "disconnect", "sync-start", "sync-done", "split-brain", "role-change")
DEFAULT_TIMEOUT = 30.0  # seconds a hook may run before it is killed
MAX_QUEUED = 64  # hooks waiting to run; a stuck script must not grow memory forever
OUTPUT_LINES = 5  # lines of a hook's output repeated in the log
STOP_TIMEOUT = 2.0  # at shutdown, how long to wait for a running hook


@dataclass(frozen=True)
class HookConfig:
    """The `[hooks]` section: a command per event, `exec` for all, and the timeout."""

    commands: dict[str, str] = field(default_factory=dict)  # event -> shell command
    exec_all: str | None = None  # a program run for every event, with the event as $1
    timeout: float = DEFAULT_TIMEOUT

    def commands_for(self, event: str) -> list[list[str]]:
        argv = []
        if event in self.commands:
            argv.append(["/bin/sh", "-c", self.commands[event]])
        if self.exec_all:
            argv.append([self.exec_all, event])  # a program, not a shell command (HAST's exec)
        return argv


class HookRunner:
    """Runs hooks in order, in one thread; `fire` never blocks."""

    def __init__(self, config: HookConfig, base_env: dict[str, str]) -> None:
        self.config = config
        self.base_env = base_env  # MIRRORD_RESOURCE, MIRRORD_NODE, MIRRORD_PEER
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: subprocess.Popen | None = None
        self.runs = 0  # hooks started, for tests and metrics
        self.failures = 0  # hooks that exited non-zero, timed out or could not start

    @property
    def configured(self) -> bool:
        return bool(self.config.commands or self.config.exec_all)

    def start(self) -> None:
        if not self.configured:
            return
        self._thread = threading.Thread(target=self._run, name="hooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive() and self._running is not None:
                _kill_group(self._running)

    def fire(self, event: str, **info) -> None:
        """Queue the hooks of `event` with `info` (state values) in their environment."""
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}")
        commands = self.config.commands_for(event)
        if not commands:
            return
        env = dict(self.base_env, MIRRORD_EVENT=event)
        for key, value in info.items():
            if value is not None:
                env["MIRRORD_" + key.upper()] = str(value)
        with self._cond:
            for argv in commands:
                if len(self._queue) >= MAX_QUEUED:
                    log.error("hooks: %d hooks waiting (is one stuck?): dropped %s for %s",
                              len(self._queue), event, env.get("MIRRORD_RESOURCE"))
                    return
                self._queue.append((event, argv, env))
            self._cond.notify()

    # --- the hook thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, nothing left
                event, argv, env = self._queue.popleft()
            self._run_one(event, argv, env)

    def _run_one(self, event: str, argv: list[str], env: dict[str, str]) -> None:
        self.runs += 1
        result = run_command(argv, env, self.config.timeout, f"hook {event}",
                             on_start=self._started)
        if result.returncode != 0:
            self.failures += 1

    def _started(self, proc: subprocess.Popen | None) -> None:
        self._running = proc


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: could not start, or killed at its timeout
    output: list[str]  # its first lines (stdout and stderr together)


def run_command(argv: list[str], env: dict[str, str], timeout: float, what: str,
                on_start=None) -> CommandResult:
    """Run an operator's command (a hook, the fence-peer handler) with `env` added to
    ours, at most `timeout` seconds; log how it went.  Never raises for the command's
    own failures."""
    full_env = dict(os.environ, **env)
    shown = argv[2] if argv[:2] == ["/bin/sh", "-c"] else " ".join(argv)
    try:
        proc = subprocess.Popen(argv, env=full_env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # killable as a group
    except OSError as exc:
        log.error("%s: cannot run %r: %s", what, shown, exc.strerror or exc)
        return CommandResult(None, [])
    if on_start is not None:
        on_start(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        log.error("%s: %r still running after %g s: killed", what, shown, timeout)
        return CommandResult(None, [])
    finally:
        if on_start is not None:
            on_start(None)
    lines = output.decode(errors="replace").splitlines()[:OUTPUT_LINES]
    shown_lines = "".join(f"\n  | {line}" for line in lines)
    if proc.returncode:
        log.warning("%s: %r exited %d%s", what, shown, proc.returncode, shown_lines)
    else:
        log.info("%s: %r done%s", what, shown, shown_lines)
    return CommandResult(proc.returncode, lines)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
