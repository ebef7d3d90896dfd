"""mirrord/nbd_protocol.py with bytes: layouts written out by hand, limits, bad input.

Expected bytes are spelled out from the NBD spec (not produced by the module's own
structs), so a wrong field order or width fails here rather than only against a client.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord import nbd_protocol as nbd
from mirrord.nbd_protocol import (
    Command,
    CommandFlag,
    Error,
    NbdProtocolError,
    OptionDataError,
    Reply,
    Request,
)

MiB = 1024 * 1024


def opt_header(option: int, length: int, magic: bytes = b"IHAVEOPT") -> bytes:
    return magic + option.to_bytes(4, "big") + length.to_bytes(4, "big")


def info_payload(name: bytes, infos=(), count: int | None = None) -> bytes:
    count = len(infos) if count is None else count
    return (len(name).to_bytes(4, "big") + name + count.to_bytes(2, "big")
            + b"".join(i.to_bytes(2, "big") for i in infos))


def request_bytes(flags=0, command=0, handle=0, offset=0, length=0,
                  magic=b"\x25\x60\x95\x13") -> bytes:
    return (magic + flags.to_bytes(2, "big") + command.to_bytes(2, "big")
            + handle.to_bytes(8, "big") + offset.to_bytes(8, "big") + length.to_bytes(4, "big"))


# --- constants that clients depend on ------------------------------------------------


def test_numbers_match_the_spec():
    assert [int(c) for c in (Command.READ, Command.WRITE, Command.DISC, Command.FLUSH,
                             Command.TRIM, Command.CACHE, Command.WRITE_ZEROES)] == list(range(7))
    assert int(nbd.Option.GO) == 7 and int(nbd.Option.INFO) == 6
    assert int(Reply.ERR_UNSUP) == 2**31 + 1 and int(Reply.ERR_UNKNOWN) == 2**31 + 6
    assert [int(i) for i in nbd.Info] == [0, 1, 2, 3]
    assert int(CommandFlag.NO_HOLE) == 2
    assert nbd.SERVER_TRANSMISSION_FLAGS == 1 | 4 | 8 | 32 | 64 | 256
    assert (nbd.REQUEST_SIZE, nbd.REPLY_SIZE) == (28, 16)


def test_greeting_bytes():
    assert nbd.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


# --- client flags --------------------------------------------------------------------


def test_client_flags_accepts_fixed_newstyle_with_and_without_no_zeroes():
    assert nbd.parse_client_flags(b"\x00\x00\x00\x01") == nbd.ClientFlag.C_FIXED_NEWSTYLE
    assert nbd.parse_client_flags(b"\x00\x00\x00\x03") & nbd.ClientFlag.C_NO_ZEROES


@pytest.mark.parametrize("raw,reason", [
    (b"\x00\x00\x00\x05", "unknown_client_flags"),
    (b"\x80\x00\x00\x01", "unknown_client_flags"),
    (b"\x00\x00\x00\x00", "not_fixed_newstyle"),
    (b"\x00\x00\x00\x02", "not_fixed_newstyle"),
    (b"\x00\x00\x01", "short_client_flags"),
    (b"\x00\x00\x00\x01\x00", "short_client_flags"),
])
def test_client_flags_refused(raw, reason):
    with pytest.raises(NbdProtocolError) as info:
        nbd.parse_client_flags(raw)
    assert info.value.reason == reason
    assert not isinstance(info.value, OptionDataError)  # these close the connection


# --- options -------------------------------------------------------------------------


def test_option_header():
    assert nbd.parse_option_header(opt_header(7, 12)) == (7, 12)
    assert nbd.parse_option_header(opt_header(0xDEADBEEF, 0)).option == 0xDEADBEEF


def test_option_header_bad_magic_and_oversize_close():
    with pytest.raises(NbdProtocolError) as info:
        nbd.parse_option_header(opt_header(7, 0, magic=b"IHAVEOPX"))
    assert info.value.reason == "bad_option_magic"
    with pytest.raises(NbdProtocolError) as info:
        nbd.parse_option_header(opt_header(7, nbd.MAX_OPTION_DATA + 1))
    assert info.value.reason == "option_too_long"
    assert not isinstance(info.value, OptionDataError)
    assert nbd.parse_option_header(opt_header(7, nbd.MAX_OPTION_DATA)).length == nbd.MAX_OPTION_DATA


def test_info_request_parsed():
    req = nbd.parse_info_request(info_payload(b"disk0", (3, 1, 2)))
    assert req == ("disk0", (3, 1, 2))
    assert nbd.parse_info_request(info_payload(b"")) == ("", ())
    assert nbd.parse_info_request(info_payload("é".encode())).name == "é"


@pytest.mark.parametrize("payload,reason", [
    (b"", "info_too_short"),
    (b"\x00\x00\x00", "info_too_short"),
    (b"\x00\x00\x00\x05abc", "info_name_length"),  # name runs past the end
    (b"\x00\x00\x00\x03abc", "info_name_length"),  # no room for the count
    (info_payload(b"abc", (1,), count=2), "info_count"),  # count says 2, one present
    (info_payload(b"abc", (1,)) + b"\x00", "info_count"),  # trailing byte
    (info_payload(b"\xff\xfe"), "name_not_utf8"),
    (info_payload(b"a\x00b"), "name_has_nul"),
    (info_payload(b"a" * (nbd.MAX_STRING + 1)), "name_too_long"),
])
def test_info_request_malformed_is_option_data_error(payload, reason):
    with pytest.raises(OptionDataError) as info:
        nbd.parse_info_request(payload)
    assert info.value.reason == reason


def test_export_name_and_empty_options():
    assert nbd.parse_export_name(b"disk0") == "disk0"
    assert nbd.parse_export_name(b"") == ""
    nbd.parse_empty_option(3, b"")
    with pytest.raises(OptionDataError):
        nbd.parse_empty_option(3, b"x")


def test_option_reply_layout():
    magic = bytes.fromhex("0003e889045565a9")
    assert nbd.option_reply(7, Reply.ACK) == magic + bytes.fromhex("00000007 00000001 00000000")
    err = nbd.option_error(99, Reply.ERR_UNSUP, "no")
    assert err == magic + bytes.fromhex("00000063 80000001 00000002") + b"no"


def test_info_replies_layout():
    magic = bytes.fromhex("0003e889045565a9")
    head = magic + bytes.fromhex("00000007 00000003")
    assert nbd.info_export(7, 64 * MiB, 0x16D) == (
        head + bytes.fromhex("0000000c 0000") + (64 * MiB).to_bytes(8, "big") + b"\x01\x6d")
    assert nbd.info_block_size(7) == (
        head + bytes.fromhex("0000000e 0003 00000001 00001000 02000000"))
    assert nbd.info_name(7, "d") == head + bytes.fromhex("00000003 0001") + b"d"
    assert nbd.info_description(6, "hi") == (
        magic + bytes.fromhex("00000006 00000003 00000004 0002") + b"hi")


def test_server_reply_layout():
    magic = bytes.fromhex("0003e889045565a9")
    assert nbd.server_reply("ab", "desc") == (
        magic + bytes.fromhex("00000003 00000002 0000000a 00000002") + b"ab" + b"desc")


def test_long_strings_are_truncated_to_the_spec_cap():
    reply = nbd.info_description(7, "é" * 3000)  # 6000 bytes of UTF-8
    text = reply[nbd.OPTION_REPLY_HEADER.size + 2:]
    assert len(text) <= nbd.MAX_STRING
    text.decode("utf-8")  # cut on a character boundary


def test_export_name_reply_with_and_without_zeroes():
    body = (5).to_bytes(8, "big") + b"\x00\x03"
    assert nbd.export_name_reply(5, 3, no_zeroes=True) == body
    assert nbd.export_name_reply(5, 3, no_zeroes=False) == body + bytes(124)


def test_transmission_flags():
    assert not nbd.transmission_flags(False) & nbd.TransmissionFlag.READ_ONLY
    assert nbd.transmission_flags(True) == nbd.SERVER_TRANSMISSION_FLAGS | 2


# --- requests and replies ------------------------------------------------------------


def test_request_parsed():
    raw = request_bytes(flags=1, command=1, handle=0x0102030405060708, offset=2**40, length=4096)
    assert nbd.parse_request(raw) == Request(1, 1, 0x0102030405060708, 2**40, 4096)
    # A preallocated buffer may be longer; only the first 28 bytes are a header.
    assert nbd.parse_request(bytearray(raw) + b"junk").length == 4096
    assert nbd.parse_request(memoryview(raw)).handle == 0x0102030405060708


def test_request_bad_magic_or_short():
    with pytest.raises(NbdProtocolError) as info:
        nbd.parse_request(request_bytes(magic=b"\x67\x44\x66\x98"))
    assert info.value.reason == "bad_request_magic"
    with pytest.raises(NbdProtocolError) as info:
        nbd.parse_request(request_bytes()[:27])
    assert info.value.reason == "short_request"


def test_simple_reply_layout():
    assert nbd.simple_reply(22, 0xAABB) == bytes.fromhex("67446698 00000016 000000000000aabb")


SIZE = 64 * MiB


@pytest.mark.parametrize("flags,command,offset,length,read_only,expected", [
    # served
    (0, Command.READ, 0, 4096, False, Error.OK),
    (0, Command.READ, SIZE - 1, 1, True, Error.OK),
    (1, Command.READ, 0, 1, False, Error.OK),  # FUA on READ: MUST be accepted
    (1, Command.WRITE, 0, nbd.MAX_PAYLOAD, False, Error.OK),
    (0, Command.FLUSH, 0, 0, True, Error.OK),  # flush is harmless when read-only
    (1, Command.FLUSH, 0, 0, False, Error.OK),
    (1, Command.TRIM, 0, SIZE, False, Error.OK),  # trim/zero may exceed MAX_PAYLOAD
    (3, Command.WRITE_ZEROES, 0, SIZE, False, Error.OK),
    (0xFFFF, Command.DISC, 5, 5, True, Error.OK),  # DISC has no reply to refuse with
    # unknown command and flags
    (0, Command.CACHE, 0, 4096, False, Error.EINVAL),
    (0, Command.BLOCK_STATUS, 0, 4096, False, Error.EINVAL),
    (0, 0xBEEF, 0, 4096, False, Error.EINVAL),
    (2, Command.READ, 0, 4096, False, Error.EINVAL),  # NO_HOLE is for WRITE_ZEROES only
    (2, Command.WRITE, 0, 4096, False, Error.EINVAL),
    (4, Command.READ, 0, 4096, False, Error.EINVAL),  # DF needs structured replies
    (16, Command.WRITE_ZEROES, 0, 4096, False, Error.EINVAL),  # FAST_ZERO not offered
    (0x80, Command.READ, 0, 4096, False, Error.EINVAL),  # undefined bit
    (0x8000, Command.WRITE, 0, 4096, False, Error.EINVAL),
    # lengths
    (0, Command.READ, 0, 0, False, Error.EINVAL),
    (0, Command.WRITE, 0, 0, False, Error.EINVAL),
    (0, Command.TRIM, 0, 0, False, Error.EINVAL),
    (0, Command.WRITE_ZEROES, 0, 0, False, Error.EINVAL),
    (0, Command.READ, 0, nbd.MAX_PAYLOAD + 1, False, Error.EINVAL),
    (0, Command.WRITE, 0, nbd.MAX_PAYLOAD + 1, False, Error.EINVAL),
    (0, Command.FLUSH, 1, 0, False, Error.EINVAL),
    (0, Command.FLUSH, 0, 1, False, Error.EINVAL),
    # read-only
    (0, Command.WRITE, 0, 1, True, Error.EPERM),
    (0, Command.TRIM, 0, 1, True, Error.EPERM),
    (0, Command.WRITE_ZEROES, 0, 1, True, Error.EPERM),
    # range: ENOSPC for writes (the spec's SHOULD), EINVAL otherwise
    (0, Command.READ, SIZE - 1, 2, False, Error.EINVAL),
    (0, Command.READ, SIZE, 1, False, Error.EINVAL),
    (0, Command.READ, 2**64 - 1, 1, False, Error.EINVAL),  # no wrap-around
    (0, Command.TRIM, SIZE - 512, 1024, False, Error.EINVAL),
    (0, Command.WRITE, SIZE - 512, 1024, False, Error.ENOSPC),
    (0, Command.WRITE_ZEROES, SIZE, 1, False, Error.ENOSPC),
])
def test_check_request(flags, command, offset, length, read_only, expected):
    got = nbd.check_request(Request(flags, int(command), 7, offset, length), SIZE, read_only)
    assert got == expected


def test_write_commands():
    assert {c for c in Command if nbd.is_write_command(c)} == {
        Command.WRITE, Command.TRIM, Command.WRITE_ZEROES}


@pytest.mark.parametrize("value,expected", [
    (0, 0), (None, 0),
    (errno.EPERM, 1), (errno.EIO, 5), (errno.ENOMEM, 12), (errno.EINVAL, 22),
    (errno.ENOSPC, 28), (errno.EOVERFLOW, 75), (errno.ENOTSUP, 95), (errno.ESHUTDOWN, 108),
    (errno.EDQUOT, 28), (errno.EFBIG, 28),  # the spec asks for ENOSPC
    (errno.EROFS, 5), (errno.ENOENT, 5), (errno.ETIMEDOUT, 5), (9999, 5),
])
def test_nbd_error(value, expected):
    assert nbd.nbd_error(value) == expected


# --- random bytes: parse or raise the module's error, nothing else --------------------


def _parses_or_raises(func, data):
    try:
        func(data)
    except NbdProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_into_every_parser(data):
    for func in (nbd.parse_client_flags, nbd.parse_option_header, nbd.parse_export_name,
                 nbd.parse_info_request, nbd.parse_request,
                 lambda d: nbd.parse_empty_option(3, d)):
        _parses_or_raises(func, data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=28, max_size=28), st.integers(0, 2**64 - 1), st.booleans())
def test_random_requests_get_a_defined_answer(data, size, read_only):
    try:
        request = nbd.parse_request(b"\x25\x60\x95\x13" + data[4:])
    except NbdProtocolError:  # pragma: no cover - the magic is right, so never
        raise AssertionError("a header with the right magic must parse")
    answer = nbd.check_request(request, size, read_only)
    assert answer in (Error.OK, Error.EINVAL, Error.EPERM, Error.ENOSPC)
    if answer == Error.OK and request.command != Command.DISC:
        assert request.offset + request.length <= size
        assert not (read_only and nbd.is_write_command(request.command))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(0, 0xFFFF), max_size=20))
def test_info_request_round_trip(name, infos):
    raw = name.encode()
    if "\0" in name:
        with pytest.raises(OptionDataError):
            nbd.parse_info_request(info_payload(raw, infos))
    else:
        assert nbd.parse_info_request(info_payload(raw, infos)) == (name, tuple(infos))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=40))
def test_info_request_byte_by_byte_prefixes(tail):
    """Every truncation of a valid INFO payload is refused, never misparsed."""
    payload = info_payload(b"disk", (0, 1, 3)) + tail
    for cut in range(len(payload)):
        prefix = payload[:cut]
        try:
            parsed = nbd.parse_info_request(prefix)
        except OptionDataError:
            continue
        # A prefix that parses must be a complete, self-consistent payload on its own.
        assert info_payload(parsed.name.encode(), parsed.info_types) == prefix


def test_request_struct_is_big_endian_28_bytes():
    assert struct.calcsize(nbd.REQUEST.format) == 28
