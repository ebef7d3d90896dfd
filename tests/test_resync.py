"""Fast resync with the dirty bitmap and the activity log: real daemons, real clients.

What the operator relies on: after a link cut, a crash of either box or a split brain,
the resync copies only what may differ, resumes where it stopped, never misses a block,
and ends with byte-identical disks.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from test_mirror import MiB, assert_identical, random_file, run, started_pair

pytestmark = pytest.mark.netns


def nbd_handle(pair, node="alpha"):
    import nbdclient

    handle = nbdclient.load().NBD()
    handle.connect_uri(pair.uri(node))
    return handle


def random_4k_writes(pair, count: int, seed: int, node="alpha") -> int:
    """`count` writes of 4 KiB at distinct random aligned offsets; returns bytes written."""
    rng = random.Random(seed)
    blocks = rng.sample(range(pair.size // 4096), count)
    handle = nbd_handle(pair, node)
    for block in blocks:
        handle.pwrite(rng.randbytes(4096), block * 4096)
    handle.flush()
    handle.shutdown()
    return count * 4096


def cut(pair):
    pair.net.set_link(pair.ns["alpha"], False)
    for node in ("alpha", "beta"):
        pair.wait(node, lambda s: s["peer"] is None, 5, "peer lost")


def test_bitmap_resync_of_1_percent_of_1_gib(mirror_pair):
    pair = mirror_pair(size=1 << 30)
    chunk = os.urandom(1 << 20)
    with open(pair.disk("alpha"), "r+b") as f:  # data on alpha: the first sync copies it all
        for _ in range(1024):
            f.write(chunk)
    pair.start_all()
    started = time.monotonic()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=120)
    full_sync_s = time.monotonic() - started
    sent_before = pair.status("alpha")["resync_sent_bytes"]
    cut(pair)
    dirty = random_4k_writes(pair, (1 << 30) // 100 // 4096, seed=5)
    assert pair.status("alpha")["out_of_sync_bytes"] == dirty
    started = time.monotonic()
    pair.net.set_link(pair.ns["alpha"], True)
    pair.wait_connected(timeout=60)
    resync_s = time.monotonic() - started
    sent = pair.status("alpha")["resync_sent_bytes"] - sent_before
    assert dirty <= sent <= 1.1 * dirty, (sent, dirty)
    assert_identical(pair)
    # Reconnecting takes a few tenths of a second; the copy itself is 1% of the disk.
    assert resync_s < full_sync_s / 3, (resync_s, full_sync_s)


def test_link_cut_half_way_through_a_resync_resumes(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=64 * MiB, extra_resource='sync_rate = "16M"')
    sent_before = pair.status("alpha")["resync_sent_bytes"]
    cut(pair)
    data = random_file(str(tmp_path / "d"), 32 * MiB, seed=8)
    run(["nbdcopy", "--flush", data, pair.uri("alpha")])
    pair.net.set_link(pair.ns["alpha"], True)
    pair.wait("alpha", lambda s: s["sync"] is not None and 40 <= s["sync"]["percent"] <= 70,
              30, "resync half-way")
    cut(pair)
    left = pair.status("alpha")["out_of_sync_bytes"]
    assert 0 < left < 32 * MiB
    pair.net.set_link(pair.ns["alpha"], True)
    resumed = pair.wait("alpha", lambda s: s["sync"] is not None, 10, "resync resumes")
    assert resumed["sync"]["total_bytes"] <= left + 2 * MiB
    pair.wait_connected(timeout=60)
    sent = pair.status("alpha")["resync_sent_bytes"] - sent_before
    assert sent < 1.2 * 32 * MiB, sent
    assert_identical(pair)


# Half small writes (up to SEND_NOW_MAX: often sent by the writing thread itself, before
# its local write) and half 1 MiB ones (framed by the link thread while the local write
# runs): a crash meets both send paths.
CRASH_WRITES = "16k/50:1m/50"


def _crash_rounds(pair, rounds: int, seed: int, extra=(), stop_at_first: bool = False
                  ) -> list[int]:
    """Kill -9 the primary at random moments under a random-write stream; restart it,
    let it resync; returns the rounds after which the disks differed (only the first,
    with `stop_at_first`)."""
    rng = random.Random(seed)
    diverged = []
    for round_no in range(rounds):
        fio = pair.random_writes("alpha", seed + round_no, bs=CRASH_WRITES)
        try:
            time.sleep(0.1 + rng.random() * 0.7)
            pair.kill("alpha", signal.SIGKILL)
        finally:
            fio.kill()
            fio.wait(10)
        pair.start("alpha", *extra)
        pair.wait("alpha", lambda s: s["connection"] == "connected" and s["peer"] is not None
                  and s["peer"]["disk"] == "up-to-date" and s["disk"] == "up-to-date", 60,
                  "alpha back in sync")
        if not pair.disks_equal():
            diverged.append(round_no)
            if stop_at_first:
                break
        pair.promote("alpha")
    return diverged


def test_crashed_primary_resyncs_every_region_it_may_have_changed(mirror_pair):
    pair = started_pair(mirror_pair, size=32 * MiB)
    assert _crash_rounds(pair, 30, seed=100) == [], pair.logs_text()


def test_without_the_activity_log_the_crash_check_finds_divergence(mirror_pair):
    """The same check with the activity log disabled must catch missed regions: proof
    that the test above can fail.  About half the rounds diverge on a quiet machine and
    fewer on a busy one (none in 10 once in CI), so it runs until the first does."""
    pair = mirror_pair(size=32 * MiB)
    pair.start("alpha", "--unsafe-no-activity-log")
    pair.start("beta")
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=60)
    diverged = _crash_rounds(pair, 30, seed=200, extra=("--unsafe-no-activity-log",),
                             stop_at_first=True)
    assert diverged, "no round diverged without the activity log: the check proves nothing"


def test_resyncs_beside_a_write_stream_end_with_identical_disks(mirror_pair):
    """The link flaps while a client keeps writing at random, 16 requests in flight: each
    return starts a resync that runs beside replicated writes to the regions it copies,
    and the next cut interrupts it.  Every round ends with byte-identical disks."""
    pair = started_pair(mirror_pair, size=32 * MiB)
    rng = random.Random(40)
    for round_no in range(4):
        fio = pair.random_writes("alpha", 400 + round_no)
        try:
            for _ in range(rng.randrange(1, 4)):
                time.sleep(0.1 + rng.random() * 0.5)
                pair.net.set_link(pair.ns["alpha"], False)
                time.sleep(0.1 + rng.random() * 0.5)
                pair.net.set_link(pair.ns["alpha"], True)
            time.sleep(0.2 + rng.random() * 0.6)  # writes go on during the last resync
        finally:
            fio.kill()
            fio.wait(10)
        pair.wait_connected(timeout=60)
        assert_identical(pair)


def test_checksum_resync_and_verify_beside_a_write_stream(mirror_pair):
    """Digests are taken on one box and compared on the other while a client writes to
    the same regions: a checksum resync (`invalidate`) under writes ends with identical
    disks, and an online verify under writes finds no difference where there is none."""
    pair = started_pair(mirror_pair, size=32 * MiB)
    for round_no in range(2):
        fio = pair.random_writes("alpha", 500 + round_no)
        try:
            time.sleep(0.3)
            pair.ctl("beta", "invalidate")
            pair.wait("alpha", lambda s: s["connection"] == "sync-source", 10, "resync starts")
            time.sleep(0.5)  # writes go on beside the digests and the copies
        finally:
            fio.kill()
            fio.wait(10)
        pair.wait_connected(timeout=60)
        assert_identical(pair)
    fio = pair.random_writes("alpha", 510)
    try:
        time.sleep(0.3)
        pair.ctl("alpha", "verify")
        # `verify` answers once the run is set up: the first status without one has
        # this run's result.
        done = pair.wait("alpha", lambda s: s["verify"] is None, 60, "verify done")
    finally:
        fio.kill()
        fio.wait(10)
    assert done["last_verify"]["completed"], done["last_verify"]
    assert done["last_verify"]["differing_blocks"] == 0, done["last_verify"]
    pair.wait_connected(timeout=60)
    assert_identical(pair)


def test_split_brain_is_detected_and_resolved_by_discarding_one_side(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=32 * MiB)
    cut(pair)
    pair.promote("beta")  # beta is up to date as far as it knows: promotion is allowed
    alpha_data = random_file(str(tmp_path / "a"), 4 * MiB, seed=1)
    beta_data = random_file(str(tmp_path / "b"), 2 * MiB, seed=2)
    run(["nbdcopy", "--flush", alpha_data, pair.uri("alpha")])
    run(["nbdcopy", "--flush", beta_data, f"{pair.uri('beta')}"])
    beta_before = open(pair.disk("beta"), "rb").read(4 * MiB)
    pair.net.set_link(pair.ns["alpha"], True)
    for node, mine, theirs in (("alpha", 4 * MiB, 2 * MiB), ("beta", 2 * MiB, 4 * MiB)):
        status = pair.wait(node, lambda s: "split_brain" in s, 10, "split brain detected")
        assert status["connection"] == "standalone" and "split brain" in status["refused"]
        assert status["split_brain"] == {"this_node_bytes": mine, "peer_bytes": theirs}
    assert open(pair.disk("beta"), "rb").read(4 * MiB) == beta_before  # nothing overwritten
    human = pair.ctl("beta", "status").stdout
    assert "split brain" in human
    pair.ctl("beta", "secondary")
    pair.ctl("beta", "connect", "--discard-my-data")
    pair.ctl("alpha", "connect")
    pair.wait_connected(timeout=30)
    assert_identical(pair)
    with open(pair.disk("beta"), "rb") as f:
        assert f.read(4 * MiB) == open(alpha_data, "rb").read()


def test_corrupt_metadata_refuses_to_start_and_touches_nothing(mirror_pair):
    pair = mirror_pair(size=8 * MiB)
    pair.create_md("alpha")
    with open(pair.disk("alpha"), "r+b") as f:
        f.write(b"precious" * 512)
    disk_before = open(pair.disk("alpha"), "rb").read()
    meta = pair.paths["alpha"]["metadata"]
    with open(meta, "r+b") as f:  # damage both superblock copies
        for slot in (0, 4096):
            f.seek(slot + 20)
            f.write(b"\xff\xfe\xfd")
    from mirrorpair import ENV, REPO, mirrord_argv

    result = pair.net.run(pair.ns["alpha"], mirrord_argv(pair.config, "alpha"),
                          capture_output=True, text=True, check=False, env=ENV, cwd=REPO,
                          timeout=20)
    assert result.returncode == 2, result.stderr
    assert "damaged" in result.stderr and meta in result.stderr
    assert "Traceback" not in result.stderr
    assert open(pair.disk("alpha"), "rb").read() == disk_before
    # Missing metadata: the same refusal, naming the command that creates it.
    os.unlink(meta)
    result = pair.net.run(pair.ns["alpha"], mirrord_argv(pair.config, "alpha"),
                          capture_output=True, text=True, check=False, env=ENV, cwd=REPO,
                          timeout=20)
    assert result.returncode == 2 and "create-md" in result.stderr


def test_checksum_resync_of_identical_volumes_sends_almost_nothing(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=128 * MiB)
    data = random_file(str(tmp_path / "d"), 128 * MiB, seed=9)
    run(["nbdcopy", "--flush", data, pair.uri("alpha")])
    sent_before = pair.status("alpha")["resync_sent_bytes"]
    message = pair.ctl("beta", "invalidate").stdout
    assert "full resync" in message
    pair.wait("alpha", lambda s: s["resync_sent_bytes"] > sent_before, 20, "a resync ran")
    pair.wait_connected(timeout=60)
    sent = pair.status("alpha")["resync_sent_bytes"] - sent_before
    # Digests only (8 bytes per 4 KiB block), no data: every block matched.
    assert sent == pair.size // 4096 * 8, sent
    assert_identical(pair)


def test_a_first_sync_compares_digests_where_blocks_match_and_copies_where_they_differ(
        mirror_pair, tmp_path):
    """A pre-seeded target (its first 32 MiB already equal) then a blank one (the last
    96 MiB): digests where blocks match, outright copies once nearly all differ."""
    size = 128 * MiB
    pair = mirror_pair(size=size)
    seeded = 32 * MiB
    data = open(random_file(str(tmp_path / "d"), size, seed=11), "rb").read()
    with open(pair.disk("alpha"), "r+b") as f:
        f.write(data)
    with open(pair.disk("beta"), "r+b") as f:
        f.write(data[:seeded])
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=60)
    assert_identical(pair)
    sent = pair.status("alpha")["resync_sent_bytes"]
    digests = size // 4096 * 8
    assert sent >= size - seeded, sent
    # The matching part cost digests only; the rest about one copy (no digest pass
    # over it, but for the first window and the probes).
    assert sent <= (size - seeded) + digests, f"sent {sent} of {size - seeded} differing"
    log = pair.log("alpha")
    assert "copying without digests" in log, log


def test_verify_finds_a_block_corrupted_by_hand_and_the_resync_repairs_it(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=64 * MiB)
    data = random_file(str(tmp_path / "d"), 64 * MiB, seed=10)
    run(["nbdcopy", "--flush", data, pair.uri("alpha")])
    with open(pair.disk("beta"), "r+b") as f:  # a silent bit rot on the secondary
        f.seek(40 * MiB + 12345)
        f.write(b"\x00rot\x00")
    refused = pair.ctl("beta", "verify", check=False)
    assert refused.returncode == 1 and "primary" in refused.stderr
    pair.ctl("alpha", "verify")
    status = pair.wait("alpha", lambda s: s["verify"] is None and s["last_verify"], 30,
                       "verify finished")
    assert status["last_verify"]["differing_blocks"] == 1
    assert status["out_of_sync_bytes"] == 4096
    pair.ctl("alpha", "disconnect")
    pair.ctl("alpha", "connect")
    pair.wait_connected(timeout=30)
    assert pair.status("alpha")["out_of_sync_bytes"] == 0
    assert_identical(pair)


def test_split_brain_policy_discard_least_changes_resolves_it_alone(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=32 * MiB,
                        extra_resource='after_split_brain = "discard-least-changes"')
    cut(pair)
    pair.promote("beta")
    run(["nbdcopy", "--flush", random_file(str(tmp_path / "a"), 4 * MiB, seed=3),
         pair.uri("alpha")])
    run(["nbdcopy", "--flush", random_file(str(tmp_path / "b"), 1 * MiB, seed=4),
         pair.uri("beta")])
    pair.ctl("beta", "secondary")  # a primary is never discarded automatically
    pair.net.set_link(pair.ns["alpha"], True)
    pair.wait_connected(timeout=30)
    assert_identical(pair)
    assert "policy discard-least-changes" in pair.log("beta")


def test_pause_and_resume_a_resync(mirror_pair, tmp_path):
    pair = started_pair(mirror_pair, size=32 * MiB, extra_resource='sync_rate = "8M"')
    cut(pair)
    run(["nbdcopy", "--flush", random_file(str(tmp_path / "d"), 16 * MiB, seed=6),
         pair.uri("alpha")])
    pair.net.set_link(pair.ns["alpha"], True)
    pair.wait("alpha", lambda s: s["sync"] is not None and s["sync"]["done_bytes"] > 0, 10,
              "resync running")
    assert "paused" in pair.ctl("alpha", "pause-sync").stdout
    time.sleep(0.5)  # chunks already in flight land
    held = pair.status("alpha")
    time.sleep(1.0)
    later = pair.status("alpha")
    assert later["sync_paused"] and later["sync"]["done_bytes"] == held["sync"]["done_bytes"]
    assert later["out_of_sync_bytes"] > 0
    pair.ctl("alpha", "resume-sync")
    pair.wait_connected(timeout=30)
    assert_identical(pair)


def test_metadata_of_another_node_is_refused(mirror_pair):
    pair = mirror_pair(size=8 * MiB)
    pair.create_md("beta")
    os.replace(pair.paths["beta"]["metadata"], pair.paths["alpha"]["metadata"])
    from mirrorpair import ENV, REPO, mirrord_argv

    result = pair.net.run(pair.ns["alpha"], mirrord_argv(pair.config, "alpha"),
                          capture_output=True, text=True, check=False, env=ENV, cwd=REPO,
                          timeout=20)
    assert result.returncode == 2 and "belongs to node 'beta'" in result.stderr, result.stderr


def _run_mirrord(pair, config: str, node: str = "alpha"):
    from mirrorpair import ENV, REPO, mirrord_argv

    return pair.net.run(pair.ns[node], mirrord_argv(config, node), capture_output=True,
                        text=True, check=False, env=ENV, cwd=REPO, timeout=20)


def test_a_second_daemon_on_the_same_disk_or_metadata_is_refused(mirror_pair):
    pair = started_pair(mirror_pair, size=8 * MiB)
    h = nbd_handle(pair)
    h.pwrite(b"kept" * 1024, 0)
    h.flush()
    h.shutdown()
    disk_before = open(pair.disk("alpha"), "rb").read()
    meta = pair.paths["alpha"]["metadata"]
    meta_before = open(meta, "rb").read()
    # The same resource started twice (by hand next to the unit): stopped at the disk.
    result = _run_mirrord(pair, pair.config)
    assert result.returncode == 2, result.stderr
    assert f"{pair.disk('alpha')} is in use by another mirrord" in result.stderr
    assert "nodes.alpha.disk" in result.stderr and "Traceback" not in result.stderr
    # Another resource file naming the same metadata but its own disk and sockets:
    # stopped at the metadata.
    other = pair.config + ".other.toml"
    text = open(pair.config).read()
    for key in ("disk", "nbd_socket", "control_socket"):
        text = text.replace(pair.paths["alpha"][key], pair.paths["alpha"][key] + ".other")
    open(other, "w").write(text)
    with open(pair.paths["alpha"]["disk"] + ".other", "wb") as f:
        f.truncate(8 * MiB)
    result = _run_mirrord(pair, other)
    assert result.returncode == 2, result.stderr
    assert f"metadata {meta} is in use by another mirrord" in result.stderr
    assert "nodes.alpha.metadata" in result.stderr and "Traceback" not in result.stderr
    # create-md --force on the metadata under the running daemon: refused, the file
    # left alone (through the other file, whose control socket finds no daemon to ask).
    from mirrorpair import ENV, REPO, mirrorctl_argv

    refused = subprocess.run(mirrorctl_argv("--config", other, "--node", "alpha",
                                            "create-md", "--force"),
                             capture_output=True, text=True, env=ENV, cwd=REPO, timeout=30)
    assert refused.returncode != 0 and "in use by a running mirrord" in refused.stderr, refused
    assert open(meta, "rb").read() == meta_before
    # The first daemon served on, untouched.
    assert open(pair.disk("alpha"), "rb").read() == disk_before
    assert pair.procs["alpha"].poll() is None
    assert pair.status("alpha")["role"] == "primary"
    h = nbd_handle(pair)
    assert h.pread(4096, 0) == b"kept" * 1024
    h.shutdown()
    # Once it has stopped (however: kill -9 here), the next start takes the files.
    pair.kill("alpha")
    pair.start("alpha")
    assert pair.status("alpha")["node"] == "alpha"
