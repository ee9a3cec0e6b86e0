"""
Tests for L{meshstream.wire.frames}: the sans-IO frame codec.

Examples for every message type and every way a frame can be malformed, and
hypothesis properties for the incremental decoder: any split of a valid stream
decodes the same, and any split of arbitrary bytes ends the same way as
feeding them whole, never buffering more than C{4 + max_frame} bytes.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshstream.wire import frames as F

CID = bytes(range(32))
CID2 = bytes(range(100, 132))

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
CIDS = st.binary(min_size=32, max_size=32)
SUBS = st.lists(st.integers(0, F.WHOLE_REQUEST - 1), min_size=1, max_size=12).map(tuple)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10)


def _short_text(limit: int) -> st.SearchStrategy[str]:
    """Text whose UTF-8 form fits the field, so it survives the round trip unchanged."""
    return st.text(max_size=40).filter(lambda s: len(s.encode("utf-8")) <= limit)


def _ranges() -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    pair = st.tuples(U32, U32).map(lambda p: (min(p), max(p)))
    return st.lists(pair, max_size=8).map(tuple)


MESSAGES: st.SearchStrategy[F.Message] = st.one_of(
    st.builds(
        F.Hello,
        node_id=_short_text(255),
        min_version=U16,
        max_version=U16,
        ticket=st.binary(max_size=40),
    ),
    st.builds(F.Have, CIDS, _ranges()),
    st.builds(F.Request, CIDS, U32, SUBS),
    st.builds(F.Data, CIDS, U32, U16, st.binary(max_size=120)),
    st.builds(F.Cancel, CIDS, U32, SUBS),
    st.builds(F.Reject, CIDS, U32, U16, U8, _short_text(1024)),
    st.builds(F.Hashes, CIDS, U32, st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple)),
    st.builds(F.Ping, U64),
    st.builds(F.Pong, U64),
    st.builds(F.State, st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=5)),
    st.builds(F.Bye, U8, _short_text(1024)),
)


def frame(mtype: int, payload: bytes) -> bytes:
    """A raw frame with a correct length header."""
    return struct.pack(">IB", len(payload) + 1, mtype) + payload


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at the given offsets (any order, clamped, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces = []
    start = 0
    for p in [*points, len(data)]:
        pieces.append(data[start:p])
        start = p
    return pieces


Outcome = tuple[list[F.Message], str | None, int]


def run_decoder(pieces: list[bytes], max_frame: int, checker: SynchronousTestCase) -> Outcome:
    """
    Feed C{pieces} one by one; return the messages, the ProtocolError text (if
    any) and the bytes left buffered.  Checks the buffering cap after every
    feed, and that a failed decoder keeps failing with the same error.
    """
    decoder = F.FrameDecoder(max_frame)
    messages: list[F.Message] = []
    for piece in pieces:
        try:
            for msg in decoder.iter_feed(piece):
                messages.append(msg)
        except F.ProtocolError as e:
            again = checker.assertRaises(F.ProtocolError, decoder.feed, b"")
            checker.assertEqual(str(again), str(e))
            return messages, str(e), decoder.buffered
        checker.assertLessEqual(decoder.buffered, 4 + max_frame)
    return messages, None, decoder.buffered


class RoundTripTests(SynchronousTestCase):
    """Every message type survives encode then decode."""

    EXAMPLES: list[F.Message] = [
        F.Hello(node_id="node-1"),
        F.Hello(node_id="ünïcødé", min_version=2, max_version=7, ticket=b"\x00secret\xff"),
        F.Have(CID, ()),
        F.Have(CID, ((0, 0), (3, 9), (10, 0xFFFFFFFF))),
        F.Request(CID, 7, (0, 1, 2, F.WHOLE_REQUEST - 1)),
        F.Data(CID, 0xFFFFFFFF, 15, b"payload bytes"),
        F.Data(CID, 0, 0, b""),
        F.Cancel(CID2, 3, (5,)),
        F.Reject(CID, 4, F.WHOLE_REQUEST, F.RejectCode.NOT_HELD, "not held"),
        F.Reject(CID, 4, 2, F.RejectCode.BUSY, ""),
        F.Hashes(CID, 2, (b"a" * 32, b"b" * 32, b"c" * 32)),
        F.Hashes(CID, 2, ()),
        F.Ping(0),
        F.Ping(0xFFFFFFFFFFFFFFFF),
        F.Pong(12345678901234),
        F.State({"upload_bps": 1000, "load": 0.25, "name": "x", "nested": {"a": [1, 2]}}),
        F.State({}),
        F.Bye(),
        F.Bye(F.ByeCode.VERSION_MISMATCH, "we speak 1..1"),
    ]

    def test_examples(self) -> None:
        for msg in self.EXAMPLES:
            with self.subTest(msg=msg):
                encoded = F.encode(msg)
                self.assertEqual(struct.unpack(">I", encoded[:4])[0], len(encoded) - 4)
                self.assertEqual(encoded[4], msg.TYPE)
                self.assertEqual(F.FrameDecoder().feed(encoded), [msg])

    def test_every_type_covered(self) -> None:
        self.assertEqual({m.TYPE for m in self.EXAMPLES}, set(range(1, 12)))

    @given(MESSAGES)
    def test_property_round_trip(self, msg: F.Message) -> None:
        decoder = F.FrameDecoder()
        self.assertEqual(decoder.feed(F.encode(msg)), [msg])
        self.assertEqual(decoder.buffered, 0)

    def test_data_header_plus_data_is_data_frame(self) -> None:
        for data in (b"", b"x", bytes(range(256)) * 5):
            header = F.encode_data_header(CID, 9, 3, len(data))
            self.assertEqual(header + data, F.encode(F.Data(CID, 9, 3, data)))

    @given(CIDS, U32, U16, st.binary(max_size=300))
    def test_property_data_header(self, cid: bytes, block: int, sub: int, data: bytes) -> None:
        self.assertEqual(
            F.encode_data_header(cid, block, sub, len(data)) + data, F.encode(F.Data(cid, block, sub, data))
        )

    def test_long_strings_cut_on_character_boundary(self) -> None:
        decoder = F.FrameDecoder()
        [hello] = decoder.feed(F.encode(F.Hello(node_id="é" * 200)))
        self.assertEqual(hello, F.Hello(node_id="é" * 127))  # 254 bytes: 255 would split a character
        [bye] = decoder.feed(F.encode(F.Bye(F.ByeCode.NORMAL, "x" + "\U0001f600" * 300)))
        assert isinstance(bye, F.Bye)
        self.assertEqual(bye.reason, "x" + "\U0001f600" * 255)  # 1021 bytes
        [hello] = decoder.feed(F.encode(F.Hello(node_id="n" * 300)))
        self.assertEqual(hello, F.Hello(node_id="n" * 255))
        [reject] = decoder.feed(F.encode(F.Reject(CID, 0, 0, 1, "r" * 2000)))
        assert isinstance(reject, F.Reject)
        self.assertEqual(reject.reason, "r" * 1024)

    @given(st.text(max_size=600), st.text(max_size=1500))
    def test_property_any_string_encodes_decodably(self, node_id: str, reason: str) -> None:
        decoder = F.FrameDecoder()
        [hello, bye] = decoder.feed(F.encode(F.Hello(node_id=node_id)) + F.encode(F.Bye(1, reason)))
        assert isinstance(hello, F.Hello) and isinstance(bye, F.Bye)
        for got, sent, limit in ((hello.node_id, node_id, 255), (bye.reason, reason, 1024)):
            self.assertTrue(sent.startswith(got))
            raw = got.encode("utf-8")
            self.assertLessEqual(len(raw), limit)
            # Cut no shorter than needed: the next character would not have fitted.
            if got != sent:
                self.assertGreater(len(raw) + len(sent[len(got)].encode("utf-8")), limit)

    def test_validators_refuse_bad_messages(self) -> None:
        self.assertRaises(ValueError, F.Request, b"short", 0, (0,))
        self.assertRaises(ValueError, F.Request, CID, 0, ())
        self.assertRaises(ValueError, F.Request, CID, 0, (F.WHOLE_REQUEST,))
        self.assertRaises(ValueError, F.Request, CID, 0, tuple(range(F.MAX_SUBS + 1)))
        self.assertRaises(ValueError, F.Cancel, CID, -1, (0,))
        self.assertRaises(ValueError, F.Cancel, CID, 1 << 32, (0,))
        self.assertRaises(ValueError, F.Have, CID[:31], ())
        self.assertRaises(ValueError, F.encode, F.State({"x": "y" * F.MAX_STATE_BYTES}))
        self.assertRaises(ValueError, F.encode, F.Hello(node_id="n", ticket=b"t" * 0x10000))


class SplitProperties(SynchronousTestCase):
    @settings(max_examples=200)
    @given(st.lists(MESSAGES, max_size=6), st.lists(st.integers(0, 4000), max_size=20))
    def test_valid_stream_any_split(self, messages: list[F.Message], cuts: list[int]) -> None:
        stream = b"".join(F.encode(m) for m in messages)
        got, error, left = run_decoder(split_at(stream, cuts), F.DEFAULT_MAX_FRAME, self)
        self.assertIsNone(error)
        self.assertEqual(got, messages)
        self.assertEqual(left, 0)

    @given(st.lists(MESSAGES, max_size=6))
    def test_valid_stream_byte_by_byte(self, messages: list[F.Message]) -> None:
        stream = b"".join(F.encode(m) for m in messages)
        pieces = [stream[i : i + 1] for i in range(len(stream))]
        self.assertEqual(run_decoder(pieces, F.DEFAULT_MAX_FRAME, self), (messages, None, 0))

    @settings(max_examples=300)
    @given(
        st.lists(
            st.one_of(
                MESSAGES.map(F.encode),
                st.binary(max_size=40),
                # A plausible header with a random length around the cap.
                st.integers(0, 400).map(lambda n: struct.pack(">I", n)),
                st.tuples(st.integers(1, 11), st.binary(max_size=60)).map(lambda t: frame(*t)),
            ),
            max_size=6,
        ).map(b"".join),
        st.lists(st.integers(0, 1500), max_size=12),
    )
    def test_arbitrary_bytes_any_split(self, data: bytes, cuts: list[int]) -> None:
        max_frame = 300
        whole = run_decoder([data], max_frame, self)
        split = run_decoder(split_at(data, cuts), max_frame, self)
        self.assertEqual(split, whole)


class MalformedFrames(SynchronousTestCase):
    def assertFails(self, data: bytes, fragment: str, max_frame: int = F.DEFAULT_MAX_FRAME) -> None:
        decoder = F.FrameDecoder(max_frame)
        e = self.assertRaises(F.ProtocolError, decoder.feed, data)
        self.assertIn(fragment, str(e))
        self.assertEqual(decoder.buffered, 0)
        # Failed for good: even a perfectly valid frame is refused now.
        e2 = self.assertRaises(F.ProtocolError, decoder.feed, F.encode(F.Ping(1)))
        self.assertEqual(str(e2), str(e))

    def test_oversized_length_refused_on_header_alone(self) -> None:
        decoder = F.FrameDecoder(max_frame=300)
        e = self.assertRaises(F.ProtocolError, decoder.feed, struct.pack(">I", 301))
        self.assertIn("exceeds the cap", str(e))
        self.assertEqual(decoder.buffered, 0)

    def test_oversized_length_refused_when_header_completes(self) -> None:
        decoder = F.FrameDecoder(max_frame=300)
        header = struct.pack(">I", 0xFFFFFFFF)
        self.assertEqual(decoder.feed(header[:1]), [])
        self.assertEqual(decoder.feed(header[1:3]), [])
        self.assertEqual(decoder.buffered, 3)
        self.assertRaises(F.ProtocolError, decoder.feed, header[3:])

    def test_oversized_after_valid_frame_in_same_chunk(self) -> None:
        decoder = F.FrameDecoder(max_frame=300)
        got: list[F.Message] = []
        with self.assertRaises(F.ProtocolError):
            for msg in decoder.iter_feed(F.encode(F.Ping(5)) + struct.pack(">I", 1000)):
                got.append(msg)
        self.assertEqual(got, [F.Ping(5)])

    def test_length_at_cap_is_buffered(self) -> None:
        decoder = F.FrameDecoder(max_frame=300)
        data = F.encode(F.Data(CID, 1, 2, b"z" * (300 - 1 - 32 - 6)))
        self.assertEqual(len(data), 304)
        self.assertEqual(decoder.feed(data[:-1]), [])
        self.assertEqual(decoder.buffered, 303)
        self.assertEqual(decoder.feed(data[-1:]), [F.Data(CID, 1, 2, b"z" * 261)])

    def test_zero_length(self) -> None:
        self.assertFails(b"\0\0\0\0", "empty frame")

    def test_unknown_type(self) -> None:
        self.assertFails(frame(0, b""), "unknown message type 0")
        self.assertFails(frame(12, b"abc"), "unknown message type 12")
        self.assertFails(frame(255, b""), "unknown message type 255")

    def test_truncated_payloads(self) -> None:
        for mtype in range(1, 12):
            if mtype == F.State.TYPE:
                continue  # an empty STATE is "not JSON", checked below
            with self.subTest(mtype=mtype):
                self.assertFails(frame(mtype, b""), "shorter than its fields")
        self.assertFails(frame(F.Ping.TYPE, b"\0" * 7), "shorter than its fields")
        self.assertFails(frame(F.Request.TYPE, CID + b"\0\0\0\1" + b"\0\2" + b"\0\1"), "shorter")
        self.assertFails(frame(F.Hashes.TYPE, CID + b"\0\0\0\1" + b"\0\1" + b"x" * 31), "shorter")
        self.assertFails(frame(F.Have.TYPE, CID + b"\0\0\0\2" + b"\0" * 8), "shorter")
        self.assertFails(frame(F.Data.TYPE, CID + b"\0\0\0\1\0"), "shorter")
        self.assertFails(frame(F.Hello.TYPE, b"\0\1\0\1\5abc"), "shorter")

    def test_trailing_bytes(self) -> None:
        for msg in (F.Ping(1), F.Bye(0, "x"), F.Request(CID, 1, (2,)), F.Hashes(CID, 0, (b"l" * 32,))):
            with self.subTest(msg=msg):
                good = F.encode(msg)
                self.assertFails(frame(msg.TYPE, good[5:] + b"!"), "trailing bytes")

    def test_bad_utf8(self) -> None:
        self.assertFails(frame(F.Bye.TYPE, b"\0\0\2\xc3\x28"), "not UTF-8")
        self.assertFails(frame(F.Hello.TYPE, b"\0\1\0\1\1\xff\0\0"), "not UTF-8")
        self.assertFails(frame(F.Reject.TYPE, CID + b"\0\0\0\0\0\0\1\0\1\x80"), "not UTF-8")

    def test_bad_state(self) -> None:
        self.assertFails(frame(F.State.TYPE, b"{not json"), "not JSON")
        self.assertFails(frame(F.State.TYPE, b"\xff\xfe"), "not JSON")
        self.assertFails(frame(F.State.TYPE, b"[1, 2]"), "not a JSON object")
        self.assertFails(frame(F.State.TYPE, b"{}" + b" " * F.MAX_STATE_BYTES), "state too large")

    def test_have_range_backwards(self) -> None:
        self.assertFails(frame(F.Have.TYPE, CID + b"\0\0\0\1" + struct.pack(">II", 5, 4)), "range ends")

    def test_have_too_many_ranges(self) -> None:
        self.assertFails(frame(F.Have.TYPE, CID + struct.pack(">I", F.MAX_HAVE_RANGES + 1)), "too many")

    def test_sub_index_whole_request_in_request_and_cancel(self) -> None:
        for mtype in (F.Request.TYPE, F.Cancel.TYPE):
            payload = CID + struct.pack(">IHHH", 3, 2, 1, F.WHOLE_REQUEST)
            self.assertFails(frame(mtype, payload), "sub block index out of range")

    def test_sub_count_out_of_range(self) -> None:
        self.assertFails(frame(F.Request.TYPE, CID + struct.pack(">IH", 3, 0)), "count 0 out of range")
        n = F.MAX_SUBS + 1
        payload = CID + struct.pack(">IH", 3, n) + b"\0\1" * n
        self.assertFails(frame(F.Cancel.TYPE, payload), "out of range")

    def test_too_many_leaves(self) -> None:
        n = F.MAX_SUBS + 1
        self.assertFails(frame(F.Hashes.TYPE, CID + struct.pack(">IH", 0, n) + b"h" * 32 * n), "too many")

    def test_error_keeps_failing_across_feeds(self) -> None:
        decoder = F.FrameDecoder()
        self.assertEqual(decoder.feed(F.encode(F.Ping(1)) + b"\0\0"), [F.Ping(1)])
        e = self.assertRaises(F.ProtocolError, decoder.feed, b"\0\0")
        for extra in (b"", F.encode(F.Pong(2)), b"\0\0\0\5"):
            again = self.assertRaises(F.ProtocolError, decoder.feed, extra)
            self.assertIs(again, e)
