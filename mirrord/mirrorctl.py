"""`mirrorctl`: ask a running mirrord for its state, or tell it to change role or connection.

    mirrorctl --config /etc/mirrord/r0.toml status
    mirrorctl --config /etc/mirrord/r0.toml status --json
    mirrorctl --config /etc/mirrord/r0.toml primary [--force]
    mirrorctl --socket /run/mirrord/r0.ctl secondary | connect | disconnect

The daemon is found through its control socket: the one this node's section of the
config names (this node: --node, else the hostname), or --socket PATH.  Every request
is one JSON line on that socket (mirrord/control.py); the OCF agent uses the same.

Exit codes:
  0  done
  1  refused by the daemon (stderr: the reason, then what to do)
  2  usage or config error
  3  the daemon is not reachable (not running, stuck, or a stale socket)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .config import ConfigFileError, load_config
from .control import DEFAULT_TIMEOUT, ControlClient, ControlUnavailable

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
EPILOG = """\
exit codes:
  0  done
  1  refused by the daemon (stderr: the reason, then what to do)
  2  usage or config error
  3  the daemon is not reachable (not running, stuck, or a stale socket)
"""

ACTIONS = ("primary", "secondary", "connect", "disconnect")


class UsageError(Exception):
    """Bad command line: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and no usage block) on stderr."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _target_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: accepted before or after the command without one overwriting the other.
    g = p.add_argument_group("which daemon")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="the resource config (e.g. /etc/mirrord/r0.toml)")
    g.add_argument("--node", metavar="NAME", default=argparse.SUPPRESS,
                   help="this node's section in FILE (default: the hostname)")
    g.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                   help="the daemon's control socket, instead of --config")
    g.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                   help=f"wait this long for the daemon (default {DEFAULT_TIMEOUT:g})")


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
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _target_options(s)
        if name == "status":
            s.add_argument("--json", action="store_true",
                           help="print the daemon's status as JSON (for scripts)")
        if name == "primary":
            s.add_argument("--force", action="store_true",
                           help="promote even an outdated or inconsistent disk (data loss risk)")
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
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
        if not timeout > 0:
            raise UsageError("--timeout must be a positive number of seconds")
        path, resource = resolve_target(args)
    except UsageError as err:
        return _fail(EXIT_USAGE, str(err))
    except ConfigFileError as err:
        return _fail(EXIT_USAGE, str(err))

    request = {"force": args.force} if args.command == "primary" else {}
    try:
        with ControlClient(path, timeout=timeout) as client:
            response = client.request(args.command, **request)
    except ControlUnavailable as err:
        unit = f"mirrord@{resource}" if resource else "mirrord@<resource>"
        return _fail(EXIT_UNREACHABLE, f"{err} (check `systemctl status {unit}`)")

    if not response["ok"]:
        print(f"mirrorctl: refused: {response.get('error') or 'no reason given'}", file=sys.stderr)
        if response.get("hint"):
            print(f"  what to do: {response['hint']}", file=sys.stderr)
        return EXIT_REFUSED

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


def _fail(code: int, line: str) -> int:
    print(f"mirrorctl: {line}", file=sys.stderr)
    return code


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
