"""`mirrord`: run one resource on one node, in the foreground.

    mirrord --config /etc/mirrord/r0.toml [--node alpha]

Logs go to stderr.  SIGTERM or SIGINT stops it cleanly: the NBD export closes, writes in
flight finish, the disk is flushed and the metadata records a clean stop.

Exit codes:
  0  stopped by SIGTERM/SIGINT
  1  a runtime failure (the link or a thread failed; the log says which)
  2  a configuration error: one line naming the file, the key and the problem.  This
     includes a disk size that differs from the peer's, found when the two connect
     (a secondary stops; a primary refuses the peer and goes on serving)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from protocol import Connection, ConnectionConfig, ProtocolError

from .applier import Applier
from .backing import BackingStore
from .cluster import ClusterLink
from .config import ConfigFileError, check_local, load_config
from .control import ControlRefused, ControlServer, request_arg
from .engine import Engine, Refused
from .events import DEFAULT_INTERVAL, KEEPALIVE, status_events
from .exclusive import InUseError
from .faults import parse_fault_spec
from .fencing import Fencer
from .hooks import HookConfig, HookRunner
from .iface import InterfaceError
from .link import Link
from .link_service import LinkService
from .metafile import MetadataFileError, MetaStore
from .nbd_server import NbdServer
from .process import tune_allocator, tune_collector

log = logging.getLogger("mirrord")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EVENTS_INTERVAL = (0.05, 3600.0)  # the `events` request's interval: least, most (seconds)


class StartupError(Exception):
    """Something named in the config cannot be used: one line, exit 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mirrord", description="Mirror one block volume to a peer box (one resource, "
        "one node, foreground).", epilog="Exit codes: 0 stopped by a signal, 1 runtime "
        "failure, 2 configuration error.")
    parser.add_argument("--config", required=True, help="the resource's TOML file")
    parser.add_argument("--node", help="this node's name in the file (default: hostname)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    # For tests and benchmarks only: frame faults on the link (see mirrord-link --faults).
    parser.add_argument("--faults", help=argparse.SUPPRESS)
    # For tests only: run without the activity log, to show the crash tests notice.
    parser.add_argument("--unsafe-no-activity-log", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Daemon:
    """Everything one resource runs on one node, built from its config."""

    def __init__(self, cfg, faults=None, activity_log: bool = True) -> None:
        self.cfg = cfg
        self.stopping = threading.Event()
        self.exit_code = EXIT_OK
        node = cfg.node
        try:
            self.store = BackingStore(node.disk)
        except InUseError as exc:
            raise StartupError(f"{cfg.path}: nodes.{node.name}.disk: {exc.strerror}") from None
        except OSError as exc:
            raise StartupError(f"{cfg.path}: nodes.{node.name}.disk: cannot open "
                               f"{node.disk}: {exc.strerror}") from None
        try:
            self.metastore = MetaStore.open(node.metadata, size=self.store.size,
                                            node=node.name, volume_id=cfg.volume_id)
        except MetadataFileError as exc:
            self.store.close()
            raise StartupError(f"{cfg.path}: nodes.{node.name}.metadata: {exc}") from None
        try:
            self.link = Link(node.interface, faults=faults)
        except InterfaceError as exc:
            self.store.close()
            raise StartupError(f"{cfg.path}: nodes.{node.name}.interface: {exc}") from None
        try:
            conn = Connection(ConnectionConfig(
                node=node.name, volume=cfg.volume_id, mtu=self.link.mtu,
                peer_node=cfg.peer.name, peer_address=cfg.peer.mac, secret=cfg.secret,
                **({"dead_peer_timeout": cfg.dead_peer_timeout}
                   if cfg.dead_peer_timeout is not None else {})))
        except ProtocolError as exc:
            self.link.close()
            self.store.close()
            raise StartupError(f"{cfg.path}: {exc}") from None
        self.link.add(conn)
        env = {"MIRRORD_RESOURCE": cfg.name, "MIRRORD_NODE": node.name,
               "MIRRORD_PEER": cfg.peer.name, "MIRRORD_CONFIG": os.path.abspath(cfg.path)}
        self.cluster = None
        if cfg.cluster == "corosync":
            self.cluster = ClusterLink(cfg.name, node.name, cfg.peer.name,
                                       on_outdate_request=self._outdate_request)
        fencer = None
        if cfg.fencing != "none":
            fencer = Fencer(policy=cfg.fencing, timeout=cfg.fence_timeout, cluster=self.cluster,
                            fence_peer=cfg.fence_peer, unfence_peer=cfg.unfence_peer, env=env)
        hooks = dict(cfg.hooks)
        self.hooks = HookRunner(HookConfig(commands=hooks, exec_all=hooks.pop("exec", None),
                                           timeout=cfg.hook_timeout), env)
        self.engine = Engine(
            resource=cfg.name, node=node.name, peer_node=cfg.peer.name,
            protocol=cfg.protocol, store=self.store, metastore=self.metastore,
            sync_rate=cfg.sync_rate, activity_log=activity_log,
            after_split_brain=cfg.after_split_brain, on_fatal=self._fatal,
            fencer=fencer, hooks=self.hooks if self.hooks.configured else None,
            cluster=self.cluster)
        self.service = LinkService(self.link, conn, self.engine.on_event)
        self.applier = Applier(self.engine)
        self.engine.attach(self.service, self.applier)
        self.nbd = NbdServer(node.nbd_socket, self.engine, export_name=cfg.name,
                             description=f"mirrord resource {cfg.name} on {node.name}")
        self.engine.nbd = self.nbd
        self.control = ControlServer(node.control_socket, self._handle_control)
        self.metrics = None
        if node.metrics is not None:
            from .metrics import MetricsServer  # prometheus-client: only when configured
            self.metrics = MetricsServer(node.metrics, self.engine.status, self._link_counters,
                                         resource=cfg.name, node=node.name)

    def _outdate_request(self, requester: str) -> tuple[bool, str]:
        """The cluster thread: the peer asks this node to outdate its disk."""
        return self.engine.outdate_by_peer(requester)

    def _fatal(self, code: int, message: str) -> None:
        log.error("stopping: %s", message)
        if self.exit_code == EXIT_OK:
            self.exit_code = code
        self.stopping.set()

    def _link_counters(self) -> dict[str, dict]:
        """The link's counters, for the metrics: the connection's (protocol/counters.py),
        the demultiplexer's and the socket's."""
        return {"connection": self.service.conn.counters.as_dict(),
                "link": dict(self.link.counters), "socket": dict(self.link.socket.counters)}

    def _handle_control(self, request: dict):
        engine = self.engine
        command = request.get("command")
        try:
            if command == "status":
                return {"ok": True, "status": engine.status()}
            if command == "events":
                # A stream (mirrord/events.py): one line per change until the daemon
                # stops; the keepalive lets the control server notice a client that left.
                interval = request.get("interval", DEFAULT_INTERVAL)
                low, high = EVENTS_INTERVAL
                if (isinstance(interval, bool) or not isinstance(interval, (int, float))
                        or not low <= interval <= high):
                    raise ControlRefused(f"events: interval must be a number of seconds "
                                         f"from {low:g} to {high:g}, not {interval!r}",
                                         'e.g. {"command": "events", "interval": 0.5}')
                return status_events(engine.status, interval=float(interval),
                                     stop=self.stopping, keepalive=KEEPALIVE)
            if command == "primary":
                return {"ok": True, "message": engine.promote(request_arg(request, "force", bool, False))}
            if command == "secondary":
                return {"ok": True, "message": engine.demote()}
            if command == "connect":
                return {"ok": True, "message": engine.connect(
                    request_arg(request, "discard_my_data", bool, False))}
            if command == "verify":
                return {"ok": True, "message": engine.start_verify()}
            if command == "invalidate":
                return {"ok": True, "message": engine.invalidate()}
            if command == "pause-sync":
                return {"ok": True, "message": engine.pause_sync()}
            if command == "resume-sync":
                return {"ok": True, "message": engine.resume_sync()}
            if command == "resume-io":
                return {"ok": True, "message": engine.resume_io()}
            if command == "disconnect":
                return {"ok": True, "message": engine.disconnect()}
            if command == "stop":
                return {"ok": True, "message": self._stop_request(
                    request_arg(request, "force", bool, False))}
        except Refused as exc:
            raise ControlRefused(exc.error, exc.hint) from None
        raise ControlRefused(f"unknown command {command!r}",
                             "mirrorctl --help lists the commands")

    def _stop_request(self, force: bool) -> str:
        """`mirrorctl down`: a clean stop, as SIGTERM does; refused while the export is in
        use (a mounted filesystem would lose its disk), unless forced."""
        clients = self.nbd.client_count
        if clients and not force:
            raise ControlRefused(f"{clients} NBD client(s) are connected to the export",
                                 "stop them first (umount the filesystem, stop nbdfuse or "
                                 "qemu), or use --force to cut them off")
        log.info("%s: stop requested over the control socket", self.cfg.name)
        self.stopping.set()
        return f"{self.cfg.name} on {self.cfg.node.name}: stopping"

    def run(self) -> int:
        cfg = self.cfg
        self.hooks.start()
        if self.cluster is not None:
            self.cluster.start()
        self.applier.start()
        self.service.start()
        try:
            self.nbd.start()
            self.control.start()
        except OSError as exc:
            log.error("%s: cannot listen: %s", cfg.path, exc)
            self.exit_code = EXIT_CONFIG
            self.stopping.set()
        else:
            self._start_metrics()
        if not self.stopping.is_set():
            meta = self.engine.meta
            log.info("%s on %s: started: disk %s, %d bytes, link %s (MTU %d), protocol %s",
                     cfg.name, cfg.node.name, self.engine.disk_state(), self.store.size,
                     cfg.node.interface, self.link.mtu, cfg.protocol)
            if meta.primary:
                log.warning("%s: this node was primary when it last stopped without a "
                            "clean shutdown: its peer will be resynced from it", cfg.name)
        while not self.stopping.wait(0.5):
            if self.service.failure is not None:
                self.exit_code = EXIT_FAILED
                break
        self.stop()
        return self.exit_code

    def _start_metrics(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.start()
        except OSError as exc:
            host, port = self.cfg.node.metrics
            log.error("%s: nodes.%s.metrics: cannot listen on %s: %s", self.cfg.path,
                      self.cfg.node.name, _host_port(host, port), exc.strerror or exc)
            self.exit_code = EXIT_CONFIG
            self.stopping.set()
        else:
            log.info("%s: metrics at http://%s/metrics", self.cfg.name,
                     _host_port(*self.metrics.address))

    def stop(self) -> None:
        log.info("%s: stopping", self.cfg.name)
        self.nbd.close()
        self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.engine.shutdown()
        if self.cluster is not None:
            self.cluster.stop()
        self.applier.stop()
        self.service.stop()
        self.hooks.stop()
        self.store.close()
        self.metastore.close()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    faults = None
    if args.faults:
        try:
            faults = parse_fault_spec(args.faults)
        except ValueError as exc:
            print(f"mirrord: --faults: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        cfg = load_config(args.config, args.node)
        check_local(cfg)
    except ConfigFileError as exc:
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    tune_allocator()
    try:
        daemon = Daemon(cfg, faults, activity_log=not args.unsafe_no_activity_log)
    except StartupError as exc:
        print(f"mirrord: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stopping.set())
    tune_collector()
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
