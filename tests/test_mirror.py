"""A mirrored volume used through NBD by real clients: two real daemons in two namespaces.

Each test starts both daemons on a fresh veth pair (MTU 9000), makes alpha primary and
waits for the initial sync, then drives the primary's export with nbdcopy, qemu-io or
qemu-img and compares the two backing files byte for byte.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from mirrorpair import files_equal, first_difference

pytestmark = pytest.mark.netns

MiB = 1 << 20


def run(argv, timeout=120, check=True, **kw):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def random_file(path: str, size: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    return path


def started_pair(mirror_pair, **options):
    """Both daemons up, alpha primary, the initial full sync done."""
    pair = mirror_pair(**options)
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=60)
    return pair


def assert_identical(pair):
    diff = first_difference(pair.disk("alpha"), pair.disk("beta"))
    assert diff is None, f"backing files differ first at byte {diff}\n{pair.logs_text()}"


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_nbdcopy_256mib_leaves_both_disks_identical(mirror_pair, tmp_path, protocol):
    pair = started_pair(mirror_pair, size=256 * MiB, protocol=protocol)
    source = random_file(str(tmp_path / "source.img"), 256 * MiB, seed=hash(protocol) & 0xFFFF)
    run(["nbdcopy", "--flush", source, pair.uri("alpha")])
    # FLUSH completed: with protocol C the peer applied everything; with A and B the
    # flush still waits for the peer to make every earlier write durable.
    assert files_equal(source, pair.disk("alpha"))
    assert_identical(pair)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, pair.uri("alpha")])
    status = pair.status("alpha")
    assert status["protocol"] == protocol and status["out_of_sync_bytes"] == 0


def test_qemu_io_mixed_requests(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=64 * MiB)
    rng = random.Random(7)
    script = []
    size = pair.size
    final = bytearray(size)  # what every byte must read back as, applying writes in order
    for i in range(1000):
        kind = rng.choice(["write", "write", "writev", "aio", "fua", "zero", "trim", "flush"])
        if kind == "flush":
            script.append("flush")
            continue
        offset = rng.randrange(0, size - 300 * 1024)
        length = rng.randrange(1, 256 * 1024)
        pattern = rng.randrange(1, 255)
        if kind == "write":
            script.append(f"write -P {pattern} {offset} {length}")
        elif kind == "fua":
            script.append(f"write -f -P {pattern} {offset} {length}")
        elif kind == "aio":
            script.append(f"aio_write -P {pattern} {offset} {length}")
            script.append("aio_flush")
        elif kind == "writev":
            half = max(1, length // 2)
            script.append(f"writev -P {pattern} {offset} {half} {length - half or 1}")
            length = half + (length - half or 1)
        elif kind == "zero":
            script.append(f"write -z {offset} {length}")
            pattern = 0
        else:
            script.append(f"discard {offset} {length}")
            pattern = 0  # this export makes trimmed ranges read as zeros on both boxes
        final[offset:offset + length] = bytes([pattern]) * length
    script.append("flush")
    reads = []
    for offset in range(0, size, 4 * MiB):
        chunk = final[offset:offset + 4 * MiB]
        start = 0
        while start < len(chunk):
            value = chunk[start]
            end = start
            while end < len(chunk) and chunk[end] == value:
                end += 1
            reads.append(f"read -P {value} {offset + start} {end - start}")
            start = end
    script_path = tmp_path / "script"
    script_path.write_text("\n".join(script + reads) + "\n")
    result = run(["qemu-io", "-f", "raw", pair.uri("alpha")], stdin=open(script_path),
                 timeout=300, check=False)
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, \
        result.stdout[-3000:] + result.stderr
    assert_identical(pair)


def test_writes_to_a_secondary_are_refused(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=16 * MiB)
    data = random_file(str(tmp_path / "d"), 1 * MiB)
    result = run(["nbdcopy", data, pair.uri("beta")], check=False)
    assert result.returncode != 0
    info = run(["nbdinfo", "--json", pair.uri("beta")]).stdout
    assert '"is_read_only": true' in info
    assert_identical(pair)


def test_promotion_rules(mirror_pair):
    pair = mirror_pair(size=16 * MiB)
    pair.start_all()
    # A fresh disk is inconsistent: promotion needs --force.
    refused = pair.ctl("alpha", "primary", check=False)
    assert refused.returncode == 1 and "inconsistent" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    pair.promote("alpha", force=True)
    pair.wait_connected()
    # The peer is primary: beta may not be promoted, even with --force.
    for args in (["primary"], ["primary", "--force"]):
        refused = pair.ctl("beta", *args, check=False)
        assert refused.returncode == 1 and "alpha is primary" in refused.stderr
    # Switch roles the proper way.
    pair.ctl("alpha", "secondary")
    pair.promote("beta")
    pair.wait("beta", lambda s: s["role"] == "primary" and s["peer"]["role"] == "secondary",
              10, "beta primary, alpha secondary")


def test_kill_9_of_the_primary_never_loses_an_acknowledged_write(mirror_pair):
    """Protocol C: a write the client saw complete is on the secondary's disk.

    Twenty rounds: a background client keeps writing to the first half of the volume;
    the checked writes go to the second half; alpha is killed a random moment after an
    acknowledgement, and beta's backing file must hold every acknowledged checked write.
    """
    pair = started_pair(mirror_pair, size=32 * MiB, protocol="C")
    import nbdclient

    nbd = nbdclient.load()
    rng = random.Random(20)
    half = pair.size // 2
    for round_no in range(20):
        stop = threading.Event()

        def background(uri=pair.uri("alpha")):
            other = nbd.NBD()
            other.connect_uri(uri)
            local = random.Random(round_no)
            try:
                while not stop.is_set():
                    other.pwrite(local.randbytes(65536), local.randrange(0, half // 65536) * 65536)
            except Exception:  # noqa: BLE001 - the server is killed under it
                pass

        noise = threading.Thread(target=background)
        noise.start()
        handle = nbd.NBD()
        handle.connect_uri(pair.uri("alpha"))
        acknowledged = []
        deadline = time.monotonic() + rng.random() * 0.5
        while True:
            length = rng.choice([4096, 65536, 1 << 20])
            offset = half + rng.randrange(0, (half - length) // 4096) * 4096
            payload = rng.randbytes(length)
            handle.pwrite(payload, offset)  # returns once the server acknowledged it
            acknowledged = [(o, p) for o, p in acknowledged
                            if o + len(p) <= offset or o >= offset + length]
            acknowledged.append((offset, payload))
            if time.monotonic() >= deadline:
                break
        time.sleep(rng.random() * 0.005)
        pair.kill("alpha", signal.SIGKILL)
        stop.set()
        noise.join(30)
        with open(pair.disk("beta"), "rb") as f:
            for offset, payload in acknowledged:
                f.seek(offset)
                assert f.read(len(payload)) == payload, \
                    f"round {round_no}: acknowledged write at {offset} lost on beta"
        # Restart alpha; it crashed as primary, so it resyncs beta from itself.
        pair.start("alpha")
        pair.promote("alpha")
        pair.wait("alpha", lambda s: s["connection"] == "connected"
                  and s["peer"] is not None and s["peer"]["disk"] == "up-to-date", 60,
                  "alpha back and beta up to date")
    assert_identical(pair)


class WriteStream:
    """Random 64 KiB writes through the primary's export from a thread, as fast as they
    complete, until the `with` block ends; then the writes are flushed.  `done_at` holds
    each write's completion time; a failed write is raised at the end of the block."""

    def __init__(self, pair, seed: int) -> None:
        import nbdclient

        self.pair = pair
        self.handle = nbdclient.load().NBD()
        self.handle.connect_uri(pair.uri("alpha"))
        self.rng = random.Random(seed)
        self.done_at: list[float] = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write)

    def _write(self) -> None:
        blocks = self.pair.size // 65536
        try:
            while not self._stop.is_set():
                self.handle.pwrite(self.rng.randbytes(65536), self.rng.randrange(blocks) * 65536)
                self.done_at.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - reported at the end of the block
            self.errors.append(exc)

    def __enter__(self) -> "WriteStream":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(60)
        if exc_info[0] is None:
            assert not self.errors, self.errors
            self.handle.flush()
        self.handle.shutdown()


def test_kill_9_of_the_secondary_during_writes(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=64 * MiB)
    with WriteStream(pair, seed=3):
        time.sleep(0.5)
        pair.kill("beta", signal.SIGKILL)
        time.sleep(3)  # the primary notices (dead-peer timeout) and goes on alone
        status = pair.status("alpha")
        assert status["role"] == "primary" and status["connection"] == "connecting"
        assert status["out_of_sync_bytes"] > 0
        pair.start("beta")
        pair.wait("alpha", lambda s: s["connection"] in ("sync-source", "connected"), 30,
                  "alpha reconnected")
        time.sleep(0.5)
    pair.wait_connected(timeout=60)
    assert_identical(pair)


def test_link_cut_then_bitmap_resync(mirror_pair, tmp_path):
    """Writes while the link is down reach the secondary by a resync of just those blocks."""
    pair = started_pair(mirror_pair, size=64 * MiB, extra_resource='sync_rate = "32M"')
    first = random_file(str(tmp_path / "first"), 8 * MiB, seed=11)
    run(["nbdcopy", "--flush", first, pair.uri("alpha")])
    sent_before = pair.status("alpha")["resync_sent_bytes"]
    pair.net.set_link(pair.ns["alpha"], False)
    for node in ("alpha", "beta"):
        pair.wait(node, lambda s: s["peer"] is None, 5, "peer lost")
    status = pair.status("alpha")
    assert status["role"] == "primary" and status["connection"] == "connecting"
    second = random_file(str(tmp_path / "second"), 16 * MiB, seed=12)
    run(["nbdcopy", "--flush", second, pair.uri("alpha")])  # the primary goes on alone
    status = pair.status("alpha")
    assert status["out_of_sync_bytes"] == 16 * MiB
    assert status["out_of_sync_map"][:16] == [100] * 16 and set(status["out_of_sync_map"][16:]) == {0}
    assert not pair.disks_equal()
    pair.net.set_link(pair.ns["alpha"], True)
    syncing = pair.wait("beta", lambda s: s["connection"] == "sync-target", 10, "resync starts")
    assert syncing["disk"] == "inconsistent"
    seen = pair.wait("alpha", lambda s: s["sync"] is not None and s["sync"]["percent"] > 0, 10,
                     "progress reported")
    assert seen["connection"] == "sync-source" and seen["sync"]["bytes_per_s"] >= 0
    assert 0 < seen["out_of_sync_bytes"] < 16 * MiB
    pair.wait_connected(timeout=60)
    assert_identical(pair)
    status = pair.status("alpha")
    assert status["out_of_sync_bytes"] == 0
    assert status["resync_sent_bytes"] - sent_before == 16 * MiB


def test_two_resources_share_one_link(netns_pair_factory, tmp_path):
    """Two resources on the same dedicated interface: the volume id keeps them apart."""
    from mirrorpair import MirrorPair

    net = netns_pair_factory(mtu=9000)
    pairs = [MirrorPair(net, size=32 * MiB, resource=name) for name in ("r0", "r1")]
    try:
        for pair in pairs:
            pair.start_all()
            pair.promote("alpha", force=True)
        for pair in pairs:
            pair.wait_connected(timeout=60)
        sources = [random_file(str(tmp_path / f"src{i}"), 32 * MiB, seed=40 + i)
                   for i in range(2)]
        copies = [subprocess.Popen(["nbdcopy", "--flush", src, pair.uri("alpha")])
                  for src, pair in zip(sources, pairs)]
        assert [c.wait(timeout=120) for c in copies] == [0, 0]
        for src, pair in zip(sources, pairs):
            assert files_equal(src, pair.disk("beta")), pair.logs_text()
    finally:
        for pair in pairs:
            pair.close()


def test_mtu_lowered_under_a_running_stream_reconnects_at_it(mirror_pair):
    """Both ends of the link go from MTU 9000 to 1500 while the primary writes: the
    session ends and a new one is agreed at 1500 within seconds (it used to retransmit
    9000-byte frames that the kernel refused, for ever), writes go on, and the two disks
    end identical."""
    pair = started_pair(mirror_pair, size=64 * MiB)
    with WriteStream(pair, seed=5) as stream:
        time.sleep(0.5)
        assert stream.done_at, "no write completed before the MTU change"
        lowered = time.monotonic()
        for node in ("beta", "alpha"):
            pair.net.run(pair.ns[node], ["ip", "link", "set", "dev", pair.ifname[node],
                                         "mtu", "1500"])
        pair.wait("alpha", lambda s: "MTU 1500" in open(pair.logs["alpha"]).read()
                  and s["connection"] in ("connected", "sync-source"), 10,
                  "alpha reconnected at MTU 1500")
        time.sleep(1.0)
        after = [t for t in stream.done_at if t > lowered + 0.5]
        assert len(after) > 10, f"only {len(after)} writes completed after the MTU change"
    pair.wait_connected(timeout=60)
    logs = {node: open(pair.logs[node]).read() for node in ("alpha", "beta")}
    assert all("MTU changed to 1500" in log for log in logs.values()), logs
    # Whichever end hears of its MTU first ends the 9000 session; the other may then
    # see only a peer that restarted, at 1500.
    assert any("MTU lowered to 1500" in log for log in logs.values()), logs
    assert_identical(pair)
