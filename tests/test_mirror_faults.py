"""Failures an operator meets: a full or failing disk, and configs that cannot work.

Real daemons in namespaces; disks that fail are sparse files on a tmpfs smaller than the
volume, so writing new blocks fails with ENOSPC as a full disk would.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

import pytest

from mirrorpair import ENV, REPO, mirrord_argv
from test_mirror import MiB, random_file, run

pytestmark = pytest.mark.netns


@contextlib.contextmanager
def small_tmpfs(size: str):
    path = tempfile.mkdtemp(prefix="mirrord-small-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def test_a_secondary_that_cannot_write_is_marked_failed_and_the_primary_goes_on(
        mirror_pair, tmp_path):
    with small_tmpfs("8M") as small:
        pair = mirror_pair(size=32 * MiB, disk_dirs={"beta": small})
        with open(pair.disk("alpha"), "r+b") as f:  # data to copy (zeros would match)
            f.write(os.urandom(32 * MiB))
        pair.start_all()
        pair.promote("alpha", force=True)
        # The initial sync writes the whole volume to beta: it runs out of space.
        status = pair.wait("alpha", lambda s: s["peer"] is not None
                           and s["peer"]["disk"] == "failed", 30, "beta reported failed")
        assert status["role"] == "primary" and 0 < status["out_of_sync_bytes"] <= pair.size
        beta = pair.wait("beta", lambda s: s["disk"] == "failed", 10, "beta's own view")
        assert beta["role"] == "secondary"
        log = pair.log("beta")
        assert pair.disk("beta") in log and "at offset" in log and "No space left" in log
        # alpha carries on alone: writes complete.
        data = random_file(str(tmp_path / "data"), 4 * MiB)
        run(["nbdcopy", "--flush", data, pair.uri("alpha")])
        with open(pair.disk("alpha"), "rb") as f, open(data, "rb") as g:
            assert f.read(4 * MiB) == g.read()
        pair.close()


def test_a_primary_disk_error_fails_the_request_with_eio_and_is_logged(mirror_pair, tmp_path):
    with small_tmpfs("4M") as small:
        pair = mirror_pair(size=32 * MiB, disk_dirs={"alpha": small})
        pair.start("alpha")
        pair.promote("alpha", force=True)  # alone: beta is not running
        result = run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 16M", pair.uri("alpha")],
                     check=False)
        assert "Input/output error" in result.stdout + result.stderr, result
        log = pair.log("alpha")
        assert f"disk {pair.disk('alpha')}: write of" in log and "at offset" in log
        # The export stays usable for what the disk can still do.
        run(["qemu-io", "-f", "raw", "-c", "read 0 4096", pair.uri("alpha")])
        pair.close()


def _run_daemon(pair, node: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return pair.net.run(pair.ns[node], mirrord_argv(pair.config, node), capture_output=True,
                        text=True, check=False, env=ENV, cwd=REPO, timeout=timeout)


def _assert_one_clear_line(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_configs_give_one_clear_line(mirror_pair):
    pair = mirror_pair(size=4 * MiB)
    text = open(pair.config).read()

    def rewrite(new_text):
        with open(pair.config, "w") as f:
            f.write(new_text)

    rewrite(text.replace('protocol = "C"\n', 'protocol = "D"\n'))
    _assert_one_clear_line(_run_daemon(pair, "alpha"), pair.config, "resource.protocol")
    missing_key = text.replace(f'disk = "{pair.disk("alpha")}"\n', "")
    rewrite(missing_key)
    _assert_one_clear_line(_run_daemon(pair, "alpha"), "nodes.alpha.disk", "missing")
    rewrite(text)
    result = pair.net.run(pair.ns["alpha"], mirrord_argv(pair.config, "gamma"),
                          capture_output=True, text=True, check=False, env=ENV, cwd=REPO)
    _assert_one_clear_line(result, "gamma")
    os.rename(pair.disk("alpha"), pair.disk("alpha") + ".away")
    _assert_one_clear_line(_run_daemon(pair, "alpha"), "nodes.alpha.disk", pair.disk("alpha"))
    os.rename(pair.disk("alpha") + ".away", pair.disk("alpha"))
    rewrite(text.replace(f'interface = "{pair.ifname["alpha"]}"', 'interface = "nosuch0"'))
    _assert_one_clear_line(_run_daemon(pair, "alpha"), "nodes.alpha.interface", "nosuch0")
    rewrite(text)


def test_disk_sizes_that_differ_stop_the_secondaries(mirror_pair):
    pair = mirror_pair(size=4 * MiB)
    with open(pair.disk("beta"), "r+b") as f:
        f.truncate(8 * MiB)
    alpha = pair.start("alpha", wait=False)
    beta = pair.start("beta", wait=False)
    for node, proc in (("alpha", alpha), ("beta", beta)):
        assert proc.wait(timeout=30) == 2, pair.logs_text()
        log = pair.log(node)
        assert "disk sizes differ" in log and "Traceback" not in log, log
