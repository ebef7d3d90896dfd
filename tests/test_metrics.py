"""Prometheus metrics: the collector on canned status and counters, the HTTP server, and
real daemons scraped from inside their namespaces across a link cut and a resync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrord.metrics import MetricsServer
from protocol.counters import Counters

MiB = 1 << 20
PORT = 9942

STATUS = {
    "resource": "r0", "node": "alpha", "role": "primary", "disk": "up-to-date",
    "connection": "sync-source", "peer": {"node": "beta", "role": "secondary",
                                          "disk": "inconsistent"},
    "protocol": "C", "out_of_sync_bytes": 3 * MiB, "size_bytes": 64 * MiB,
    "sync": {"percent": 25.0, "bytes_per_s": 8 * MiB, "eta_s": 3.0, "done_bytes": MiB,
             "total_bytes": 4 * MiB},
    "resync_sent_bytes": 5 * MiB, "resync_received_bytes": 0,
    "out_of_sync_map": [0] * 64, "future_key": [1, 2],
}


def samples(text: str) -> dict[tuple, float]:
    """{(name, (('label', 'value'), ...)): value} without resource/node (checked here)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("resource") == "r0", s
            assert labels.pop("node") in ("alpha", "beta"), s
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def scrape_local(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


# -- the collector and the server, in process -------------------------------------------

@pytest.fixture
def server():
    state = {"status": dict(STATUS), "counters": {
        "connection": Counters(frames_sent=10, frames_received=7, retransmits=2,
                               corrupt=3, bad_mac=1).as_dict(),
        "link": {"runt": 1, "unknown_volume": 4},
        "socket": {"send_dropped": 5, "recv_errors": 0, "runts": 0, "tx_ring_full": 9}}}
    srv = MetricsServer(("127.0.0.1", 0), lambda: state["status"], lambda: state["counters"],
                        resource="r0", node="alpha")
    srv.start()
    srv.state = state
    yield srv
    srv.close()


def test_series_and_values(server):
    m = samples(scrape_local(server.address[1]))
    assert value(m, "mirrord_role", role="primary") == 1
    assert value(m, "mirrord_role", role="secondary") == 0
    assert value(m, "mirrord_disk_state", state="up-to-date") == 1
    assert value(m, "mirrord_disk_state", state="failed") == 0
    assert value(m, "mirrord_connection_state", state="sync-source") == 1
    assert sum(v for (name, _), v in m.items() if name == "mirrord_connection_state") == 1
    assert value(m, "mirrord_peer_connected") == 1
    assert value(m, "mirrord_peer_disk_state", state="inconsistent") == 1
    assert value(m, "mirrord_out_of_sync_bytes") == 3 * MiB
    assert value(m, "mirrord_size_bytes") == 64 * MiB
    assert value(m, "mirrord_resync_active") == 1
    assert value(m, "mirrord_resync_done_ratio") == 0.25
    assert value(m, "mirrord_resync_bytes_per_second") == 8 * MiB
    assert value(m, "mirrord_resync_sent_bytes_total") == 5 * MiB
    assert value(m, "mirrord_resync_received_bytes_total") == 0
    assert value(m, "mirrord_link_frames_sent_total") == 10
    assert value(m, "mirrord_link_frames_received_total") == 7
    assert value(m, "mirrord_link_retransmits_total") == 2
    assert value(m, "mirrord_link_dropped_total", reason="corrupt") == 3
    assert value(m, "mirrord_link_dropped_total", reason="bad_mac") == 1
    assert value(m, "mirrord_link_dropped_total", reason="runt") == 1
    assert value(m, "mirrord_link_dropped_total", reason="unknown_volume") == 4
    assert value(m, "mirrord_link_dropped_total", reason="send_dropped") == 5
    assert ("mirrord_link_dropped_total", (("reason", "tx_ring_full"),)) not in m


def test_read_at_scrape_time_and_tolerant(server):
    server.state["status"] = {"role": "weird", "connection": "connecting", "peer": None,
                              "sync": None, "out_of_sync_bytes": "junk"}
    server.state["counters"] = {}
    m = samples(scrape_local(server.address[1]))
    assert value(m, "mirrord_role", role="weird") == 1  # an unknown state still shows
    assert value(m, "mirrord_connection_state", state="connecting") == 1
    assert value(m, "mirrord_peer_connected") == 0
    assert value(m, "mirrord_peer_role", role="primary") == 0
    assert value(m, "mirrord_resync_active") == 0
    assert value(m, "mirrord_resync_bytes_per_second") == 0
    assert not any(name == "mirrord_out_of_sync_bytes" for name, _ in m)
    assert not any(name == "mirrord_link_frames_sent_total" for name, _ in m)


def test_other_paths_404_and_close_frees_the_port(server):
    port = server.address[1]
    assert "mirrord_role" in scrape_local(port, "/")
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape_local(port, "/nope")
    assert info.value.code == 404
    server.close()
    server.close()  # idempotent
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_collect_failure_is_a_500_not_a_dead_server():
    def broken():
        raise RuntimeError("engine gone")

    srv = MetricsServer(("127.0.0.1", 0), broken, resource="r0", node="alpha")
    srv.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape_local(srv.address[1])
        assert info.value.code == 500
        with pytest.raises(urllib.error.HTTPError):
            scrape_local(srv.address[1])  # still answering
    finally:
        srv.close()


def test_address_in_use_raises_oserror(server):
    other = MetricsServer(("127.0.0.1", server.address[1]), lambda: STATUS, resource="r0",
                          node="alpha")
    with pytest.raises(OSError):
        other.start()
    other.close()


# -- real daemons -----------------------------------------------------------------------

SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          "'http://127.0.0.1:%d/metrics', timeout=5).read().decode())" % PORT)


def scrape(pair, node: str) -> dict:
    """The metrics of `node`'s daemon, fetched from inside its namespace."""
    result = pair.net.run(pair.ns[node], [sys.executable, "-c", SCRAPE], capture_output=True,
                          text=True, timeout=20, check=False)
    assert result.returncode == 0, f"scrape {node}: {result.stderr}\n{pair.logs_text()}"
    return samples(result.stdout)


def wait_metric(pair, node: str, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    m = None
    while time.monotonic() < deadline:
        m = scrape(pair, node)
        if predicate(m):
            return m
        time.sleep(0.1)
    raise AssertionError(f"{node}: not within {timeout} s: {what}\n{m}")


@pytest.mark.netns
def test_metrics_across_link_cut_and_resync(mirror_pair, tmp_path):
    address = f'"127.0.0.1:{PORT}"'  # the same port on both: each box is its own namespace
    pair = mirror_pair(size=32 * MiB, extra_resource='sync_rate = "8M"',
                       node_extra={"alpha": {"metrics": address}, "beta": {"metrics": address}})
    for node in ("alpha", "beta"):  # a fresh namespace's loopback is down
        pair.net.run(pair.ns[node], ["ip", "link", "set", "lo", "up"])
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=30)
    m = scrape(pair, "alpha")
    assert value(m, "mirrord_role", role="primary") == 1
    assert value(m, "mirrord_connection_state", state="connected") == 1
    assert value(m, "mirrord_peer_connected") == 1
    assert value(m, "mirrord_out_of_sync_bytes") == 0
    assert value(m, "mirrord_size_bytes") == 32 * MiB
    assert value(m, "mirrord_link_frames_sent_total") > 0
    sent_before = value(m, "mirrord_resync_sent_bytes_total")
    # The initial sync of two zeroed disks: how much it sends is the engine's business
    # (a checksum resync sends digests and no data).
    assert 0 <= sent_before <= 32 * MiB
    b = scrape(pair, "beta")
    assert value(b, "mirrord_role", role="secondary") == 1
    received_before = value(b, "mirrord_resync_received_bytes_total")
    assert 0 <= received_before <= 32 * MiB
    assert value(b, "mirrord_link_frames_received_total") > 0

    pair.net.set_link(pair.ns["alpha"], False)
    wait_metric(pair, "alpha", lambda m: value(m, "mirrord_peer_connected") == 0, 10, "peer lost")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8 * MiB))
    subprocess.run(["nbdcopy", "--flush", str(data), pair.uri("alpha")], check=True, timeout=60,
                   capture_output=True)
    m = scrape(pair, "alpha")
    assert value(m, "mirrord_connection_state", state="connecting") == 1
    assert value(m, "mirrord_out_of_sync_bytes") > 0
    assert value(m, "mirrord_resync_active") == 0

    pair.net.set_link(pair.ns["alpha"], True)
    m = wait_metric(pair, "alpha", lambda m: value(m, "mirrord_resync_active") == 1, 10,
                    "resync running")
    assert value(m, "mirrord_connection_state", state="sync-source") == 1
    pair.wait_connected(timeout=30)
    m = scrape(pair, "alpha")
    assert value(m, "mirrord_out_of_sync_bytes") == 0
    assert value(m, "mirrord_resync_active") == 0
    assert value(m, "mirrord_resync_sent_bytes_total") > sent_before
    b = scrape(pair, "beta")
    assert value(b, "mirrord_resync_received_bytes_total") > received_before
    assert value(b, "mirrord_disk_state", state="up-to-date") == 1


@pytest.mark.netns
def test_metrics_port_in_use_exits_2(mirror_pair):
    pair = mirror_pair(size=MiB, node_extra={"alpha": {"metrics": f'"127.0.0.1:{PORT}"'}})
    holder = pair.net.popen(pair.ns["alpha"], [sys.executable, "-c", (
        "import socket, sys, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {PORT})); s.listen(); print('ok', flush=True); "
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ok\n"
        proc = pair.start("alpha", wait=False)
        assert proc.wait(timeout=20) == 2, pair.log("alpha")
    finally:
        holder.stdin.close()  # it exits at end of input
        holder.wait(timeout=10)
    log = pair.log("alpha")
    assert f"nodes.alpha.metrics: cannot listen on 127.0.0.1:{PORT}" in log, log
    assert "Traceback" not in log
    assert not os.path.exists(pair.paths["alpha"]["control_socket"])
