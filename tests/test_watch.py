"""`mirrorctl watch`: the screen for a status (pure), plain blocks on a pipe, the exit when
the daemon goes away, and the live view in a pseudo-terminal while real daemons resync."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import pytest

from mirrord.control import ControlServer
from mirrord.watch import bar_text, map_glyph, map_text, plain_block, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")
PERCENT = re.compile(r"(\d{1,3}\.\d)% done")

SYNCING = {
    "resource": "r0", "node": "alpha", "role": "primary", "disk": "up-to-date",
    "connection": "sync-source", "peer": {"node": "beta", "role": "secondary",
                                          "disk": "inconsistent"},
    "protocol": "C", "out_of_sync_bytes": 40 * MiB, "size_bytes": 64 * MiB,
    "sync": {"percent": 37.5, "bytes_per_s": 16 * MiB, "eta_s": 2.5, "done_bytes": 24 * MiB,
             "total_bytes": 64 * MiB},
    "out_of_sync_map": [0] * 24 + [60] + [100] * 39,
    "generation": {"current": "1", "previous": "0"}, "refused": "split brain (test)",
}


def screen_text(status: dict, width: int = 100) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(
        render(status, interval=0.5, when="12:00:00"))
    return out.getvalue()


# -- pure -------------------------------------------------------------------------------

def test_map_glyphs():
    assert [map_glyph(p)[0] for p in (0, 0.5, 1, 25, 26, 50, 51, 75, 76, 100)] == [
        "·", "░", "░", "░", "▒", "▒", "▓", "▓", "█", "█"]
    assert map_glyph(None)[0] == "?" and map_glyph("x")[0] == "?"
    assert map_text([0, 100, 30]) == "·█▒"


def test_bar_grows_with_percent():
    done = [len("".join(bar_text(p)).rstrip("─")) for p in (0, 10, 50, 90, 100)]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 40
    assert all(len("".join(bar_text(p))) == 40 for p in (-5, 0, 33.3, 100, 250))


def test_screen_shows_state_progress_and_map():
    text = screen_text(SYNCING)
    assert "r0 on alpha" in text
    for words in ("primary", "disk up-to-date", "sync-source", "protocol C",
                  "beta: secondary", "disk inconsistent", "37.5% done", "16.0 MiB/s", "eta 2 s",
                  "24.0 MiB of 64.0 MiB", "40.0 MiB of 64.0 MiB", "split brain (test)"):
        assert words in text, (words, text)
    assert "·" * 24 + "▓" + "█" * 39 in text
    bar = re.search(r"(━+)(╸?)(─+)", text)
    assert bar and len(bar.group(1)) == 15, text  # 37.5% of 40 cells


def test_screen_without_sync_or_peer_and_with_junk():
    text = screen_text(dict(SYNCING, sync=None, peer=None, connection="connecting",
                            out_of_sync_map=[100] * 64, refused=None))
    assert "not connected" in text and "waiting for the peer" in text and "█" * 64 in text
    # Missing and odd values never crash the view.
    for junk in ({}, {"sync": {"percent": "x"}, "peer": 5, "out_of_sync_map": [1, "a"]},
                 {"sync": {}, "size_bytes": None, "out_of_sync_map": "nope"}):
        assert "mirrord" in screen_text(junk)


def test_plain_block():
    block = plain_block(SYNCING, when="12:00:00")
    assert block.startswith("-- 12:00:00\nr0 on alpha: primary, disk up-to-date, sync-source")
    assert "sync: 37.5% at 16.0 MiB/s" in block
    assert block.endswith("  map: " + "·" * 24 + "▓" + "█" * 39 + "\n")


# -- against a ControlServer with a moving status ---------------------------------------

@pytest.fixture
def fake_daemon():
    """A ControlServer whose status is a resync advancing 10 points per 0.1 s."""
    path = tempfile.mkdtemp(prefix="mwatch-", dir="/tmp")
    started = time.monotonic()

    def status():
        percent = min(100.0, round((time.monotonic() - started) * 100, 1))
        return dict(SYNCING, sync=dict(SYNCING["sync"], percent=percent), refused=None)

    server = ControlServer(os.path.join(path, "r0.ctl"),
                           lambda request: {"ok": True, "status": status()})
    server.start()
    yield server
    server.close()
    shutil.rmtree(path, ignore_errors=True)


def mirrorctl(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mirrord.mirrorctl", *args], cwd=REPO,
                            text=True, **kw)


def test_plain_blocks_when_not_a_terminal(fake_daemon):
    proc = mirrorctl("--socket", fake_daemon.path, "watch", "--interval", "0.1", "--count", "3",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and err == "", err
    blocks = out.split("\n\n")
    assert len([b for b in blocks if b.strip()]) == 3, out
    assert all("map: " in b for b in blocks if b.strip())
    assert "\x1b[" not in out


def test_daemon_going_away_exits_3_with_one_line(fake_daemon):
    proc = mirrorctl("--socket", fake_daemon.path, "watch", "--interval", "0.1",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        fake_daemon.close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 3, err
    assert err.count("\n") == 1 and err.startswith("mirrorctl: watch: ") and "Traceback" not in err
    assert "sync-source" in out


def test_no_daemon_exits_3(tmp_path):
    proc = mirrorctl("--socket", str(tmp_path / "none.ctl"), "watch", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3 and err.count("\n") == 1 and out == "", err


# -- in a pseudo-terminal ---------------------------------------------------------------

class PtyWatch:
    """`mirrorctl watch` on a pseudo-terminal of 30 rows x 110 columns; collects output."""

    def __init__(self, socket_path: str, interval: float = 0.2) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 110, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="110", LINES="30")
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirrord.mirrorctl", "--socket", socket_path, "watch",
             "--interval", str(interval)],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True)
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if ready:
                    data = os.read(self.master, 65536)
                    if not data:
                        return
                    with self._lock:
                        self.chunks.append(data)
                elif self.proc.poll() is not None:
                    return
            except OSError:  # EIO: the child closed the terminal
                return

    def text(self) -> str:
        with self._lock:
            raw = b"".join(self.chunks)
        return ANSI.sub("", raw.decode("utf-8", "replace"))

    def percents(self) -> list[float]:
        return [float(p) for p in PERCENT.findall(self.text())]

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._thread.join(5)
            os.close(self.master)


def test_live_view_in_a_terminal(fake_daemon):
    watch = PtyWatch(fake_daemon.path, interval=0.1)
    deadline = time.monotonic() + 10
    while len(set(watch.percents())) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.stop() == 0, watch.text()
    text = watch.text()
    assert "Traceback" not in text
    assert len(set(watch.percents())) >= 3, text[-3000:]
    assert "━" in text and "╭" in text and "Ctrl-C quits" in text


@pytest.mark.netns
def test_watch_follows_a_throttled_resync(mirror_pair, tmp_path):
    """The view of a real resync (writes made while the link was cut): the percent shown
    grows, the bar is drawn, and the map showed where the out-of-sync data lay."""
    pair = mirror_pair(size=32 * MiB, extra_resource='sync_rate = "8M"')
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=30)
    pair.net.set_link(pair.ns["alpha"], False)
    pair.wait("alpha", lambda s: s["peer"] is None, 10, "peer lost")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(12 * MiB))  # the first 12 MiB: cells 0..23 of 64
    subprocess.run(["nbdcopy", "--flush", str(data), pair.uri("alpha")], check=True,
                   timeout=60, capture_output=True)
    watch = PtyWatch(pair.paths["alpha"]["control_socket"], interval=0.2)
    try:
        deadline = time.monotonic() + 10
        while "waiting for the peer" not in watch.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        before = watch.text()
        assert "not connected" in before and "waiting for the peer" in before, before[-3000:]
        pair.net.set_link(pair.ns["alpha"], True)
        pair.wait_connected(timeout=30)
        time.sleep(0.5)  # a screen or two of the end state
        rc = watch.stop()
    finally:
        if watch.proc.poll() is None:
            watch.stop()
    text = watch.text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    # Where the writes went: the map showed the first cells out of sync, the rest not.
    assert re.search(r"map\s+[█▓▒░]{20,26}·{38,44}\s", before), before[-3000:]
    percents = watch.percents()
    increasing = sorted(set(percents))
    assert len(increasing) >= 2 and increasing[-1] > increasing[0], (percents, text[-3000:])
    assert percents == sorted(percents), percents  # never goes back
    assert "━" in text and "sync-source" in text
    assert re.search(r"state\s+primary\s+disk up-to-date\s+connected", text), text[-3000:]
