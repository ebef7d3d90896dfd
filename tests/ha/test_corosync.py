"""ha.cpg / ha.quorum / ha.errors against a real two-node corosync (tests/cluster.py).

The first tests are pure (error names, struct layouts, argument checks).  The
others run tests/ha/cpg_helper.py inside each node of one corosync-only
cluster shared by the module (no Pacemaker: faster, and CPG is all we test);
every test uses its own group name, so a member left over by an earlier test
cannot show up in the next one's membership.  A test that crashes a node
boots it again before it ends.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time

import pytest

from ha import _native, cpg, errors, quorum
from ha.cpg import MAX_MESSAGE_BYTES, ProcessGroup, Reason
from ha.errors import CorosyncError, CorosyncUnavailable, error_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPER = os.path.join(REPO, "tests", "ha", "cpg_helper.py")
# A helper is up in well under a second; a membership change after a node
# crash takes token (1 s) + consensus (1.2 s) ~ 2.2 s; a clean leave or a dead
# process is seen in milliseconds.
READY_TIMEOUT_S = 10.0
EVENT_TIMEOUT_S = 5.0
NODEDOWN_TIMEOUT_S = 8.0


# -- pure: no cluster -----------------------------------------------------------


def test_every_cs_error_t_value_has_its_header_name():
    assert len(errors.CS_ERROR_NAMES) == 30  # corotypes.h: 1..28, 30, 100
    assert errors.CS_ERROR_NAMES[1] == "CS_OK"
    assert errors.error_name(6) == "CS_ERR_TRY_AGAIN"
    assert errors.error_name(11) == "CS_ERR_ACCESS"
    assert errors.error_name(28) == "CS_ERR_CONTEXT_NOT_FOUND"
    assert errors.error_name(30) == "CS_ERR_TOO_MANY_GROUPS"
    assert errors.error_name(100) == "CS_ERR_SECURITY"
    assert 29 not in errors.CS_ERROR_NAMES
    assert errors.error_name(29) == "CS_ERR_UNKNOWN_29"
    assert all(name.startswith("CS_") for name in errors.CS_ERROR_NAMES.values())


def test_error_names_the_call_code_and_name():
    exc = CorosyncError("cpg_join", 11)
    assert (exc.call, exc.code, exc.name) == ("cpg_join", 11, "CS_ERR_ACCESS")
    assert str(exc) == "cpg_join: CS_ERR_ACCESS (11)"
    detailed = CorosyncError("cpg_mcast_joined", 6, "corosync still busy after 2 s")
    assert str(detailed) == "cpg_mcast_joined: CS_ERR_TRY_AGAIN (6): corosync still busy after 2 s"
    again = pickle.loads(pickle.dumps(detailed))
    assert (type(again), again.call, again.code, str(again)) == (
        CorosyncError, "cpg_mcast_joined", 6, str(detailed))


@pytest.mark.parametrize("call, code, initializing, unavailable", [
    ("cpg_initialize", 2, True, True),     # CS_ERR_LIBRARY: nothing listens
    ("cpg_initialize", 6, True, True),     # TRY_AGAIN at init: corosync still starting
    ("quorum_initialize", 2, True, True),
    ("cpg_dispatch", 2, False, True),      # the connection broke: corosync went away
    ("cpg_mcast_joined", 6, False, False),  # busy, but there is a cluster
    ("cpg_join", 11, False, False),        # CS_ERR_ACCESS: a real refusal
    ("cpg_initialize", 11, True, False),
])
def test_error_for_tells_no_cluster_from_a_failure(call, code, initializing, unavailable):
    exc = error_for(call, code, initializing=initializing)
    assert isinstance(exc, CorosyncError)
    assert isinstance(exc, CorosyncUnavailable) is unavailable
    assert exc.call == call and exc.code == code


def test_a_missing_library_is_unavailable_and_names_the_package():
    with pytest.raises(CorosyncUnavailable) as info:
        _native.load("libmirrordtest-missing.so.9", "mirrordtest-missing", "libmissing9")
    assert info.value.call == "load libmirrordtest-missing.so.9"
    assert info.value.code == errors.CS_ERR_LIBRARY
    assert "libmissing9" in str(info.value)


def test_struct_layouts_match_the_headers():
    # Sizes printed by a C program including corosync 3.1.7's cpg.h/quorum.h.
    assert ctypes.sizeof(cpg._CpgName) == 132 and cpg._CpgName.value.offset == 4
    assert ctypes.sizeof(cpg._CpgAddress) == 12
    assert ctypes.sizeof(cpg._Callbacks) == 2 * ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(quorum._Callbacks) == ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(_native.handle_t) == 8
    assert [r.value for r in Reason] == [0, 1, 2, 3, 4, 5]
    assert Reason.NODEDOWN.name == "NODEDOWN" and Reason.PROCDOWN == 5


@pytest.mark.parametrize("name", ["", "x" * 129, "é" * 65])
def test_group_names_must_fit_cpg_name(name):
    with pytest.raises(ValueError, match="1..128 bytes"):
        ProcessGroup(name, on_deliver=print, on_membership=print)


# -- no corosync at all -----------------------------------------------------------

UNAVAILABLE_PROBE = """
import json
from ha.cpg import ProcessGroup
from ha.quorum import Quorum
from ha.errors import CorosyncUnavailable
out = {}
for label, make in (("cpg", lambda: ProcessGroup("g", on_deliver=print, on_membership=print)),
                    ("quorum", Quorum)):
    try:
        make()
        out[label] = "connected"
    except CorosyncUnavailable as exc:
        out[label] = [exc.call, exc.name, str(exc)]
print(json.dumps(out))
"""


@pytest.mark.netns
def test_without_corosync_the_bindings_raise_unavailable():
    """In a fresh network namespace (libqb's abstract sockets are per netns) with a
    private /run and /dev/shm, nothing can answer, whatever runs on the host."""
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare --net --mount")
    script = ("mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /dev/shm && "
              'exec "$0" -c "$1"')
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, UNAVAILABLE_PROBE],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cpg"][:2] == ["cpg_initialize", "CS_ERR_LIBRARY"]
    assert result["cpg"][2] == "cpg_initialize: CS_ERR_LIBRARY (2)"
    assert result["quorum"][:2] == ["quorum_initialize", "CS_ERR_LIBRARY"]


# -- a real corosync pair ----------------------------------------------------------


@pytest.fixture(scope="module")
def corosync_pair():
    from cluster import Cluster, unusable_reason

    reason = unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Cluster(pacemaker=False) as c:
        c.start()
        yield c


@pytest.fixture
def nodes(corosync_pair, request):
    """The module's cluster with both nodes running; a unique group name per test."""
    for node in corosync_pair.nodes:
        if not corosync_pair.is_up(node):
            corosync_pair.boot(node)
    corosync_pair.group = "mt-" + request.node.name[:100]
    return corosync_pair


class Helper:
    """tests/ha/cpg_helper.py inside one node: commands in, JSON events out."""

    def __init__(self, cluster, node: str, group: str) -> None:
        self.node = node
        self.proc = cluster.popen(
            node, [sys.executable, "-u", HELPER, group], env={"PYTHONPATH": REPO},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.expect(lambda e: e["event"] in ("ready", "error"), READY_TIMEOUT_S,
                                 "ready")
        assert self.ready["event"] == "ready", self.ready

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._new.put(json.loads(line))
        self._new.put(None)

    def command(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_until(self, condition, timeout: float, what: str):
        """Read events until ``condition()`` is truthy (returned) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        exited = False
        while True:
            result = condition()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0 or exited:
                stderr = "" if self.proc.poll() is None else self.proc.stderr.read()
                raise AssertionError(f"{self.node}: no {what} within {timeout}s; events: "
                                     f"{self.events}; stderr: {stderr}")
            try:
                event = self._new.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:  # the helper exited: its events are complete
                exited = True
            else:
                self.events.append(event)

    def expect(self, predicate, timeout: float, what: str, start: int = 0) -> dict:
        """The first event (from index ``start``) matching ``predicate``, waiting for it."""
        return self.wait_until(
            lambda: next((e for e in self.events[start:] if predicate(e)), None), timeout, what)

    def deliveries(self) -> list[tuple[int, str]]:
        return [(e["nodeid"], e["data"]) for e in self.events if e["event"] == "deliver"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def helpers(nodes):
    """``start(node) -> Helper`` in this test's group; all stopped at teardown."""
    started: list[Helper] = []

    def start(node: str) -> Helper:
        helper = Helper(nodes, node, nodes.group)
        started.append(helper)
        return helper

    yield start
    for helper in started:
        helper.close()


def confchg_with(helper: Helper, predicate, timeout: float, what: str) -> dict:
    return helper.expect(lambda e: e["event"] == "confchg" and predicate(e), timeout, what)


@pytest.mark.netns
@pytest.mark.cluster
def test_each_side_sees_the_others_join_with_its_nodeid(nodes, helpers):
    alpha = helpers("alpha")
    beta = helpers("beta")
    assert (alpha.ready["nodeid"], beta.ready["nodeid"]) == (1, 2)
    beta_member = [2, beta.ready["pid"], int(Reason.JOIN)]
    alpha_member = [1, alpha.ready["pid"], int(Reason.JOIN)]
    # Our own join comes first, alone in the group.
    first = confchg_with(alpha, lambda e: True, EVENT_TIMEOUT_S, "own join")
    assert first["joined"] == [alpha_member] and first["left"] == []
    seen = confchg_with(alpha, lambda e: beta_member in e["joined"], EVENT_TIMEOUT_S,
                        "beta's join")
    assert sorted(m[:2] for m in seen["members"]) == [alpha_member[:2], beta_member[:2]]
    # beta joined second: its first confchg already lists alpha as a member.
    own = confchg_with(beta, lambda e: beta_member in e["joined"], EVENT_TIMEOUT_S, "own join")
    assert sorted(m[:2] for m in own["members"]) == [alpha_member[:2], beta_member[:2]]


@pytest.mark.netns
@pytest.mark.cluster
def test_messages_cross_both_ways_in_one_total_order(nodes, helpers):
    alpha, beta = helpers("alpha"), helpers("beta")
    confchg_with(alpha, lambda e: len(e["members"]) == 2, EVENT_TIMEOUT_S, "two members")
    count = 40
    # Both sides send at once, so their messages interleave in corosync's order.
    alpha.command(f"burst {count} a")
    beta.command(f"burst {count} b")
    alpha.command("send a-last")
    for helper in (alpha, beta):
        helper.expect(lambda e: e["event"] == "deliver" and e["data"] == "a-last",
                      EVENT_TIMEOUT_S, "the last message")
        helper.wait_until(lambda: len(helper.deliveries()) >= 2 * count + 1, EVENT_TIMEOUT_S,
                          "every message")
    on_alpha, on_beta = alpha.deliveries(), beta.deliveries()
    assert len(on_alpha) == 2 * count + 1
    assert on_alpha == on_beta  # the same total order on both sides, own messages included
    assert [d for n, d in on_alpha if n == 1][:count] == [f"a{i}" for i in range(count)]
    assert [d for n, d in on_alpha if n == 2] == [f"b{i}" for i in range(count)]


@pytest.mark.netns
@pytest.mark.cluster
def test_quorate_with_both_nodes(nodes, helpers):
    alpha, beta = helpers("alpha"), helpers("beta")
    assert alpha.ready["quorate"] is True and beta.ready["quorate"] is True
    alpha.command("quorate")
    assert alpha.expect(lambda e: e["event"] == "quorate", EVENT_TIMEOUT_S, "answer")["quorate"]


@pytest.mark.netns
@pytest.mark.cluster
def test_a_clean_leave_is_reported_as_leave(nodes, helpers):
    alpha, beta = helpers("alpha"), helpers("beta")
    beta_pid = beta.ready["pid"]
    confchg_with(alpha, lambda e: len(e["members"]) == 2, EVENT_TIMEOUT_S, "two members")
    beta.command("leave")
    beta.expect(lambda e: e["event"] == "closed", EVENT_TIMEOUT_S, "closed")
    assert beta.proc.wait(timeout=5) == 0
    change = confchg_with(alpha, lambda e: e["left"], EVENT_TIMEOUT_S, "beta leaving")
    assert change["left"] == [[2, beta_pid, int(Reason.LEAVE)]]
    assert [m[:2] for m in change["members"]] == [[1, alpha.ready["pid"]]]


@pytest.mark.netns
@pytest.mark.cluster
def test_a_killed_process_is_reported_as_procdown(nodes, helpers):
    alpha, beta = helpers("alpha"), helpers("beta")
    beta_pid = beta.ready["pid"]
    confchg_with(alpha, lambda e: len(e["members"]) == 2, EVENT_TIMEOUT_S, "two members")
    beta.proc.kill()  # SIGKILL to the helper itself (NodeProcess finds it under nsenter)
    assert beta.proc.wait(timeout=5) == -9
    change = confchg_with(alpha, lambda e: e["left"], EVENT_TIMEOUT_S, "beta's death")
    assert change["left"] == [[2, beta_pid, int(Reason.PROCDOWN)]]


@pytest.mark.netns
@pytest.mark.cluster
def test_oversized_messages_are_refused_before_corosync(nodes, helpers):
    alpha = helpers("alpha")
    alpha.command("send " + "x" * MAX_MESSAGE_BYTES)  # exactly at the limit: sent
    alpha.expect(lambda e: e["event"] == "deliver", EVENT_TIMEOUT_S, "a message at the limit")
    alpha.command("send " + "x" * (MAX_MESSAGE_BYTES + 1))
    error = alpha.expect(lambda e: e["event"] == "refused", EVENT_TIMEOUT_S, "refusal")
    assert "MAX_MESSAGE_BYTES" in error["message"]


@pytest.mark.netns
@pytest.mark.cluster
def test_send_from_inside_a_callback(nodes, helpers):
    alpha, beta = helpers("alpha"), helpers("beta")
    confchg_with(beta, lambda e: len(e["members"]) == 2, EVENT_TIMEOUT_S, "two members")
    alpha.command("echo")
    alpha.expect(lambda e: e["event"] == "ok", EVENT_TIMEOUT_S, "ok")
    beta.command("send ping:7")
    pong = beta.expect(lambda e: e["event"] == "deliver" and e["data"] == "pong:7",
                       EVENT_TIMEOUT_S, "alpha's answer")
    assert pong["nodeid"] == 1


@pytest.mark.netns
@pytest.mark.cluster
def test_a_callback_exception_is_raised_by_dispatch_after_the_batch(nodes, helpers):
    alpha = helpers("alpha")
    alpha.command("fail-next")
    alpha.expect(lambda e: e["event"] == "ok", EVENT_TIMEOUT_S, "ok")
    alpha.command("burst 3 m")
    error = alpha.expect(lambda e: e["event"] == "callback-error", EVENT_TIMEOUT_S, "the error")
    assert error["message"] == "boom from a callback"
    # However corosync batched them, no delivery was lost to the exception.
    alpha.wait_until(lambda: len(alpha.deliveries()) == 3, EVENT_TIMEOUT_S, "all three")
    assert [d for _, d in alpha.deliveries()] == ["m0", "m1", "m2"]


@pytest.mark.netns
@pytest.mark.cluster
def test_a_crashed_node_is_nodedown_and_the_survivor_stays_quorate(nodes, helpers, capsys):
    alpha, beta = helpers("alpha"), helpers("beta")
    beta_pid = beta.ready["pid"]
    confchg_with(alpha, lambda e: len(e["members"]) == 2, EVENT_TIMEOUT_S, "two members")
    start = len(alpha.events)
    crashed = time.monotonic()
    nodes.crash("beta")
    try:
        change = alpha.expect(lambda e: e["event"] == "confchg" and e["left"],
                              NODEDOWN_TIMEOUT_S, "beta's node going down", start)
        detected = time.monotonic() - crashed
        assert change["left"] == [[2, beta_pid, int(Reason.NODEDOWN)]]
        # two_node: the survivor keeps quorum (a notification, and when asked).
        note = alpha.expect(lambda e: e["event"] == "quorum", EVENT_TIMEOUT_S,
                            "a quorum notification", start)
        assert note["quorate"] is True
        alpha.command("quorate")
        assert alpha.expect(lambda e: e["event"] == "quorate", EVENT_TIMEOUT_S,
                            "answer", start)["quorate"] is True
        with capsys.disabled():
            print(f"\n[ha] CPG NODEDOWN seen {detected:.2f} s after the peer's crash")
    finally:
        nodes.boot("beta")


@pytest.mark.netns
@pytest.mark.cluster
def test_dispatch_raises_unavailable_when_corosync_dies(nodes, helpers):
    beta = helpers("beta")
    # Kill only corosync, by its PID (from its pid file, inside the node).
    pid = nodes.run("beta", ["/bin/cat", "/run/corosync.pid"]).stdout.strip()
    try:
        nodes.run("beta", ["/bin/kill", "-KILL", pid])
        error = beta.expect(lambda e: e["event"] == "error", EVENT_TIMEOUT_S, "an error")
        assert error["type"] == "CorosyncUnavailable"
        assert error["call"] in ("cpg_dispatch", "quorum_dispatch")
        assert error["message"].startswith(error["call"] + ": CS_ERR_LIBRARY (2)")
        beta.expect(lambda e: e["event"] == "closed", EVENT_TIMEOUT_S, "close after the error")
        assert beta.proc.wait(timeout=5) == 4
    finally:
        nodes.crash("beta")  # corosync is gone: power-cycle the node for the next test
        nodes.boot("beta")
