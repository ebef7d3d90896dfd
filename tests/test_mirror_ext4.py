"""Acceptance: a real filesystem on the mirrored volume.

ext4 on the primary's export via nbdfuse + a loop device (root namespace): write 200
files, unmount; the secondary's backing file then passes `e2fsck -fn` and, loop-mounted
read-only, holds the same files.  Unmounting ext4 flushes (NBD FLUSH through the loop
device and nbdfuse), and with protocol C a completed FLUSH means beta has every write
on its disk: nothing is waited for after the unmount.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time

import pytest

from fuseblock import loop_device, loops_backed_by, mounted, mounts_under, nbd_block_device
from mirrorpair import first_difference

pytestmark = pytest.mark.netns

MiB = 1 << 20
FILES = 200


def run(argv, timeout=120):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(argv)} exited {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result


def file_sizes(rng: random.Random) -> list[int]:
    """200 sizes, about 60 MiB in all: empty, sub-block, a few blocks, up to 4 MiB."""
    sizes = [0, 1, 4095, 4096, 4097, 4 * MiB]
    while len(sizes) < FILES:
        kind = rng.random()
        if kind < 0.4:
            sizes.append(rng.randrange(1, 4096))
        elif kind < 0.8:
            sizes.append(rng.randrange(4096, 256 * 1024))
        else:
            sizes.append(rng.randrange(256 * 1024, 2 * MiB))
    rng.shuffle(sizes)
    return sizes


def write_files(root: str, rng: random.Random) -> dict[str, str]:
    """The files, in a few directories; returns relative path -> sha256."""
    digests = {}
    for i, size in enumerate(file_sizes(rng)):
        rel = os.path.join(f"dir{i % 7}", f"file{i:03d}.bin")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        data = rng.randbytes(size)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def read_digests(root: str) -> dict[str, str]:
    digests = {}
    for directory, _, names in os.walk(root):
        if os.path.basename(directory) == "lost+found":
            continue
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def test_ext4_on_the_primary_is_a_clean_identical_filesystem_on_the_secondary(
        mirror_pair, tmp_path):
    pair = mirror_pair(size=256 * MiB)  # MTU 9000, protocol C
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=60)  # the initial full sync is done
    workdir = str(tmp_path)
    rng = random.Random(200)
    try:
        with nbd_block_device(pair.uri("alpha"), workdir) as device:
            run(["mkfs.ext4", "-q", "-F", device])
            with mounted(device, str(tmp_path / "alpha-fs")) as fs:
                written = write_files(fs, rng)
                run(["sync", "-f", fs])
        # Unmounted, detached, nbdfuse gone: every write reached alpha and, through the
        # flushes, beta.
        assert len(written) == FILES
        status = pair.status("alpha")
        assert status["connection"] == "connected" and status["out_of_sync_bytes"] == 0, status

        beta_disk = pair.disk("beta")
        fsck = subprocess.run(["e2fsck", "-fn", beta_disk], capture_output=True, text=True,
                              timeout=120)
        assert fsck.returncode == 0, f"e2fsck -fn on beta's disk:\n{fsck.stdout}{fsck.stderr}"
        assert f"{FILES + 7 + 11}/" in fsck.stdout  # inodes in use: files, dirs, reserved

        with loop_device(beta_disk, read_only=True) as device:
            with mounted(device, str(tmp_path / "beta-fs"), "ro,noload") as fs:
                found = read_digests(fs)
        missing = sorted(set(written) - set(found))
        extra = sorted(set(found) - set(written))
        wrong = sorted(p for p in written if p in found and found[p] != written[p])
        assert not (missing or extra or wrong), (
            f"beta's filesystem: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"different content {wrong[:5]}")

        diff = first_difference(pair.disk("alpha"), beta_disk)
        assert diff is None, f"backing files differ first at byte {diff}\n{pair.logs_text()}"
    finally:
        # The context managers tore everything down; make sure, and say so if not.
        leftovers = mounts_under(workdir) + loops_backed_by(workdir) \
            + loops_backed_by(pair.diskdir)
        assert leftovers == [], f"left behind: {leftovers}"


def test_teardown_reaches_copies_of_the_mounts_in_another_mount_namespace(
        mirror_pair, tmp_path):
    """A process that makes its own mount namespace while the filesystem is mounted (any
    `ip netns exec`, e.g. another test's daemon starting meanwhile) holds copies of the
    ext4 and FUSE mounts that our `umount` does not reach (mounts here are private).
    fuseblock removes the mount points after unmounting, which detaches those copies:
    the loop device is freed, the FUSE mount goes, nbdfuse exits, and the export has no
    client left (else the context managers raise FuseBlockError)."""
    pair = mirror_pair(size=64 * MiB)
    pair.start_all()
    pair.promote("alpha", force=True)
    pair.wait_connected(timeout=60)
    workdir = str(tmp_path)
    bystander = None
    try:
        with nbd_block_device(pair.uri("alpha"), workdir) as device:
            run(["mkfs.ext4", "-q", "-F", device])
            with mounted(device, str(tmp_path / "fs")) as fs:
                with open(os.path.join(fs, "a"), "wb") as f:
                    f.write(random.Random(1).randbytes(MiB))
                bystander = pair.net.popen(pair.ns["beta"], ["sleep", "300"])
                deadline = time.monotonic() + 10
                while fs not in _mounts_of(bystander.pid):
                    assert bystander.poll() is None and time.monotonic() < deadline, \
                        "the bystander should see a copy of the mount"
                    time.sleep(0.05)
        assert bystander.poll() is None
        assert not any(p.startswith(workdir) for p in _mounts_of(bystander.pid))
        assert pair.ctl("alpha", "secondary").returncode == 0  # no NBD client left
    finally:
        if bystander is not None:
            bystander.kill()
            bystander.wait(timeout=10)
        leftovers = mounts_under(workdir) + loops_backed_by(workdir)
        assert leftovers == [], f"left behind: {leftovers}"


def _mounts_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mounts") as f:
        return [line.split()[1] for line in f]
