"""mirrord/nbd_server.py driven by real NBD clients and by hand-made bytes.

The server runs in this process (its own threads) on a unix socket, serving a 64 MiB
file through tests/nbd_devices.py.  Clients are the real ones, as subprocesses with a
timeout: nbdinfo, nbdcopy, qemu-img, qemu-io, fio; libnbd's Python binding (with
strict mode off) sends the requests a server must refuse.  Raw-socket clients, written
from the spec with struct rather than with mirrord.nbd_protocol, break the protocol on
purpose.  See ../shared/NBD-TESTING.md for what these clients do on this machine.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import nbdclient
from mirrord import nbd_server
from mirrord.nbd_server import NbdServer
from nbd_devices import AsyncDevice, FileDevice

# A thread dying with an exception is a server bug even if the client did not notice.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

MiB = 1024 * 1024
SIZE = 64 * MiB
EXPORT = "disk0"
DESCRIPTION = "a test export"
TIMEOUT = 30  # every subprocess
LOGGER = "mirrord.nbd_server"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (see tests/run.sh)")


def run(*args: str, expect: int | None = 0, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, (
            f"{args[0]} exited {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def random_bytes(n: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


# --- fixtures ------------------------------------------------------------------------


class Served:
    def __init__(self, server: NbdServer, device, path: str) -> None:
        self.server = server
        self.device = device
        self.path = path

    def uri(self, name: str = EXPORT) -> str:
        return f"nbd+unix:///{name}?socket={self.path}"

    @property
    def file(self) -> FileDevice:
        return self.device.inner if isinstance(self.device, AsyncDevice) else self.device


@pytest.fixture
def sockdir():
    # Short and outside tmp_path: unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return str(path)


@pytest.fixture
def serve(sockdir, image):
    """serve(device=None, *, asynchronous=False, writable=True) -> Served."""
    started: list[Served] = []

    def start(device=None, *, asynchronous: bool = False, writable: bool = True) -> Served:
        if device is None:
            device = FileDevice(image, writable=writable)
            if asynchronous:
                device = AsyncDevice(device)
        path = os.path.join(sockdir, f"nbd{len(started)}.sock")
        server = NbdServer(path, device, EXPORT, DESCRIPTION)
        server.start()
        served = Served(server, device, path)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.server.close()
            served.device.close()


@pytest.fixture(scope="module")
def nbd():
    try:
        return nbdclient.load()
    except ImportError as exc:
        pytest.skip(str(exc))


def connect(nbd, served: Served, strict: bool = False):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # send what a server must refuse, and see the refusal
    h.connect_uri(served.uri())
    return h


# --- a raw client, written from the spec --------------------------------------------

OPT_MAGIC = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQ = struct.Struct(">IHHQQI")
REP = struct.Struct(">IIQ")


class Raw:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the stream (anything it sends first is skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def greet(self, client_flags: int = 3) -> int:
        greeting = self.recv_exact(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", client_flags))
        return struct.unpack(">H", greeting[16:])[0]

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(OPT_MAGIC + struct.pack(">II", option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC
        return option, kind, self.recv_exact(length)

    def info(self, option: int, name: str, infos=()) -> list[tuple[int, bytes]]:
        raw = name.encode()
        self.option(option, struct.pack(">I", len(raw)) + raw
                    + struct.pack(f">H{len(infos)}H", len(infos), *infos))
        replies = []
        while True:
            got_option, kind, data = self.option_reply()
            assert got_option == option
            replies.append((kind, data))
            if kind != 3:  # not NBD_REP_INFO: ACK or an error ends the answer
                return replies

    def go(self, name: str = EXPORT) -> tuple[int, int]:
        replies = self.info(7, name)
        assert replies[-1][0] == 1, replies
        kind, data = replies[0]
        info_type, size, flags = struct.unpack(">HQH", data)
        assert (kind, info_type) == (3, 0)
        return size, flags

    def request(self, command: int, handle: int, offset: int = 0, length: int = 0,
                flags: int = 0, payload: bytes = b"") -> None:
        self.sock.sendall(REQ.pack(0x25609513, flags, command, handle, offset, length) + payload)

    def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = REP.unpack(self.recv_exact(16))
        assert magic == 0x67446698
        data = self.recv_exact(data_length) if data_length and not error else b""
        return error, handle, data


def raw_session(served: Served) -> Raw:
    raw = Raw(served.path)
    raw.greet()
    raw.go()
    return raw


# --- real clients --------------------------------------------------------------------


def test_nbdinfo_reports_flags_size_and_block_sizes(serve):
    need("nbdinfo")
    served = serve()
    info = json.loads(run("nbdinfo", "--json", served.uri()).stdout)
    assert info["protocol"] == "newstyle-fixed"
    (export,) = info["exports"]
    assert export["export-name"] == EXPORT
    assert export["description"] == DESCRIPTION
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    for flag in ("can_cache", "can_df", "can_fast_zero"):
        assert export[flag] is False, flag
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 32 * MiB)
    assert run("nbdinfo", "--can", "multi-conn", served.uri(), expect=None).returncode == 0


def test_nbdinfo_read_only_export(serve):
    need("nbdinfo")
    served = serve(writable=False)
    (export,) = json.loads(run("nbdinfo", "--json", served.uri()).stdout)["exports"]
    assert export["is_read_only"] is True
    assert run("nbdinfo", "--is", "read-only", served.uri(), expect=None).returncode == 0


def test_nbdinfo_list_and_default_export(serve):
    need("nbdinfo")
    served = serve()
    listing = json.loads(run("nbdinfo", "--list", "--json", served.uri()).stdout)
    assert [(e["export-name"], e.get("description")) for e in listing["exports"]] == [
        (EXPORT, DESCRIPTION)]
    # The empty name is the protocol's default export: it selects ours.
    assert run("nbdinfo", "--size", served.uri(name="")).stdout.strip() == str(SIZE)


def test_unknown_export_is_refused_and_the_server_carries_on(serve):
    need("nbdinfo")
    served = serve()
    proc = run("nbdinfo", served.uri(name="nope"), expect=None)
    assert proc.returncode != 0
    assert "nope" in proc.stderr
    assert run("nbdinfo", "--size", served.uri()).stdout.strip() == str(SIZE)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-done", "async-done"])
def test_nbdcopy_in_and_out(serve, tmp_path, asynchronous):
    need("nbdcopy")
    served = serve(asynchronous=asynchronous)
    source = tmp_path / "source.img"
    data = random_bytes(SIZE, seed=1)
    source.write_bytes(data)
    run("nbdcopy", "--flush", str(source), served.uri())
    with open(served.file.path, "rb") as f:
        assert f.read() == data
    assert served.file.ops("flush"), "nbdcopy --flush sent no FLUSH"
    out = tmp_path / "out.img"
    run("nbdcopy", served.uri(), str(out))
    assert out.read_bytes() == data


def test_qemu_img_compare(serve, tmp_path, image):
    need("qemu-img")
    data = random_bytes(SIZE, seed=2)
    with open(image, "wb") as f:
        f.write(data)
    reference = tmp_path / "reference.img"
    reference.write_bytes(data)
    served = serve()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), served.uri())
    # The same comparison must notice one changed byte, or it proved nothing.
    with open(reference, "r+b") as f:
        f.seek(SIZE - 12345)
        f.write(bytes([data[SIZE - 12345] ^ 0xFF]))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), served.uri(),
        expect=1)


# (command, whether it reads).  Writes with -P fill a pattern; reads with -P check it.
QEMU_IO_SCRIPT = [
    "write -P 0x11 0 64k",
    "write -P 0x22 65537 3000",  # unaligned both ends
    "writev -P 0x33 1M 4k 8k 512",
    "aio_write -P 0x44 2M 128k",
    "aio_write -P 0x45 3M 64k",
    "aio_flush",
    "write -f -P 0x55 4M 4k",  # FUA
    "write -P 0x66 5M 1M",
    "write -z 5M 256k",  # zeroes, no unmap: NO_HOLE
    "write -z -u 5632k 256k",  # zeroes, may unmap
    "write -P 0x77 8M 1M",
    "discard 8M 512k",
    "write -P 0x88 16M 40M",  # larger than the 32 MiB maximum: qemu splits it
    "flush",
    "read -P 0x11 0 64k",
    "read -P 0x00 64k 1",
    "read -P 0x22 65537 3000",
    "read -P 0x00 68537 4k",
    "read -P 0x33 1M 12800",
    "read -P 0x44 2M 128k",
    "read -P 0x45 3M 64k",
    "read -P 0x55 4M 4k",
    "read -P 0x00 5M 256k",
    "read -P 0x66 5376k 256k",
    "read -P 0x00 5632k 256k",
    "read -P 0x66 5888k 256k",
    "read -P 0x00 8M 512k",  # the test device punches holes: discarded reads as zeros
    "read -P 0x77 8704k 512k",
    "read -P 0x88 16M 40M",
]


def qemu_io(served: Served, commands: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]  # writeback: FUA only on `write -f`
    for command in commands:
        args += ["-c", command]
    return run(*args, served.uri(), expect=expect)


def test_qemu_io_mixed_requests(serve):
    need("qemu-io")
    served = serve(asynchronous=True)
    proc = qemu_io(served, QEMU_IO_SCRIPT)
    output = proc.stdout + proc.stderr
    assert "Pattern verification failed" not in output
    assert "error" not in output.lower(), output
    reads = [c for c in QEMU_IO_SCRIPT if c.startswith("read")]
    assert output.count("read ") == len(reads), output
    device = served.file
    fua_writes = [c for c in device.ops("write") if c[3]]
    assert [(c[1], c[2]) for c in fua_writes] == [(4 * MiB, 4096)]
    zeroes = {(c[1], c[2], c[4]) for c in device.ops("write_zeroes")}
    assert (5 * MiB, 256 * 1024, False) in zeroes  # NO_HOLE reached the device
    assert (5632 * 1024, 256 * 1024, True) in zeroes
    assert (8 * MiB, 512 * 1024) in {(c[1], c[2]) for c in device.ops("trim")}
    assert device.ops("flush")
    assert max(c[2] for c in device.ops("write")) <= 32 * MiB


def test_qemu_io_notices_a_wrong_pattern(serve):
    """The negative control for the test above: a mismatch makes qemu-io fail."""
    need("qemu-io")
    served = serve()
    proc = qemu_io(served, ["write -P 0x11 0 4k", "read -P 0x12 0 4k"], expect=1)
    assert "Pattern verification failed" in proc.stdout + proc.stderr


def test_fio_random_writes_verified(serve):
    need("fio")
    served = serve(asynchronous=True)
    proc = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri()}",
               "--rw=randwrite", "--bssplit=512/10:4k/50:64k/30:1m/10", "--iodepth=32",
               "--size=16M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
               "--verify_state_save=0",  # else fio leaves a state file in the cwd
               "--output-format=json")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB
    assert job["read"]["io_bytes"] >= 16 * MiB  # the verification pass
    assert served.device.submitted >= 100


# --- libnbd: requests a server must refuse ------------------------------------------


def test_refused_requests_leave_the_connection_usable(serve, nbd):
    served = serve()
    expected = random_bytes(4096, seed=3)
    with open(served.file.path, "r+b") as f:
        f.write(expected)
    h = connect(nbd, served)
    size = h.get_size()
    big = b"x" * (32 * MiB + 1)
    refused = [
        ("read beyond the end", lambda: h.pread(1024, size - 512), "EINVAL"),
        ("read at 2^64-1k", lambda: h.pread(4096, 2**64 - 1024), "EINVAL"),
        ("write beyond the end", lambda: h.pwrite(b"y" * 1024, size - 512), "ENOSPC"),
        ("trim beyond the end", lambda: h.trim(1024, size - 512), "EINVAL"),
        ("zero beyond the end", lambda: h.zero(1024, size - 512), "ENOSPC"),
        ("zero-length read", lambda: h.pread(0, 0), "EINVAL"),
        ("zero-length write", lambda: h.pwrite(b"", 0), "EINVAL"),
        ("zero-length trim", lambda: h.trim(0, 0), "EINVAL"),
        ("read over 32 MiB", lambda: h.pread(32 * MiB + 1, 0), "EINVAL"),
        # The payload is read and dropped, so the next request is parsed where it starts.
        ("write over 32 MiB", lambda: h.pwrite(big, 0), "EINVAL"),
        ("unknown command (CACHE)", lambda: h.cache(4096, 0), "EINVAL"),
        ("unknown flag bit 7", lambda: h.pread(4096, 0, 1 << 7), "EINVAL"),
        ("NO_HOLE on a read", lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE), "EINVAL"),
        ("DF without structured replies", lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF), "EINVAL"),
        ("FAST_ZERO not offered", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), "EINVAL"),
    ]
    for what, call, code in refused:
        with pytest.raises(nbd.Error) as info:
            call()
        assert info.value.errno == code, f"{what}: {info.value.string}"
        assert h.pread(4096, 0) == expected, f"connection unusable after: {what}"
    assert not served.file.ops("write") and not served.file.ops("trim")
    # FUA on a read MUST be accepted (the spec: "even by ignoring the bit").
    assert h.pread(4096, 0, nbd.CMD_FLAG_FUA) == expected
    h.shutdown()


def test_fua_reaches_the_device(serve, nbd):
    served = serve()
    h = connect(nbd, served, strict=True)
    h.pwrite(b"a" * 4096, 0, nbd.CMD_FLAG_FUA)
    h.pwrite(b"b" * 4096, 4096)
    h.zero(8192, 8192, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    calls_before = len(served.file.calls)
    h.trim(4096, 65536, nbd.CMD_FLAG_FUA)
    h.shutdown()
    assert [(c[1], c[3]) for c in served.file.ops("write")] == [(0, True), (4096, False)]
    assert [c[3:] for c in served.file.ops("write_zeroes")] == [(True, False)]
    # The device's trim() has no FUA argument: the server flushes after it.
    assert [c[0] for c in list(served.file.calls)[calls_before:]] == ["trim", "flush"]


def test_read_only_export_refuses_writes_with_eperm(serve, nbd):
    served = serve(writable=False)
    h = connect(nbd, served)
    assert h.is_read_only()
    for what, call in [("write", lambda: h.pwrite(b"z" * 512, 0)),
                       ("trim", lambda: h.trim(512, 0)),
                       ("zero", lambda: h.zero(512, 0))]:
        with pytest.raises(nbd.Error) as info:
            call()
        assert info.value.errno == "EPERM", what
        assert h.pread(512, 0) == bytes(512)
    h.flush()
    h.shutdown()
    assert not served.file.ops("write") and not served.file.ops("trim")
    assert not served.file.ops("write_zeroes")


def test_device_turning_read_only_gets_eperm(serve, nbd):
    served = serve()
    h = connect(nbd, served)
    assert not h.is_read_only()
    h.pwrite(b"1" * 512, 0)
    served.file.set_writable(False)
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"2" * 512, 0)
    assert info.value.errno == "EPERM"
    with pytest.raises(nbd.Error) as info:
        h.zero(512, 0)
    assert info.value.errno == "EPERM"
    # Refused by the server itself: the device never saw these two.
    assert len(served.file.ops("write")) == 1 and not served.file.ops("write_zeroes")
    assert h.pread(512, 0) == b"1" * 512
    served.file.set_writable(True)
    h.pwrite(b"3" * 512, 0)
    assert h.pread(512, 0) == b"3" * 512
    h.shutdown()


@pytest.mark.parametrize("device_errno,nbd_errno", [
    (errno.EIO, "EIO"), (errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "ENOSPC"),
    (errno.EROFS, "EIO"),  # not in the spec's list: EIO
])
def test_device_errors_reach_the_client(serve, nbd, device_errno, nbd_errno):
    served = serve(asynchronous=True)
    served.file.fail_at(1 * MiB + 100, device_errno)
    h = connect(nbd, served)
    for what, call in [("read", lambda: h.pread(4096, 1 * MiB)),
                       ("write", lambda: h.pwrite(b"q" * 4096, 1 * MiB)),
                       ("zero", lambda: h.zero(4096, 1 * MiB)),
                       ("trim", lambda: h.trim(4096, 1 * MiB))]:
        with pytest.raises(nbd.Error) as info:
            call()
        assert info.value.errno == nbd_errno, what
        assert h.pread(4096, 0) == bytes(4096)
    h.pwrite(b"w" * 4096, 2 * MiB)
    assert h.pread(4096, 2 * MiB) == b"w" * 4096
    h.shutdown()


class RaisingDevice(FileDevice):
    """A device that raises instead of calling done: the server must still answer."""

    def write(self, offset, data, fua, done):
        if offset == 0:
            raise OSError(errno.ENOSPC, "full")
        if offset == 4096:
            raise RuntimeError("bug in the device")
        super().write(offset, data, fua, done)


def test_device_raising_instead_of_calling_done(serve, nbd, image, caplog):
    served = serve(RaisingDevice(image))
    h = connect(nbd, served)
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"a" * 512, 0)
    assert info.value.errno == "ENOSPC"
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"a" * 512, 4096)
    assert info.value.errno == "EIO"
    assert any("bug in the device" in r.getMessage() for r in caplog.records)
    h.pwrite(b"c" * 512, 8192)
    assert h.pread(512, 8192) == b"c" * 512
    h.shutdown()


def test_client_count(serve, nbd):
    served = serve()
    assert served.server.client_count == 0
    first = connect(nbd, served)
    second = connect(nbd, served)
    wait_for(lambda: served.server.client_count == 2, what="two clients")
    first.shutdown()
    wait_for(lambda: served.server.client_count == 1, what="one client")
    raw = Raw(served.path)
    raw.greet()  # in negotiation: not counted
    time.sleep(0.05)
    assert served.server.client_count == 1
    raw.close()
    second.shutdown()
    wait_for(lambda: served.server.client_count == 0, what="no clients")


def test_libnbd_through_the_subprocess_fallback(serve):
    """tests/nbdclient.py's fallback (libnbd under /usr/bin/python3) keeps working."""
    if not os.path.exists(os.path.join(nbdclient.DIST, "nbd.py")):
        pytest.skip("python3-libnbd is not installed")
    if not os.access(nbdclient.SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{nbdclient.SYSTEM_PYTHON} is missing")
    served = serve()
    proxy = nbdclient._ProxyModule()
    try:
        h = proxy.NBD()
        h.set_strict_mode(0)
        h.connect_uri(served.uri())
        h.pwrite(b"p" * 512, 4096, proxy.CMD_FLAG_FUA)
        assert h.pread(512, 4096) == b"p" * 512
        with pytest.raises(proxy.Error) as info:
            h.pread(1024, SIZE - 512)
        assert info.value.errno == "EINVAL" and info.value.errnum == errno.EINVAL
        h.shutdown()
    finally:
        proxy.close()
    assert served.file.ops("write") == [("write", 4096, 512, True)]


# --- broken clients ------------------------------------------------------------------


def assert_one_log_line_no_traceback(caplog, capfd, needle: str) -> None:
    records = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert needle in records[0].getMessage()
    assert records[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err


def still_serves(served: Served) -> None:
    raw = raw_session(served)
    raw.request(0, 1, 0, 512)
    assert raw.reply(512)[:2] == (0, 1)
    raw.request(2, 2)  # DISC
    assert raw.closed_by_server()
    raw.close()


@pytest.mark.parametrize("send,needle", [
    (b"\xde\xad\xbe\xef" * 10, "unknown_client_flags"),
    (b"\x00\x00\x00\x00", "not_fixed_newstyle"),
    (b"\x00\x00\x00\x03" + b"IHAVEOPZ" + b"\x00" * 8, "bad_option_magic"),
    (b"\x00\x00\x00\x03" + OPT_MAGIC + struct.pack(">II", 7, 1 << 30), "option_too_long"),
    (b"\x00\x00\x00\x03" + OPT_MAGIC + struct.pack(">II", 1, 4) + b"nope", "unknown_export"),
    (b"\x00\x00\x00\x03" + OPT_MAGIC + struct.pack(">II", 7, 100) + b"short", "handshake cut short"),
])
def test_broken_handshake_closes_only_that_connection(serve, caplog, capfd, send, needle):
    served = serve()
    caplog.set_level(logging.INFO, logger=LOGGER)
    raw = Raw(served.path)
    raw.recv_exact(18)
    raw.sock.sendall(send)
    if needle == "handshake cut short":
        raw.sock.shutdown(socket.SHUT_WR)
    assert raw.closed_by_server()
    raw.close()
    wait_for(lambda: not served.server._conns, what="the connection to be dropped")
    assert_one_log_line_no_traceback(caplog, capfd, needle)
    still_serves(served)


def test_handshake_has_a_total_deadline(serve, caplog, capfd, monkeypatch):
    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.5)
    served = serve()
    caplog.set_level(logging.INFO, logger=LOGGER)
    probe = Raw(served.path)  # connects and leaves: no error worth a log line
    probe.close()
    slow = Raw(served.path)
    slow.greet()
    started = time.monotonic()
    try:
        for byte in OPT_MAGIC:  # one byte at a time, each well within the budget
            slow.sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        pass  # the server may already have hung up
    assert slow.closed_by_server()
    assert time.monotonic() - started < 2
    slow.close()
    wait_for(lambda: not served.server._conns, what="the connection to be dropped")
    assert_one_log_line_no_traceback(caplog, capfd, "handshake not finished")
    still_serves(served)


def test_bad_request_magic_closes_the_connection(serve, caplog, capfd):
    served = serve()
    caplog.set_level(logging.INFO, logger=LOGGER)
    raw = raw_session(served)
    raw.sock.sendall(b"\x12\x34\x56\x78" + bytes(24))
    assert raw.closed_by_server()
    raw.close()
    wait_for(lambda: served.server.client_count == 0, what="the connection to be dropped")
    assert_one_log_line_no_traceback(caplog, capfd, "bad_request_magic")
    still_serves(served)


@pytest.mark.parametrize("cut", ["header", "payload", "refused payload"])
def test_client_vanishing_mid_request(serve, caplog, capfd, cut):
    served = serve(asynchronous=True)
    raw = raw_session(served)
    wait_for(lambda: served.server.client_count == 1, what="the client")
    if cut == "header":
        raw.sock.sendall(REQ.pack(0x25609513, 0, 1, 1, 0, 4096)[:17])
    elif cut == "payload":
        raw.sock.sendall(REQ.pack(0x25609513, 0, 1, 1, 0, MiB) + b"p" * 1000)
    else:
        raw.sock.sendall(REQ.pack(0x25609513, 0, 1, 1, SIZE, MiB) + b"p" * 1000)
    raw.close()
    wait_for(lambda: served.server.client_count == 0, what="the connection to be dropped")
    assert served.device.submitted == 0
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    still_serves(served)


def test_write_too_long_to_read_closes_the_connection(serve, caplog, capfd):
    served = serve()
    caplog.set_level(logging.INFO, logger=LOGGER)
    raw = raw_session(served)
    raw.request(1, 9, 0, nbd_server.MAX_DISCARD + 1)
    assert raw.closed_by_server()
    raw.close()
    assert_one_log_line_no_traceback(caplog, capfd, "write_too_long")
    still_serves(served)


def test_oversized_write_is_refused_and_its_payload_skipped(serve):
    served = serve()
    raw = raw_session(served)
    length = 32 * MiB + 4096
    # Payload crafted to look like a READ header: a server that did not skip the whole
    # payload would answer it.
    fake = REQ.pack(0x25609513, 0, 0, 666, 0, 512)
    payload = fake * (length // len(fake)) + fake[: length % len(fake)]
    sender = threading.Thread(target=raw.request, args=(1, 7, 0, length, 0, payload))
    sender.start()
    assert raw.reply() == (errno.EINVAL, 7, b"")
    sender.join(10)
    raw.request(3, 8, 5, 0)  # FLUSH with a nonzero (reserved) offset
    assert raw.reply() == (errno.EINVAL, 8, b"")
    raw.request(0, 10, 0, 512)
    assert raw.reply(512) == (0, 10, bytes(512))
    assert not served.device.ops("write")
    raw.close()


def test_negotiation_answers_each_option(serve):
    served = serve()
    raw = Raw(served.path)
    assert raw.greet() == 3  # FIXED_NEWSTYLE | NO_ZEROES
    raw.option(99)
    assert raw.option_reply() == (99, 2**31 + 1, b"option 99 not supported")
    raw.option(8)  # STRUCTURED_REPLY: not offered, negotiation goes on
    option, kind, _ = raw.option_reply()
    assert (option, kind) == (8, 2**31 + 1)
    raw.option(3, b"x")  # LIST takes no data
    assert raw.option_reply()[:2] == (3, 2**31 + 3)
    raw.option(6, b"\x00\x00\x00\x09abc")  # INFO whose name runs off the end
    assert raw.option_reply()[:2] == (6, 2**31 + 3)
    assert raw.info(6, "other")[-1][0] == 2**31 + 6  # ERR_UNKNOWN
    raw.option(3)
    listing = [raw.option_reply(), raw.option_reply()]
    assert listing[0][1] == 2 and listing[0][2] == struct.pack(">I", 5) + b"disk0" + DESCRIPTION.encode()
    assert listing[1][:2] == (3, 1)
    replies = raw.info(6, EXPORT, infos=(3, 1, 2, 3, 77))
    kinds = [struct.unpack(">H", data[:2])[0] for kind, data in replies[:-1]]
    assert kinds == [0, 3, 1, 2]  # EXPORT always, then each requested one once
    assert replies[1][1] == struct.pack(">HIII", 3, 1, 4096, 32 * MiB)
    assert replies[2][1] == struct.pack(">H", 1) + EXPORT.encode()
    assert replies[-1][0] == 1
    size, flags = raw.go()
    assert (size, flags) == (SIZE, 0x16D)
    raw.request(0, 1, 0, 512)
    assert raw.reply(512) == (0, 1, bytes(512))
    raw.close()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option(serve, no_zeroes):
    served = serve(writable=False)
    raw = Raw(served.path)
    raw.greet(3 if no_zeroes else 1)
    raw.option(1, EXPORT.encode())
    size, flags = struct.unpack(">QH", raw.recv_exact(10))
    assert (size, flags) == (SIZE, 0x16F)  # READ_ONLY included
    if not no_zeroes:
        assert raw.recv_exact(124) == bytes(124)
    raw.request(0, 5, 0, 8)  # a reply right after proves nothing extra was sent
    assert raw.reply(8) == (0, 5, bytes(8))
    raw.close()


def test_abort_gets_an_ack(serve):
    served = serve()
    raw = Raw(served.path)
    raw.greet()
    raw.option(2)
    assert raw.option_reply()[:2] == (2, 1)
    assert raw.closed_by_server()
    raw.close()


# --- completions, the in-flight bound, draining, closing -----------------------------


def test_in_flight_bound_and_out_of_order_completions(serve):
    served = serve(asynchronous=True)
    device = served.device
    device.hold()
    raw = raw_session(served)
    count = nbd_server.MAX_IN_FLIGHT + 36

    def send_all() -> None:
        # From a thread: once the server stops reading, the socket buffer fills up and
        # sendall blocks - that is the back-pressure this test is about.
        for handle in range(count):
            raw.request(1, handle, handle * 4096, 4096, payload=bytes([handle]) * 4096)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    wait_for(lambda: device.submitted == nbd_server.MAX_IN_FLIGHT, what="the bound")
    time.sleep(0.2)
    assert device.submitted == nbd_server.MAX_IN_FLIGHT  # the reader stopped at the bound
    device.release()
    replies = [raw.reply() for _ in range(count)]
    sender.join(5)
    assert sorted(handle for _, handle, _ in replies) == list(range(count))
    assert all(error == 0 for error, _, _ in replies)
    order = [handle for _, handle, _ in replies]
    assert order != sorted(order), "completions should come back out of order here"
    for handle in (0, 63, 64, count - 1):
        raw.request(0, 1000 + handle, handle * 4096, 4096)
        assert raw.reply(4096) == (0, 1000 + handle, bytes([handle]) * 4096)
    raw.close()


def test_disconnect_waits_for_requests_in_flight(serve):
    served = serve(asynchronous=True)
    device = served.device
    device.hold()
    raw = raw_session(served)
    for handle in range(3):
        raw.request(1, handle, handle * 4096, 4096, payload=b"d" * 4096)
    raw.request(2, 99)  # DISC
    wait_for(lambda: device.parked == 3, what="three parked writes")
    assert not raw.closed_by_server(timeout=0.3), "closed before the writes completed"
    device.release()
    assert sorted(raw.reply()[1] for _ in range(3)) == [0, 1, 2]
    assert raw.closed_by_server()
    raw.close()
    with open(served.file.path, "rb") as f:
        assert f.read(3 * 4096) == b"d" * 3 * 4096


def test_close_drops_clients_and_removes_the_socket(serve, nbd):
    served = serve(asynchronous=True)
    served.device.hold()
    raw = raw_session(served)
    raw.request(1, 1, 0, 4096, payload=b"c" * 4096)
    h = connect(nbd, served)
    wait_for(lambda: served.server.client_count == 2 and served.device.parked == 1,
             what="clients and a parked write")
    started = time.monotonic()
    served.server.close()
    assert time.monotonic() - started < 3
    assert raw.closed_by_server()
    assert not os.path.exists(served.path)
    assert served.server.client_count == 0
    served.server.close()  # idempotent
    served.device.release()  # a late done() on a closed connection is dropped quietly
    time.sleep(0.05)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    raw.close()


def test_start_replaces_a_stale_socket_but_not_a_live_one(sockdir, image):
    path = os.path.join(sockdir, "sub", "dir", "nbd.sock")
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays: nobody listens
    device = FileDevice(image)
    server = NbdServer(path, device, EXPORT)
    server.start()
    try:
        raw = Raw(path)
        assert raw.greet() == 3
        raw.close()
        with pytest.raises(OSError) as info:
            NbdServer(path, device, EXPORT).start()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        server.close()
        device.close()
    assert not os.path.exists(path)
    with open(path, "w"):
        pass  # a regular file is never taken for a stale socket
    with pytest.raises(OSError) as info:
        NbdServer(path, device, EXPORT).start()
    assert info.value.errno == errno.EEXIST
    assert os.path.isfile(path)


# --- replies go out from the connection's writer thread ---------------------------------


class TimedDoneDevice:
    """Completes writes from one device thread (as the replication link thread would)
    and records how long each `done` call took."""

    def __init__(self, inner: FileDevice) -> None:
        import queue
        self.inner = inner
        self.size = inner.size
        self.done_seconds: list[float] = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="device", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset, data, fua, done) -> None:
        self._jobs.put(done)

    def write_zeroes(self, offset, length, fua, may_trim, done) -> None:
        self._jobs.put(done)

    def trim(self, offset, length, done) -> None:
        self._jobs.put(done)

    def flush(self, done) -> None:
        self._jobs.put(done)

    def _run(self) -> None:
        while (done := self._jobs.get()) is not None:
            start = time.monotonic()
            done(0)
            self.done_seconds.append(time.monotonic() - start)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)
        self.inner.close()


def test_a_client_that_does_not_read_its_replies_never_blocks_done(serve, image):
    device = TimedDoneDevice(FileDevice(image))
    served = serve(device)
    raw = raw_session(served)
    raw.sock.settimeout(60)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    count = 5000  # replies the socket buffers cannot hold (~700 here)
    sender = threading.Thread(target=lambda: [raw.request(1, i, (i % 1000) * 4, 4,
                                                          payload=b"abcd")
                                              for i in range(count)], daemon=True)
    sender.start()
    # The replies fill the socket; the writer blocks on it, MAX_IN_FLIGHT requests wait
    # for it, and the server stops reading requests: the number completed stays put.
    seen = [-1]

    def settled() -> bool:
        now, seen[0] = len(device.done_seconds), len(device.done_seconds)
        time.sleep(0.3)
        return now == len(device.done_seconds) and now > 0

    wait_for(settled, timeout=20, what="the server to stop reading")
    assert len(device.done_seconds) < count, "every reply fitted: the test proves nothing"
    assert max(device.done_seconds) < 0.2  # `done` only queued: never waited on the client
    # ...and the device's thread is free right now, not stuck in a `done`.
    free = threading.Event()
    device._jobs.put(lambda _error=0: free.set())
    assert free.wait(2.0)
    handles = set()
    for _ in range(count):
        error, handle, _ = raw.reply()
        assert error == 0
        handles.add(handle)
    sender.join(10)
    assert handles == set(range(count))
    raw.close()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-done", "async-done"])
def test_every_write_gets_one_reply_and_disc_waits_for_them(serve, asynchronous):
    served = serve(asynchronous=asynchronous)
    raw = raw_session(served)
    for i in range(200):
        raw.request(1, 1000 + i, i * 512, 512, payload=bytes([i % 256]) * 512)
    raw.request(3, 5000)  # FLUSH
    raw.request(2, 0)  # DISC: the server answers what is in flight, then closes
    handles = [raw.reply()[1] for _ in range(201)]
    assert sorted(handles) == list(range(1000, 1200)) + [5000]
    assert raw.closed_by_server()
    raw.close()
    wait_for(lambda: not any(t.name.startswith("nbd-reply-") for t in threading.enumerate()),
             what="the reply writer to end")
