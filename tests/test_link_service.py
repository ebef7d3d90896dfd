"""LinkService, the daemon's link thread, on a real veth pair: two services in this
process, each built inside its own namespace (tests/netns.py in_netns).

What the engine relies on: messages go out in the order of their submit() calls,
whichever thread sends them (the link thread, or a writer's send_now()); send_now sends
from its caller while the link thread sleeps and leaves the work to the link thread when
it is busy; calls handed over for the link thread run there.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time

import pytest

from netns import NetnsPair, in_netns, unusable_reason

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason())),
]

NUMBER = struct.Struct(">I")


class Box:
    """One end: a Link and Connection served by a LinkService, its events recorded."""

    def __init__(self, ns: str, ifname: str, node: str, peer: str) -> None:
        from mirrord.link import Link
        from mirrord.link_service import LinkService
        from protocol import Connection, ConnectionConfig

        with in_netns(ns):
            self.link = Link(ifname)
        self.conn = Connection(ConnectionConfig(node=node, volume=1, mtu=self.link.mtu,
                                                peer_node=peer))
        self.link.add(self.conn)
        self.connected = threading.Event()
        self.received: list[bytes] = []
        self.arrived = threading.Condition()
        self.service = LinkService(self.link, self.conn, self._on_event)

    def _on_event(self, event) -> None:
        from protocol import Connected, MessageReceived

        if isinstance(event, Connected):
            self.connected.set()
        elif isinstance(event, MessageReceived):
            with self.arrived:
                self.received.append(event.data)
                self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 20) -> list[bytes]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout), \
                f"{len(self.received)} of {count} messages arrived"
            return list(self.received)


@pytest.fixture
def boxes():
    with NetnsPair(mtu=1500) as pair:
        alpha = Box(pair.ns_a, pair.if_a, "alpha", "beta")
        beta = Box(pair.ns_b, pair.if_b, "beta", "alpha")
        for box in (alpha, beta):
            box.service.start()
        try:
            for box in (alpha, beta):
                assert box.connected.wait(10), "no handshake"
            yield alpha, beta
        finally:
            for box in (alpha, beta):
                box.service.stop()


def _senders(box: Box, frames_before: list) -> list[str]:
    """Wrap box.link.flush: record the name of each thread whose flush sent frames."""
    flush = box.link.flush

    def recording(now=None):
        before = box.conn.counters.frames_sent
        flush(now)
        if box.conn.counters.frames_sent > before:
            frames_before.append(threading.current_thread().name)

    box.link.flush = recording
    return frames_before


def test_messages_from_many_threads_arrive_in_submit_order(boxes):
    """Four writers submit numbered messages, each followed by send_now(); the order of
    submit() calls (taken under one lock) is the order beta receives, exactly once."""
    alpha, beta = boxes
    session = alpha.conn.session_id
    numbers = itertools.count()
    order = threading.Lock()
    per_thread = 400

    def writer() -> None:
        for _ in range(per_thread):
            with order:
                alpha.service.submit(NUMBER.pack(next(numbers)), session)
            alpha.service.send_now()

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got = [NUMBER.unpack(m)[0] for m in beta.wait_for(4 * per_thread)]
    assert got == list(range(4 * per_thread))
    assert alpha.service.failure is None and beta.service.failure is None


def test_send_now_sends_from_its_caller_while_the_link_thread_sleeps(boxes):
    alpha, beta = boxes
    session = alpha.conn.session_id
    senders = _senders(alpha, [])
    for n in range(10):
        del senders[:]
        alpha.service.submit(NUMBER.pack(n), session)
        alpha.service.send_now()
        assert beta.wait_for(n + 1)[-1] == NUMBER.pack(n)
        time.sleep(0.05)  # let the link thread's own wake-up pass: it sleeps again
        assert senders, "nothing was sent"
        if senders[0] == threading.current_thread().name:
            break
    else:
        pytest.fail("in 10 tries send_now never sent the frame itself: always the link thread")
    assert alpha.service.failure is None


def test_send_now_leaves_the_work_to_a_busy_link_thread(boxes):
    """While the link thread is in a turn (here: its lock held by the test), send_now
    sends nothing; the link thread sends the message at its next turn."""
    alpha, beta = boxes
    senders = _senders(alpha, [])
    with alpha.service._turn:
        alpha.service.submit(b"queued", alpha.conn.session_id)
        alpha.service.send_now()  # must not block on the held lock, nor send
        time.sleep(0.05)
        assert beta.received == [] and senders == []
    assert beta.wait_for(1) == [b"queued"]
    assert senders[0] == "link"


def test_calls_for_the_link_thread_run_there_and_before_later_messages(boxes):
    """send_now never runs call_soon functions: it leaves them, and the messages queued
    after them, to the link thread, which runs them in order."""
    alpha, beta = boxes
    ran_in = []
    sent_when_called = []
    with alpha.service._turn:  # hold the link thread so both are queued together
        alpha.service.call_soon(lambda: (ran_in.append(threading.current_thread().name),
                                         sent_when_called.append(list(beta.received))))
        alpha.service.submit(b"after the call", alpha.conn.session_id)
    alpha.service.send_now()
    assert beta.wait_for(1) == [b"after the call"]
    assert ran_in == ["link"]
    assert sent_when_called == [[]]
