"""`mirrorctl up` / `down`: start a resource's daemon detached, or stop it and wait for it
to be gone (like `drbdadm up` / `down`).  The OCF agent drives the daemon only this way.

Strategy
--------
The daemon is known only through its control socket, so there is no pid file to go
stale: :func:`probe` asks it for ``status`` and gets one of three answers: RUNNING,
NOT_RUNNING (no socket file, or nobody listening on it: what a killed daemon leaves)
or NO_ANSWER (something holds the socket but gives no valid reply: stuck).

``up`` starts ``python -m mirrord.daemon`` in a new session with stdin on /dev/null and
stdout/stderr appended to a log file, then polls until the control socket answers.  A
daemon that exits first is reported with what its exit status means and the log lines
this start wrote; one that never answers is stopped again, so that no half-started
daemon stays behind that nothing can steer.

``down`` learns the daemon's PID from the control connection itself (SO_PEERCRED),
holds a pidfd on it, asks it to ``stop`` and then waits for the *process* to exit, not
merely for the socket to vanish: the daemon closes its sockets first and records the
clean stop in the metadata last, and the next start must not overlap that.
"""

from __future__ import annotations

import os
import select
import signal
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import Enum

from .config import ResourceConfig, check_local
from .control import ControlClient, ControlUnavailable

__all__ = ["DaemonState", "Failed", "LOG_DIR", "Probe", "default_log_file", "down", "probe",
           "up"]

LOG_DIR = "/var/log/mirrord"  # default log: LOG_DIR/<resource>.log (like /var/log/drbd...)
UP_TIMEOUT = 30.0  # default wait for a start (metadata load + bitmap read) or a clean stop
POLL = 0.1  # between two probes while waiting: a start takes about half a second
PROBE_TIMEOUT = 2.0  # one status request while waiting; a live daemon answers in ms
LOG_TAIL_LINES = 15  # log lines shown when the daemon exits at start
STOP_GRACE = 10.0  # a start that timed out: SIGTERM, then SIGKILL after this long
DAEMON_EXIT = {1: "a runtime failure", 2: "a configuration error"}  # mirrord's codes
EXIT_REFUSED, EXIT_CONFIG, EXIT_UNREACHABLE = 1, 2, 3  # mirrorctl's codes


class DaemonState(Enum):
    RUNNING = "running"
    NOT_RUNNING = "not-running"  # no socket, or nobody listens on it: no daemon
    NO_ANSWER = "no-answer"  # the socket is held but gives no valid answer: stuck


@dataclass(frozen=True)
class Probe:
    state: DaemonState
    status: dict | None = None  # the daemon's status when RUNNING
    error: str = ""  # why not, when not RUNNING
    pid: int | None = None  # the daemon's PID when RUNNING and visible from here


class Failed(Exception):
    """up/down did not get there: mirrorctl prints the message (and details) and exits
    with ``code``."""

    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code, self.details = code, details or []


def probe(path: str, timeout: float) -> Probe:
    """Ask the daemon at control socket `path` for its status, once."""
    try:
        with ControlClient(path, timeout=timeout) as client:
            response = client.request("status")
            pid = client.peer_pid()
    except ControlUnavailable as err:
        state = DaemonState.NOT_RUNNING if err.not_running else DaemonState.NO_ANSWER
        return Probe(state, error=str(err))
    status = response.get("status")
    if not response["ok"] or not isinstance(status, dict):
        return Probe(DaemonState.NO_ANSWER, error=f"control socket {path}: unexpected reply "
                                                  f"to status: {response}")
    return Probe(DaemonState.RUNNING, status, pid=pid)


def default_log_file(cfg: ResourceConfig) -> str:
    return os.path.join(LOG_DIR, f"{cfg.name}.log")


# -- up ---------------------------------------------------------------------------------

def up(cfg: ResourceConfig, *, node: str | None, log_file: str | None,
       timeout: float = UP_TIMEOUT) -> str:
    """Start the daemon for `cfg` unless it runs; return what happened (one line).

    `node` is passed on to the daemon as --node (None: it picks by hostname, as the
    config did).  Raises Failed, or ConfigFileError for what the daemon would refuse at
    once (config.check_local): one line now rather than a log tail later.
    """
    path, what = cfg.node.control_socket, f"{cfg.name} on {cfg.node.name}"
    found = probe(path, min(timeout, PROBE_TIMEOUT))
    if found.state is DaemonState.RUNNING:
        return f"{what}: already running{_pid_note(found.pid)}"
    if found.state is DaemonState.NO_ANSWER:
        raise Failed(EXIT_UNREACHABLE, f"{found.error}; a mirrord may be running but not "
                                       f"answering: see its log, stop it, then `up` again")
    check_local(cfg)

    log_file = os.path.abspath(log_file or default_log_file(cfg))
    log_fd, start_offset = _open_log(log_file)
    # -P: the working directory is not put first on sys.path (the daemon runs as root).
    argv = [sys.executable, "-P", "-m", "mirrord.daemon", "--config", os.path.abspath(cfg.path)]
    if node is not None:
        argv += ["--node", node]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, cwd="/", env=_daemon_env())
    except OSError as err:
        raise Failed(EXIT_REFUSED, f"cannot start {argv[0]}: {err.strerror or err}") from None
    finally:
        os.close(log_fd)

    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            meaning = DAEMON_EXIT.get(code) or _exit_meaning(code)
            raise Failed(EXIT_CONFIG if code == 2 else EXIT_REFUSED,
                         f"{what}: mirrord exited at start with status {code} ({meaning}); "
                         f"the end of {log_file}:",
                         _log_tail(log_file, start_offset))
        found = probe(path, min(PROBE_TIMEOUT, max(deadline - time.monotonic(), POLL)))
        if found.state is DaemonState.RUNNING:
            return f"{what}: started (pid {proc.pid}, log {log_file})"
        if time.monotonic() >= deadline:
            _stop_child(proc)
            raise Failed(EXIT_REFUSED, f"{what}: mirrord (pid {proc.pid}) did not answer on "
                                       f"{path} within {timeout:g} s; stopped it again. "
                                       f"The end of {log_file}:",
                         _log_tail(log_file, start_offset))
        time.sleep(POLL)


def _open_log(path: str) -> tuple[int, int]:
    """The log file opened for appending, and its size before this start."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as err:
        raise Failed(EXIT_CONFIG, f"log file {path}: {err.strerror or err} "
                                  f"(choose another with --log-file)") from None
    return fd, os.fstat(fd).st_size


def _daemon_env() -> dict[str, str]:
    """The daemon's environment: ours, unbuffered (log lines as they happen), and able
    to import the same mirrord this mirrorctl is: a source checkout is not on a fresh
    interpreter's path once the daemon runs from / (an installed package is, and must
    not be put on PYTHONPATH: it would then come before the standard library)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = {os.path.abspath(p) for p in site.getsitepackages()}
    installed.add(os.path.abspath(site.getusersitepackages()))
    if root not in installed:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def _log_tail(path: str, offset: int) -> list[str]:
    """The last lines written to `path` after `offset` (this start's, not older runs')."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()[-64 << 10:]
    except OSError as err:
        return [f"(cannot read the log: {err.strerror or err})"]
    lines = data.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return lines or ["(nothing was logged)"]


def _stop_child(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_GRACE)


def _exit_meaning(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "unexpected"


def _pid_note(pid: int | None) -> str:
    return f" (pid {pid})" if pid else ""


# -- down -------------------------------------------------------------------------------

def down(path: str, *, name: str | None = None, force: bool = False,
         timeout: float = UP_TIMEOUT) -> str:
    """Ask the daemon at control socket `path` to stop; return once its process is gone.

    `name` (the resource) names it when it is not running; otherwise the daemon's
    status does.  Raises control.ControlRefused (the daemon said no: NBD clients
    connected) or Failed.
    """
    deadline = time.monotonic() + timeout
    try:
        with ControlClient(path, timeout=min(timeout, PROBE_TIMEOUT * 5)) as client:
            status = client.call("status").get("status") or {}  # connects; is it mirrord?
            what = f"{status.get('resource', name or path)} on {status.get('node', '?')}"
            pid = client.peer_pid()
            pidfd = _pidfd(pid)
            try:
                client.call("stop", force=force)
                gone = _wait_gone(pidfd, path, deadline)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
    except ControlUnavailable as err:
        if err.not_running:
            return f"{name or path}: not running"
        raise Failed(EXIT_UNREACHABLE, f"{err}; a mirrord may be running but not "
                                       f"answering: see its log") from None
    if not gone:
        raise Failed(EXIT_REFUSED, f"{what}: mirrord{_pid_note(pid)} was asked to stop but "
                                   f"is still running after {timeout:g} s; see its log. If "
                                   f"it is stuck, kill it: the metadata stays safe (the next "
                                   f"start treats it as a crash)")
    return f"{what}: stopped"


def _pidfd(pid: int | None) -> int | None:
    """A pidfd on the daemon, so that its exit is seen even if the PID is reused."""
    if pid is None:
        return None
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None  # gone already, or a kernel without pidfds: fall back to the socket


def _wait_gone(pidfd: int | None, path: str, deadline: float) -> bool:
    """Until the process has exited (pidfd readable) or, without a pidfd, until the
    socket stops answering; False at the deadline."""
    while True:
        left = deadline - time.monotonic()
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if poller.poll(max(left, 0) * 1000):
                return True
        else:
            if probe(path, PROBE_TIMEOUT).state is DaemonState.NOT_RUNNING:
                return True
            time.sleep(POLL)
        if time.monotonic() >= deadline:
            return False
