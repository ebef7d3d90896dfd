"""ConnectionConfig.validate(): each bad setting is refused, naming its field."""

from __future__ import annotations

import pytest

from protocol import ConfigError, Connection, ConnectionConfig, LocalProtocolError
from protocol.config import MAX_UPPER_HANDSHAKE
from protocol.frames import MAX_MTU, MIN_MTU


def config(**changes) -> ConnectionConfig:
    return ConnectionConfig(**{"node": "a", "volume": 1, "peer_node": "b", **changes})


def test_defaults_are_valid():
    config().validate()
    Connection(config())


@pytest.mark.parametrize("field,value", [
    ("node", ""), ("node", "n" * 65), ("node", "é" * 33),
    ("peer_node", ""), ("peer_node", "a"),
    ("volume", -1), ("volume", 2**32),
    ("mtu", MIN_MTU - 1), ("mtu", MAX_MTU + 1),
    ("secret", b"short"),
    ("hello_interval", 0), ("keepalive_interval", -1), ("dead_peer_timeout", 0),
    ("rto_initial", 0), ("rto_min", 0), ("rto_max", 0), ("ack_delay", 0),
    ("ack_every", 0), ("send_window", 0), ("max_message", 0),
], ids=lambda v: repr(v)[:20])
def test_each_bad_value_names_its_field(field, value):
    with pytest.raises(ConfigError) as info:
        config(**{field: value}).validate()
    assert info.value.field == field
    with pytest.raises(ConfigError):
        Connection(config(**{field: value}))


def test_relations_between_settings():
    with pytest.raises(ConfigError) as info:
        config(rto_min=2.0, rto_max=1.0).validate()
    assert info.value.field == "rto_min"
    with pytest.raises(ConfigError) as info:
        config(keepalive_interval=2.0, dead_peer_timeout=2.0).validate()
    assert info.value.field == "dead_peer_timeout"
    with pytest.raises(ConfigError) as info:
        config(max_message=1 << 20, receive_buffer=(2 << 20) - 1).validate()
    assert info.value.field == "receive_buffer"
    config(max_message=1 << 20, receive_buffer=2 << 20).validate()


def test_handshake_info_must_fit_a_hello():
    Connection(config(handshake_info=bytes(MAX_UPPER_HANDSHAKE - 3)))  # packs to the limit
    with pytest.raises(LocalProtocolError):
        Connection(config(handshake_info=bytes(MAX_UPPER_HANDSHAKE - 2)))
