# -*- test-case-name: tests.test_tracker_auth -*-
"""
Users, passwords and bearer tokens (the seed's claim 34), as pure functions.

Passwords are hashed with scrypt (C{cryptography}'s L{Scrypt}, a memory-hard
KDF; OpenSSL does the work).  A stored hash names its parameters, so they can
be raised later without invalidating old hashes::

    scrypt$ln=15,r=8,p=1$<salt, base64>$<32-byte key, base64>

(C{2**15 * 128 * 8} = 32 MiB and about 50 ms per check.)

A login gives an opaque bearer token: 32 random bytes, URL-safe base64.  The
tracker stores only its SHA-256 (L{token_digest}), so a copy of the database
holds no usable token.  Tokens expire; disabling a user revokes them.

Roles:
  - C{admin}: everything, including the usage export;
  - C{server}: a content server (and publisher): may register manifests and
    announce itself in the server list;
  - C{user}: a viewer's box: announce, look up nodes, report usage, reserve.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets

from attrs import frozen
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

ADMIN = "admin"
SERVER = "server"
USER = "user"
ROLES = (ADMIN, SERVER, USER)

#: Who may publish manifests.
PUBLISHERS = frozenset({ADMIN, SERVER})
#: Every role: any authenticated caller.
ANYONE = frozenset(ROLES)
ADMINS = frozenset({ADMIN})

USER_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}\Z")
MAX_PASSWORD = 1024

#: scrypt cost for new hashes: log2(N), r, p.
DEFAULT_COST = (15, 8, 1)
_KEY_LENGTH = 32
_SALT_LENGTH = 16
_MAX_LOG_N = 20  # refuse stored hashes that would cost more than 1 GiB


class PasswordHashError(ValueError):
    """A stored password hash is not one this module wrote."""


@frozen
class Principal:
    """Who made a request: an enabled user and their role."""

    name: str
    role: str


def valid_user_name(name: object) -> bool:
    return isinstance(name, str) and USER_NAME_RE.match(name) is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    kdf = Scrypt(salt=salt, length=_KEY_LENGTH, n=2**log_n, r=r, p=p)
    return kdf.derive(password.encode("utf-8"))


def hash_password(password: str, cost: tuple[int, int, int] = DEFAULT_COST) -> str:
    """Hash C{password} with a fresh salt; blocking (about 50 ms): call it off the reactor."""
    log_n, r, p = cost
    salt = os.urandom(_SALT_LENGTH)
    key = _scrypt(password, salt, log_n, r, p)
    return f"scrypt$ln={log_n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, params, salt_text, key_text = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        values = dict(item.split("=", 1) for item in params.split(","))
        log_n, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        salt = base64.b64decode(salt_text, validate=True)
        key = base64.b64decode(key_text, validate=True)
    except (ValueError, KeyError) as e:
        raise PasswordHashError(f"not a meshstream password hash: {e}") from None
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= 32 and 1 <= p <= 16 and key):
        raise PasswordHashError("password hash parameters out of range")
    return log_n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    """
    Whether C{password} matches C{stored}; blocking, like L{hash_password}.

    A malformed C{stored} raises L{PasswordHashError}.
    """
    log_n, r, p, salt, key = _parse_hash(stored)
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p), key)


#: Checked against when the user does not exist, so that a login for an
#: unknown name costs as much as one with a wrong password.
DUMMY_HASH = "scrypt$ln=15,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def new_token() -> str:
    """A fresh bearer token (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the tracker stores of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_bearer(header: bytes | None) -> str | None:
    """The token of an C{Authorization: Bearer TOKEN} header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = value.strip()
    if not token or len(token) > 256 or not token.isascii():
        return None
    return token.decode("ascii")
