"""The state table: every state against every input, in the table and through the API."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from harness import connected_pair, pair
from protocol import ConnState, Input, LocalProtocolError
from protocol.state import TRANSITIONS, StateMachine


@pytest.mark.parametrize("state,event", list(itertools.product(ConnState, Input)),
                         ids=lambda v: v.value)
def test_every_state_against_every_input(state, event):
    sm = StateMachine()
    sm.state = state
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(LocalProtocolError) as info:
            sm.transition(event)
        assert sm.state is ConnState.ERROR
        assert event.value in str(info.value) and state.value in str(info.value)
    else:
        assert sm.transition(event) is expected
        assert sm.state is expected


def test_error_is_terminal():
    for event in Input:
        assert (ConnState.ERROR, event) not in TRANSITIONS
        sm = StateMachine()
        sm.state = ConnState.ERROR
        with pytest.raises(LocalProtocolError):
            sm.transition(event)
        assert sm.state is ConnState.ERROR


def test_table_only_names_known_states_and_leads_nowhere_into_error():
    for (state, event), new in TRANSITIONS.items():
        assert isinstance(state, ConnState) and isinstance(event, Input)
        assert new is not ConnState.ERROR  # only a refused input leads there


def test_a_new_machine_is_idle():
    assert StateMachine().state is ConnState.IDLE


# --- through the Connection API -------------------------------------------------------


def test_send_while_connecting_raises_and_leaves_error():
    net, a, b = pair()
    conn = a.conn
    assert conn.state is ConnState.CONNECTING
    with pytest.raises(LocalProtocolError):
        conn.send_message(b"too early", now=net.now)
    assert conn.state is ConnState.ERROR
    # From ERROR every API input is refused.
    for call in (lambda: conn.connect(now=net.now), lambda: conn.close(now=net.now),
                 lambda: conn.send_message(b"x", now=net.now),
                 lambda: conn.carrier_changed(True, now=net.now),
                 lambda: conn.carrier_changed(False, now=net.now)):
        with pytest.raises(LocalProtocolError):
            call()
        assert conn.state is ConnState.ERROR


def test_send_before_connect_raises_and_leaves_error():
    net, a, b = pair(connect=False)
    with pytest.raises(LocalProtocolError):
        a.conn.send_message(b"x", now=0.0)
    assert a.conn.state is ConnState.ERROR


def test_a_connection_in_error_never_connects_and_never_crashes_on_input():
    net, a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.conn.send_message(b"x", now=net.now)
    net.run_for(1.0)
    assert a.conn.state is ConnState.ERROR
    assert not a.connected and not b.connected


def test_oversized_message_is_refused_without_queueing_it():
    net, a, b = connected_pair(max_message=4096, receive_buffer=8192)
    with pytest.raises(LocalProtocolError):
        a.conn.send_message(bytes(4097), now=net.now)
    assert a.conn.counters.messages_sent == 0
    number = a.conn.send_message(bytes(4096), now=net.now)
    net.run_until(lambda: len(b.messages) == 1, timeout=1.0)
    assert number == 1 and b.messages == [bytes(4096)]


# Every API input, applied in any order between bursts of wire activity: the connection
# must do exactly what the table says (one transition per call), or raise and stay in ERROR.
API = {
    Input.CONNECT: lambda c, now: c.connect(now=now),
    Input.CLOSE: lambda c, now: c.close(now=now),
    Input.SEND: lambda c, now: c.send_message(b"m", now=now),
    Input.CARRIER_DOWN: lambda c, now: c.carrier_changed(False, now=now),
    Input.CARRIER_UP: lambda c, now: c.carrier_changed(True, now=now),
}

STEPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(sorted(API, key=lambda i: i.value))),
        st.tuples(st.just("run"), st.sampled_from([0.0001, 0.001, 0.05, 0.3, 3.0])),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(STEPS)
def test_api_inputs_follow_the_table(steps):
    net, a, b = pair(connect=False)
    endpoints = {"a": a, "b": b}
    for step in steps:
        if step[0] == "run":
            net.run_for(step[1])
            continue
        conn = endpoints[step[0]].conn
        before = conn.state
        expected = TRANSITIONS.get((before, step[1]))
        if expected is None:
            with pytest.raises(LocalProtocolError):
                API[step[1]](conn, net.now)
            assert conn.state is ConnState.ERROR
        else:
            API[step[1]](conn, net.now)
            assert conn.state is expected
    # Whatever happened, each side's events tell a consistent story.
    for endpoint in (a, b):
        endpoint.drain()
        sessions = [type(e).__name__ for e in endpoint.events
                    if type(e).__name__ in ("Connected", "ConnectionLost")]
        # Connected and ConnectionLost alternate, starting with Connected.
        assert sessions == ["Connected", "ConnectionLost"] * (len(sessions) // 2) + \
            (["Connected"] if len(sessions) % 2 else [])
        if endpoint.conn.state is ConnState.ESTABLISHED:
            assert sessions and sessions[-1] == "Connected"
