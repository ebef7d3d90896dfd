"""The events stream: status_events as a pure function of a status sequence, the control
server ending an abandoned stream, and `mirrorctl events` on real daemons across a link
cut and the resync that follows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mirrord.control import ControlServer
from mirrord.events import CHANGE_KEYS, status_events, watched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

PEER = {"node": "beta", "role": "secondary", "disk": "up-to-date"}
CONNECTED = {"resource": "r0", "node": "alpha", "role": "primary", "disk": "up-to-date",
             "connection": "connected", "peer": PEER, "protocol": "C",
             "out_of_sync_bytes": 0, "sync": None, "size_bytes": 64 * MiB}


def syncing(percent: float) -> dict:
    return dict(CONNECTED, connection="sync-source",
                peer=dict(PEER, disk="inconsistent"),
                out_of_sync_bytes=int((100 - percent) / 100 * 64 * MiB),
                sync={"percent": percent, "bytes_per_s": 16 * MiB, "eta_s": 1.0,
                      "done_bytes": int(percent / 100 * 64 * MiB), "total_bytes": 64 * MiB})


def replay(statuses, **kw) -> list[dict]:
    """status_events over `statuses`, one per poll; the stream stops after the last."""
    stop = threading.Event()
    it = iter(statuses)

    def get_status():
        status = next(it)
        if not it.__length_hint__():
            stop.set()
        return status

    return list(status_events(get_status, interval=0, stop=stop, timestamp=lambda: "T", **kw))


# -- status_events, pure ----------------------------------------------------------------

def test_first_line_is_the_state_now():
    lines = replay([CONNECTED, CONNECTED])
    assert lines == [{"type": "exists", "time": "T", "status": CONNECTED}]


def test_link_cut_and_resync_as_events():
    disconnected = dict(CONNECTED, connection="connecting", peer=None, out_of_sync_bytes=64 * MiB)
    sequence = [CONNECTED, CONNECTED, disconnected, disconnected, syncing(0.0), syncing(40.0),
                syncing(80.0), CONNECTED, CONNECTED]
    lines = replay(sequence)
    assert [line["type"] for line in lines] == [
        "exists", "change", "change", "progress", "progress", "progress", "change"]
    assert lines[1]["changed"] == {"connection": ["connected", "connecting"],
                                   "peer_role": ["secondary", None],
                                   "peer_disk": ["up-to-date", None]}
    assert lines[1]["status"] is disconnected
    assert lines[2]["changed"] == {"connection": ["connecting", "sync-source"],
                                   "peer_role": [None, "secondary"],
                                   "peer_disk": [None, "inconsistent"]}
    progress = [line for line in lines if line["type"] == "progress"]
    assert [p["percent"] for p in progress] == [0.0, 40.0, 80.0]
    assert progress[1] == {"type": "progress", "time": "T", "percent": 40.0,
                           "bytes_per_s": 16 * MiB, "eta_s": 1.0,
                           "done_bytes": int(0.4 * 64 * MiB), "total_bytes": 64 * MiB,
                           "out_of_sync_bytes": int(0.6 * 64 * MiB)}
    assert lines[-1]["changed"] == {"connection": ["sync-source", "connected"],
                                    "peer_disk": ["inconsistent", "up-to-date"]}


def test_role_disk_and_refusal_changes():
    demoted = dict(CONNECTED, role="secondary")
    failed = dict(demoted, disk="failed")
    refused = dict(failed, refused="split brain: both were primary")
    lines = replay([CONNECTED, demoted, failed, refused, dict(failed)])
    assert [line["changed"] for line in lines[1:]] == [
        {"role": ["primary", "secondary"]}, {"disk": ["up-to-date", "failed"]},
        {"refused": [None, "split brain: both were primary"]},
        {"refused": ["split brain: both were primary", None]}]


def test_unrelated_changes_make_no_line():
    moved = dict(CONNECTED, out_of_sync_bytes=4096, generation={"current": "1"}, new_key=[1])
    assert len(replay([CONNECTED, moved, moved])) == 1


def test_tolerates_missing_and_odd_values():
    lines = replay([{}, {"peer": "junk", "sync": "junk"}, {"role": "primary"}])
    assert lines[0]["status"] == {}
    assert lines[1:] == [{"type": "change", "time": "T", "changed": {"role": [None, "primary"]},
                          "status": {"role": "primary"}}]
    assert watched({"peer": 3}) == dict.fromkeys(CHANGE_KEYS)


def test_progress_fields_cannot_hide_the_type():
    odd = syncing(10.0)
    odd["sync"] = dict(odd["sync"], type="x", time="y")
    lines = replay([odd, odd])
    assert lines[1]["type"] == "progress" and lines[1]["time"] == "T"


def test_max_lines():
    lines = replay([CONNECTED] + [syncing(p) for p in range(0, 100, 10)], max_lines=3)
    assert [line["type"] for line in lines] == ["exists", "change", "progress"]
    assert replay([CONNECTED], max_lines=0) == []
    assert len(replay([CONNECTED, CONNECTED], max_lines=1)) == 1


def test_stop_ends_the_stream_at_once():
    stop = threading.Event()
    stop.set()
    assert list(status_events(lambda: CONNECTED, stop=stop)) == []
    stop = threading.Event()
    events = status_events(lambda: CONNECTED, interval=30, stop=stop)
    assert next(events)["type"] == "exists"
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    assert list(events) == []
    assert time.monotonic() - started < 5


def test_keepalive_after_a_quiet_while():
    now = [0.0]

    def get_status():
        now[0] += 1.0  # each poll: one simulated second
        return CONNECTED

    events = status_events(get_status, interval=0, clock=lambda: now[0], keepalive=3.0,
                           timestamp=lambda: "T", max_lines=3)
    lines = list(events)
    assert [line["type"] for line in lines] == ["exists", "keepalive", "keepalive"]
    assert lines[1] == {"type": "keepalive", "time": "T"}


def test_without_stop_it_sleeps_the_interval():
    statuses = iter([CONNECTED, dict(CONNECTED, role="secondary")])
    started = time.monotonic()
    lines = list(status_events(lambda: next(statuses), interval=0.05, max_lines=2))
    assert [line["type"] for line in lines] == ["exists", "change"]
    assert time.monotonic() - started >= 0.05
    assert lines[0]["time"].endswith("+00:00")  # ISO 8601, UTC


def test_get_status_failure_ends_the_stream():
    def broken():
        raise RuntimeError("engine gone")

    with pytest.raises(RuntimeError):
        list(status_events(broken, interval=0))


# -- through a real ControlServer -------------------------------------------------------

@pytest.fixture
def sockdir():
    path = tempfile.mkdtemp(prefix="mev-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stream_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "control client")


def test_a_client_that_leaves_ends_its_stream_thread(sockdir):
    """The control server notices a gone client only when it writes to it: the keepalive
    makes that happen while nothing changes, so the stream's thread ends."""
    stop = threading.Event()
    path = os.path.join(sockdir, "r0.ctl")
    server = ControlServer(path, lambda request: status_events(
        lambda: CONNECTED, interval=0.05, stop=stop, keepalive=0.2))
    server.start()
    try:
        before = _stream_threads()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(path)
        client.sendall(b'{"command": "events"}\n')
        reader = client.makefile("rb")
        assert json.loads(reader.readline())["type"] == "exists"
        assert json.loads(reader.readline())["type"] == "keepalive"
        assert _stream_threads() == before + 1
        reader.close()
        client.close()
        deadline = time.monotonic() + 5
        while _stream_threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stream_threads() == before
    finally:
        stop.set()
        server.close()


def test_mirrorctl_events_count_and_interval_checks(sockdir):
    path = os.path.join(sockdir, "r0.ctl")
    requests = []

    def handle(request):
        requests.append(request)
        statuses = iter([CONNECTED] + [syncing(p) for p in range(0, 100, 5)])
        return status_events(lambda: next(statuses), interval=request["interval"])

    server = ControlServer(path, handle)
    server.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "mirrord.mirrorctl", "--socket", path,
                               "events", "--interval", "0.05", "--count", "4"],
                              capture_output=True, text=True, timeout=20, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [line["type"] for line in lines] == ["exists", "change", "progress", "progress"]
        assert all("ok" not in line for line in lines)
        assert requests == [{"command": "events", "interval": 0.05}]
        for bad in (["--interval", "0"], ["--interval", "nan"], ["--count", "0"]):
            proc = subprocess.run([sys.executable, "-m", "mirrord.mirrorctl", "--socket", path,
                                   "events", *bad], capture_output=True, text=True,
                                  timeout=20, cwd=REPO)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    finally:
        server.close()


# -- real daemons -----------------------------------------------------------------------

class EventReader:
    """`mirrorctl events` in the background; its lines, parsed, as they come."""

    def __init__(self, pair, node: str) -> None:
        from mirrorpair import ENV, mirrorctl_argv

        self.proc = subprocess.Popen(
            mirrorctl_argv("--socket", pair.paths[node]["control_socket"], "events",
                           "--interval", "0.2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.append(json.loads(line))

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"no event line within {timeout} s: {what}; lines: "
                             f"{[_short(x) for x in self.lines]}")

    def finish(self, sig=signal.SIGINT, timeout: float = 10) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise
        self._thread.join(5)
        return rc, self.proc.stderr.read()


def _short(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "status"}


def _changed(key: str, new) -> callable:
    return lambda line: line["type"] == "change" and line["changed"].get(key, [None])[-1] == new


@pytest.mark.netns
def test_events_during_link_cut_and_resync(mirror_pair, tmp_path):
    pair = mirror_pair(size=32 * MiB, extra_resource='sync_rate = "8M"')
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=30)
    readers = {node: EventReader(pair, node) for node in ("alpha", "beta")}
    try:
        for node, reader in readers.items():
            first = reader.wait_for(lambda line: True, 10, "the first line")
            assert first["type"] == "exists" and first["status"]["connection"] == "connected"
            assert first["status"]["node"] == node
        pair.net.set_link(pair.ns["alpha"], False)
        lost = readers["alpha"].wait_for(_changed("connection", "connecting"), 10,
                                         "connection -> connecting")
        assert lost["changed"]["peer_role"] == ["secondary", None]
        readers["beta"].wait_for(_changed("connection", "connecting"), 10, "beta connecting")
        data = tmp_path / "data"
        data.write_bytes(os.urandom(12 * MiB))
        subprocess.run(["nbdcopy", "--flush", str(data), pair.uri("alpha")], check=True,
                       timeout=60, capture_output=True)
        pair.net.set_link(pair.ns["alpha"], True)
        readers["alpha"].wait_for(_changed("connection", "sync-source"), 15, "sync-source")
        readers["beta"].wait_for(_changed("connection", "sync-target"), 15, "sync-target")
        for reader in readers.values():
            reader.wait_for(_changed("connection", "connected"), 20, "connected again")
        for node, reader in readers.items():
            progress = [line for line in reader.lines if line["type"] == "progress"]
            assert len(progress) >= 2, (node, [_short(x) for x in reader.lines])
            percents = [p["percent"] for p in progress]
            assert percents == sorted(percents) and percents[-1] > percents[0], percents
            assert {"bytes_per_s", "eta_s", "done_bytes", "total_bytes"} <= set(progress[0])
        back = readers["beta"].wait_for(_changed("disk", "up-to-date"), 5, "beta up to date")
        assert back["status"]["disk"] == "up-to-date"
        rc, err = readers["alpha"].finish()
        assert rc == 0 and "Traceback" not in err, err
        # The daemon stops: the stream ends, mirrorctl says so in one line, exit 3.
        pair.kill("beta", signal.SIGTERM)
        rc, err = _wait_exit(readers["beta"])
        assert rc == 3 and err.count("\n") == 1 and "closed the stream" in err, err
    finally:
        for reader in readers.values():
            if reader.proc.poll() is None:
                reader.proc.kill()
                reader.proc.wait(timeout=10)


def _wait_exit(reader: EventReader, timeout: float = 15) -> tuple[int, str]:
    rc = reader.proc.wait(timeout=timeout)
    reader._thread.join(5)
    return rc, reader.proc.stderr.read()
