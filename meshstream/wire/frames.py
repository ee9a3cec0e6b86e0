# -*- test-case-name: tests.test_frames -*-
"""
The peer wire protocol's frame codec: bytes in, messages out, and back.

Pure: no Twisted, no I/O.  Every frame is::

    +----------------+---------+----------------------+
    | u32 length     | u8 type | payload              |
    +----------------+---------+----------------------+

all integers big-endian; C{length} counts the type byte and the payload, so a
frame occupies C{4 + length} bytes.  C{length} is checked against the
decoder's cap I{before} anything is buffered, so a peer can never make us hold
more than C{4 + cap} bytes of a partial frame.

Payloads (C{cid} is the 32-byte binary content id, C{str8}/C{str16} a UTF-8
string after a u8/u16 length, C{subs} a u16 count then that many u16 indexes):

==========  ====  =========================================================
message     type  payload
==========  ====  =========================================================
HELLO       1     u16 min_version, u16 max_version, str8 node_id,
                  u16 ticket length, ticket bytes
HAVE        2     cid, u32 count, count × (u32 first_block, u32 end_block)
REQUEST     3     cid, u32 block, subs
DATA        4     cid, u32 block, u16 sub, the sub block's bytes
CANCEL      5     cid, u32 block, subs
REJECT      6     cid, u32 block, u16 sub (0xFFFF: the whole request),
                  u8 code, str16 reason
HASHES      7     cid, u32 block, u16 count, count × 32-byte SHA-256 leaves
PING        8     u64 nonce
PONG        9     u64 nonce
STATE       10    UTF-8 JSON object (node state: bandwidth, load, ...)
BYE         11    u8 code, str16 reason
==========  ====  =========================================================

See C{docs/wire.md} for the conversation rules.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, ClassVar

from attrs import field, frozen

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

CID_SIZE = 32
LEAF_SIZE = 32
WHOLE_REQUEST = 0xFFFF
MAX_SUBS = 1024
MAX_HAVE_RANGES = 65536
MAX_STATE_BYTES = 16 * 1024

_LEN = struct.Struct(">I")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_BLOCK_SUB = struct.Struct(">IH")
_RANGE = struct.Struct(">II")
_HEADER = struct.Struct(">IB")

#: Default cap on C{length}: a 1 MiB sub block plus room for its header.
DEFAULT_MAX_FRAME = 1024 * 1024 + 256


class RejectCode:
    UNKNOWN_CONTENT = 1
    NOT_HELD = 2
    BAD_REQUEST = 3
    BUSY = 4
    UNAUTHORIZED = 5


class ByeCode:
    NORMAL = 0
    PROTOCOL_ERROR = 1
    VERSION_MISMATCH = 2
    BUSY = 3
    SHUTTING_DOWN = 4
    UNAUTHORIZED = 5
    TIMEOUT = 6


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame; the connection is done."""


def _check_cid(value: bytes) -> bytes:
    if len(value) != CID_SIZE:
        raise ValueError("a content id is 32 bytes")
    return value


def _check_subs(value: tuple[int, ...]) -> tuple[int, ...]:
    if not 0 < len(value) <= MAX_SUBS:
        raise ValueError(f"between 1 and {MAX_SUBS} sub blocks")
    for s in value:
        if not 0 <= s < WHOLE_REQUEST:
            raise ValueError("sub block index out of range")
    return value


def _check_u16(value: int) -> int:
    if not 0 <= value <= 0xFFFF:
        raise ValueError("version out of range")
    return value


def _check_ranges(value: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    if len(value) > MAX_HAVE_RANGES:
        raise ValueError("too many ranges")
    for a, b in value:
        if not 0 <= a <= b <= 0xFFFFFFFF:
            raise ValueError("a range is (first, end) with first <= end")
    return value


def _check_leaves(value: tuple[bytes, ...]) -> tuple[bytes, ...]:
    if len(value) > MAX_SUBS or any(len(leaf) != LEAF_SIZE for leaf in value):
        raise ValueError(f"at most {MAX_SUBS} leaves of {LEAF_SIZE} bytes")
    return value


def _check_u32(value: int) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("block index out of range")
    return value


@frozen
class Hello:
    TYPE: ClassVar[int] = 1
    node_id: str
    min_version: int = field(default=MIN_PROTOCOL_VERSION, validator=lambda _i, _a, v: _check_u16(v))
    max_version: int = field(default=PROTOCOL_VERSION, validator=lambda _i, _a, v: _check_u16(v))
    ticket: bytes = b""


@frozen
class Have:
    TYPE: ClassVar[int] = 2
    content_id: bytes = field(validator=lambda _i, _a, v: _check_cid(v))
    ranges: tuple[tuple[int, int], ...] = field(validator=lambda _i, _a, v: _check_ranges(v))


@frozen
class Request:
    TYPE: ClassVar[int] = 3
    content_id: bytes = field(validator=lambda _i, _a, v: _check_cid(v))
    block: int = field(validator=lambda _i, _a, v: _check_u32(v))
    subs: tuple[int, ...] = field(validator=lambda _i, _a, v: _check_subs(v))


@frozen
class Data:
    TYPE: ClassVar[int] = 4
    content_id: bytes
    block: int
    sub: int
    data: bytes


@frozen
class Cancel:
    TYPE: ClassVar[int] = 5
    content_id: bytes = field(validator=lambda _i, _a, v: _check_cid(v))
    block: int = field(validator=lambda _i, _a, v: _check_u32(v))
    subs: tuple[int, ...] = field(validator=lambda _i, _a, v: _check_subs(v))


@frozen
class Reject:
    TYPE: ClassVar[int] = 6
    content_id: bytes
    block: int
    sub: int
    code: int
    reason: str = ""


@frozen
class Hashes:
    TYPE: ClassVar[int] = 7
    content_id: bytes
    block: int
    leaves: tuple[bytes, ...] = field(validator=lambda _i, _a, v: _check_leaves(v))


@frozen
class Ping:
    TYPE: ClassVar[int] = 8
    nonce: int


@frozen
class Pong:
    TYPE: ClassVar[int] = 9
    nonce: int


@frozen
class State:
    TYPE: ClassVar[int] = 10
    state: dict[str, Any] = field(hash=False)


@frozen
class Bye:
    TYPE: ClassVar[int] = 11
    code: int = ByeCode.NORMAL
    reason: str = ""


Message = Hello | Have | Request | Data | Cancel | Reject | Hashes | Ping | Pong | State | Bye


def _str(s: str, fmt: struct.Struct, limit: int) -> bytes:
    # Cut to the limit without splitting a character.
    raw = s.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")
    return fmt.pack(len(raw)) + raw


def _subs(subs: tuple[int, ...]) -> bytes:
    return _U16.pack(len(subs)) + struct.pack(f">{len(subs)}H", *subs)


def encode_payload(msg: Message) -> bytes:
    """The payload bytes of C{msg} (without length and type)."""
    if isinstance(msg, Data):
        return msg.content_id + _BLOCK_SUB.pack(msg.block, msg.sub) + msg.data
    if isinstance(msg, (Request, Cancel)):
        return msg.content_id + _U32.pack(msg.block) + _subs(msg.subs)
    if isinstance(msg, Hashes):
        return (
            _check_cid(msg.content_id)
            + _U32.pack(msg.block)
            + _U16.pack(len(msg.leaves))
            + b"".join(msg.leaves)
        )
    if isinstance(msg, Hello):
        if len(msg.ticket) > 0xFFFF:
            raise ValueError("ticket too long")
        return (
            _U16.pack(msg.min_version)
            + _U16.pack(msg.max_version)
            + _str(msg.node_id, _U8, 255)
            + _U16.pack(len(msg.ticket))
            + msg.ticket
        )
    if isinstance(msg, Have):
        return (
            msg.content_id + _U32.pack(len(msg.ranges)) + b"".join(_RANGE.pack(a, b) for a, b in msg.ranges)
        )
    if isinstance(msg, Reject):
        return (
            _check_cid(msg.content_id)
            + _BLOCK_SUB.pack(msg.block, msg.sub)
            + _U8.pack(msg.code)
            + _str(msg.reason, _U16, 1024)
        )
    if isinstance(msg, (Ping, Pong)):
        return _U64.pack(msg.nonce)
    if isinstance(msg, State):
        raw = json.dumps(msg.state, separators=(",", ":")).encode("utf-8")
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError("state too large")
        return raw
    if isinstance(msg, Bye):
        return _U8.pack(msg.code) + _str(msg.reason, _U16, 1024)
    raise TypeError(f"not a message: {msg!r}")


def encode(msg: Message) -> bytes:
    """One whole frame for C{msg}."""
    payload = encode_payload(msg)
    return _HEADER.pack(len(payload) + 1, msg.TYPE) + payload


def encode_data_header(content_id: bytes, block: int, sub: int, length: int) -> bytes:
    """
    The frame header and DATA fields before C{length} bytes of sub block, so a
    sender can hand the header and the data to the transport separately
    (C{writeSequence}) instead of copying the data into one frame.
    """
    return (
        _HEADER.pack(1 + CID_SIZE + _BLOCK_SUB.size + length, Data.TYPE)
        + content_id
        + _BLOCK_SUB.pack(block, sub)
    )


class _Reader:
    """Bounds-checked cursor over one frame's payload."""

    def __init__(self, view: memoryview) -> None:
        self._v = view
        self._o = 0

    def take(self, n: int) -> memoryview:
        if self._o + n > len(self._v):
            raise ProtocolError("payload shorter than its fields")
        out = self._v[self._o : self._o + n]
        self._o += n
        return out

    def u8(self) -> int:
        return int(_U8.unpack(self.take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def cid(self) -> bytes:
        return bytes(self.take(CID_SIZE))

    def string(self, width: int) -> str:
        n = self.u8() if width == 1 else self.u16()
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None

    def subs(self) -> tuple[int, ...]:
        n = self.u16()
        if not 0 < n <= MAX_SUBS:
            raise ProtocolError(f"sub block count {n} out of range")
        subs = struct.unpack(f">{n}H", self.take(2 * n))
        if WHOLE_REQUEST in subs:
            raise ProtocolError("sub block index out of range")
        return subs

    def rest(self) -> memoryview:
        out = self._v[self._o :]
        self._o = len(self._v)
        return out

    def end(self) -> None:
        if self._o != len(self._v):
            raise ProtocolError("trailing bytes after the payload")


def decode_payload(mtype: int, payload: memoryview) -> Message:
    """Parse one frame's payload; raise L{ProtocolError} on anything odd."""
    r = _Reader(payload)
    msg: Message
    if mtype == Data.TYPE:
        cid = r.cid()
        block, sub = r.u32(), r.u16()
        return Data(cid, block, sub, bytes(r.rest()))
    if mtype == Request.TYPE:
        msg = Request(r.cid(), r.u32(), r.subs())
    elif mtype == Cancel.TYPE:
        msg = Cancel(r.cid(), r.u32(), r.subs())
    elif mtype == Hashes.TYPE:
        cid, block, n = r.cid(), r.u32(), r.u16()
        if n > MAX_SUBS:
            raise ProtocolError("too many leaves")
        raw = bytes(r.take(n * LEAF_SIZE))
        msg = Hashes(cid, block, tuple(raw[i : i + LEAF_SIZE] for i in range(0, len(raw), LEAF_SIZE)))
    elif mtype == Hello.TYPE:
        lo, hi = r.u16(), r.u16()
        node_id = r.string(1)
        ticket = bytes(r.take(r.u16()))
        msg = Hello(node_id=node_id, min_version=lo, max_version=hi, ticket=ticket)
    elif mtype == Have.TYPE:
        cid, n = r.cid(), r.u32()
        if n > MAX_HAVE_RANGES:
            raise ProtocolError("too many ranges")
        ranges = tuple(_RANGE.unpack(r.take(_RANGE.size)) for _ in range(n))
        if any(a > b for a, b in ranges):
            raise ProtocolError("range ends before it starts")
        msg = Have(cid, ranges)
    elif mtype == Reject.TYPE:
        cid, block, sub, code = r.cid(), r.u32(), r.u16(), r.u8()
        msg = Reject(cid, block, sub, code, r.string(2))
    elif mtype == Ping.TYPE:
        msg = Ping(r.u64())
    elif mtype == Pong.TYPE:
        msg = Pong(r.u64())
    elif mtype == State.TYPE:
        body = r.rest()
        if len(body) > MAX_STATE_BYTES:
            raise ProtocolError("state too large")
        try:
            state = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("state is not JSON") from None
        if not isinstance(state, dict):
            raise ProtocolError("state is not a JSON object")
        msg = State(state)
    elif mtype == Bye.TYPE:
        msg = Bye(r.u8(), r.string(2))
    else:
        raise ProtocolError(f"unknown message type {mtype}")
    r.end()
    return msg


class FrameDecoder:
    """
    Incremental decoder.  Feed it bytes in any split; it returns the messages
    completed so far.  After a L{ProtocolError} it stays failed: every later
    call raises the same error, since the stream has lost its framing.

    At most C{4 + max_frame} bytes are ever buffered: a length over the cap is
    refused as soon as its four bytes are seen.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        return list(self.iter_feed(data))

    def iter_feed(self, data: bytes) -> Iterator[Message]:
        if self._error is not None:
            raise self._error
        try:
            yield from self._feed(data)
        except ProtocolError as e:
            self._error = e
            self._buf.clear()
            raise

    def _feed(self, data: bytes | memoryview) -> Iterator[Message]:
        if self._buf:
            # Complete the partial frame first, taking no more than it needs.
            need = self._need()
            if need is None:
                take = 4 - len(self._buf)
                self._buf += data[:take]
                data = data[take:]
                need = self._need()
                if need is None:
                    return
            take = need - len(self._buf)
            self._buf += data[:take]
            data = data[take:]
            if len(self._buf) < need:
                return
            frame = memoryview(bytes(self._buf))
            self._buf.clear()
            yield self._parse(frame)
        view = memoryview(data)
        offset = 0
        end = len(view)
        while end - offset >= 4:
            (length,) = _LEN.unpack_from(view, offset)
            self._check_length(length)
            if end - offset < 4 + length:
                break
            yield self._parse(view[offset : offset + 4 + length])
            offset += 4 + length
        self._buf += view[offset:]

    def _need(self) -> int | None:
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf, 0)
        self._check_length(length)
        return int(4 + length)

    def _check_length(self, length: int) -> None:
        if length == 0:
            raise ProtocolError("empty frame")
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the cap of {self.max_frame}")

    @staticmethod
    def _parse(frame: memoryview) -> Message:
        try:
            return decode_payload(frame[4], frame[5:])
        except ValueError as e:  # a field the message's own checks refuse
            raise ProtocolError(str(e)) from None
