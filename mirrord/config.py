"""The resource config: one TOML file, the same on both boxes (deploy/r0.toml.example).

Strategy
--------
Parse the whole file into frozen dataclasses or fail with one :class:`ConfigFileError`
that names the file, the dotted key (``nodes.alpha.disk``) and the problem, so the
operator can fix it without reading code.  Unknown keys are errors (a typo such as
``sync_rtae`` must not silently leave the default in force), and every type check names
the type it wanted.

:func:`load_config` checks only the file itself, so it gives the same answer on both
boxes and on a workstation.  :func:`check_local` checks what exists on *this* box (the
backing disk, the metadata directory, the link interface); the daemon calls it at start.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field

import xxhash

__all__ = [
    "ConfigFileError", "NodeConfig", "ResourceConfig", "PROTOCOLS", "SECTOR_SIZE",
    "check_local", "disk_size", "load_config", "parse_rate",
]

PROTOCOLS = ("A", "B", "C")  # completion rules, as in DRBD: local+sent / +received / +durable
DEFAULT_PROTOCOL = "C"  # the only one that loses no acknowledged write when the primary dies
# Resource and node names appear in unit names (mirrord@r0), file names and the wire
# (the protocol carries node names of at most 64 bytes).
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_SECRET = 8  # bytes; the link protocol refuses shorter secrets (protocol/config.py)
MAX_VOLUME_ID = 2**32 - 1  # the frame header's volume id field is 32 bits
SECTOR_SIZE = 512  # the backing disk must be a whole number of these (NBD block size)
IFNAMSIZ = 16  # Linux interface names: at most 15 bytes + NUL
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
RATE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # sync_rate suffixes

RESOURCE_KEYS = ("name", "protocol", "secret", "secret_file", "volume_id", "sync_rate",
                 "dead_peer_timeout", "after_split_brain", "fencing", "fence_peer",
                 "unfence_peer", "fence_timeout", "cluster")
# How a primary that goes on without its peer first makes sure the peer cannot be
# promoted (mirrord/fencing.py): like DRBD's fencing dont-care / resource-only /
# resource-and-stonith.
FENCING_POLICIES = ("none", "resource-only", "resource-and-stonith")
DEFAULT_FENCING = "resource-only"
DEFAULT_FENCE_TIMEOUT = 10.0  # seconds for the peer's answer, and for the handler
CLUSTER_MODES = ("corosync", "none")  # join a corosync process group, or not
# [hooks]: a shell command per event (mirrord/hooks.py), `exec` (a program, given the
# event name) for all, and their timeout.
HOOK_EVENTS = ("connect", "disconnect", "sync-start", "sync-done", "split-brain",
               "role-change")
HOOK_KEYS = HOOK_EVENTS + ("exec", "timeout")
DEFAULT_HOOK_TIMEOUT = 30.0
# What to do when both nodes wrote while apart (DRBD's after-sb-0pri, for secondaries):
# "disconnect" leaves it to the operator; the others pick the node whose changes go.
SPLIT_BRAIN_POLICIES = ("disconnect", "discard-zero-changes", "discard-least-changes")
NODE_KEYS = ("interface", "disk", "metadata", "nbd_socket", "control_socket", "mac", "metrics")
NODE_PATH_KEYS = ("disk", "metadata", "nbd_socket", "control_socket")
SOCKET_KEYS = ("nbd_socket", "control_socket")
TOP_KEYS = ("resource", "nodes", "hooks")
REQUIRED_TOP_KEYS = ("resource", "nodes")

_TOML_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "a table", list: "an array"}


class ConfigFileError(Exception):
    """A problem in the config file, or on this box for what it names.

    ``str(err)`` is ``"{path}: {key}: {problem}"``, or ``"{path}: {problem}"`` when the
    problem is the file itself (unreadable, not TOML) and ``key`` is "".
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class NodeConfig:
    """One ``[nodes.NAME]`` section: where that box keeps the volume and its link."""

    name: str
    interface: str  # the dedicated replication link's interface
    disk: str  # backing file or block device (absolute path)
    metadata: str  # metadata file (absolute path)
    nbd_socket: str  # NBD export's unix socket (absolute path)
    control_socket: str  # control socket for mirrorctl and the OCF agent (absolute path)
    mac: bytes | None = None  # this node's link MAC (6 bytes); the peer pins it when set
    metrics: tuple[str, int] | None = None  # (host, port) of the Prometheus endpoint, None = off


@dataclass(frozen=True)
class ResourceConfig:
    """The whole file, seen from one of its two nodes."""

    path: str  # the config file, as given
    name: str
    protocol: str  # "A" | "B" | "C"
    # Shared secret (from `secret` or `secret_file`), None = no auth; kept out of repr()
    # so that logging the config does not log the secret.
    secret: bytes | None = field(repr=False)
    volume_id: int  # on the wire in every frame; both boxes derive the same default
    sync_rate: int | None  # max resync bytes/s; None = unlimited
    dead_peer_timeout: float | None  # seconds; None = the link's default
    node: NodeConfig  # this box
    peer: NodeConfig  # the other box
    nodes: dict[str, NodeConfig]  # both, by name
    after_split_brain: str = "disconnect"  # one of SPLIT_BRAIN_POLICIES
    fencing: str = DEFAULT_FENCING  # one of FENCING_POLICIES
    fence_peer: str | None = None  # shell command that makes the peer unpromotable
    unfence_peer: str | None = None  # shell command that undoes it once the peer is good
    fence_timeout: float = DEFAULT_FENCE_TIMEOUT
    cluster: str = "corosync"  # one of CLUSTER_MODES
    hooks: dict = field(default_factory=dict)  # event -> shell command; "exec" -> program
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT


def default_volume_id(name: str) -> int:
    """The volume id used when the file sets none: the same on both boxes by construction."""
    return xxhash.xxh32_intdigest(name.encode())


def parse_rate(text: str) -> int:
    """'200M' -> 209715200 bytes/s.  K, M, G are powers of 1024; 'MiB', 'M/s' also accepted.

    Raises ValueError with a message meant for the operator.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)(?:i?B)?(?:/s)?\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a rate (examples: \"500K\", \"200M\", \"1G\")")
    value = int(float(m.group(1)) * RATE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes/s")
    return value


def load_config(path: str, node: str | None = None) -> ResourceConfig:
    """Read and check the resource config at `path`, as seen from `node`.

    `node` None means this host: ``socket.gethostname()``, then its short form (before
    the first dot).  Raises ConfigFileError for the first problem found.  Does not look
    at the disk or the interface: see :func:`check_local`.
    """
    return _Loader(path).load(node)


class _Loader:
    """Holds the path so that every check can raise a ConfigFileError naming it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigFileError:
        return ConfigFileError(self.path, key, problem)

    # -- the file -------------------------------------------------------------------

    def read(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise self.error("", f"cannot read: {err.strerror or err}") from None
        try:
            return tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise self.error("", f"not UTF-8 text (byte {err.start})") from None
        except tomllib.TOMLDecodeError as err:
            # tomllib's message ends with "(at line L, column C)".
            raise self.error("", f"TOML syntax error: {err}") from None

    def load(self, node: str | None) -> ResourceConfig:
        doc = self.read()
        self.no_unknown_keys(doc, "", TOP_KEYS)
        for key in REQUIRED_TOP_KEYS:
            if key not in doc:
                raise self.error(key, f"missing (add a [{key}] section)" if key == "resource"
                                 else "missing (add two [nodes.NAME] sections)")
        resource = self.typed(doc, "resource", dict)
        self.no_unknown_keys(resource, "resource", RESOURCE_KEYS)
        name = self.name(resource)
        protocol = self.protocol(resource)
        secret = self.secret(resource)
        volume_id = self.volume_id(resource, name)
        sync_rate = self.sync_rate(resource)
        dead_peer_timeout = self.dead_peer_timeout(resource)
        after_split_brain = self.after_split_brain(resource)
        fencing = self.choice(resource, "fencing", FENCING_POLICIES, DEFAULT_FENCING)
        fence_peer = self.command(resource, "resource", "fence_peer")
        unfence_peer = self.command(resource, "resource", "unfence_peer")
        fence_timeout = self.seconds(resource, "resource", "fence_timeout",
                                     DEFAULT_FENCE_TIMEOUT)
        cluster = self.choice(resource, "cluster", CLUSTER_MODES, "corosync")
        hooks, hook_timeout = self.hooks(doc)

        nodes = self.nodes(self.typed(doc, "nodes", dict))
        this = self.pick_node(nodes, node)
        (peer,) = (n for n in nodes.values() if n.name != this.name)
        return ResourceConfig(
            path=self.path, name=name, protocol=protocol, secret=secret, volume_id=volume_id,
            sync_rate=sync_rate, dead_peer_timeout=dead_peer_timeout, node=this, peer=peer,
            nodes=nodes, after_split_brain=after_split_brain, fencing=fencing,
            fence_peer=fence_peer, unfence_peer=unfence_peer, fence_timeout=fence_timeout,
            cluster=cluster, hooks=hooks, hook_timeout=hook_timeout,
        )

    # -- generic checks -------------------------------------------------------------

    def no_unknown_keys(self, table: dict, where: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
                raise self.error(_join(where, key), f"unknown key ({hint})")

    def typed(self, table: dict, key: str, kind: type | tuple[type, ...], where: str = ""):
        """table[key] (which must exist) if it has the expected TOML type; `where` is the
        dotted name of `table`, for the message."""
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, never in TOML: `volume_id = true` is a type error.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            wanted = " or ".join(_TOML_TYPES[k] for k in kinds)
            raise self.error(_join(where, key), f"must be {wanted}, not {_toml_type(value)}")
        return value

    def required_str(self, table: dict, where: str, key: str) -> str:
        if key not in table:
            raise self.error(_join(where, key), "missing")
        return self.typed(table, key, str, where)

    # -- [resource] -----------------------------------------------------------------

    def name(self, resource: dict) -> str:
        name = self.required_str(resource, "resource", "name")
        if not NAME_RE.fullmatch(name):
            raise self.error("resource.name",
                             f"{name!r} must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
        return name

    def after_split_brain(self, resource: dict) -> str:
        if "after_split_brain" not in resource:
            return "disconnect"
        value = self.typed(resource, "after_split_brain", str, "resource")
        if value not in SPLIT_BRAIN_POLICIES:
            raise self.error("resource.after_split_brain",
                             f"{value!r} must be one of {', '.join(SPLIT_BRAIN_POLICIES)}")
        return value

    def choice(self, resource: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
        if key not in resource:
            return default
        value = self.typed(resource, key, str, "resource")
        if value not in allowed:
            raise self.error(f"resource.{key}", f"{value!r} must be one of {', '.join(allowed)}")
        return value

    def command(self, table: dict, where: str, key: str) -> str | None:
        """A shell command (run with /bin/sh -c): a non-empty string."""
        if key not in table:
            return None
        value = self.typed(table, key, str, where)
        if not value.strip():
            raise self.error(_join(where, key), "is empty (remove the key to run nothing)")
        return value

    def seconds(self, table: dict, where: str, key: str, default: float) -> float:
        if key not in table:
            return default
        value = float(self.typed(table, key, (int, float), where))
        if not 0 < value < float("inf"):
            raise self.error(_join(where, key), f"{value} must be a positive number of seconds")
        return value

    def hooks(self, doc: dict) -> tuple[dict, float]:
        if "hooks" not in doc:
            return {}, DEFAULT_HOOK_TIMEOUT
        table = self.typed(doc, "hooks", dict)
        self.no_unknown_keys(table, "hooks", HOOK_KEYS)
        commands = {key: self.command(table, "hooks", key) for key in table if key != "timeout"}
        if "exec" in commands and not os.path.isabs(commands["exec"]):
            raise self.error("hooks.exec", f"{commands['exec']!r} must be the absolute path of "
                                           f"a program (it gets the event name as $1)")
        return commands, self.seconds(table, "hooks", "timeout", DEFAULT_HOOK_TIMEOUT)

    def protocol(self, resource: dict) -> str:
        if "protocol" not in resource:
            return DEFAULT_PROTOCOL
        value = self.typed(resource, "protocol", str, "resource")
        if value.upper() not in PROTOCOLS:
            raise self.error("resource.protocol", f"{value!r} must be one of A, B, C")
        return value.upper()

    def secret(self, resource: dict) -> bytes | None:
        if "secret" in resource and "secret_file" in resource:
            raise self.error("resource.secret_file", "give either secret or secret_file, not both")
        if "secret" in resource:
            key = "resource.secret"
            secret = self.typed(resource, "secret", str, "resource").encode()
        elif "secret_file" in resource:
            key = "resource.secret_file"
            name = self.typed(resource, "secret_file", str, "resource")
            # Relative to the config file's directory, never to the daemon's cwd.
            name = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
            try:
                with open(name, "rb") as f:
                    secret = f.read()
            except OSError as err:
                raise self.error(key, f"cannot read {name}: {err.strerror or err}") from None
            # Editors add a final newline; the secret is what comes before it.
            secret = secret.rstrip(b"\r\n")
        else:
            return None
        if len(secret) < MIN_SECRET:
            raise self.error(key, f"the secret is {len(secret)} bytes; it must be at least "
                                  f"{MIN_SECRET} bytes (UTF-8)")
        return secret

    def volume_id(self, resource: dict, name: str) -> int:
        if "volume_id" not in resource:
            return default_volume_id(name)
        value = self.typed(resource, "volume_id", int, "resource")
        if not 0 <= value <= MAX_VOLUME_ID:
            raise self.error("resource.volume_id", f"{value} must be between 0 and {MAX_VOLUME_ID}")
        return value

    def sync_rate(self, resource: dict) -> int | None:
        if "sync_rate" not in resource:
            return None
        value = self.typed(resource, "sync_rate", (str, int), "resource")
        if isinstance(value, int):
            if value <= 0:
                raise self.error("resource.sync_rate", f"{value} must be more than 0 bytes/s")
            return value
        try:
            return parse_rate(value)
        except ValueError as err:
            raise self.error("resource.sync_rate", str(err)) from None

    def dead_peer_timeout(self, resource: dict) -> float | None:
        if "dead_peer_timeout" not in resource:
            return None
        value = float(self.typed(resource, "dead_peer_timeout", (int, float), "resource"))
        if not value > 0 or value == float("inf"):
            raise self.error("resource.dead_peer_timeout",
                             f"{value} must be a positive number of seconds")
        # The link pings after this much silence; a shorter timeout would declare a
        # healthy peer dead.  Imported here so that mirrorctl does not load the protocol.
        from protocol.config import DEFAULT_KEEPALIVE_INTERVAL
        if value <= DEFAULT_KEEPALIVE_INTERVAL:
            raise self.error("resource.dead_peer_timeout",
                             f"{value} must be longer than the keepalive interval "
                             f"({DEFAULT_KEEPALIVE_INTERVAL} s)")
        return value

    # -- [nodes.*] ------------------------------------------------------------------

    def nodes(self, table: dict) -> dict[str, NodeConfig]:
        if len(table) != 2:
            found = ", ".join(table) if table else "none"
            raise self.error("nodes", f"must define exactly two nodes ([nodes.NAME] sections), "
                                      f"found {len(table)} ({found})")
        nodes = {}
        for name in table:
            where = f"nodes.{name}"
            if not NAME_RE.fullmatch(name):
                raise self.error(where, f"node name {name!r} must be 1 to 64 characters of "
                                        f"A-Z a-z 0-9 _ . -")
            section = self.typed(table, name, dict, "nodes")
            nodes[name] = self.node(name, section, where)
        a, b = nodes.values()
        if a.mac is not None and a.mac == b.mac:
            raise self.error(f"nodes.{b.name}.mac", f"same MAC as node {a.name!r}; each node "
                                                    f"must give its own interface's MAC")
        return nodes

    def node(self, name: str, section: dict, where: str) -> NodeConfig:
        self.no_unknown_keys(section, where, NODE_KEYS)
        values = {}
        interface = self.required_str(section, where, "interface")
        if (not 0 < len(interface.encode()) < IFNAMSIZ or interface in (".", "..")
                or any(c in interface for c in "/: \t\n")):
            raise self.error(f"{where}.interface",
                             f"{interface!r} is not a Linux interface name "
                             f"(1 to {IFNAMSIZ - 1} bytes, no '/', ':' or spaces)")
        for key in NODE_PATH_KEYS:
            value = self.required_str(section, where, key)
            if not os.path.isabs(value):
                raise self.error(f"{where}.{key}", f"{value!r} must be an absolute path")
            if key in SOCKET_KEYS and len(value.encode()) > SUN_PATH_MAX:
                raise self.error(f"{where}.{key}",
                                 f"{value!r} is {len(value.encode())} bytes; a unix socket "
                                 f"path may have at most {SUN_PATH_MAX}")
            values[key] = value
        mac = None
        if "mac" in section:
            mac = self.mac(self.typed(section, "mac", str, where), f"{where}.mac")
        metrics = None
        if "metrics" in section:
            metrics = self.metrics(self.typed(section, "metrics", str, where), f"{where}.metrics")
        return NodeConfig(name=name, interface=interface, mac=mac, metrics=metrics, **values)

    def metrics(self, text: str, key: str) -> tuple[str, int]:
        """'127.0.0.1:9942', '[::1]:9942', 'localhost:9942' -> (host, port)."""
        example = ('(like "127.0.0.1:9942", "[::1]:9942", or "0.0.0.0:9942" for every '
                   'interface)')
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", text)
        if m is None:
            raise self.error(key, f"{text!r} is not HOST:PORT {example}")
        bracketed = m.group(1) is not None
        host = m.group(1) if bracketed else m.group(3)
        port = int(m.group(2) if bracketed else m.group(4))
        if not 1 <= port <= 65535:
            raise self.error(key, f"{text!r}: port {port} must be from 1 to 65535")
        if bracketed:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise self.error(key, f"{text!r}: {host!r} is not an IPv6 address") from None
        elif not re.fullmatch(r"\d+(\.\d+){3}", host):
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?",
                                host) or len(host) > 253:
                raise self.error(key, f"{text!r}: {host!r} is not a host name or IP address "
                                      f"{example}")
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise self.error(key, f"{text!r}: {host!r} is not an IPv4 address") from None
        return host, port

    def mac(self, text: str, key: str) -> bytes:
        if re.fullmatch(r"[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}", text) is None:
            raise self.error(key, f"{text!r} is not a MAC address (like \"02:00:00:00:00:01\")")
        mac = bytes.fromhex(re.sub("[:-]", "", text))
        if mac[0] & 1 or mac == bytes(6):
            # Frames are filtered by source MAC; a source is never multicast nor zero.
            raise self.error(key, f"{text!r} must be a unicast MAC address")
        return mac

    def pick_node(self, nodes: dict[str, NodeConfig], node: str | None) -> NodeConfig:
        if node is not None:
            if node in nodes:
                return nodes[node]
            found, how = node, ""
        else:
            host = socket.gethostname()
            for candidate in (host, host.split(".", 1)[0]):
                if candidate in nodes:
                    return nodes[candidate]
            found, how = host, "this host's name; "
        raise self.error("nodes", f"no section for node {found!r} ({how}this file has: "
                                  f"{', '.join(nodes)}); pass --node NAME")


# -- this box ---------------------------------------------------------------------------

def disk_size(path: str) -> int:
    """Size in bytes of a regular file (st_size) or a block device (seek to its end).

    Raises OSError if it cannot be opened, ValueError if it is neither.
    """
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{path} is not a regular file or block device")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_local(cfg: ResourceConfig) -> None:
    """Check what `cfg` names on this box (this node only); raise ConfigFileError.

    The disk must exist, be a regular file or block device that opens read-write, and
    hold a non-zero multiple of 512 bytes; the metadata file's directory must exist (the
    file itself may not, yet); the link interface must exist (in this box's network
    namespace: /sys/class/net follows the namespace of whoever mounted /sys).
    """
    node = cfg.node
    where = f"nodes.{node.name}"

    def error(key: str, problem: str) -> ConfigFileError:
        return ConfigFileError(cfg.path, f"{where}.{key}", problem)

    try:
        st = os.stat(node.disk)
    except OSError as err:
        problem = "does not exist" if isinstance(err, FileNotFoundError) else err.strerror
        raise error("disk", f"{node.disk}: {problem}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise error("disk", f"{node.disk} is not a regular file or block device")
    try:
        # A real open, not os.access(): root passes access() even on a read-only mount.
        os.close(os.open(node.disk, os.O_RDWR | os.O_CLOEXEC))
        size = disk_size(node.disk)
    except OSError as err:
        raise error("disk", f"{node.disk} cannot be opened read-write: {err.strerror}") from None
    if size == 0:
        raise error("disk", f"{node.disk} is empty (0 bytes)")
    if size % SECTOR_SIZE:
        raise error("disk", f"{node.disk} is {size} bytes, not a multiple of {SECTOR_SIZE}")

    parent = os.path.dirname(node.metadata)
    if not os.path.isdir(parent):
        raise error("metadata", f"directory {parent} does not exist")
    if os.path.lexists(node.metadata):
        mode = os.stat(node.metadata).st_mode if os.path.exists(node.metadata) else 0
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise error("metadata", f"{node.metadata} exists but is not a regular file or "
                                    f"block device")

    if not os.path.exists(f"/sys/class/net/{node.interface}"):
        raise error("interface", f"no interface {node.interface!r} on this box "
                                 f"(see `ip link`)")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _toml_type(value) -> str:
    for kind, name in _TOML_TYPES.items():
        if type(value) is kind:
            return name
    return type(value).__name__  # dates and times
