# -*- test-case-name: tests.test_tickets -*-
"""
Tests for L{meshstream.tickets}: issuing and verifying peer tickets.
"""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshstream import tickets
from meshstream.tickets import CLOCK_SKEW, PREFIX, Ticket, TicketError, issue, verify
from meshstream.wire import frames as F

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
CID = "ab" * 32
NOW = 1_700_000_000.0
TICKET = Ticket(user="alice", node="box-1", content=CID, expires=int(NOW) + 300)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed_payload(payload: bytes, key: Ed25519PrivateKey = KEY) -> bytes:
    """A well-signed ticket around any payload bytes."""
    signed = PREFIX + b64(payload)
    return signed + b"." + b64(key.sign(signed))


class TicketTests(SynchronousTestCase):
    def reason(self, data: bytes, now: float = NOW, node: str = "box-1") -> str:
        with self.assertRaises(TicketError) as ctx:
            verify(PUB, data, now, node)
        self.assertTrue(str(ctx.exception))
        return ctx.exception.reason

    def test_round_trip(self) -> None:
        data = issue(KEY, TICKET)
        self.assertTrue(data.startswith(b"mt1."))
        self.assertTrue(data.isascii())
        self.assertEqual(verify(PUB, data, NOW, "box-1"), TICKET)

    def test_fits_hello(self) -> None:
        """The longest ticket (64-character names) is small and goes through a HELLO frame."""
        big = Ticket(user="u" * 64, node="n" * 64, content=CID, expires=2**40)
        data = issue(KEY, big)
        self.assertLess(len(data), 600)
        (hello,) = F.FrameDecoder().feed(F.encode(F.Hello(node_id="n" * 64, ticket=data)))
        assert isinstance(hello, F.Hello)
        self.assertEqual(verify(PUB, hello.ticket, 0, "n" * 64), big)

    def test_payload_is_canonical_json(self) -> None:
        data = issue(KEY, TICKET)
        payload = base64.urlsafe_b64decode(data.split(b".")[1] + b"==")
        self.assertEqual(
            payload,
            b'{"content":"' + CID.encode() + b'","expires":1700000300,"node":"box-1","user":"alice"}',
        )

    def test_expiry_with_skew(self) -> None:
        data = issue(KEY, TICKET)
        last = TICKET.expires + CLOCK_SKEW
        self.assertEqual(verify(PUB, data, last, "box-1"), TICKET)
        self.assertEqual(self.reason(data, now=last + 0.001), "expired")
        self.assertEqual(self.reason(data, now=last + 86400), "expired")

    def test_wrong_node(self) -> None:
        self.assertEqual(self.reason(issue(KEY, TICKET), node="box-2"), "wrong_node")

    def test_other_key(self) -> None:
        self.assertEqual(self.reason(issue(Ed25519PrivateKey.generate(), TICKET)), "bad_signature")

    def test_forged_payload(self) -> None:
        """Another payload under a genuine signature does not verify."""
        genuine = issue(KEY, TICKET)
        forged_ticket = Ticket(user="mallory", node="box-1", content=CID, expires=TICKET.expires + 10**6)
        forged = PREFIX + b64(forged_ticket.payload()) + b"." + genuine.rsplit(b".", 1)[1]
        self.assertEqual(self.reason(forged), "bad_signature")

    def test_flipped_signature_bit(self) -> None:
        data = issue(KEY, TICKET)
        signed, _, sig = data.rpartition(b".")
        raw = bytearray(base64.urlsafe_b64decode(sig + b"=="))
        raw[10] ^= 0x01
        self.assertEqual(self.reason(signed + b"." + b64(bytes(raw))), "bad_signature")

    def test_unsigned_prefix_version(self) -> None:
        """The version prefix is signed: changing it breaks the ticket."""
        data = issue(KEY, TICKET)
        self.assertEqual(self.reason(b"mt2." + data[4:]), "malformed")

    def test_malformed(self) -> None:
        good = issue(KEY, TICKET)
        for data in (
            b"",
            b"mt1.",
            b"mt1..",
            b"garbage",
            b"mt1.abc",  # no signature
            good + b"=",
            good.replace(b".", b"!", 1),
            good[:-3],  # signature cut short
            good + b"AAAA",  # signature too long
            b"mt1." + b"A" * 3000 + b"." + good.rsplit(b".", 1)[1],
            good.replace(b"mt1.", b"mt1.\xff"),
            b"\x00" * 100,
        ):
            with self.subTest(data=data[:40]):
                self.assertEqual(self.reason(data), "malformed")

    def test_signed_but_bad_payload(self) -> None:
        """A tracker-signed payload of the wrong shape is malformed, not trusted."""
        good = json.loads(TICKET.payload())
        for payload in (
            b"not json",
            b"\xff\xfe",
            b"[]",
            json.dumps({**good, "extra": 1}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "user"}).encode(),
            json.dumps({**good, "content": "AB" * 32}).encode(),
            json.dumps({**good, "content": "ab"}).encode(),
            json.dumps({**good, "expires": "soon"}).encode(),
            json.dumps({**good, "expires": 1.5}).encode(),
            json.dumps({**good, "expires": True}).encode(),
            json.dumps({**good, "expires": -1}).encode(),
            json.dumps({**good, "node": "a b"}).encode(),
            json.dumps({**good, "user": ""}).encode(),
        ):
            with self.subTest(payload=payload):
                self.assertEqual(self.reason(signed_payload(payload)), "malformed")

    def test_ticket_fields_validated(self) -> None:
        for kwargs in (
            {"content": "xyz"},
            {"node": ""},
            {"node": "n" * 65},
            {"user": ""},
            {"expires": -5},
            {"expires": 1.0},
        ):
            with self.subTest(kwargs=kwargs), self.assertRaises(ValueError):
                Ticket(**{"user": "u", "node": "n", "content": CID, "expires": 1, **kwargs})  # type: ignore[arg-type]

    def test_checker_gives_the_content(self) -> None:
        clock = [NOW]
        check = tickets.checker(PUB, lambda: clock[0])
        data = issue(KEY, TICKET)
        self.assertEqual(check("box-1", data), bytes.fromhex(CID))
        self.assertRaises(TicketError, check, "box-2", data)
        clock[0] = NOW + 10_000
        self.assertRaises(TicketError, check, "box-1", data)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=0), st.data())
    def test_any_truncation_or_bit_flip_refused(self, cut: int, data: st.DataObject) -> None:
        good = issue(KEY, TICKET)
        cut = cut % len(good)
        with self.assertRaises(TicketError):
            verify(PUB, good[:cut], NOW, "box-1")
        i = data.draw(st.integers(0, len(good) - 1))
        bit = data.draw(st.integers(0, 7))
        flipped = bytearray(good)
        flipped[i] ^= 1 << bit
        try:
            got = verify(PUB, bytes(flipped), NOW, "box-1")
        except TicketError:
            return
        # Only a change the base64 decoder ignores (the unused low bits of
        # the signature's last character) may leave the ticket valid.
        self.assertEqual(got, TICKET)
        self.assertEqual(i, len(good) - 1)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=3000))
    def test_random_bytes_refused(self, data: bytes) -> None:
        with self.assertRaises(TicketError):
            verify(PUB, data, NOW, "box-1")

    @settings(max_examples=50, deadline=None)
    @given(
        user=st.text(min_size=1, max_size=64),
        node=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
        content=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        expires=st.integers(0, 2**53 - 1),
    )
    def test_round_trip_any(self, user: str, node: str, content: str, expires: int) -> None:
        ticket = Ticket(user=user, node=node, content=content, expires=expires)
        self.assertEqual(verify(PUB, issue(KEY, ticket), 0, node), ticket)
