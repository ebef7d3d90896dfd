"""Prometheus metrics: the daemon's state and the link's counters, read at scrape time.

    [nodes.alpha]
    metrics = "127.0.0.1:9942"        # then: curl http://127.0.0.1:9942/metrics

Strategy
--------
Nothing is counted twice: a custom collector (:class:`MirrordCollector`) reads
``Engine.status()`` and the link's own counters when Prometheus scrapes, and turns them
into metric families, so the hot paths keep their plain integer counters and pay nothing
for the export.  The text comes from prometheus-client's ``generate_latest`` on a
registry of our own (no process-global state); the HTTP server is the standard library's
threading server on the configured address (IPv4, IPv6 or a host name).

Every series carries the labels ``resource`` and ``node``.  States are enum-style: one
series per possible state, 1 for the current one and 0 for the others, so that
``mirrord_connection_state{state="connected"} == 0`` is an alert rule.

Series: mirrord_role{role}, mirrord_disk_state{state}, mirrord_connection_state{state},
mirrord_peer_connected, mirrord_peer_role{role}, mirrord_peer_disk_state{state},
mirrord_size_bytes, mirrord_out_of_sync_bytes, mirrord_resync_active,
mirrord_resync_done_ratio, mirrord_resync_bytes_per_second,
mirrord_resync_sent_bytes_total, mirrord_resync_received_bytes_total,
mirrord_link_frames_sent_total, mirrord_link_frames_received_total,
mirrord_link_bytes_sent_total, mirrord_link_bytes_delivered_total,
mirrord_link_retransmits_total, mirrord_link_handshakes_total,
mirrord_link_sessions_lost_total, mirrord_link_dropped_total{reason}.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import threading
from typing import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["MetricsServer", "MirrordCollector", "ROLES", "DISK_STATES", "CONNECTION_STATES"]

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")
DISK_STATES = ("up-to-date", "inconsistent", "failed")
CONNECTION_STATES = ("standalone", "connecting", "connected", "sync-source", "sync-target")
# The connection's counters (protocol/counters.py) exported one for one: field -> (metric
# name without _total, help).  Drops are mirrord_link_dropped_total{reason}.
LINK_COUNTERS = {
    "frames_sent": ("mirrord_link_frames_sent", "Frames sent on the replication link."),
    "frames_received": ("mirrord_link_frames_received",
                        "Valid frames accepted from the replication link."),
    "bytes_sent": ("mirrord_link_bytes_sent", "Bytes sent on the replication link."),
    "bytes_delivered": ("mirrord_link_bytes_delivered",
                        "Message payload bytes received and delivered in order."),
    "retransmits": ("mirrord_link_retransmits", "Frames sent again after a loss."),
    "handshakes": ("mirrord_link_handshakes", "Link sessions established."),
    "sessions_lost": ("mirrord_link_sessions_lost", "Link sessions lost (dead peer, reset)."),
}
# Drop reasons of the connection (protocol/counters.py DROP_REASONS, received frames).
try:
    from protocol.counters import DROP_REASONS
except ImportError:  # pragma: no cover - the package ships with mirrord
    DROP_REASONS = ()
# Frames dropped below the connection: by the demultiplexer (mirrord/link.py) and by
# the AF_PACKET socket (mirrord/packet_socket.py).  tx_ring_full is not a drop.
LINK_DROPS = {"runt": "runt", "unknown_volume": "unknown_volume"}
SOCKET_DROPS = {"send_dropped": "send_dropped", "recv_errors": "recv_error",
                "runts": "socket_runt"}


class MirrordCollector(Collector):
    """Reads the status and the counters at each scrape (prometheus-client Collector).

    ``get_status()`` returns ``Engine.status()``; ``get_counters()`` returns
    ``{"connection": {...}, "link": {...}, "socket": {...}}`` (any may be missing).
    Keys missing from either are left out of the exposition, never an error.
    """

    def __init__(self, get_status: Callable[[], dict],
                 get_counters: Callable[[], dict] | None = None, *,
                 resource: str, node: str) -> None:
        self.get_status = get_status
        self.get_counters = get_counters
        self.resource, self.node = resource, node

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; collect() only at scrape time

    def collect(self) -> Iterable[Metric]:
        status = self.get_status() or {}
        counters = self.get_counters() if self.get_counters is not None else {}
        labels = ["resource", "node"]
        base = [self.resource, self.node]

        def gauge(name: str, help_text: str, value) -> Metric | None:
            if not _is_number(value):
                return None
            g = GaugeMetricFamily(name, help_text, labels=labels)
            g.add_metric(base, float(value))
            return g

        def counter(name: str, help_text: str, value) -> Metric | None:
            if not _is_number(value):
                return None
            c = CounterMetricFamily(name, help_text, labels=labels)
            c.add_metric(base, float(value))
            return c

        def enum(name: str, help_text: str, label: str, states: tuple[str, ...], current):
            g = GaugeMetricFamily(name, help_text, labels=[*labels, label])
            for state in states + ((current,) if isinstance(current, str)
                                   and current not in states else ()):
                g.add_metric([*base, state], 1.0 if state == current else 0.0)
            return g

        peer = status.get("peer") if isinstance(status.get("peer"), dict) else None
        sync = status.get("sync") if isinstance(status.get("sync"), dict) else None
        families = [
            enum("mirrord_role", "This node's role (1 for the current one).", "role", ROLES,
                 status.get("role")),
            enum("mirrord_disk_state", "This node's disk state (1 for the current one).",
                 "state", DISK_STATES, status.get("disk")),
            enum("mirrord_connection_state", "The connection state (1 for the current one).",
                 "state", CONNECTION_STATES, status.get("connection")),
            gauge("mirrord_peer_connected", "1 while the peer is connected.",
                  1 if peer is not None else 0),
            enum("mirrord_peer_role", "The peer's role (all 0 while not connected).",
                 "role", ROLES, peer.get("role") if peer else None),
            enum("mirrord_peer_disk_state", "The peer's disk state (all 0 while not "
                 "connected).", "state", DISK_STATES, peer.get("disk") if peer else None),
            gauge("mirrord_size_bytes", "Size of the mirrored volume.", status.get("size_bytes")),
            gauge("mirrord_out_of_sync_bytes", "Bytes that differ from the peer (or may).",
                  status.get("out_of_sync_bytes")),
            gauge("mirrord_resync_active", "1 while a resync runs.", 1 if sync else 0),
            gauge("mirrord_resync_done_ratio", "Part of the running resync done (0 to 1).",
                  sync["percent"] / 100 if sync and _is_number(sync.get("percent")) else 0),
            gauge("mirrord_resync_bytes_per_second", "Rate of the running resync (0 when "
                  "none runs).", (sync.get("bytes_per_s") or 0) if sync else 0),
            counter("mirrord_resync_sent_bytes", "Resync data sent to the peer since the "
                    "daemon started.", status.get("resync_sent_bytes")),
            counter("mirrord_resync_received_bytes", "Resync data received and written here "
                    "since the daemon started.", status.get("resync_received_bytes")),
        ]
        conn = counters.get("connection") or {}
        for key, (name, help_text) in LINK_COUNTERS.items():
            families.append(counter(name, help_text, conn.get(key)))
        drops = CounterMetricFamily(
            "mirrord_link_dropped", "Frames dropped, by reason (the connection's, the "
            "demultiplexer's and the socket's).", labels=[*labels, "reason"])
        for source, names in (("connection", {r: r for r in DROP_REASONS}),
                              ("link", LINK_DROPS), ("socket", SOCKET_DROPS)):
            table = counters.get(source) or {}
            for key, reason in names.items():
                if _is_number(table.get(key)):
                    drops.add_metric([*base, reason], float(table[key]))
        families.append(drops)
        return [f for f in families if f is not None]


class MetricsServer:
    """Serve the metrics over HTTP at ``address`` (host, port) until :meth:`close`.

    ``GET /metrics`` (or ``/``) answers the text exposition format; other paths 404.
    :meth:`start` raises OSError when it cannot listen (address in use, no such
    address); ``address`` then holds the one actually bound (port 0 picks a free one).
    """

    def __init__(self, address: tuple[str, int], get_status: Callable[[], dict],
                 get_counters: Callable[[], dict] | None = None, *,
                 resource: str, node: str) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MirrordCollector(get_status, get_counters,
                                                resource=resource, node=node))
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host, port = self.address
        registry = self.registry

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "mirrord-metrics"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path not in ("/metrics", "/"):
                    self.send_error(404, "try /metrics")
                    return
                try:
                    body = generate_latest(registry)
                except Exception:
                    log.exception("metrics: collecting failed")
                    self.send_error(500, "collecting the metrics failed (see the log)")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics: %s %s", self.address_string(), fmt % args)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = _family(host, port)

        self._httpd = Server((host, port), Handler)
        self.address = (host, self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="metrics http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket.  Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()  # returns once serve_forever() has
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(2.0)


def _family(host: str, port: int) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass
    try:  # a host name: the family of its first address
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return socket.AF_INET  # bind() then fails with a message naming the host


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
