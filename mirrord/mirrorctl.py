"""`mirrorctl`: ask a running mirrord for its state, or tell it to change role or connection.

    mirrorctl --config /etc/mirrord/r0.toml status
    mirrorctl --config /etc/mirrord/r0.toml status --json
    mirrorctl --config /etc/mirrord/r0.toml primary [--force]
    mirrorctl --socket /run/mirrord/r0.ctl secondary | connect | disconnect
    mirrorctl --config /etc/mirrord/r0.toml events [--interval S] [--count N]
    mirrorctl --config /etc/mirrord/r0.toml watch [--interval S] [--count N]
    mirrorctl --config /etc/mirrord/r0.toml up [--log-file PATH] [--timeout S]
    mirrorctl --config /etc/mirrord/r0.toml down [--force] [--timeout S]
    mirrorctl --config /etc/mirrord/r0.toml check

The daemon is found through its control socket: the one this node's section of the
config names (this node: --node, else the hostname), or --socket PATH.  Every request
is one JSON line on that socket (mirrord/control.py); the OCF agent uses the same.

`events` prints the daemon's state changes as JSON lines (mirrord/events.py) until
Ctrl-C, --count lines or the daemon stops; `watch` shows the state and the resync live
(mirrord/watch.py).  Both exit 0 on Ctrl-C and 3 when the daemon goes away.

`up` starts the daemon detached (stdout and stderr appended to --log-file, default
/var/log/mirrord/<resource>.log) and returns once it answers; `down` asks it to stop
and returns once its process has exited (mirrord/updown.py).  Both are done when there
is nothing to do ("already running", "not running").  `check` checks the config and
what it names on this box, as the daemon does at start.

`status --json` when the daemon cannot be reached: exit 3, and stdout has one object
{"unreachable": "not-running" | "no-answer", "error": "..."}: not-running when no
daemon is there (no control socket, or nobody listening on it), no-answer when
something holds the socket but gives no valid reply (stuck, or not a mirrord).

Exit codes:
  0  done
  1  refused by the daemon (stderr: the reason, then what to do); `up`: the daemon
     exited at start or did not answer in time; `down`: it did not exit in time
  2  usage or config error (`up`: also the daemon exiting at start with its status 2)
  3  the daemon is not reachable (not running, stuck, or a stale socket)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import updown
from .config import ConfigFileError, check_local, load_config
from .control import (
    DEFAULT_TIMEOUT, MAX_REPLY, ControlClient, ControlRefused, ControlUnavailable,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
EPILOG = """\
exit codes:
  0  done
  1  refused by the daemon (stderr: the reason, then what to do); up/down: the daemon
     did not start or stop (stderr says why)
  2  usage or config error
  3  the daemon is not reachable (not running, stuck, or a stale socket)
"""

ACTIONS = ("primary", "secondary", "connect", "disconnect")
WATCH_INTERVAL = 0.5  # seconds between two screens of `watch`, by default
INTERVAL_RANGE = (0.05, 3600.0)  # --interval: least, most (the daemon checks the same)
STREAM_IDLE_TIMEOUT = 15.0  # `events`: the daemon sends a keepalive line every 5 s


class UsageError(Exception):
    """Bad command line: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and no usage block) on stderr."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _target_options(p: argparse.ArgumentParser, timeout_help: str = "") -> None:
    # SUPPRESS: accepted before or after the command without one overwriting the other.
    g = p.add_argument_group("which daemon")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="the resource config (e.g. /etc/mirrord/r0.toml)")
    g.add_argument("--node", metavar="NAME", default=argparse.SUPPRESS,
                   help="this node's section in FILE (default: the hostname)")
    g.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the daemon's control socket, instead of --config")
    g.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                   help=timeout_help
                   or f"wait this long for the daemon (default {DEFAULT_TIMEOUT:g})")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mirrorctl", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {
        "status": "show role, disk and connection state, and resync progress",
        "primary": "become primary (refused for an outdated or inconsistent disk unless --force)",
        "secondary": "become secondary (closes the export for writes)",
        "connect": "connect to the peer over the replication link",
        "disconnect": "drop the replication link (writes go on locally, marked out of sync)",
        "events": "print state changes and resync progress as JSON lines, as they happen",
        "watch": "show the state and resync progress live (plain blocks if not a terminal)",
        "verify": "online verify (on the primary): compare block digests with the peer; "
                  "differing blocks are marked out of sync",
        "invalidate": "(on a secondary) distrust this disk: full resync from the peer, "
                      "copying only blocks whose digests differ",
        "pause-sync": "pause the running (or next) resync",
        "resume-sync": "resume a paused resync",
        "resume-io": "(on a primary) let writes go on although the peer could not be "
                     "fenced (fencing resource-and-stonith): do not promote the peer then",
        "create-md": "write fresh metadata for this node's disk (before the first start; "
                     "needs --config, and mirrord stopped)",
        "up": "start mirrord for this resource in the background, unless it runs; wait "
              "until it answers (needs --config)",
        "down": "stop mirrord cleanly and wait until it has exited (refused while NBD "
                "clients are connected, unless --force)",
        "check": "check the config and what it names on this box (disk, metadata "
                 "directory, link interface); needs --config",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _target_options(s, f"wait this long for the daemon to start or stop (default "
                           f"{updown.UP_TIMEOUT:g})" if name in ("up", "down") else "")
        if name == "up":
            s.add_argument("--log-file", metavar="PATH",
                           help=f"append the daemon's output here (default "
                                f"{updown.LOG_DIR}/<resource>.log)")
        if name == "down":
            s.add_argument("--force", action="store_true",
                           help="stop even while NBD clients are connected (they lose "
                                "the disk)")
        if name == "status":
            s.add_argument("--json", action="store_true",
                           help="print the daemon's status as JSON (for scripts)")
        if name == "primary":
            s.add_argument("--force", action="store_true",
                           help="promote even an outdated or inconsistent disk (data loss risk)")
        if name == "connect":
            s.add_argument("--discard-my-data", action="store_true",
                           help="after a split brain: this node's changes are dropped and "
                                "it is resynced from the peer")
        if name == "create-md":
            s.add_argument("--force", action="store_true",
                           help="overwrite existing metadata (the node forgets its state)")
        if name in ("events", "watch"):
            default = 0.5 if name == "events" else WATCH_INTERVAL
            s.add_argument("--interval", metavar="SECONDS", type=float, default=default,
                           help=("poll the state this often; progress lines come this often "
                                 if name == "events" else "redraw this often ")
                           + f"(default {default:g})")
            s.add_argument("--count", metavar="N", type=int, default=None,
                           help="stop after N lines" if name == "events"
                           else "stop after N screens (default: until Ctrl-C)")
    return p


def resolve_target(args) -> tuple[str, str | None]:
    """(control socket path, resource name or None) from --config/--node or --socket."""
    config, socket_path = getattr(args, "config", None), getattr(args, "socket", None)
    if config is not None and socket_path is not None:
        raise UsageError("give --config or --socket, not both")
    if socket_path is not None:
        if getattr(args, "node", None) is not None:
            raise UsageError("--node goes with --config, not --socket")
        return socket_path, None
    if config is None:
        raise UsageError("which resource? give --config FILE (or --socket PATH) "
                         "(see mirrorctl --help)")
    cfg = load_config(config, getattr(args, "node", None))
    return cfg.node.control_socket, cfg.name


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("mirrorctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `mirrorctl status | head -1`: the reader left, which is not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv) -> int:
    try:
        args = parser().parse_args(argv)
        timeout = getattr(args, "timeout", updown.UP_TIMEOUT if args.command in ("up", "down")
                          else DEFAULT_TIMEOUT)
        if not timeout > 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if args.command in ("events", "watch"):
            low, high = INTERVAL_RANGE
            if not low <= args.interval <= high:
                raise UsageError(f"--interval must be from {low:g} to {high:g} seconds")
            if args.count is not None and args.count < 1:
                raise UsageError("--count must be at least 1")
        if args.command == "create-md":
            return _create_md(args)
        if args.command in ("up", "check"):
            return _up_or_check(args, timeout)
        path, resource = resolve_target(args)
        if args.command == "down":
            return _down(args, path, resource, timeout)
    except UsageError as err:
        return _fail(EXIT_USAGE, str(err))
    except ConfigFileError as err:
        return _fail(EXIT_USAGE, str(err))

    if args.command == "watch":
        from . import watch
        return watch.run(path, interval=args.interval, timeout=timeout, count=args.count)
    if args.command == "events":
        return _events(path, resource, timeout, args.interval, args.count)

    request = {"force": args.force} if args.command == "primary" else {}
    if args.command == "connect" and args.discard_my_data:
        request = {"discard_my_data": True}
    try:
        with ControlClient(path, timeout=timeout) as client:
            response = client.request(args.command, **request)
    except ControlUnavailable as err:
        if args.command == "status" and args.json:
            # For scripts and the OCF agent: stopped and hung are not the same failure.
            print(json.dumps({"unreachable": "not-running" if err.not_running
                              else "no-answer", "error": str(err)}))
        unit = f"mirrord@{resource}" if resource else "mirrord@<resource>"
        return _fail(EXIT_UNREACHABLE, f"{err} (check `systemctl status {unit}`)")

    if not response["ok"]:
        return _refused(response.get("error"), response.get("hint"))

    if args.command == "status":
        status = response.get("status")
        if not isinstance(status, dict):
            return _fail(EXIT_UNREACHABLE, f"control socket {path}: the daemon's reply has no "
                                           f"status (a mirrord of another version?)")
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            print(format_status(status))
    else:
        print(response.get("message") or f"{args.command}: done")
    return EXIT_OK


def _create_md(args) -> int:
    """`mirrorctl create-md`: local, like drbdadm create-md (the daemon must be stopped)."""
    from .create_md import CreateRefused, create_md

    if getattr(args, "config", None) is None:
        raise UsageError("create-md needs --config FILE (it reads the disk and metadata paths)")
    cfg = load_config(args.config, getattr(args, "node", None))
    try:
        print(create_md(cfg, force=args.force))
    except CreateRefused as err:
        print(f"mirrorctl: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _up_or_check(args, timeout: float) -> int:
    """`up` and `check` read the config themselves: the daemon's command line and the
    checks need the file, not just a socket."""
    if getattr(args, "config", None) is None or getattr(args, "socket", None) is not None:
        raise UsageError(f"{args.command} needs --config FILE (not --socket)")
    cfg = load_config(args.config, getattr(args, "node", None))
    if args.command == "check":
        check_local(cfg)  # what the daemon checks at start
        print(f"{cfg.path}: {cfg.name} on {cfg.node.name}: config OK")
        return EXIT_OK
    try:
        print(updown.up(cfg, node=getattr(args, "node", None), log_file=args.log_file,
                        timeout=timeout))
    except updown.Failed as err:
        return _fail(err.code, str(err), err.details)
    return EXIT_OK


def _down(args, path: str, resource: str | None, timeout: float) -> int:
    try:
        print(updown.down(path, name=resource, force=args.force, timeout=timeout))
    except ControlRefused as err:
        return _refused(err.error, err.hint)
    except updown.Failed as err:
        return _fail(err.code, str(err), err.details)
    return EXIT_OK


def _events(path: str, resource: str | None, timeout: float, interval: float,
            count: int | None) -> int:
    """`mirrorctl events`: one JSON object per line on stdout, flushed at once."""
    printed = 0
    try:
        with ControlClient(path, timeout=timeout) as client:
            for event in _stream(client, "events", interval=interval):
                if not event["ok"]:
                    return _refused(event.get("error"), event.get("hint"))
                if event.get("type") == "keepalive":
                    continue  # only there to tell a live reader from a gone one
                event = {k: v for k, v in event.items() if k != "ok"}
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
                printed += 1
                if count is not None and printed >= count:
                    return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    except ControlUnavailable as err:
        if printed:
            return _fail(EXIT_UNREACHABLE, f"events: {err}")
        unit = f"mirrord@{resource}" if resource else "mirrord@<resource>"
        return _fail(EXIT_UNREACHABLE, f"{err} (check `systemctl status {unit}`)")
    raise AssertionError("unreachable: the stream ends with ControlUnavailable")


def _stream(client: ControlClient, command: str, **args):
    """The response lines of a streaming request, until the daemon closes the connection
    (then ControlUnavailable).  The first line comes through ControlClient.request (its
    connect and reply checks); the next ones from the same connection, each within
    STREAM_IDLE_TIMEOUT (the daemon's keepalive lines keep a quiet stream alive)."""
    yield client.request(command, **args)
    sock, reader = client._sock, client._reader  # the connection request() opened
    if sock is None:  # request() closed it: its reply was the whole answer
        raise ControlUnavailable(client.path, f"control socket {client.path}: the daemon "
                                              f"closed the stream (mirrord stopped?)")
    sock.settimeout(max(client.timeout, STREAM_IDLE_TIMEOUT))
    while True:
        try:
            line = reader.readline(MAX_REPLY + 1)
        except TimeoutError:
            raise ControlUnavailable(client.path, f"control socket {client.path}: nothing "
                                     f"for {sock.gettimeout():g} s (the daemon may be stuck)"
                                     ) from None
        except OSError as err:
            raise ControlUnavailable(client.path, f"control socket {client.path}: connection "
                                     f"lost: {err.strerror or err}") from None
        if not line:
            raise ControlUnavailable(client.path, f"control socket {client.path}: the daemon "
                                                  f"closed the stream (mirrord stopped?)")
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not line.endswith(b"\n") or not isinstance(event, dict) \
                or not isinstance(event.get("ok"), bool):
            raise ControlUnavailable(client.path, f"control socket {client.path}: unexpected "
                                                  f"line (not from mirrord?): {line[:80]!r}")
        yield event


def _fail(code: int, line: str, details: list[str] = ()) -> int:
    print(f"mirrorctl: {line}", file=sys.stderr)
    for detail in details:  # e.g. the end of the daemon's log, indented under the line
        print(f"  {detail}", file=sys.stderr)
    return code


def _refused(error: str | None, hint: str | None) -> int:
    """The daemon said no: its reason, then what to do; exit 1."""
    print(f"mirrorctl: refused: {error or 'no reason given'}", file=sys.stderr)
    if hint:
        print(f"  what to do: {hint}", file=sys.stderr)
    return EXIT_REFUSED


# -- human-readable status --------------------------------------------------------------

def format_status(status: dict) -> str:
    """The status block an operator reads; tolerant of missing or unexpected values."""
    get = status.get
    lines = [f"{_s(get('resource'))} on {_s(get('node'))}: {_s(get('role'))}, "
             f"disk {_s(get('disk'))}, {_s(get('connection'))}, protocol {_s(get('protocol'))}"]
    peer = get("peer")
    if isinstance(peer, dict):
        lines.append(f"  peer {_s(peer.get('node'))}: {_s(peer.get('role'))}, "
                     f"disk {_s(peer.get('disk'))}")
    else:
        lines.append("  peer: unknown")
    lines.append(f"  out of sync: {human_size(get('out_of_sync_bytes'))}")
    sync = get("sync")
    if isinstance(sync, dict):
        percent = sync.get("percent")
        percent = f"{percent:.1f}%" if _is_number(percent) else "?%"
        lines.append(f"  sync: {percent} at {human_size(sync.get('bytes_per_s'))}/s, "
                     f"eta {human_duration(sync.get('eta_s'))}")
    refused = get("refused")  # why the peer's last handshake was refused (split brain...)
    if refused:
        lines.append(f"  connection refused: {refused}")
    outdated = get("outdated")  # why this disk may not be promoted
    if isinstance(outdated, dict):
        lines.append(f"  disk outdated: {_s(outdated.get('reason'))}")
    fencing = get("fencing")
    if get("io_frozen"):
        detail = fencing.get("detail") if isinstance(fencing, dict) else None
        lines.append("  writes frozen: fencing the peer" + (f" ({detail})" if detail else ""))
    elif isinstance(fencing, dict) and fencing.get("state") == "failed":
        lines.append(f"  peer not fenced: {_s(fencing.get('detail'))}")
    cluster = get("cluster")  # shown only where a cluster runs: elsewhere it is noise
    if isinstance(cluster, dict) and cluster.get("joined"):
        lines.append("  cluster: peer's daemon " + ("present" if cluster.get("peer_present")
                                                     else "absent"))
    return "\n".join(lines)


def human_size(value) -> str:
    """Bytes in binary units: 0 B, 512 B, 1.5 KiB, 512.0 MiB; '?' if not a number."""
    if not _is_number(value):
        return "?"
    if abs(value) < 1024:
        return f"{value:g} B" if isinstance(value, float) else f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_duration(seconds) -> str:
    """3 s, 2 min 5 s, 1 h 2 min; 'unknown' if not a number."""
    if not _is_number(seconds) or seconds < 0:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _s(value) -> str:
    return "?" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
