# -*- test-case-name: tests.test_tickets -*-
"""
Peer tickets: the tracker's signed permission for one node to fetch one
content from other nodes, for a short while.

When an agent asks the tracker for the nodes of a content it gets a ticket
(L{issue}) and presents it in its HELLO; a serving agent checks it offline
with the tracker's public key (L{verify}) and refuses the peer without one.

Wire form (ASCII, about 280 bytes, 425 at most with 64-character names; the
HELLO ticket field holds 65 535)::

    mt1.<base64url(payload)>.<base64url(signature)>

C{base64url} is RFC 4648 §5 without padding.  C{payload} is the canonical
JSON (sorted keys, no spaces, UTF-8) of C{{"content", "expires", "node",
"user"}}: the 64-hex content id, the expiry as whole Unix seconds, the node
id the ticket was issued to, and the tracker user who asked.  C{signature}
is the tracker's Ed25519 signature of the bytes before the last dot
(C{mt1.<payload>}), so the version prefix is signed too, and no ticket can
pass for a signed manifest (which is JSON, starting with C{{}) or the other
way round.

A ticket is valid until C{expires + CLOCK_SKEW}: the serving agent's clock
may lag or lead the tracker's by up to L{CLOCK_SKEW} seconds.  A ticket is a
bearer token bound to a node id, which a peer only claims in its HELLO: on
plain TCP a ticket seen on the wire could be replayed under that node id
until it expires (TLS between peers, and the short lifetime, limit this).

Pure: no Twisted, no clock of its own (C{now} is an argument).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable

from attrs import field, frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = b"mt1."
#: Seconds a ticket is still accepted after its expiry (clock skew between
#: the tracker and the serving agent).
CLOCK_SKEW = 30.0
#: A ticket longer than this is malformed before anything is decoded.
MAX_TICKET = 2048
SIGNATURE_SIZE = 64

_CONTENT = re.compile(r"[0-9a-f]{64}\Z")
_NODE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_USER_MAX = 256
_B64 = re.compile(rb"[A-Za-z0-9_-]+\Z")
_FIELDS = frozenset({"content", "expires", "node", "user"})


class TicketError(Exception):
    """
    A ticket that does not let its bearer in.

    @ivar reason: one of C{"malformed"}, C{"bad_signature"}, C{"expired"},
        C{"wrong_node"}.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_content(_i: object, _a: object, value: str) -> None:
    if not isinstance(value, str) or not _CONTENT.match(value):
        raise ValueError("content must be 64 lowercase hex characters")


def _check_node(_i: object, _a: object, value: str) -> None:
    if not isinstance(value, str) or not _NODE.match(value):
        raise ValueError("node must be 1 to 64 characters of [A-Za-z0-9._-]")


def _check_user(_i: object, _a: object, value: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= _USER_MAX:
        raise ValueError(f"user must be a string of 1 to {_USER_MAX} characters")


def _check_expires(_i: object, _a: object, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ValueError("expires must be a non-negative integer (Unix seconds)")


@frozen
class Ticket:
    """What a ticket says: C{user}'s node C{node} may fetch C{content} until C{expires}."""

    user: str = field(validator=_check_user)
    node: str = field(validator=_check_node)
    content: str = field(validator=_check_content)
    expires: int = field(validator=_check_expires)

    def payload(self) -> bytes:
        """The canonical JSON the signature covers (inside the base64)."""
        doc = {"content": self.content, "expires": self.expires, "node": self.node, "user": self.user}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    if not _B64.match(text) or len(text) % 4 == 1:
        raise TicketError("malformed", "the ticket is not base64url")
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TicketError("malformed", "the ticket is not base64url") from None


def issue(key: Ed25519PrivateKey, ticket: Ticket) -> bytes:
    """The signed wire form of C{ticket} (ASCII bytes)."""
    signed = PREFIX + _b64(ticket.payload())
    return signed + b"." + _b64(key.sign(signed))


def _parse(payload: bytes) -> Ticket:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise TicketError("malformed", "the ticket payload is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise TicketError("malformed", "the ticket payload has the wrong fields")
    try:
        return Ticket(user=doc["user"], node=doc["node"], content=doc["content"], expires=doc["expires"])
    except ValueError as e:
        raise TicketError("malformed", f"the ticket payload is invalid: {e}") from None


def verify(public_key: Ed25519PublicKey, data: bytes, now: float, node_id: str) -> Ticket:
    """
    Check a ticket presented by node C{node_id} at time C{now}: return what
    it says, or raise L{TicketError} saying why it is refused.
    """
    if not data:
        raise TicketError("malformed", "no ticket")
    if len(data) > MAX_TICKET:
        raise TicketError("malformed", f"the ticket is longer than {MAX_TICKET} bytes")
    if not data.startswith(PREFIX):
        raise TicketError("malformed", "not a version 1 ticket")
    signed, dot, sig_text = data.rpartition(b".")
    if not dot or not signed.startswith(PREFIX):
        raise TicketError("malformed", "the ticket has no signature")
    signature = _unb64(sig_text)
    if len(signature) != SIGNATURE_SIZE:
        raise TicketError("malformed", "the ticket signature has the wrong size")
    payload = _unb64(signed[len(PREFIX) :])
    try:
        public_key.verify(signature, signed)
    except InvalidSignature:
        raise TicketError("bad_signature", "the ticket is not signed by the tracker") from None
    ticket = _parse(payload)
    if ticket.node != node_id:
        raise TicketError("wrong_node", f"the ticket was issued to node {ticket.node}, not {node_id}")
    if now > ticket.expires + CLOCK_SKEW:
        raise TicketError("expired", f"the ticket expired at {ticket.expires}")
    return ticket


def checker(public_key: Ed25519PublicKey, now: Callable[[], float]) -> Callable[[str, bytes], bytes]:
    """
    A L{meshstream.wire.protocol.TicketChecker}: verifies a HELLO's ticket
    at C{now()} and returns the binary content id the peer may ask for.
    """

    def check(node_id: str, data: bytes) -> bytes:
        return bytes.fromhex(verify(public_key, data, now(), node_id).content)

    return check
