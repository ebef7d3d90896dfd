"""mirrord/config.py: every operator mistake names its key; a good file round-trips."""

from __future__ import annotations

import os
import re
import socket

import pytest
import xxhash

from mirrord.config import (
    ConfigFileError, NodeConfig, ResourceConfig, check_local, disk_size, load_config, parse_rate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "deploy", "r0.toml.example")


def node_table(name: str, **over) -> dict:
    table = {
        "interface": "mir0",
        "disk": f"/srv/mirrord/r0-{name}.img",
        "metadata": f"/var/lib/mirrord/r0-{name}.meta",
        "nbd_socket": "/run/mirrord/r0.nbd",
        "control_socket": "/run/mirrord/r0.ctl",
    }
    table.update(over)
    return {k: v for k, v in table.items() if v is not None}


def good_doc() -> dict:
    return {
        "resource": {"name": "r0"},
        "nodes": {"alpha": node_table("alpha"), "beta": node_table("beta")},
    }


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(value)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def to_toml(doc: dict) -> str:
    """Enough TOML for these tests: top-level scalars, [table], [table.sub] of scalars."""
    out = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if not isinstance(table, dict):
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        out.append(f"\n[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in scalars.items()]
        for sub, subtable in table.items():
            if isinstance(subtable, dict):
                out.append(f"\n[{name}.{toml_key(sub)}]")
                out += [f"{k} = {toml_value(v)}" for k, v in subtable.items()]
    return "\n".join(out) + "\n"


@pytest.fixture
def write(tmp_path):
    def write(doc_or_text, name="r0.toml") -> str:
        path = tmp_path / name
        path.write_text(doc_or_text if isinstance(doc_or_text, str) else to_toml(doc_or_text))
        return str(path)
    return write


def error_of(path: str, node: str | None = "alpha") -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        load_config(path, node)
    err = info.value
    assert str(err).startswith(f"{path}: ")
    assert "\n" not in str(err)
    return err


# -- a good file ------------------------------------------------------------------------

def test_minimal_config_round_trips(write):
    path = write(good_doc())
    cfg = load_config(path, "alpha")
    assert isinstance(cfg, ResourceConfig)
    assert cfg.path == path
    assert cfg.name == "r0"
    assert cfg.protocol == "C"
    assert cfg.secret is None
    assert cfg.volume_id == xxhash.xxh32_intdigest(b"r0")
    assert cfg.sync_rate is None
    assert cfg.dead_peer_timeout is None
    assert cfg.node == NodeConfig(
        name="alpha", interface="mir0", disk="/srv/mirrord/r0-alpha.img",
        metadata="/var/lib/mirrord/r0-alpha.meta", nbd_socket="/run/mirrord/r0.nbd",
        control_socket="/run/mirrord/r0.ctl", mac=None)
    assert cfg.peer.name == "beta" and cfg.peer.disk == "/srv/mirrord/r0-beta.img"
    assert cfg.nodes == {"alpha": cfg.node, "beta": cfg.peer}
    # Seen from the other node: the same file, roles of node and peer swapped.
    other = load_config(path, "beta")
    assert (other.node, other.peer) == (cfg.peer, cfg.node)
    assert other.volume_id == cfg.volume_id


def test_every_option_round_trips(write):
    doc = good_doc()
    doc["resource"].update(protocol="A", secret="s3cret-pass", volume_id=7, sync_rate="200M",
                           dead_peer_timeout=3.5)
    doc["nodes"]["alpha"]["mac"] = "02:00:00:00:00:01"
    doc["nodes"]["beta"]["mac"] = "02-00-00-00-00-0A"
    cfg = load_config(write(doc), "beta")
    assert cfg.protocol == "A"
    assert cfg.secret == b"s3cret-pass"
    assert cfg.volume_id == 7
    assert cfg.sync_rate == 200 * 1024 * 1024
    assert cfg.dead_peer_timeout == 3.5
    assert cfg.node.mac == bytes.fromhex("02000000000a")
    assert cfg.peer.mac == bytes.fromhex("020000000001")
    assert "s3cret" not in repr(cfg)  # a logged config does not leak the secret


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9942", ("127.0.0.1", 9942)), ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9942", ("::1", 9942)), ("[fe80::1]:65535", ("fe80::1", 65535)),
    ("localhost:9942", ("localhost", 9942)), ("mon.example.org:80", ("mon.example.org", 80)),
])
def test_metrics_address(write, text, expected):
    doc = good_doc()
    doc["nodes"]["alpha"]["metrics"] = text
    cfg = load_config(write(doc), "alpha")
    assert cfg.node.metrics == expected
    assert cfg.peer.metrics is None  # optional, per node


@pytest.mark.parametrize("value, expected", [
    ("1024", 1024), ("500K", 500 << 10), ("200M", 200 << 20), ("1G", 1 << 30),
    ("1.5G", 3 << 29), ("200MiB", 200 << 20), ("64k", 64 << 10), (4096, 4096),
])
def test_sync_rate_units(write, value, expected):
    doc = good_doc()
    doc["resource"]["sync_rate"] = value
    assert load_config(write(doc), "alpha").sync_rate == expected


def test_parse_rate_direct():
    assert parse_rate("2K") == 2048
    with pytest.raises(ValueError):
        parse_rate("2X")


def test_protocol_is_case_insensitive(write):
    doc = good_doc()
    doc["resource"]["protocol"] = "b"
    assert load_config(write(doc), "alpha").protocol == "B"


def test_secret_file_relative_to_config_and_newline_stripped(write, tmp_path):
    (tmp_path / "r0.secret").write_bytes(b"correct horse battery\n")
    doc = good_doc()
    doc["resource"]["secret_file"] = "r0.secret"
    assert load_config(write(doc), "alpha").secret == b"correct horse battery"
    doc["resource"]["secret_file"] = str(tmp_path / "r0.secret")
    assert load_config(write(doc), "alpha").secret == b"correct horse battery"


def test_node_chosen_by_hostname(write, monkeypatch):
    path = write(good_doc())
    monkeypatch.setattr(socket, "gethostname", lambda: "beta")
    assert load_config(path).node.name == "beta"
    monkeypatch.setattr(socket, "gethostname", lambda: "alpha.example.com")
    cfg = load_config(path)
    assert (cfg.node.name, cfg.peer.name) == ("alpha", "beta")
    # An explicit node wins over the hostname.
    assert load_config(path, "beta").node.name == "beta"


def test_hostname_without_section(write, monkeypatch):
    path = write(good_doc())
    monkeypatch.setattr(socket, "gethostname", lambda: "gamma.example.com")
    err = error_of(path, None)
    assert err.key == "nodes"
    assert "'gamma.example.com'" in err.problem
    assert "alpha, beta" in err.problem and "--node NAME" in err.problem


def test_example_config_loads():
    for node in ("alpha", "beta"):
        cfg = load_config(EXAMPLE, node)
        assert cfg.name == "r0" and cfg.protocol == "C" and cfg.node.name == node


def test_example_config_optional_lines_are_valid(tmp_path):
    """Uncommenting the example's `# key = value` lines must give a valid file."""
    text = open(EXAMPLE).read()
    uncommented = re.sub(
        r"^# ((secret|volume_id|sync_rate|dead_peer_timeout|mac|metrics|fencing|fence_peer|"
        r"unfence_peer|fence_timeout|cluster|disconnect|role-change|exec|timeout) = .*)$",
        r"\1", text, flags=re.M).replace("\n# [hooks]\n", "\n[hooks]\n")
    assert uncommented.count("\nmac = ") == 2 and uncommented.count("\nmetrics = ") == 2
    # secret and secret_file are exclusive: keep the inline one.
    path = tmp_path / "r0.toml"
    path.write_text(uncommented)
    cfg = load_config(str(path), "alpha")
    assert cfg.secret and cfg.volume_id == 7 and cfg.sync_rate == 200 << 20
    assert cfg.node.mac and cfg.peer.mac and cfg.dead_peer_timeout == 2.0
    assert cfg.node.metrics == ("127.0.0.1", 9942) == cfg.peer.metrics
    assert cfg.fencing == "resource-only" and cfg.fence_peer and cfg.unfence_peer
    assert cfg.cluster == "corosync" and cfg.fence_timeout == 10
    assert set(cfg.hooks) == {"disconnect", "role-change", "exec"} and cfg.hook_timeout == 30


# -- file-level errors ------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    err = error_of(path)
    assert err.key == "" and "No such file" in err.problem
    assert str(err) == f"{path}: {err.problem}"


def test_toml_syntax_error_names_the_line(write):
    path = write('[resource]\nname = "r0"\nprotocol = C\n')
    err = error_of(path)
    assert err.key == ""
    assert "line 3" in str(err)


def test_not_utf8(write, tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b'[resource]\nname = "\xff"\n')
    err = error_of(str(path))
    assert err.key == "" and "UTF-8" in err.problem


# -- key-level errors -------------------------------------------------------------------

def mutate(fn):
    doc = good_doc()
    fn(doc)
    return doc


def _three_nodes(d):
    d["nodes"]["gamma"] = node_table("gamma")


def _set(table_path: str, key: str, value):
    def fn(doc):
        table = doc
        for part in table_path.split("."):
            table = table[part]
        if value is None:
            del table[key]
        else:
            table[key] = value
    return fn


CASES = [
    # (id, mutation, key, words in the problem)
    ("no resource section", lambda d: d.pop("resource"), "resource", ["missing"]),
    ("no nodes section", lambda d: d.pop("nodes"), "nodes", ["missing"]),
    ("missing name", _set("resource", "name", None), "resource.name", ["missing"]),
    ("missing disk", _set("nodes.alpha", "disk", None), "nodes.alpha.disk", ["missing"]),
    ("missing interface", _set("nodes.beta", "interface", None), "nodes.beta.interface",
     ["missing"]),
    ("missing control_socket", _set("nodes.beta", "control_socket", None),
     "nodes.beta.control_socket", ["missing"]),
    ("unknown top key", lambda d: d.update(resources={"name": "x"}), "resources",
     ["unknown key", "resource"]),
    ("unknown resource key", _set("resource", "sync_rtae", "1M"), "resource.sync_rtae",
     ["unknown key", "sync_rate"]),
    ("unknown node key", _set("nodes.beta", "interfce", "mir0"), "nodes.beta.interfce",
     ["unknown key", "interface"]),
    ("name not a string", _set("resource", "name", 5), "resource.name", ["string", "integer"]),
    ("volume_id a string", _set("resource", "volume_id", "7"), "resource.volume_id",
     ["integer", "string"]),
    ("volume_id a boolean", _set("resource", "volume_id", True), "resource.volume_id",
     ["integer", "boolean"]),
    ("volume_id too big", _set("resource", "volume_id", 2**32), "resource.volume_id",
     ["4294967295"]),
    ("volume_id negative", _set("resource", "volume_id", -1), "resource.volume_id", ["between"]),
    ("interface a number", _set("nodes.alpha", "interface", 3), "nodes.alpha.interface",
     ["string"]),
    ("interface too long", _set("nodes.alpha", "interface", "a" * 16), "nodes.alpha.interface",
     ["interface name"]),
    ("protocol not a string", _set("resource", "protocol", 3), "resource.protocol", ["string"]),
    ("bad protocol", _set("resource", "protocol", "D"), "resource.protocol", ["A, B, C"]),
    ("bad name chars", _set("resource", "name", "r 0"), "resource.name", ["64"]),
    ("empty name", _set("resource", "name", ""), "resource.name", ["64"]),
    ("name too long", _set("resource", "name", "r" * 65), "resource.name", ["64"]),
    ("short secret", _set("resource", "secret", "short"), "resource.secret", ["at least 8"]),
    ("short multibyte secret", _set("resource", "secret", "ééé"), "resource.secret",
     ["6 bytes"]),
    ("secret and secret_file", lambda d: d["resource"].update(secret="long enough secret",
                                                            secret_file="/etc/x"),
     "resource.secret_file", ["not both"]),
    ("secret_file missing", _set("resource", "secret_file", "/nonexistent/r0.secret"),
     "resource.secret_file", ["cannot read", "/nonexistent/r0.secret"]),
    ("sync_rate nonsense", _set("resource", "sync_rate", "fast"), "resource.sync_rate", ["rate"]),
    ("sync_rate zero", _set("resource", "sync_rate", 0), "resource.sync_rate", ["more than 0"]),
    ("sync_rate float", _set("resource", "sync_rate", 1.5), "resource.sync_rate",
     ["string or an integer"]),
    ("dead_peer_timeout zero", _set("resource", "dead_peer_timeout", 0),
     "resource.dead_peer_timeout", ["positive"]),
    ("dead_peer_timeout string", _set("resource", "dead_peer_timeout", "2"),
     "resource.dead_peer_timeout", ["number", "string"]),
    ("dead_peer_timeout below keepalive", _set("resource", "dead_peer_timeout", 0.1),
     "resource.dead_peer_timeout", ["keepalive"]),
    ("one node", lambda d: d["nodes"].pop("beta"), "nodes", ["exactly two", "found 1", "alpha"]),
    ("three nodes", _three_nodes, "nodes", ["exactly two", "found 3"]),
    ("node not a table", lambda d: d.update(nodes={"alpha": node_table("alpha"), "beta": 3}),
     "nodes.beta", ["table", "integer"]),
    ("bad node name", lambda d: d["nodes"].update({"bad node": d["nodes"].pop("beta")}),
     "nodes.bad node", ["node name"]),
    ("duplicate mac", lambda d: (d["nodes"]["alpha"].update(mac="02:00:00:00:00:01"),
                                 d["nodes"]["beta"].update(mac="02:00:00:00:00:01")),
     "nodes.beta.mac", ["same MAC", "alpha"]),
    ("short mac", _set("nodes.alpha", "mac", "02:00:00:00:00"), "nodes.alpha.mac", ["MAC address"]),
    ("non-hex mac", _set("nodes.alpha", "mac", "02:00:00:00:00:zz"), "nodes.alpha.mac",
     ["MAC address"]),
    ("multicast mac", _set("nodes.alpha", "mac", "01:00:5e:00:00:01"), "nodes.alpha.mac",
     ["unicast"]),
    ("mac a number", _set("nodes.alpha", "mac", 12), "nodes.alpha.mac", ["string"]),
    ("relative disk", _set("nodes.alpha", "disk", "r0.img"), "nodes.alpha.disk", ["absolute"]),
    ("relative metadata", _set("nodes.beta", "metadata", "m"), "nodes.beta.metadata", ["absolute"]),
    ("socket path too long", _set("nodes.alpha", "control_socket", "/run/" + "x" * 110),
     "nodes.alpha.control_socket", ["107"]),
    ("metrics without a port", _set("nodes.alpha", "metrics", "127.0.0.1"),
     "nodes.alpha.metrics", ["HOST:PORT", "127.0.0.1:9942"]),
    ("metrics without a host", _set("nodes.beta", "metrics", ":9942"), "nodes.beta.metrics",
     ["HOST:PORT", "0.0.0.0:9942"]),
    ("metrics a number", _set("nodes.alpha", "metrics", 9942), "nodes.alpha.metrics",
     ["string", "integer"]),
    ("metrics port 0", _set("nodes.alpha", "metrics", "127.0.0.1:0"), "nodes.alpha.metrics",
     ["1 to 65535"]),
    ("metrics port too big", _set("nodes.alpha", "metrics", "127.0.0.1:65536"),
     "nodes.alpha.metrics", ["1 to 65535"]),
    ("metrics bad IPv4", _set("nodes.alpha", "metrics", "300.0.0.1:9942"),
     "nodes.alpha.metrics", ["IPv4"]),
    ("metrics bare IPv6", _set("nodes.alpha", "metrics", "::1:9942"), "nodes.alpha.metrics",
     ["HOST:PORT", "[::1]:9942"]),
    ("metrics a URL", _set("nodes.alpha", "metrics", "http://127.0.0.1:9942"),
     "nodes.alpha.metrics", ["HOST:PORT"]),
    ("metrics bad host name", _set("nodes.alpha", "metrics", "-box:9942"),
     "nodes.alpha.metrics", ["host name"]),
]


@pytest.mark.parametrize("mutation, key, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors_name_the_key(write, mutation, key, words):
    err = error_of(write(mutate(mutation)))
    assert err.key == key, str(err)
    assert str(err) == f"{err.path}: {key}: {err.problem}"
    for word in words:
        assert word in err.problem, str(err)


def test_unknown_node(write):
    err = error_of(write(good_doc()), "gamma")
    assert err.key == "nodes"
    assert err.problem == ("no section for node 'gamma' (this file has: alpha, beta); "
                           "pass --node NAME")


def test_short_secret_file(write, tmp_path):
    (tmp_path / "s").write_text("1234567\n")  # 7 bytes once the newline is gone
    doc = good_doc()
    doc["resource"]["secret_file"] = str(tmp_path / "s")
    err = error_of(write(doc))
    assert err.key == "resource.secret_file" and "at least 8" in err.problem


def test_wrong_type_of_top_level_table(write):
    text = 'resource = "r0"\n' + to_toml({"nodes": good_doc()["nodes"]})
    err = error_of(write(text))
    assert err.key == "resource" and "table" in err.problem


# -- this box ---------------------------------------------------------------------------

@pytest.fixture
def local(tmp_path, write):
    """A config whose alpha disk and metadata live in tmp_path, on the loopback interface."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    doc = good_doc()
    doc["nodes"]["alpha"].update(disk=str(disk), metadata=str(tmp_path / "r0.meta"), interface="lo")
    # beta names things that do not exist here: only this node is checked.
    doc["nodes"]["beta"].update(disk="/nonexistent/disk", interface="nosuchif0")

    def make(**alpha):
        doc["nodes"]["alpha"].update(alpha)
        return load_config(write(doc), "alpha")
    return make


def check_error(cfg) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        check_local(cfg)
    return info.value


@pytest.mark.skipif(not os.path.exists("/sys/class/net/lo"), reason="no /sys/class/net/lo")
def test_check_local_accepts_a_good_box(local):
    check_local(local())


def test_check_local_disk_missing(local, tmp_path):
    err = check_error(local(disk=str(tmp_path / "nope.img")))
    assert err.key == "nodes.alpha.disk" and "does not exist" in err.problem


def test_check_local_disk_is_a_directory(local, tmp_path):
    err = check_error(local(disk=str(tmp_path)))
    assert err.key == "nodes.alpha.disk" and "regular file or block device" in err.problem


def test_check_local_disk_size_not_multiple_of_512(local, tmp_path):
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    err = check_error(local(disk=str(tmp_path / "odd.img")))
    assert err.key == "nodes.alpha.disk" and "1000" in err.problem and "512" in err.problem


def test_check_local_disk_empty(local, tmp_path):
    (tmp_path / "empty.img").write_bytes(b"")
    err = check_error(local(disk=str(tmp_path / "empty.img")))
    assert err.key == "nodes.alpha.disk" and "empty" in err.problem


def test_check_local_metadata_dir_missing(local, tmp_path):
    err = check_error(local(metadata=str(tmp_path / "nodir" / "r0.meta")))
    assert err.key == "nodes.alpha.metadata" and "does not exist" in err.problem


def test_check_local_interface_missing(local):
    err = check_error(local(interface="nosuchif0"))
    assert err.key == "nodes.alpha.interface" and "'nosuchif0'" in err.problem


def test_disk_size_of_a_regular_file(tmp_path):
    (tmp_path / "d").write_bytes(bytes(8192))
    assert disk_size(str(tmp_path / "d")) == 8192
    with pytest.raises(ValueError):
        disk_size(str(tmp_path))


def test_after_split_brain_policy(write):
    doc = good_doc()
    assert load_config(write(doc), "alpha").after_split_brain == "disconnect"
    doc["resource"]["after_split_brain"] = "discard-least-changes"
    assert load_config(write(doc), "alpha").after_split_brain == "discard-least-changes"
    doc["resource"]["after_split_brain"] = "discard-everything"
    with pytest.raises(ConfigFileError) as err:
        load_config(write(doc), "alpha")
    assert err.value.key == "resource.after_split_brain" and "discard-zero-changes" in str(err.value)


def test_fencing_keys(write):
    cfg = load_config(write(good_doc()), "alpha")
    assert (cfg.fencing, cfg.fence_peer, cfg.unfence_peer, cfg.fence_timeout, cfg.cluster) == (
        "resource-only", None, None, 10.0, "corosync")
    doc = good_doc()
    doc["resource"].update(fencing="resource-and-stonith", fence_peer="python3 -m ha.crm_fence fence",
                           unfence_peer="python3 -m ha.crm_fence unfence", fence_timeout=3,
                           cluster="none")
    cfg = load_config(write(doc), "alpha")
    assert cfg.fencing == "resource-and-stonith" and cfg.fence_timeout == 3.0
    assert cfg.fence_peer.endswith("fence") and cfg.cluster == "none"


@pytest.mark.parametrize("key, value, problem", [
    ("fencing", "stonith", "must be one of none, resource-only, resource-and-stonith"),
    ("fencing", 1, "must be a string, not an integer"),
    ("fence_peer", "  ", "is empty"),
    ("fence_timeout", 0, "must be a positive number of seconds"),
    ("cluster", "pacemaker", "must be one of corosync, none"),
])
def test_bad_fencing_keys_name_the_key(write, key, value, problem):
    doc = good_doc()
    doc["resource"][key] = value
    with pytest.raises(ConfigFileError) as err:
        load_config(write(doc), "alpha")
    assert err.value.key == f"resource.{key}" and problem in str(err.value)


def test_hooks_section(write):
    doc = good_doc()
    doc["hooks"] = {"disconnect": "logger -t mirrord down", "exec": "/usr/local/bin/hook",
                    "timeout": 5}
    cfg = load_config(write(doc), "alpha")
    assert cfg.hooks == {"disconnect": "logger -t mirrord down", "exec": "/usr/local/bin/hook"}
    assert cfg.hook_timeout == 5.0


@pytest.mark.parametrize("hooks, key, problem", [
    ({"on-disconnect": "x"}, "hooks.on-disconnect", "unknown key (did you mean 'disconnect'?)"),
    ({"exec": "hook.sh"}, "hooks.exec", "must be the absolute path of a program"),
    ({"role-change": 3}, "hooks.role-change", "must be a string"),
    ({"timeout": -1}, "hooks.timeout", "must be a positive number of seconds"),
])
def test_bad_hooks_name_the_key(write, hooks, key, problem):
    doc = good_doc()
    doc["hooks"] = hooks
    with pytest.raises(ConfigFileError) as err:
        load_config(write(doc), "alpha")
    assert err.value.key == key and problem in str(err.value)
