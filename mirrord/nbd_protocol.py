"""NBD wire codec, sans-IO: bytes in, parsed records out; records in, bytes out.

Only what mirrord's NBD frontend speaks: the fixed-newstyle handshake (options
EXPORT_NAME, ABORT, LIST, INFO, GO), 28-byte request headers and 16-byte simple replies.
No structured replies, no metadata contexts, no TLS, no extended headers: the server
answers those options NBD_REP_ERR_UNSUP and clients carry on without them.

The socket side (mirrord/nbd_server.py) reads exactly the byte counts named here
(`GREETING`, `CLIENT_FLAGS.size`, `OPTION_HEADER.size`, `REQUEST.size`) and hands them
in.  Everything the peer can get wrong is decided here, as one of two outcomes:

- `NbdProtocolError`: the framing is broken (bad magic, unknown client flag, an option
  longer than any we accept).  The stream cannot be trusted any more: close it.
- `OptionDataError` (a subclass): one option's payload is inconsistent (lengths that do
  not add up, a name that is not UTF-8) but its framing was fine, so the server answers
  NBD_REP_ERR_INVALID and negotiation goes on.

A bad *request* inside a well-framed header (unknown command, flag, range) is not an
exception either: `check_request` returns the NBD error to reply with, the connection
stays usable.

Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import NamedTuple

# --- magics -------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation; prefixes each option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# --- wire layouts (big-endian, as everything in NBD) ---------------------------------

GREETING_STRUCT = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes, maybe)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

REQUEST_SIZE = REQUEST.size  # 28
REPLY_SIZE = REPLY.size  # 16
# NBD_OPT_EXPORT_NAME's reply ends with 124 zero bytes unless both sides set NO_ZEROES
# (the reserved tail of the oldstyle handshake).
EXPORT_NAME_PADDING = bytes(124)

# --- limits --------------------------------------------------------------------------

# The spec caps strings (export names, descriptions) at 4096 bytes.
MAX_STRING = 4096
# Largest option payload we read: an INFO/GO with a maximal name and a generous list of
# info requests fits with room to spare.  Beyond it the client is not speaking NBD to us
# and the connection is closed rather than reading an attacker-chosen 4 GiB.
MAX_OPTION_DATA = 64 * 1024
# Block sizes announced in NBD_INFO_BLOCK_SIZE.  Minimum 1: any offset and length work
# (the backing store does read-modify-write itself); preferred 4096: the page and
# filesystem block size, below which writes cost a read-modify-write somewhere;
# maximum 32 MiB: the largest READ/WRITE payload we buffer per request, and the value
# the spec and qemu assume when a server says nothing.
BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
MAX_PAYLOAD = 32 * 1024 * 1024


# --- numbers -------------------------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    """Server flags in the greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags, the 32 bits the client answers the greeting with."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


# Masks used with `~` are plain ints: `~` on an IntFlag complements only within the
# defined members, so `flags & ~SOME_FLAG` would never see an undefined bit.
KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class TransmissionFlag(enum.IntFlag):
    """Per-export flags sent at the end of negotiation (NBD_INFO_EXPORT or EXPORT_NAME)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option numbers (NBD_OPT_*).  Only some are served; the rest are named for logs."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Reply(enum.IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class Info(enum.IntEnum):
    """NBD_INFO_* items inside an NBD_REP_INFO reply."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types (NBD_CMD_*).  CACHE, BLOCK_STATUS and RESIZE are not served."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Request flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Error(enum.IntEnum):
    """The error values a reply may carry: the spec's fixed list, not the host's errno."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Transmission flags this server always advertises (READ_ONLY is added per connection).
SERVER_TRANSMISSION_FLAGS = (
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.CAN_MULTI_CONN
)

# Flags each served command accepts.  FUA on every command: the spec says a server that
# advertises SEND_FUA MUST accept it everywhere, even where it means nothing (READ,
# FLUSH).  NO_HOLE only on WRITE_ZEROES.  DF and REQ_ONE need structured replies,
# FAST_ZERO needs SEND_FAST_ZERO: none is negotiated, so they are EINVAL.
_ALLOWED_FLAGS = {
    Command.READ: int(CommandFlag.FUA),
    Command.WRITE: int(CommandFlag.FUA),
    Command.FLUSH: int(CommandFlag.FUA),
    Command.TRIM: int(CommandFlag.FUA),
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE),
}
_WRITE_COMMANDS = frozenset((Command.WRITE, Command.TRIM, Command.WRITE_ZEROES))


# --- errors --------------------------------------------------------------------------


class NbdProtocolError(Exception):
    """Bytes from the client are not NBD we accept; the connection must be closed.

    `reason` is a short fixed token (for counting and tests), `detail` says what was
    seen, for the one log line the server writes.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class OptionDataError(NbdProtocolError):
    """One option's payload is malformed; answer NBD_REP_ERR_INVALID and carry on."""


# --- handshake -----------------------------------------------------------------------


def greeting() -> bytes:
    """The 18 bytes the server sends first: fixed newstyle, zeroes may be skipped."""
    return GREETING_STRUCT.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def parse_client_flags(data: bytes) -> ClientFlag:
    """The client's 4-byte answer to the greeting.

    The spec says the server MUST drop a client that sets a flag we did not offer, so
    unknown bits raise.  A client without C_FIXED_NEWSTYLE is refused too: fixed
    newstyle is all this server speaks (every client from the last decade sets it).
    """
    _need(data, CLIENT_FLAGS.size, "client flags")
    (flags,) = CLIENT_FLAGS.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise NbdProtocolError("unknown_client_flags", f"{flags:#x}")
    if not flags & ClientFlag.C_FIXED_NEWSTYLE:
        raise NbdProtocolError("not_fixed_newstyle", f"client flags {flags:#x}")
    return ClientFlag(flags)


class OptionHeader(NamedTuple):
    """The 16 bytes before each option's data."""

    option: int  # not an Option: unknown numbers are legal and answered ERR_UNSUP
    length: int


def parse_option_header(data: bytes) -> OptionHeader:
    """Check the IHAVEOPT magic and bound the data length (both close on failure)."""
    _need(data, OPTION_HEADER.size, "option header")
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError("bad_option_magic", f"{magic:#018x}")
    if length > MAX_OPTION_DATA:
        raise NbdProtocolError("option_too_long", f"option {option}: {length} bytes")
    return OptionHeader(option, length)


def parse_export_name(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME's data: the whole payload is the name."""
    return _decode_name(data)


class InfoRequest(NamedTuple):
    """NBD_OPT_INFO / NBD_OPT_GO: which export, and which NBD_INFO_* items are asked."""

    name: str
    info_types: tuple[int, ...]  # may hold unknown numbers: those are ignored


def parse_info_request(data: bytes) -> InfoRequest:
    """Layout: u32 name length, name, u16 count, count x u16 info type; nothing more."""
    if len(data) < 4:
        raise OptionDataError("info_too_short", f"{len(data)} bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    end_name = 4 + name_len
    if end_name + 2 > len(data):
        raise OptionDataError("info_name_length", f"name length {name_len} in {len(data)} bytes")
    name = _decode_name(data[4:end_name])
    (count,) = _U16.unpack_from(data, end_name)
    if end_name + 2 + 2 * count != len(data):
        raise OptionDataError("info_count", f"{count} info requests in {len(data)} bytes")
    types = struct.unpack_from(f">{count}H", data, end_name + 2)
    return InfoRequest(name, types)


def parse_empty_option(option: int, data: bytes) -> None:
    """Options without data (LIST, ABORT): any payload is NBD_REP_ERR_INVALID."""
    if data:
        raise OptionDataError("unexpected_data", f"option {option}: {len(data)} bytes")


def _decode_name(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise OptionDataError("name_too_long", f"{len(raw)} bytes")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionDataError("name_not_utf8", repr(raw[:64])) from None
    if "\0" in name:
        raise OptionDataError("name_has_nul", repr(name[:64]))
    return name


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply: header and data."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option: int, reply: Reply, message: str = "") -> bytes:
    """An NBD_REP_ERR_* reply; the message is for the human behind the client."""
    return option_reply(option, reply, _encode_string(message))


def server_reply(name: str, description: str = "") -> bytes:
    """One NBD_REP_SERVER entry of an NBD_OPT_LIST answer.

    u32 name length, name, then free text: libnbd and nbdinfo show it as the
    export's description.
    """
    raw = _encode_string(name)
    return option_reply(Option.LIST, Reply.SERVER,
                        _U32.pack(len(raw)) + raw + _encode_string(description))


def info_export(option: int, size: int, flags: int) -> bytes:
    """NBD_REP_INFO / NBD_INFO_EXPORT: size and transmission flags (always sent)."""
    return option_reply(option, Reply.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags))


def info_name(option: int, name: str) -> bytes:
    """NBD_REP_INFO / NBD_INFO_NAME: the export's canonical name."""
    return option_reply(option, Reply.INFO, _U16.pack(Info.NAME) + _encode_string(name))


def info_description(option: int, description: str) -> bytes:
    """NBD_REP_INFO / NBD_INFO_DESCRIPTION: free text for humans."""
    return option_reply(option, Reply.INFO,
                        _U16.pack(Info.DESCRIPTION) + _encode_string(description))


def info_block_size(option: int, minimum: int = BLOCK_SIZE_MIN,
                    preferred: int = BLOCK_SIZE_PREFERRED, maximum: int = MAX_PAYLOAD) -> bytes:
    """NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: the sizes clients should align and cap to."""
    return option_reply(option, Reply.INFO,
                        INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum))


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """What ends an NBD_OPT_EXPORT_NAME negotiation (there is no option reply header)."""
    tail = b"" if no_zeroes else EXPORT_NAME_PADDING
    return EXPORT_NAME_REPLY.pack(size, flags) + tail


def transmission_flags(read_only: bool) -> TransmissionFlag:
    """The flags advertised for one connection; read-only is decided at handshake."""
    flags = SERVER_TRANSMISSION_FLAGS
    return flags | TransmissionFlag.READ_ONLY if read_only else flags


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        # Truncate on a character boundary: the spec's hard cap, never a client's problem.
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


# --- transmission --------------------------------------------------------------------


class Request(NamedTuple):
    """One parsed request header.

    A NamedTuple rather than a frozen dataclass: it is built once per request on the
    hot path, and a tuple is the cheapest immutable record Python has.
    """

    flags: int
    command: int  # not a Command: unknown numbers are answered EINVAL, not raised
    handle: int
    offset: int
    length: int


def parse_request(data) -> Request:
    """A 28-byte request header; a bad magic means the stream is lost (close it)."""
    if len(data) < REQUEST_SIZE:
        raise NbdProtocolError("short_request", f"{len(data)} bytes")
    magic, flags, command, handle, offset, length = REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError("bad_request_magic", f"{magic:#010x}")
    return Request(flags, command, handle, offset, length)


def is_write_command(command: int) -> bool:
    """WRITE, TRIM and WRITE_ZEROES change the export: refused with EPERM when read-only."""
    return command in _WRITE_COMMANDS


def check_request(request: Request, size: int, read_only: bool) -> int:
    """The NBD error to answer `request` with, or 0 when it may be served.

    Checked in this order, so one request gets one well-defined answer:
    1. unknown command (CACHE, BLOCK_STATUS, ... included): EINVAL, as the spec says;
    2. a flag not documented for the command: EINVAL, as the spec says;
    3. FLUSH with nonzero offset or length (reserved, MUST be zero): EINVAL;
    4. zero length on READ/WRITE/TRIM/WRITE_ZEROES: EINVAL (the spec leaves it
       undefined; refusing is the safe reading);
    5. READ or WRITE longer than MAX_PAYLOAD: EINVAL.  TRIM and WRITE_ZEROES carry no
       payload and are bounded by the export size only: qemu sends discards far larger
       than the advertised maximum block size;
    6. a write-type command on a read-only connection: EPERM, as the spec says;
    7. beyond the end of the export: ENOSPC for WRITE and WRITE_ZEROES, which is what
       the spec recommends ("SHOULD return ENOSPC if it receives a write request
       including one or more sectors beyond the size of the device"), and EINVAL for
       READ and TRIM (nbdkit and qemu-nbd answer the same).
    DISC is never refused (it has no reply).  The server still checks the device's own writability at
    dispatch (it may change while the connection is open).
    """
    command = request.command
    if command == Command.DISC:
        return Error.OK  # no reply exists to carry an error: the server just hangs up
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None:
        return Error.EINVAL
    if request.flags & ~allowed:
        return Error.EINVAL
    length = request.length
    if command == Command.FLUSH:
        return Error.EINVAL if request.offset or length else Error.OK
    if length == 0:
        return Error.EINVAL
    if length > MAX_PAYLOAD and (command == Command.READ or command == Command.WRITE):
        return Error.EINVAL
    if read_only and command != Command.READ:
        return Error.EPERM
    if request.offset + length > size:
        if command == Command.WRITE or command == Command.WRITE_ZEROES:
            return Error.ENOSPC
        return Error.EINVAL
    return Error.OK


def simple_reply(error: int, handle: int) -> bytes:
    """The 16-byte reply header; a successful READ's data follows it on the wire."""
    return REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


# errno values that have an NBD equivalent.  The spec also asks servers to report
# EDQUOT and EFBIG as ENOSPC (the client can act on "no space" but not on those).
_ERRNO_TO_NBD = {
    _errno.EPERM: Error.EPERM,
    _errno.EIO: Error.EIO,
    _errno.ENOMEM: Error.ENOMEM,
    _errno.EINVAL: Error.EINVAL,
    _errno.ENOSPC: Error.ENOSPC,
    _errno.EDQUOT: Error.ENOSPC,
    _errno.EFBIG: Error.ENOSPC,
    _errno.EOVERFLOW: Error.EOVERFLOW,
    _errno.ENOTSUP: Error.ENOTSUP,
    _errno.ESHUTDOWN: Error.ESHUTDOWN,
}


def nbd_error(errno_value: int | None) -> int:
    """Map a host errno to the NBD error field; 0 stays 0, anything unlisted is EIO.

    NBD error numbers are fixed by the spec, not by the host's errno.h, so they go
    through this table even where the numbers happen to agree on Linux.
    """
    if not errno_value:
        return Error.OK
    return _ERRNO_TO_NBD.get(errno_value, Error.EIO)


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise NbdProtocolError("short_" + what.replace(" ", "_"), f"{len(data)} of {size} bytes")
