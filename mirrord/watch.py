"""`mirrorctl watch`: a live view of one daemon's state and resync progress.

    mirrorctl --config /etc/mirrord/r0.toml watch [--interval 0.5]

On a terminal it redraws one screen in place (rich): the node's role, disk and
connection, the peer, a progress bar with rate and ETA while a resync runs, the bytes out
of sync and a map of where they lie (64 cells, each 1/64th of the volume: █ ▓ ▒ ░ by how
much of the cell is out of sync, · for a cell in sync).  When stdout is not a terminal
(a pipe, a log file) it prints one plain status block per interval instead.

Strategy: poll ``status`` on one control connection once per interval, the same request
``mirrorctl status`` makes, so the view shows exactly what a script would read.  Ctrl-C
(or SIGTERM) ends it with exit 0; a daemon that goes away ends it with one line on stderr
and exit 3.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime

from .control import ControlClient, ControlUnavailable
from .mirrorctl import (
    EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, format_status, human_duration, human_size,
    _is_number,
)

__all__ = ["MAP_CELLS", "bar_text", "map_cells", "map_glyph", "plain_block", "render", "run"]

MAP_CELLS = 64  # out_of_sync_map has one entry per 1/64th of the volume
BAR_WIDTH = 40  # characters of the resync progress bar (fewer on a narrow terminal)
SCREEN_WIDTH = 100  # the panel's width (less on a narrower terminal): steady as values change
LABEL_WIDTH = 14  # "│ out of sync ": border, label and padding before a value
# (least percent out of sync, glyph, style), most first; 0 percent is "·".
GLYPHS = ((76, "█", "bold red"), (51, "▓", "red"), (26, "▒", "yellow"), (1, "░", "yellow"))
IN_SYNC_GLYPH = ("·", "green")
STATE_STYLES = {
    "primary": "bold cyan", "secondary": "cyan",
    "up-to-date": "green", "inconsistent": "yellow", "failed": "bold red",
    "connected": "green", "sync-source": "yellow", "sync-target": "yellow",
    "connecting": "red", "standalone": "bold red",
}


def map_glyph(percent) -> tuple[str, str]:
    """The (glyph, style) of a map cell that is `percent` out of sync."""
    if not _is_number(percent) or percent <= 0:
        return IN_SYNC_GLYPH if _is_number(percent) else ("?", "dim")
    for least, glyph, style in GLYPHS:
        if percent >= least:
            return glyph, style
    return GLYPHS[-1][1:]  # 0 < percent < 1


def map_cells(status: dict) -> list | None:
    """The status's out_of_sync_map if it is a list of numbers, else None."""
    cells = status.get("out_of_sync_map")
    if not isinstance(cells, list) or not cells or not all(_is_number(c) for c in cells):
        return None
    return cells


def map_text(cells: list) -> str:
    return "".join(map_glyph(c)[0] for c in cells)


def plain_block(status: dict, when: str | None = None) -> str:
    """One status block for a pipe: a time line, `mirrorctl status`, then the map."""
    when = when or datetime.now().strftime("%H:%M:%S")
    lines = [f"-- {when}", format_status(status)]
    cells = map_cells(status)
    if cells is not None:
        lines.append(f"  map: {map_text(cells)}")
    return "\n".join(lines) + "\n"


def bar_text(percent: float, width: int = BAR_WIDTH) -> tuple[str, str]:
    """(done, left) parts of a progress bar: ━ per done cell, ╸ for a half, ─ left.

    Two glyphs, not only two colours, so that the bar reads on a monochrome terminal too.
    """
    percent = max(0.0, min(100.0, percent))
    halves = int(percent / 100 * width * 2)
    done = "━" * (halves // 2) + ("╸" if halves % 2 else "")
    return done, "─" * (width - len(done))


def progress_bar(percent: float, width: int = BAR_WIDTH):
    from rich.text import Text

    done, left = bar_text(percent, width)
    bar = Text(done, style="bold green")
    bar.append(left, style="dim")
    return bar


def _styled(value) -> "Text":
    from rich.text import Text

    text = "?" if value is None else str(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


def squeeze(cells: list, most: int) -> list:
    """At most `most` cells: neighbours merged, each keeping the worst (highest) percent."""
    while len(cells) > most and len(cells) > 1:
        cells = [max(cells[i:i + 2]) for i in range(0, len(cells), 2)]
    return cells


def render(status: dict, *, interval: float, when: str | None = None,
           width: int = SCREEN_WIDTH):
    """The screen for one status (a rich renderable), at most `width` columns wide."""
    width = max(40, min(SCREEN_WIDTH, width))
    room = width - LABEL_WIDTH - 2  # for a value: less the right border
    bar_width = max(10, min(BAR_WIDTH, room - 13))  # then "  100.0% done"
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    get = status.get
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", justify="right", no_wrap=True, min_width=11)
    grid.add_column(no_wrap=True)

    head = Text()
    head.append_text(_styled(get("role")))
    head.append("   disk ")
    head.append_text(_styled(get("disk")))
    head.append("   ")
    head.append_text(_styled(get("connection")))
    head.append(f"   protocol {'?' if get('protocol') is None else get('protocol')}")
    grid.add_row("state", head)

    peer = get("peer")
    if isinstance(peer, dict):
        line = Text(f"{'?' if peer.get('node') is None else peer.get('node')}: ")
        line.append_text(_styled(peer.get("role")))
        line.append("   disk ")
        line.append_text(_styled(peer.get("disk")))
    else:
        line = Text("not connected", style="red")
    grid.add_row("peer", line)

    size = get("size_bytes")
    out_of_sync = get("out_of_sync_bytes")
    sync = get("sync")
    if isinstance(sync, dict):
        percent = sync.get("percent")
        pct = float(percent) if _is_number(percent) else 0.0
        line = progress_bar(pct, bar_width)
        line.append(f"  {pct:5.1f}% done", style="bold")
        grid.add_row("resync", line)
        detail = ""
        if _is_number(sync.get("done_bytes")) and _is_number(sync.get("total_bytes")):
            detail = (f"{human_size(sync['done_bytes'])} of "
                      f"{human_size(sync['total_bytes'])}  ")
        detail += (f"at {human_size(sync.get('bytes_per_s'))}/s  "
                   f"eta {human_duration(sync.get('eta_s'))}")
        grid.add_row("", Text(detail))
    elif _is_number(out_of_sync) and out_of_sync > 0:
        grid.add_row("resync", Text("none running (waiting for the peer)", style="yellow"))
    else:
        grid.add_row("resync", Text("none running", style="dim"))

    oos = Text(human_size(out_of_sync),
               style="bold red" if _is_number(out_of_sync) and out_of_sync > 0 else "green")
    if _is_number(size):
        oos.append(f" of {human_size(size)}", style="")
    grid.add_row("out of sync", oos)

    cells = map_cells(status)
    if cells is not None:
        cells = squeeze(cells, room)
        row = Text()
        for c in cells:
            glyph, style = map_glyph(c)
            row.append(glyph, style=style)
        grid.add_row("map", row)
        scale = Text("0", style="dim")
        end = human_size(size) if _is_number(size) else ""
        scale.append(" " * max(1, len(cells) - 1 - len(end)) + end, style="dim")
        grid.add_row("", scale)
        grid.add_row("", Text("█ >75%  ▓ >50%  ▒ >25%  ░ >0%  · in sync", style="dim"))

    refused = get("refused")
    if refused:
        grid.add_row("refused", Text(str(refused), style="bold red"))

    when = when or datetime.now().strftime("%H:%M:%S")
    title = f"mirrord  {'?' if get('resource') is None else get('resource')} on " \
            f"{'?' if get('node') is None else get('node')}"
    return Panel(grid, title=title, title_align="left", width=width,
                 subtitle=f"{when} · every {interval:g} s · Ctrl-C quits", subtitle_align="right")


class _Stop(Exception):
    """SIGTERM: leave like Ctrl-C, restoring the terminal."""


def run(path: str, *, interval: float, timeout: float, count: int | None = None,
        out=None) -> int:
    """Watch the daemon at control socket `path`; the exit code."""
    out = out if out is not None else sys.stdout
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        with ControlClient(path, timeout=timeout) as client:
            if out.isatty():
                return _run_live(client, interval, count, out)
            return _run_plain(client, interval, count, out)
    except (KeyboardInterrupt, _Stop):
        return EXIT_OK
    except ControlUnavailable as err:
        print(f"mirrorctl: watch: {err} (the daemon went away?)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except _Refused as err:
        print(f"mirrorctl: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Refused(Exception):
    pass


def _status(client: ControlClient) -> dict:
    response = client.request("status")
    if not response["ok"]:
        raise _Refused(response.get("error") or "no reason given")
    status = response.get("status")
    if not isinstance(status, dict):
        raise ControlUnavailable(client.path, f"control socket {client.path}: the daemon's "
                                              f"reply has no status (a mirrord of another "
                                              f"version?)")
    return status


def _ticks(interval: float, count: int | None):
    """Yield at most `count` times, `interval` apart (from the start of each tick)."""
    n = 0
    next_at = time.monotonic()
    while count is None or n < count:
        yield n
        n += 1
        if count is not None and n >= count:
            return
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()  # a slow daemon: do not try to catch up


def _run_plain(client: ControlClient, interval: float, count: int | None, out) -> int:
    for _ in _ticks(interval, count):
        out.write(plain_block(_status(client)) + "\n")
        out.flush()
    return EXIT_OK


def _run_live(client: ControlClient, interval: float, count: int | None, out) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    status = _status(client)  # before taking over the screen: no daemon, no screen
    with Live(render(status, interval=interval, width=console.width), console=console,
              auto_refresh=False, transient=False, redirect_stdout=False,
              redirect_stderr=False) as live:
        for n in _ticks(interval, count):
            if n:
                status = _status(client)
            live.update(render(status, interval=interval, width=console.width), refresh=True)
    return EXIT_OK
