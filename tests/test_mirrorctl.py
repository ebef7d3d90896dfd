"""The real `mirrorctl` process against a real ControlServer with canned answers, and the
control socket's own contract (malformed lines, long lines, streams, stale sockets)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mirrord.control import (
    MAX_LINE, ControlClient, ControlError, ControlRefused, ControlServer, ControlUnavailable,
    request_arg,
)
from mirrord.mirrorctl import format_status, human_duration, human_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONNECTED = {
    "resource": "r0", "node": "alpha", "role": "primary", "disk": "up-to-date",
    "connection": "connected", "peer": {"node": "beta", "role": "secondary", "disk": "up-to-date"},
    "protocol": "C", "out_of_sync_bytes": 0, "sync": None,
    # Unknown keys: kept by --json, ignored by the human output.
    "future_key": {"nested": [1, 2.5, None, "x"]},
}
SYNCING = dict(CONNECTED, connection="sync-source", out_of_sync_bytes=3 << 29,
               peer={"node": "beta", "role": "secondary", "disk": "inconsistent"},
               sync={"percent": 42.0, "bytes_per_s": 512 << 20, "eta_s": 3.2})
STANDALONE = dict(CONNECTED, connection="standalone", peer=None, out_of_sync_bytes=4096)


class Daemon:
    """A ControlServer whose handler answers from `replies` and records requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.replies: dict[str, object] = {"status": {"ok": True, "status": CONNECTED}}
        self.server = ControlServer(path, self.handle)

    def handle(self, request: dict):
        self.requests.append(request)
        reply = self.replies.get(request["command"])
        if reply is None:
            raise ControlRefused(f"unknown command {request['command']!r}", "see mirrorctl --help")
        if isinstance(reply, BaseException):
            raise reply
        return reply


@pytest.fixture
def sockdir():
    # Short: a unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="mctl-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(sockdir):
    d = Daemon(os.path.join(sockdir, "r0.ctl"))
    d.server.start()
    yield d
    d.server.close()


def mirrorctl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mirrord.mirrorctl", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.rstrip("\n")


def write_config(sockdir: str, control_socket: str) -> str:
    path = os.path.join(sockdir, "r0.toml")
    nodes = ""
    for name, ctl in (("alpha", control_socket), ("beta", "/nonexistent.ctl")):
        nodes += (f'\n[nodes.{name}]\ninterface = "mir0"\ndisk = "/srv/{name}.img"\n'
                  f'metadata = "/var/lib/mirrord/r0.meta"\nnbd_socket = "/run/mirrord/r0.nbd"\n'
                  f'control_socket = "{ctl}"\n')
    with open(path, "w") as f:
        f.write('[resource]\nname = "r0"\n' + nodes)
    return path


# -- exit 0 -----------------------------------------------------------------------------

def test_status_json_is_the_dict_as_received(daemon):
    for status in (CONNECTED, SYNCING, STANDALONE):
        daemon.replies["status"] = {"ok": True, "status": status}
        proc = mirrorctl("--socket", daemon.path, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == status
        assert proc.stdout == json.dumps(status, indent=2, sort_keys=True) + "\n"
    assert daemon.requests[-1] == {"command": "status"}


def test_status_human_connected(daemon):
    proc = mirrorctl("--socket", daemon.path, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "r0 on alpha: primary, disk up-to-date, connected, protocol C\n"
        "  peer beta: secondary, disk up-to-date\n"
        "  out of sync: 0 B\n")
    assert proc.stderr == ""


def test_status_human_syncing(daemon):
    daemon.replies["status"] = {"ok": True, "status": SYNCING}
    proc = mirrorctl("--socket", daemon.path, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "r0 on alpha: primary, disk up-to-date, sync-source, protocol C\n"
        "  peer beta: secondary, disk inconsistent\n"
        "  out of sync: 1.5 GiB\n"
        "  sync: 42.0% at 512.0 MiB/s, eta 3 s\n")


def test_status_human_peer_unknown(daemon):
    daemon.replies["status"] = {"ok": True, "status": STANDALONE}
    proc = mirrorctl("--socket", daemon.path, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "r0 on alpha: primary, disk up-to-date, standalone, protocol C\n"
        "  peer: unknown\n"
        "  out of sync: 4.0 KiB\n")


def test_options_after_the_command_and_config_lookup(daemon, sockdir):
    config = write_config(sockdir, daemon.path)
    for args in (["--config", config, "--node", "alpha", "status"],
                 ["status", "--config", config, "--node", "alpha"],
                 ["--config", config, "status", "--node", "alpha"]):
        proc = mirrorctl(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stdout.startswith("r0 on alpha: primary")


@pytest.mark.parametrize("command, args, sent", [
    ("primary", [], {"command": "primary", "force": False}),
    ("primary", ["--force"], {"command": "primary", "force": True}),
    ("secondary", [], {"command": "secondary"}),
    ("connect", [], {"command": "connect"}),
    ("disconnect", [], {"command": "disconnect"}),
])
def test_actions_send_their_request_and_print_the_message(daemon, command, args, sent):
    daemon.replies[command] = {"ok": True, "message": f"{command} done, really"}
    proc = mirrorctl("--socket", daemon.path, command, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{command} done, really\n"
    assert daemon.requests == [sent]


# -- exit 1 -----------------------------------------------------------------------------

def test_refusal_with_hint(daemon):
    daemon.replies["primary"] = ControlRefused(
        "the local disk is outdated", "promote the peer instead, or use primary --force")
    proc = mirrorctl("--socket", daemon.path, "primary")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("mirrorctl: refused: the local disk is outdated\n"
                           "  what to do: promote the peer instead, or use primary --force\n")


def test_refusal_without_hint(daemon):
    daemon.replies["connect"] = {"ok": False, "error": "already connected"}
    proc = mirrorctl("--socket", daemon.path, "connect")
    assert proc.returncode == 1
    assert one_line(proc.stderr) == "mirrorctl: refused: already connected"


def test_handler_crash_is_a_refusal_not_a_traceback(daemon, caplog):
    daemon.replies["secondary"] = RuntimeError("boom")
    proc = mirrorctl("--socket", daemon.path, "secondary")
    assert proc.returncode == 1
    assert proc.stderr.startswith("mirrorctl: refused: internal error: boom\n")
    assert any("boom" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    # The daemon goes on serving.
    assert mirrorctl("--socket", daemon.path, "status").returncode == 0


# -- exit 2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    ([], ["required", "COMMAND"]),
    (["--socket", "/x.ctl"], ["required"]),
    (["--socket", "/x.ctl", "frobnicate"], ["invalid choice", "frobnicate"]),
    (["status"], ["--config"]),
    (["--socket", "/x.ctl", "--config", "/y.toml", "status"], ["not both"]),
    (["--socket", "/x.ctl", "status", "--bogus"], ["--bogus"]),
    (["--socket", "/x.ctl", "--timeout", "soon", "status"], ["--timeout"]),
    (["--socket", "/x.ctl", "--timeout", "0", "status"], ["--timeout"]),
    (["--socket", "/x.ctl", "events", "--interval", "0"], ["--interval"]),
    (["--socket", "/x.ctl", "events", "--interval", "soon"], ["--interval"]),
    (["--socket", "/x.ctl", "events", "--count", "0"], ["--count"]),
    (["--socket", "/x.ctl", "watch", "--interval", "1e9"], ["--interval"]),
    (["--socket", "/x.ctl", "watch", "--count", "-1"], ["--count"]),
])
def test_usage_errors(args, words):
    proc = mirrorctl(*args)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("mirrorctl")
    for word in words:
        assert word in line


def test_config_errors(sockdir, daemon):
    missing = os.path.join(sockdir, "nope.toml")
    proc = mirrorctl("--config", missing, "status")
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"mirrorctl: {missing}: cannot read: No such file or directory"

    config = write_config(sockdir, daemon.path)
    proc = mirrorctl("--config", config, "--node", "gamma", "status")
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (f"mirrorctl: {config}: nodes: no section for node 'gamma' "
                                     f"(this file has: alpha, beta); pass --node NAME")
    assert daemon.requests == []


# -- exit 3 -----------------------------------------------------------------------------

def test_no_socket(sockdir):
    path = os.path.join(sockdir, "absent.ctl")
    proc = mirrorctl("--socket", path, "status")
    assert proc.returncode == 3
    line = one_line(proc.stderr)
    assert path in line and "may not be running" in line and "systemctl status mirrord@" in line


def test_no_socket_via_config_names_the_unit(sockdir):
    config = write_config(sockdir, os.path.join(sockdir, "absent.ctl"))
    proc = mirrorctl("--config", config, "--node", "alpha", "primary")
    assert proc.returncode == 3
    line = one_line(proc.stderr)
    assert os.path.join(sockdir, "absent.ctl") in line and "systemctl status mirrord@r0" in line


def test_stale_socket(sockdir):
    path = os.path.join(sockdir, "stale.ctl")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # bound, never listening: what a killed daemon leaves behind
    try:
        proc = mirrorctl("--socket", path, "status")
    finally:
        s.close()
    assert proc.returncode == 3
    assert path in one_line(proc.stderr)


def test_daemon_that_never_answers(sockdir):
    path = os.path.join(sockdir, "mute.ctl")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()
    try:
        start = time.monotonic()
        proc = mirrorctl("--socket", path, "--timeout", "0.5", "status")
        assert time.monotonic() - start < 5
    finally:
        s.close()
    assert proc.returncode == 3
    line = one_line(proc.stderr)
    assert path in line and "no reply" in line


@pytest.mark.parametrize("reply", [b"hello there\n", b"[1, 2]\n", b'{"status": {}}\n', b""])
def test_reply_that_is_not_ours(sockdir, reply):
    path = os.path.join(sockdir, "odd.ctl")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen()

    def answer():
        conn, _ = s.accept()
        conn.recv(4096)
        conn.sendall(reply)
        conn.close()
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        proc = mirrorctl("--socket", path, "status")
    finally:
        t.join(5)
        s.close()
    assert proc.returncode == 3
    assert path in one_line(proc.stderr)


def test_status_reply_without_status(daemon):
    daemon.replies["status"] = {"ok": True, "message": "hm"}
    proc = mirrorctl("--socket", daemon.path, "status")
    assert proc.returncode == 3
    assert "no status" in one_line(proc.stderr)


# -- the control socket itself ----------------------------------------------------------

def raw(path: str) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s, s.makefile("rb")


def exchange(s, reader, line: bytes) -> dict:
    s.sendall(line)
    return json.loads(reader.readline())


def test_malformed_lines_get_ok_false_and_the_connection_stays_usable(daemon):
    s, reader = raw(daemon.path)
    try:
        for bad, words in ((b"{not json\n", "not JSON"), (b"[1, 2]\n", "not a JSON object"),
                           (b'"status"\n', "not a JSON object"),
                           (b'{"cmd": "status"}\n', "command"), (b'{"command": 3}\n', "command")):
            response = exchange(s, reader, bad)
            assert response["ok"] is False and words in response["error"], response
            assert response["hint"]
        s.sendall(b"\n")  # blank lines are ignored, not answered
        assert exchange(s, reader, b'{"command": "status"}\n') == {"ok": True, "status": CONNECTED}
        assert exchange(s, reader, b'{"command": "nope"}\n') == {
            "ok": False, "error": "unknown command 'nope'", "hint": "see mirrorctl --help"}
    finally:
        s.close()
    assert daemon.requests == [{"command": "status"}, {"command": "nope"}]


def test_line_longer_than_64k_closes_the_connection(daemon):
    s, reader = raw(daemon.path)
    try:
        # Exactly MAX_LINE bytes before the newline is still served.
        line = b'{"command": "status"}'.ljust(MAX_LINE) + b"\n"
        assert exchange(s, reader, line)["ok"] is True
        s.sendall(b"x" * (MAX_LINE + 10) + b"\n")
        response = json.loads(reader.readline())
        assert response["ok"] is False and "longer" in response["error"]
        assert reader.readline() == b""  # closed
    finally:
        s.close()
    assert mirrorctl("--socket", daemon.path, "status").returncode == 0


def test_handler_response_without_ok_gets_ok_true_and_nan_becomes_null(daemon):
    daemon.replies["connect"] = {"message": "connecting", "rate": float("nan")}
    with ControlClient(daemon.path) as client:
        assert client.request("connect") == {"ok": True, "message": "connecting", "rate": None}
        # The same connection serves several requests.
        assert client.request("status")["status"] == CONNECTED
        with pytest.raises(ControlRefused) as info:
            client.call("nope")
        assert info.value.hint == "see mirrorctl --help"


def test_stream_responses(daemon):
    daemon.replies["events"] = None

    def handle(request):
        if request["command"] == "events":
            return iter([{"event": "connected"}, {"event": "sync-done"}])
        return Daemon.handle(daemon, request)
    daemon.server.handler = handle
    s, reader = raw(daemon.path)
    try:
        assert exchange(s, reader, b'{"command": "events"}\n') == {"ok": True, "event": "connected"}
        assert json.loads(reader.readline()) == {"ok": True, "event": "sync-done"}
        assert exchange(s, reader, b'{"command": "status"}\n')["ok"] is True
    finally:
        s.close()


def test_server_socket_file_lifecycle(sockdir):
    path = os.path.join(sockdir, "sub", "r0.ctl")  # the parent directory is created
    server = ControlServer(path, lambda request: {"ok": True, "message": "hi"})
    server.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        # A second daemon must not steal a live socket.
        with pytest.raises(ControlError, match="another process") as info:
            ControlServer(path, lambda r: {}).start()
        assert isinstance(info.value, OSError)  # the daemon's `except OSError` covers it
        assert str(info.value).startswith(f"{path}: another process")
        assert ControlClient(path).request("x") == {"ok": True, "message": "hi"}
    finally:
        server.close()
    assert not os.path.exists(path)
    server.close()  # idempotent


def test_server_replaces_a_stale_socket_but_not_a_file(sockdir):
    path = os.path.join(sockdir, "r0.ctl")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with ControlServer(path, lambda request: {"ok": True, "message": "fresh"}):
        assert ControlClient(path).request("x")["message"] == "fresh"
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, lambda r: {}).start()
    assert open(path).read() == "precious"


def test_close_drops_idle_clients(sockdir):
    path = os.path.join(sockdir, "r0.ctl")
    server = ControlServer(path, lambda request: {"ok": True})
    server.start()
    s, reader = raw(path)
    assert exchange(s, reader, b'{"command": "status"}\n') == {"ok": True}  # served, now idle
    server.close()
    assert reader.readline() == b""
    s.close()


def test_a_request_that_starts_the_stop_still_gets_its_reply(sockdir):
    """`mirrorctl down`: its handler starts the stop, and the stopping daemon closes the
    server while the handler has not yet returned; the reply still reaches the client."""
    path = os.path.join(sockdir, "r0.ctl")
    stopping = threading.Event()

    def handle(request):
        stopping.set()
        time.sleep(0.3)  # the stop is well under way before the reply is ready
        return {"ok": True, "message": "r0 on alpha: stopping"}

    server = ControlServer(path, handle)
    server.start()
    closer = threading.Thread(target=lambda: stopping.wait(10) and server.close())
    closer.start()
    try:
        with ControlClient(path, timeout=10) as client:
            assert client.call("down")["message"] == "r0 on alpha: stopping"
    finally:
        closer.join(10)
        server.close()
    assert not os.path.exists(path)


def test_close_cuts_a_request_that_outlasts_the_grace(sockdir, monkeypatch):
    import mirrord.control as control

    monkeypatch.setattr(control, "REPLY_GRACE", 0.2)
    path = os.path.join(sockdir, "r0.ctl")
    release = threading.Event()
    started = threading.Event()

    def handle(request):
        started.set()
        release.wait(10)
        return {"ok": True}

    server = ControlServer(path, handle)
    server.start()
    s, reader = raw(path)
    try:
        s.sendall(b'{"command": "stuck"}\n')
        assert started.wait(10)
        t0 = time.monotonic()
        server.close()
        assert time.monotonic() - t0 < 5
        assert reader.readline() == b""  # cut, not answered
    finally:
        release.set()
        s.close()


def test_client_unavailable_names_the_socket(sockdir):
    path = os.path.join(sockdir, "absent.ctl")
    with pytest.raises(ControlUnavailable) as info:
        ControlClient(path).request("status")
    assert path in str(info.value) and "not be running" in str(info.value)
    assert info.value.path == path


def test_request_arg():
    request = {"command": "primary", "force": True, "count": 3, "flag": 1}
    assert request_arg(request, "force", bool) is True
    assert request_arg(request, "count", int) == 3
    assert request_arg(request, "absent", bool, False) is False
    with pytest.raises(ControlRefused, match="'absent'"):
        request_arg(request, "absent", bool)
    with pytest.raises(ControlRefused, match="'flag' must be bool, not int"):
        request_arg(request, "flag", bool)
    with pytest.raises(ControlRefused, match="'force' must be int, not bool"):
        request_arg(request, "force", int)


# -- formatting -------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (512 << 20, "512.0 MiB"),
    (3 << 29, "1.5 GiB"), (5 << 40, "5.0 TiB"), (None, "?"), ("lots", "?"), (True, "?"),
])
def test_human_size(value, text):
    assert human_size(value) == text


@pytest.mark.parametrize("value, text", [
    (0, "0 s"), (3.2, "3 s"), (59, "59 s"), (125, "2 min 5 s"), (3720, "1 h 2 min"),
    (None, "unknown"), (float("inf"), "unknown"), (-1, "unknown"),
])
def test_human_duration(value, text):
    assert human_duration(value) == text


def test_format_status_shows_why_the_peer_was_refused():
    status = dict(STANDALONE, refused="split brain: both nodes were primary")
    assert format_status(status).splitlines()[-1] == (
        "  connection refused: split brain: both nodes were primary")
    assert "refused" not in format_status(STANDALONE)


def test_format_status_tolerates_junk():
    text = format_status({"peer": "beta", "sync": {"percent": "x"}, "out_of_sync_bytes": None})
    assert text.splitlines() == ["? on ?: ?, disk ?, ?, protocol ?", "  peer: unknown",
                                 "  out of sync: ?", "  sync: ?% at ?/s, eta unknown"]


# -- events and watch -------------------------------------------------------------------

def test_events_prints_each_line_without_ok_and_skips_keepalives(daemon):
    daemon.replies["events"] = None

    def handle(request):
        if request["command"] == "events":
            daemon.requests.append(request)
            return iter([{"type": "exists", "time": "T", "status": CONNECTED},
                         {"type": "keepalive", "time": "T"},
                         {"type": "change", "time": "T", "changed": {"role": ["a", "b"]},
                          "status": CONNECTED}])
        return Daemon.handle(daemon, request)
    daemon.server.handler = handle
    proc = mirrorctl("--socket", daemon.path, "events", "--count", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines == [{"type": "exists", "time": "T", "status": CONNECTED},
                     {"type": "change", "time": "T", "changed": {"role": ["a", "b"]},
                      "status": CONNECTED}]
    assert daemon.requests == [{"command": "events", "interval": 0.5}]


def test_events_daemon_closing_the_stream_exits_3(daemon):
    def handle(request):
        if request["command"] == "events":
            def stream():
                yield {"type": "exists", "time": "T", "status": CONNECTED}
                threading.Timer(0.2, daemon.server.close).start()  # the daemon stops
            return stream()
        return Daemon.handle(daemon, request)
    daemon.server.handler = handle
    proc = mirrorctl("--socket", daemon.path, "events")
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["type"] == "exists"
    line = one_line(proc.stderr)
    assert daemon.path in line and "closed the stream" in line


def test_events_refused_by_a_daemon_without_it(daemon):
    proc = mirrorctl("--socket", daemon.path, "events")  # the canned daemon knows no events
    assert proc.returncode == 1 and proc.stdout == ""
    assert "unknown command 'events'" in proc.stderr


def test_events_error_in_the_middle_of_the_stream_exits_1(daemon):
    def handle(request):
        def stream():
            yield {"type": "exists", "time": "T", "status": CONNECTED}
            raise RuntimeError("engine exploded")
        return stream()
    daemon.server.handler = handle
    proc = mirrorctl("--socket", daemon.path, "events")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["type"] == "exists"
    assert "internal error: engine exploded" in proc.stderr


def test_events_no_daemon_exits_3(sockdir):
    proc = mirrorctl("--socket", os.path.join(sockdir, "absent.ctl"), "events")
    assert proc.returncode == 3 and "may not be running" in one_line(proc.stderr)


def test_watch_plain_once(daemon):
    daemon.replies["status"] = {"ok": True, "status": SYNCING}
    proc = mirrorctl("--socket", daemon.path, "watch", "--count", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == format_status(SYNCING).splitlines() + [""]
