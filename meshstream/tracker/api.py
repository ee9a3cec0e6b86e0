# -*- test-case-name: tests.test_tracker_api -*-
"""
The tracker's HTTP/JSON API (version 1), served by L{meshstream.tracker.http1}.

L{TrackerAPI} holds what the handlers need (the store, the signing key, the
clock and the announce timing) and L{TrackerAPI.handler} answers its
requests.  Requests are routed in one place (L{_ROUTES}); every handler
returns (or fires with) a L{Reply} or raises L{ApiError}, and
L{TrackerHandler} turns both into JSON (or, for a L{Reply} with a C{content_type}, writes its
bytes as they are: the CSV usage export).  Anything else that goes wrong is
logged with its traceback and answered with a 500 JSON error.  Every answered
request is counted in the tracker's L{TrackerMetrics} and logged as one
structured event (see L{TrackerHandler}).

Request bodies are validated by pure functions (L{parse_announce},
L{parse_node_id}, ...) that raise L{ApiError}; nothing is written to the
store unless the whole body is valid.  See docs/api.md for the endpoints.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from ipaddress import ip_address
from random import Random
from typing import Any

from attrs import define, field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshstream import tickets
from meshstream.coalesce import Coalesced
from meshstream.manifest import Manifest, ManifestError, public_key_text
from meshstream.tracker import auth, billing, catalog
from meshstream.tracker.auth import Principal
from meshstream.tracker.catalog import ContentInfo
from meshstream.tracker.http1 import JSON_HEADERS, ApiRequest, Response, error_body, path_segments
from meshstream.tracker.metrics import (
    LOGIN_BAD_CREDENTIALS,
    LOGIN_DISABLED,
    LOGIN_OK,
    LOGIN_THROTTLED,
    UNMATCHED,
    TrackerMetrics,
)
from meshstream.tracker.ranking import candidate_count, spread_candidates, spread_nodes
from meshstream.tracker.store import (
    PEER,
    SCHEMA_VERSION,
    SERVER,
    Announced,
    Candidate,
    NodeOwned,
    NodeRecord,
    ReservationLimit,
    TrackerStore,
    UsageResult,
)
from meshstream.tracker.throttle import LoginThrottle

log = Logger()

KIB = 1024
MIB = 1024 * KIB
DEFAULT_ANNOUNCE_LIMIT = 1 * MIB
DEFAULT_MANIFEST_LIMIT = 16 * MIB
USAGE_LIMIT = 2 * MIB  # 10000 entries of about 150 bytes
SMALL_BODY_LIMIT = 64 * KIB  # leave
#: Seconds the health check waits for the database.
HEALTH_TIMEOUT = 2.0

MAX_CONTENTS = 10_000
DEFAULT_NODES_LIMIT = 50
MAX_NODES_LIMIT = 200
MAX_EXCLUDE = 1000
MAX_HOST = 253

CONTENT_ID_RE = re.compile(r"[0-9a-f]{64}\Z")
CONTENT_IDS_RE = re.compile(r"[0-9a-f]*\Z")  # content ids end to end (each checked for length)
NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
HOST_RE = re.compile(r"[A-Za-z0-9.:_-]*\Z")

# State fields a node may report, and the largest value each may take.
STATE_FIELDS: Mapping[str, float] = {
    "upload_bps": math.inf,
    "upload_capacity_bps": math.inf,
    "download_bps": math.inf,
    "cpu": 1.0,
    "memory": 1.0,
    "connections": math.inf,
    "disk_io_bps": math.inf,
    "upload_slots": math.inf,
}
INTEGER_FIELDS = frozenset({"connections", "upload_slots"})
#: The roles that may announce a node of kind C{server} (a content server).
SERVER_ANNOUNCERS = frozenset({auth.SERVER, auth.ADMIN})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class ApiError(Exception):
    """A request the tracker refuses: becomes a JSON error with a 4xx status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@frozen
class Reply:
    """
    A successful answer: a status and a JSON-able body, or the body's bytes
    as they are: JSON already encoded without a C{content_type}, anything
    with one.
    """

    status: int
    body: object
    content_type: str | None = None


# -- validators (pure) -------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every body and one encoder for every answer (json.loads
# and json.dumps given an argument build one per call).
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"))


def parse_json(body: bytes) -> object:
    """Decode a JSON request body; raise L{ApiError} C{bad_json}."""
    try:
        return _JSON_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {e}") from None


def parse_content_id(value: object) -> str:
    if not isinstance(value, str) or not CONTENT_ID_RE.match(value):
        raise ApiError(400, "bad_content_id", "a content id is 64 lowercase hex characters")
    return value


def parse_node_id(value: object) -> str:
    if not isinstance(value, str) or not NODE_ID_RE.match(value):
        raise bad_request("node_id must be 1 to 64 characters of [A-Za-z0-9._-]")
    return value


def parse_address(value: object) -> tuple[str, int]:
    """
    Split C{host:port} (IPv6 hosts may be bracketed: C{[::1]:7000}).

    The host comes back without brackets; it may be empty or a wildcard,
    which the caller replaces with the client's address.
    """
    if not isinstance(value, str) or len(value) > MAX_HOST + 8:
        raise bad_request("address must be a 'host:port' string")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise bad_request("address must be a 'host:port' string")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise bad_request("only IPv6 addresses may be bracketed") from None
    if not HOST_RE.match(host) or len(host) > MAX_HOST:
        raise bad_request("address has an invalid host")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise bad_request("address has an invalid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise bad_request("port must be between 1 and 65535")
    return host, port


def format_address(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_state(value: object) -> dict[str, int | float]:
    """Keep the known numeric state fields; unknown keys are dropped."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("state must be an object")
    state: dict[str, int | float] = {}
    for name, limit in STATE_FIELDS.items():
        if name not in value:
            continue
        v = value[name]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise bad_request(f"state.{name} must be a number")
        if name in INTEGER_FIELDS and not isinstance(v, int):
            raise bad_request(f"state.{name} must be an integer")
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite or v < 0 or v > limit:
            raise bad_request(f"state.{name} must be between 0 and {limit}")
        state[name] = v
    return state


@frozen
class Announce:
    """A validated announce body."""

    node_id: str
    host: str
    port: int
    contents: tuple[str, ...]
    state: dict[str, int | float] = field(hash=False)
    #: C{"peer"} (the default) or C{"server"}: a content server.
    kind: str = PEER


def parse_announce(obj: object) -> Announce:
    """Validate an announce body; raise L{ApiError} (400) if anything is off."""
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    for name in ("node_id", "address", "contents"):
        if name not in obj:
            raise bad_request(f"missing field {name!r}")
    node_id = parse_node_id(obj["node_id"])
    host, port = parse_address(obj["address"])
    contents = obj["contents"]
    if not isinstance(contents, list):
        raise bad_request("contents must be a list of content ids")
    if len(contents) > MAX_CONTENTS:
        raise bad_request(f"at most {MAX_CONTENTS} contents per announce")
    # (One match over them all: a tenth of the cost of one each.)
    if not all(type(c) is str and len(c) == 64 for c in contents) or not CONTENT_IDS_RE.match(
        "".join(contents)
    ):
        raise bad_request("contents must be a list of content ids")
    state = parse_state(obj.get("state"))
    kind = obj.get("kind", PEER)
    if kind not in (PEER, SERVER):
        raise bad_request(f"kind must be {PEER!r} or {SERVER!r}")
    return Announce(node_id, host, port, tuple(dict.fromkeys(contents)), state, kind)


def _is_utf8_text(text: str) -> bool:
    """Whether C{text} can be encoded as UTF-8: JSON's C{\\ud800} escapes make lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_login(obj: object) -> tuple[str, str]:
    """C{(user, password)} of a login body."""
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    name, password = obj.get("user"), obj.get("password")
    if not auth.valid_user_name(name):
        raise bad_request("user must be 1 to 64 characters of [A-Za-z0-9._@-]")
    if not isinstance(password, str) or not 0 < len(password) <= auth.MAX_PASSWORD:
        raise bad_request(f"password must be a string of 1 to {auth.MAX_PASSWORD} characters")
    if not _is_utf8_text(password):
        raise bad_request("password must be Unicode text (it has a lone surrogate)")
    assert isinstance(name, str)
    return name, password


def parse_leave(obj: object) -> str:
    if not isinstance(obj, dict) or "node_id" not in obj:
        raise bad_request("the body must be an object with a node_id")
    return parse_node_id(obj["node_id"])


def parse_nodes_query(args: Mapping[bytes, Sequence[bytes]]) -> tuple[int, frozenset[str]]:
    """C{limit} (default 50, clamped to 200) and the C{exclude} node ids."""
    limit = DEFAULT_NODES_LIMIT
    raw_limits = args.get(b"limit", [])
    if len(raw_limits) > 1:
        raise bad_request("limit given more than once")
    if raw_limits:
        text = raw_limits[0]
        if not text.isdigit() or len(text) > 9:
            raise bad_request("limit must be a positive integer")
        limit = int(text)
        if limit < 1:
            raise bad_request("limit must be a positive integer")
        limit = min(limit, MAX_NODES_LIMIT)
    excludes = args.get(b"exclude", [])
    if len(excludes) > MAX_EXCLUDE:
        raise bad_request(f"at most {MAX_EXCLUDE} exclude parameters")
    exclude = frozenset(e.decode("utf-8", "replace") for e in excludes)
    return limit, exclude


def parse_ticket_node(args: Mapping[bytes, Sequence[bytes]]) -> str | None:
    """The C{node} a peer ticket is asked for (at most one), or None."""
    nodes = args.get(b"node", [])
    if len(nodes) > 1:
        raise bad_request("node given more than once")
    if not nodes:
        return None
    return parse_node_id(nodes[0].decode("utf-8", "replace"))


# The content catalogue (claim 35).
DEFAULT_CONTENTS_LIMIT = 50
MAX_CONTENTS_LIMIT = 200


@frozen
class ContentsQuery:
    """A validated C{GET /contents} query."""

    query: str | None = None
    mime_prefix: str | None = None
    limit: int = DEFAULT_CONTENTS_LIMIT
    offset: int = 0


def _single(args: Mapping[bytes, Sequence[bytes]], name: str) -> bytes | None:
    values = args.get(name.encode("ascii"), [])
    if len(values) > 1:
        raise bad_request(f"{name} given more than once")
    return values[0] if values else None


def _count(text: bytes | None, name: str, default: int, minimum: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or len(text) > 9 or int(text) < minimum:
        raise bad_request(f"{name} must be an integer of at least {minimum}")
    return int(text)


def parse_contents_query(args: Mapping[bytes, Sequence[bytes]]) -> ContentsQuery:
    """
    C{q} (a substring of the title or name; empty means any), C{mime} (a
    MIME type prefix such as C{video/}), C{limit} (default 50, clamped to
    200) and C{offset} (default 0).  Unknown parameters are ignored.
    """
    query: str | None = None
    raw_q = _single(args, "q")
    if raw_q:
        try:
            query = raw_q.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("q must be UTF-8") from None
        if not catalog.valid_query(query):
            raise bad_request(f"q must be at most {catalog.MAX_QUERY} characters, without control characters")
    mime: str | None = None
    raw_mime = _single(args, "mime")
    if raw_mime:
        mime = raw_mime.decode("ascii", "replace").lower()
        if not catalog.MIME_PREFIX_RE.match(mime):
            raise bad_request("mime must be the start of a MIME type, such as video/ or audio/mp4")
    limit = min(_count(_single(args, "limit"), "limit", DEFAULT_CONTENTS_LIMIT, 1), MAX_CONTENTS_LIMIT)
    offset = _count(_single(args, "offset"), "offset", 0, 0)
    return ContentsQuery(query, mime, limit, offset)


# -- the API -----------------------------------------------------------------


Handler = Callable[["TrackerAPI", ApiRequest, Sequence[str]], "Reply | Deferred[Reply]"]


@frozen
class Route:
    method: bytes
    pattern: tuple[str | None, ...]  # None matches one path segment
    handler: Handler
    #: The roles allowed to call it; None for a public endpoint.
    roles: frozenset[str] | None = None

    #: Its name in metrics and logs: the pattern, C{{id}} standing for a variable segment.
    label: str = field(init=False)

    @label.default
    def _label(self) -> str:
        return "/".join("{id}" if segment is None else segment for segment in self.pattern)


def principal(request: ApiRequest) -> Principal:
    """Who made C{request} (set by the authentication of its route)."""
    p = request.principal
    if not isinstance(p, Principal):
        raise RuntimeError("principal() on a public route")
    return p


#: How long a tracker process trusts what it read of a token: disabling a
#: user on another tracker process sharing the database takes effect within
#: this many seconds here.
TOKEN_CACHE_SECONDS = 15.0
TOKEN_CACHE_SIZE = 100_000
DEFAULT_TOKEN_TTL = 24 * 3600.0
#: Expired tokens are kept this long, so that their holders hear
#: C{token_expired} rather than C{bad_token}.
TOKEN_PURGE_GRACE = 3600.0
#: Seconds a peer ticket stays valid (C{--ticket-ttl}).
DEFAULT_TICKET_TTL = 300.0
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meshstream"'}


class TokenCache:
    """Token digest -> (principal, expiry), each entry trusted for a few seconds."""

    def __init__(self, lifetime: float = TOKEN_CACHE_SECONDS, size: int = TOKEN_CACHE_SIZE) -> None:
        self.lifetime = lifetime
        self.size = size
        self._entries: dict[str, tuple[Principal, float, float]] = {}

    def get(self, digest: str, now: float) -> tuple[Principal, float] | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        who, expires, read_at = entry
        if now - read_at >= self.lifetime:
            del self._entries[digest]
            return None
        return who, expires

    def put(self, digest: str, who: Principal, expires: float, now: float) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[digest] = (who, expires, now)

    def forget(self, digest: str | None = None, name: str | None = None) -> None:
        """Drop one token, or every token of user C{name}."""
        if digest is not None:
            self._entries.pop(digest, None)
        if name is not None:
            for d in [d for d, (who, _, _) in self._entries.items() if who.name == name]:
                del self._entries[d]


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers=_CHALLENGE)


class TrackerAPI:
    """The tracker's endpoints, bound to a store, a signing key and a clock."""

    def __init__(
        self,
        store: TrackerStore,
        signing_key: Ed25519PrivateKey,
        clock: IReactorTime,
        announce_interval: float = 30.0,
        expire_after: int = 3,
        announce_limit: int = DEFAULT_ANNOUNCE_LIMIT,
        manifest_limit: int = DEFAULT_MANIFEST_LIMIT,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        blocking: Callable[..., Deferred[Any]] = deferToThread,
        ticket_ttl: float = DEFAULT_TICKET_TTL,
        metrics: TrackerMetrics | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
        rng: Random | None = None,
        login_throttle: LoginThrottle | None = None,
        log_requests: bool = False,
    ) -> None:
        """
        @param token_ttl: seconds a login token stays valid.
        @param ticket_ttl: seconds a peer ticket stays valid (see
            L{meshstream.tickets}).
        @param blocking: runs a blocking function (password hashing) off the
            reactor thread and fires with its result.
        @param metrics: where requests, logins and announces are counted;
            by default a fresh L{TrackerMetrics} of this tracker's own.
        @param health_timeout: seconds (on C{clock}) the health check waits
            for the database.
        @param rng: the randomness of the node lists' spread (see
            L{meshstream.tracker.ranking}); seeded in tests.
        @param login_throttle: counts failed logins and refuses guessing
            (L{meshstream.tracker.throttle}); by default its default limits.
        @param log_requests: log successful requests too (L{TrackerHandler});
            refused and failed ones always are.
        """
        self.rng = rng if rng is not None else Random()
        self.store = store
        self.token_ttl = token_ttl
        self.ticket_ttl = ticket_ttl
        self._blocking = blocking
        self.tokens = TokenCache()
        self._key = signing_key
        self._public_text = public_key_text(signing_key.public_key())
        self.clock = clock
        self.announce_interval = announce_interval
        self._plain_answer: tuple[tuple[float, float], bytes] = ((math.nan, math.nan), b"")
        self.expire_after = expire_after
        self.announce_limit = announce_limit
        self.manifest_limit = manifest_limit
        self.metrics = (
            metrics
            if metrics is not None
            else TrackerMetrics(
                store_errors=lambda: getattr(store, "errors", 0),
                keys_rewritten=lambda: getattr(store, "rekeyed", 0),
            )
        )
        self.health_timeout = health_timeout
        # Concurrent health checks share one ping, so that a hung database
        # gets no pile of queued pings; a check that gives up leaves it.
        self._ping: Coalesced[None] = Coalesced(lambda: self.store.ping())
        self.quotas = billing.QuotaCache()
        self.login_throttle = login_throttle if login_throttle is not None else LoginThrottle(clock)
        self.log_requests = log_requests

    @property
    def ttl(self) -> float:
        """How long a node stays listed after its last announce."""
        return self.announce_interval * self.expire_after

    def handler(self) -> TrackerHandler:
        """What the HTTP server (L{meshstream.tracker.http1.ApiFactory}) calls with each request."""
        return TrackerHandler(self)

    def purge_expired(self) -> Deferred[int]:
        """
        Drop the nodes that missed C{expire_after} announces, and the tokens
        expired for over L{TOKEN_PURGE_GRACE}; fire with the number of nodes
        dropped.
        """
        now = self.clock.seconds()
        d = self.store.purge(now - self.ttl)

        def logged(n: int) -> Deferred[int]:
            if n:
                log.info("Purged {count} expired nodes", count=n)

            def tokens_logged(t: int) -> int:
                if t:
                    log.info("Purged {count} expired tokens", count=t)
                return n

            d = self.store.purge_tokens(now - TOKEN_PURGE_GRACE)
            return d.addCallback(tokens_logged)

        return d.addCallback(logged)

    def refresh_stats(self) -> Deferred[None]:
        """Count the live nodes and the contents for the metrics' gauges (the purge timer calls it)."""
        d = self.store.stats(self.clock.seconds() - self.ttl)
        return d.addCallback(lambda counts: self.metrics.set_stats(*counts))

    # -- authentication ----------------------------------------------------

    def known_principal(self, request: ApiRequest, roles: frozenset[str]) -> Principal | None:
        """
        The request's L{Principal} without waiting, when its token is in the
        token cache, unexpired and of one of C{roles} (set on the request as
        L{authenticate} does); else None, and L{authenticate} decides.  Most
        calls (every announce of a busy tracker) take this way: with the
        static route lookup, one Deferred chain less per request gave 6-8 %
        more announces a second (bench/RESULTS.md).
        """
        token = auth.parse_bearer(request.header(b"authorization"))
        if token is None:
            return None
        now = self.clock.seconds()
        cached = self.tokens.get(auth.token_digest(token), now)
        if cached is None:
            return None
        who, expires = cached
        if expires <= now or who.role not in roles:
            return None
        request.principal = who
        return who

    def authenticate(self, request: ApiRequest, roles: frozenset[str]) -> Deferred[Principal]:
        """
        Check the request's bearer token and that its user has one of
        C{roles}; fire with the L{Principal} (also set on the request, see
        L{principal}) or fail with a 401/403 L{ApiError}.
        """
        token = auth.parse_bearer(request.header(b"authorization"))
        if token is None:
            raise unauthorized(
                "unauthenticated", "this call needs 'Authorization: Bearer TOKEN' (POST /api/v1/login)"
            )
        digest = auth.token_digest(token)
        now = self.clock.seconds()
        cached = self.tokens.get(digest, now)
        d: Deferred[tuple[str, str, float] | None]
        if cached is not None:
            who, expires = cached
            d = succeed((who.name, who.role, expires))
        else:
            d = self.store.token_principal(digest)

        def check(row: tuple[str, str, float] | None) -> Principal:
            if row is None:
                raise unauthorized("bad_token", "the token is unknown or revoked; log in again")
            name, role, expires = row
            who = Principal(name, role)
            if cached is None:
                self.tokens.put(digest, who, expires, now)
            if expires <= now:
                raise unauthorized("token_expired", "the token has expired; log in again")
            if role not in roles:
                raise ApiError(403, "forbidden", f"the {role} role may not do this")
            request.principal = who
            return who

        return d.addCallback(check)

    async def _login(self, name: str, password: str, client: str) -> Reply:
        wait = self.login_throttle.retry_after(name, client)
        if wait is not None:
            # Refused before any hashing: guessing costs the tracker nothing.
            self.metrics.login(LOGIN_THROTTLED)
            seconds = math.ceil(wait)
            log.info(
                "Refused login for {user} from {client}: too many failed logins",
                user=name,
                client=client,
                code="too_many_attempts",
            )
            raise ApiError(
                429,
                "too_many_attempts",
                f"too many failed logins; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        user = await self.store.get_user(name)
        stored = user.password if user is not None else auth.DUMMY_HASH
        try:
            ok = await self._blocking(auth.verify_password, password, stored)
        except auth.PasswordHashError:
            log.error("User {user} has an unreadable password hash", user=name)
            ok = False
        if user is None or not ok:
            self.login_throttle.failed(name, client)
            self.metrics.login(LOGIN_BAD_CREDENTIALS)
            log.info(
                "Failed login for {user} from {client}", user=name, client=client, code="bad_credentials"
            )
            raise unauthorized("bad_credentials", "wrong user name or password")
        if user.disabled:
            self.metrics.login(LOGIN_DISABLED)
            log.info(
                "Refused login for disabled user {user} from {client}",
                user=name,
                client=client,
                code="user_disabled",
            )
            raise ApiError(403, "user_disabled", f"user {name} is disabled")
        self.login_throttle.succeeded(name)
        token = auth.new_token()
        expires = self.clock.seconds() + self.token_ttl
        await self.store.add_token(auth.token_digest(token), name, expires)
        self.metrics.login(LOGIN_OK)
        log.info("User {user} logged in from {client}", user=name, client=client)
        return Reply(
            200,
            {"token": token, "expires_in": self.token_ttl, "user": name, "role": user.role},
        )

    def login(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        name, password = parse_login(parse_json(read_body(request, SMALL_BODY_LIMIT)))
        return Deferred.fromCoroutine(self._login(name, password, request.client))

    def logout(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        token = auth.parse_bearer(request.header(b"authorization"))
        assert token is not None  # the route is authenticated
        digest = auth.token_digest(token)
        self.tokens.forget(digest=digest)
        return self.store.delete_token(digest).addCallback(lambda _: Reply(200, {}))

    def whoami(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        who = principal(request)

        def found(user: Any) -> Reply:
            quota = None if user is None else user.quota_bytes
            return Reply(200, {"user": who.name, "role": who.role, "quota_bytes": quota})

        return self.store.get_user(who.name).addCallback(found)

    # -- handlers ----------------------------------------------------------

    def health(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        """
        200 if the database answers a trivial query within C{health_timeout}
        seconds, else 503 (with the shape of an error, so that clients
        reading C{error.code} understand it too).
        """
        d = self._ping().addTimeout(self.health_timeout, self.clock)

        def down(f: Failure) -> Reply:
            reason = "timed out" if f.check(TimeoutError) else f.getErrorMessage()
            log.warn(
                "Health check failed: the database did not answer ({reason})",
                reason=reason,
                code="database_unavailable",
            )
            message = f"the database did not answer: {reason}"
            return Reply(
                503,
                {
                    "status": "unavailable",
                    "schema": SCHEMA_VERSION,
                    **error_body("database_unavailable", message),
                },
            )

        return d.addCallbacks(lambda _: Reply(200, {"status": "ok", "schema": SCHEMA_VERSION}), down)

    def key(self, request: ApiRequest, args: Sequence[str]) -> Reply:
        return Reply(200, {"algorithm": "ed25519", "public_key": self._public_text})

    def register_manifest(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        body = read_body(request, self.manifest_limit)
        try:
            manifest = Manifest.from_json(body)
            # Refuse NaN/Infinity (which json accepts) so stored manifests stay strict JSON.
            json.dumps(manifest.meta, allow_nan=False)
            signed = manifest.sign(self._key)
            text = signed.to_json().decode("ascii")
        except ManifestError as e:
            raise ApiError(400, "bad_manifest", str(e)) from None
        except (RecursionError, TypeError, ValueError) as e:
            raise ApiError(400, "bad_manifest", f"malformed manifest: {e}") from None
        entry = catalog.entry_for(signed.content_id, signed.name, signed.size, signed.meta)
        d = self.store.add_manifest(signed.content_id, text, self.clock.seconds(), entry)

        def stored(result: tuple[bool, str]) -> Reply:
            created, stored_text = result
            if created:
                log.info("Registered content {content_id}", content_id=signed.content_id)
            return Reply(
                201 if created else 200,
                {"content_id": signed.content_id, "manifest": json.loads(stored_text)},
            )

        return d.addCallback(stored)

    def get_manifest(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        content_id = parse_content_id(args[0])

        def found(text: str | None) -> Reply:
            if text is None:
                raise ApiError(404, "unknown_content", f"no content {content_id}")
            return Reply(200, json.loads(text))

        return self.store.get_manifest(content_id).addCallback(found)

    def announce(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        ann = parse_announce(parse_json(read_body(request, self.announce_limit)))
        who = principal(request)
        if ann.kind == SERVER and who.role not in SERVER_ANNOUNCERS:
            raise ApiError(403, "forbidden", f"the {who.role} role may not announce a content server")
        host = ann.host
        if host in WILDCARD_HOSTS:
            host = request.client
        # The owner's reservations are read in the announce's transaction.
        d = self.store.announce_answer(
            ann.node_id,
            format_address(host, ann.port),
            ann.state,
            self.clock.seconds(),
            ann.contents,
            owner=who.name,
            kind=ann.kind,
            reservations=billing.MAX_RESERVATIONS,
        )

        def done(announced: Announced) -> Reply:
            self.metrics.announces.inc()
            if not announced.unknown and not announced.reservations:
                return Reply(200, self._plain_announce_answer())
            answer = {
                "interval": self.announce_interval,
                "expires_in": self.ttl,
                "unknown": announced.unknown,
                "reservations": [r.to_dict() for r in announced.reservations],
            }
            return Reply(200, answer)

        return d.addCallbacks(done, _node_owned)

    def _plain_announce_answer(self) -> bytes:
        """The answer to an announce with no unknown contents and no reservations, encoded once."""
        key = (self.announce_interval, self.ttl)
        if self._plain_answer[0] != key:
            answer = {"interval": key[0], "expires_in": key[1], "unknown": [], "reservations": []}
            self._plain_answer = (key, _JSON_ENCODER.encode(answer).encode("utf-8"))
        return self._plain_answer[1]

    def leave(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        node_id = parse_leave(parse_json(read_body(request, SMALL_BODY_LIMIT)))
        d = self.store.leave(node_id, owner=principal(request).name)
        return d.addCallbacks(lambda _: Reply(200, {}), _node_owned)

    def nodes(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        return self._ranked_holders(request, args[0], PEER, "nodes")

    def _ranked_holders(self, request: ApiRequest, cid: str, kind: str, key: str) -> Deferred[Reply]:
        """The nodes of C{kind} holding content C{cid}, spread by their state."""
        content_id = parse_content_id(cid)
        limit, exclude = parse_nodes_query(request.args)
        node = parse_ticket_node(request.args)
        who = principal(request)
        d = self.check_quota(who.name)
        return d.addCallback(
            lambda _: Deferred.fromCoroutine(self._holders(content_id, kind, key, limit, exclude, node, who))
        )

    async def _holders(
        self,
        content_id: str,
        kind: str,
        key: str,
        limit: int,
        exclude: frozenset[str],
        node: str | None,
        who: Principal,
    ) -> Reply:
        now = self.clock.seconds()

        def choose(candidates: list[Candidate]) -> list[Candidate]:
            return spread_candidates(candidates, self.rng, limit, now=now, horizon=self.ttl)

        # The database pre-selects the candidates (see the ranking module).
        chosen = await self.store.node_list(
            content_id, now - self.ttl, kind, candidate_count(limit), exclude, choose
        )
        if chosen is None:
            raise ApiError(404, "unknown_content", f"no content {content_id}")
        # Encoded here, each node's stored state spliced in (ListedNode.to_json).
        listed = ",".join([c.to_json() for c in chosen])
        text = f'{{"content_id":{_JSON_ENCODER.encode(content_id)},"{key}":[{listed}]'
        if node is not None:
            ticket = _JSON_ENCODER.encode(await self._ticket(content_id, node, who))
            text += "," + ticket[1:-1]  # its fields, beside the others
        return Reply(200, (text + "}").encode("utf-8"))

    # -- content servers (claims 37, 38) -------------------------------------

    def content_servers(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        """C{GET contents/<id>/servers}: the content servers holding a content."""
        return self._ranked_holders(request, args[0], SERVER, "servers")

    def all_servers(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        """C{GET servers}: every live content server, with how many contents it holds."""
        limit, exclude = parse_nodes_query(request.args)
        now = self.clock.seconds()

        def ranked(rows: list[tuple[NodeRecord, int]]) -> Reply:
            held = {r.node_id: n for r, n in rows}
            candidates = [r for r, _ in rows if r.node_id not in exclude]
            chosen = spread_nodes(candidates, self.rng, limit, now=now, horizon=self.ttl)
            servers = [{**r.to_dict(), "contents": held[r.node_id]} for r in chosen]
            return Reply(200, {"servers": servers})

        return self.store.servers(now - self.ttl).addCallback(ranked)

    # -- peer tickets ------------------------------------------------------

    async def _ticket(self, content_id: str, node: str, who: Principal) -> dict[str, Any]:
        """A peer ticket for C{who}'s node C{node} to fetch C{content_id}."""
        owner = await self.store.node_owner(node)
        if owner is not None and owner != who.name:
            raise ApiError(403, "node_owned", f"node {node} belongs to another user")
        expires = int(self.clock.seconds() + self.ticket_ttl)
        ticket = tickets.Ticket(user=who.name, node=node, content=content_id, expires=expires)
        return {"ticket": tickets.issue(self._key, ticket).decode("ascii"), "ticket_expires": expires}

    # -- billing: usage and quotas -------------------------------------------

    def period(self) -> str:
        """The current billing period (C{YYYY-MM}, UTC, by the API's clock)."""
        return billing.period_of(self.clock.seconds())

    def check_quota(self, name: str) -> Deferred[None]:
        """
        Fail with C{402 quota_exceeded} if user C{name} has downloaded their
        quota in the current period.  What was read is trusted for a few
        seconds (L{billing.QuotaCache}), so most calls do not wait for the
        database.
        """
        now = self.clock.seconds()
        period = billing.period_of(now)
        cached = self.quotas.get(name, period, now)
        d = succeed(cached) if cached is not None else self.store.standing(name, period)

        def check(standing: billing.Standing) -> None:
            if cached is None:
                self.quotas.put(name, standing, now)
            if standing.over_quota:
                raise ApiError(402, "quota_exceeded", billing.quota_message(name, standing))

        return d.addCallback(check)

    def report_usage(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        try:
            report = billing.parse_usage_report(parse_json(read_body(request, USAGE_LIMIT)))
        except ValueError as e:
            raise bad_request(str(e)) from None
        name = principal(request).name
        now = self.clock.seconds()
        d = self.store.add_usage(
            name, report.node_id, report.seq, billing.period_of(now), report.entries, now
        )

        def done(result: UsageResult) -> Reply:
            self.quotas.put(name, result.standing, now)
            body = result.standing.to_dict()
            body.update(accepted=result.accepted, unknown=result.unknown)
            return Reply(200, body)

        return d.addCallbacks(done, _node_owned)

    def _usage_period(self, request: ApiRequest) -> str:
        """The C{period} query parameter, or the current period."""
        text = _query_one(request, "period")
        if text is None:
            return self.period()
        try:
            return billing.parse_period(text)
        except ValueError as e:
            raise bad_request(str(e)) from None

    def my_usage(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        name = principal(request).name
        period = self._usage_period(request)
        d = self.store.usage(period, name)

        def got_rows(rows: list[billing.UsageRow]) -> Deferred[Reply]:
            def answer(standing: billing.Standing) -> Reply:
                body: dict[str, Any] = {"user": name, **standing.to_dict()}
                body["uploaded_bytes"] = sum(r.uploaded for r in rows)
                body["contents"] = [_content_usage(r) for r in rows]
                return Reply(200, body)

            return self.store.standing(name, period).addCallback(answer)

        return d.addCallback(got_rows)

    def export_usage(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        period = self._usage_period(request)
        name = _query_one(request, "user")
        if name is not None and not auth.valid_user_name(name):
            raise bad_request("user must be 1 to 64 characters of [A-Za-z0-9._@-]")
        form = _query_one(request, "format") or "json"
        if form not in ("json", "csv"):
            raise bad_request("format must be json or csv")

        def render(rows: list[billing.UsageRow]) -> Reply:
            if form == "csv":
                return Reply(200, billing.usage_csv(rows), content_type="text/csv; charset=utf-8")
            return Reply(200, {"period": period, "usage": [r.to_dict() for r in rows]})

        return self.store.usage(period, name).addCallback(render)

    # -- reservations ------------------------------------------------------

    def reserve(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        now = self.clock.seconds()
        try:
            wanted = billing.parse_reservation(parse_json(read_body(request, SMALL_BODY_LIMIT)), now)
        except ValueError as e:
            raise bad_request(str(e)) from None
        name = principal(request).name
        d = self.store.add_reservation(uuid.uuid4().hex, name, wanted, now, billing.MAX_RESERVATIONS)

        def stored(reservation: billing.Reservation | None) -> Reply:
            if reservation is None:
                raise ApiError(404, "unknown_content", f"no content {wanted.content_id}")
            log.info(
                "User {user} reserved {cid} from {start} to {end}",
                user=name,
                cid=wanted.content_id[:12],
                start=wanted.start,
                end=wanted.end,
            )
            return Reply(201, reservation.to_dict())

        def too_many(f: Failure) -> Failure:
            if f.check(ReservationLimit):
                raise ApiError(409, "too_many_reservations", str(f.value))
            return f

        return d.addCallbacks(stored, too_many)

    def list_reservations(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        name = principal(request).name
        d = self.store.reservations(name, self.clock.seconds(), billing.MAX_RESERVATIONS)
        return d.addCallback(lambda found: Reply(200, {"reservations": [r.to_dict() for r in found]}))

    def cancel_reservation(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        rid = args[0]
        if not RESERVATION_ID_RE.match(rid):
            raise bad_request("a reservation id is 32 lowercase hex characters")
        who = principal(request)
        d = self.store.delete_reservation(rid, owner=None if who.role == auth.ADMIN else who.name)

        def deleted(found: bool) -> Reply:
            if not found:
                raise ApiError(404, "unknown_reservation", f"no reservation {rid} of yours")
            return Reply(200, {})

        return d.addCallback(deleted)

    # -- the content catalogue ---------------------------------------------

    def contents(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        query = parse_contents_query(request.args)
        d = self.store.search_contents(
            self.clock.seconds() - self.ttl, query.query, query.mime_prefix, query.limit, query.offset
        )

        def listed(result: tuple[list[ContentInfo], int]) -> Reply:
            page, total = result
            return Reply(200, {"contents": [c.to_dict() for c in page], "total": total})

        return d.addCallback(listed)

    def content(self, request: ApiRequest, args: Sequence[str]) -> Deferred[Reply]:
        content_id = parse_content_id(args[0])

        def found(info: ContentInfo | None) -> Reply:
            if info is None:
                raise ApiError(404, "unknown_content", f"no content {content_id}")
            return Reply(200, info.to_dict())

        return self.store.get_content(content_id, self.clock.seconds() - self.ttl).addCallback(found)


RESERVATION_ID_RE = re.compile(r"[0-9a-f]{32}\Z")


def _query_one(request: ApiRequest, name: str) -> str | None:
    """A query parameter given at most once (400 if repeated), or None."""
    values = (request.args).get(name.encode("ascii"), [])
    if len(values) > 1:
        raise bad_request(f"{name} given more than once")
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def _content_usage(row: billing.UsageRow) -> dict[str, Any]:
    d = row.to_dict()
    del d["user"], d["period"]
    return d


def _node_owned(f: Failure) -> Failure:
    if f.check(NodeOwned):
        raise ApiError(403, "node_owned", str(f.value))
    return f


_ROUTES: tuple[Route, ...] = (
    Route(b"GET", ("health",), TrackerAPI.health),
    Route(b"GET", ("key",), TrackerAPI.key),
    Route(b"POST", ("login",), TrackerAPI.login),
    Route(b"POST", ("logout",), TrackerAPI.logout, auth.ANYONE),
    Route(b"GET", ("me",), TrackerAPI.whoami, auth.ANYONE),
    Route(b"POST", ("manifests",), TrackerAPI.register_manifest, auth.PUBLISHERS),
    Route(b"GET", ("manifests", None), TrackerAPI.get_manifest, auth.ANYONE),
    Route(b"POST", ("announce",), TrackerAPI.announce, auth.ANYONE),
    Route(b"POST", ("leave",), TrackerAPI.leave, auth.ANYONE),
    Route(b"GET", ("contents", None, "nodes"), TrackerAPI.nodes, auth.ANYONE),
    # Billing and reservations.
    Route(b"POST", ("usage",), TrackerAPI.report_usage, auth.ANYONE),
    Route(b"GET", ("usage",), TrackerAPI.export_usage, auth.ADMINS),
    Route(b"GET", ("me", "usage"), TrackerAPI.my_usage, auth.ANYONE),
    Route(b"POST", ("reservations",), TrackerAPI.reserve, auth.ANYONE),
    Route(b"GET", ("reservations",), TrackerAPI.list_reservations, auth.ANYONE),
    Route(b"DELETE", ("reservations", None), TrackerAPI.cancel_reservation, auth.ANYONE),
    Route(b"GET", ("contents",), TrackerAPI.contents, auth.ANYONE),
    Route(b"GET", ("contents", None), TrackerAPI.content, auth.ANYONE),
    Route(b"GET", ("contents", None, "servers"), TrackerAPI.content_servers, auth.ANYONE),
    Route(b"GET", ("servers",), TrackerAPI.all_servers, auth.ANYONE),
)
API_PREFIX = ("api", "v1")


def _static_routes(routes: Sequence[Route]) -> dict[tuple[bytes, tuple[str, ...]], Route]:
    """
    The routes without variable segments, by method and path: most requests
    (announces) take one of them, found with one dict lookup.  No route
    with variables may match a static route's path, so that the lookup
    gives what trying the routes in order would.
    """
    static = {
        (r.method, tuple(s for s in r.pattern if s is not None)): r for r in routes if None not in r.pattern
    }
    for r in routes:
        for _, path in static:
            if None in r.pattern and _match(r.pattern, path) is not None:
                raise ValueError(f"route {r.label} shadows the static route {'/'.join(path)}")
    return static


def _match(pattern: tuple[str | None, ...], path: Sequence[str]) -> list[str] | None:
    if len(pattern) != len(path):
        return None
    captured = []
    for want, got in zip(pattern, path, strict=True):
        if want is None:
            captured.append(got)
        elif want != got:
            return None
    return captured


def find_route(method: bytes, path: Sequence[str]) -> tuple[Route, list[str]]:
    """Pick the route for a request, or raise a 404/405 L{ApiError}."""
    if tuple(path[: len(API_PREFIX)]) != API_PREFIX:
        raise ApiError(404, "not_found", "no such resource")
    rest = path[len(API_PREFIX) :]
    if method == b"HEAD":
        method = b"GET"
    static = _STATIC_ROUTES.get((method, tuple(rest)))
    if static is not None:
        return static, []
    allowed: list[str] = []
    for route in _ROUTES:
        captured = _match(route.pattern, rest)
        if captured is None:
            continue
        if route.method == method:
            return route, captured
        allowed.append(route.method.decode("ascii"))
    if allowed:
        methods = ", ".join(sorted(set(allowed)))
        raise ApiError(405, "method_not_allowed", f"use {methods} here", headers={"Allow": methods})
    raise ApiError(404, "not_found", "no such resource")


_STATIC_ROUTES = _static_routes(_ROUTES)


def route_label(path: Sequence[str]) -> str:
    """The label of the route whose path C{path} matches, whatever the method; or C{unmatched}."""
    if tuple(path[: len(API_PREFIX)]) == API_PREFIX:
        rest = path[len(API_PREFIX) :]
        for route in _ROUTES:
            if _match(route.pattern, rest) is not None:
                return route.label
    return UNMATCHED


def read_body(request: ApiRequest, limit: int) -> bytes:
    """
    Return the request body, or raise 413 if it is over C{limit} (the
    route's own limit; the HTTP server has refused any body over the
    tracker's hard cap before reading it).
    """
    body = request.body
    if len(body) > limit:
        raise ApiError(413, "body_too_large", f"the request body is limited to {limit} bytes")
    return body


#: Request paths are logged up to this many characters.
MAX_LOGGED_PATH = 200


Answer = tuple[int, dict[str, str], object]


@define
class _Exchange:
    """One request's bookkeeping: when it started and its route."""

    started: float
    route: str = UNMATCHED


class TrackerHandler:
    """
    Answers the API's requests: routes, runs the handler, encodes the answer.

    Every answered request is counted in the API's metrics.  A refused (4xx)
    or failed (5xx) one is logged as one event with the fields C{method},
    C{route}, C{path}, C{client}, C{status}, C{code} (the error code, or
    None), C{user} (who was authenticated, or None) and C{duration}
    (seconds), at C{info} or C{error} level; a successful one likewise at
    C{debug} level, but only if the API's C{log_requests} is set (the
    C{--log-requests} option): building an event costs about 12 µs, 5 % of an
    announce, even when the observers drop it.
    """

    def __init__(self, api: TrackerAPI) -> None:
        self._api = api

    def __call__(self, request: ApiRequest) -> Deferred[Response]:
        exchange = _Exchange(self._api.metrics.timer())
        return self._answer(request, exchange).addCallback(self._write, request, exchange)

    def _answer(self, request: ApiRequest, exchange: _Exchange) -> Deferred[Answer]:
        api = self._api
        try:
            segments = request.segments
            try:
                route, captured = find_route(request.method, segments)
            except ApiError:
                exchange.route = route_label(segments)
                raise
            exchange.route = route.label
            if route.roles is None or api.known_principal(request, route.roles) is not None:
                result = route.handler(api, request, captured)
                d = result if isinstance(result, Deferred) else succeed(result)
            else:
                d = api.authenticate(request, route.roles).addCallback(
                    lambda _: route.handler(api, request, captured)
                )
        except Exception:
            return succeed(self._failure(Failure(), request, exchange))
        return d.addCallbacks(self._success, self._failure, errbackArgs=(request, exchange))

    def _success(self, reply: Reply) -> Answer:
        if reply.content_type is None:
            return reply.status, {}, reply.body
        return reply.status, {"Content-Type": reply.content_type}, reply.body

    def _failure(self, f: Failure, request: ApiRequest, exchange: _Exchange) -> Answer:
        if f.check(ApiError):
            e = f.value
            assert isinstance(e, ApiError)
            return e.status, e.headers, error_body(e.code, e.message)
        log.failure(
            "Unhandled error in {method} {route}",
            f,
            method=request.method.decode("ascii", "replace"),
            route=exchange.route,
            path=request.path.decode("utf-8", "replace")[:MAX_LOGGED_PATH],
        )
        return 500, {}, error_body("internal_error", "the tracker failed to answer")

    def _observe(self, request: ApiRequest, exchange: _Exchange, status: int, body: object) -> None:
        """Count and log an answered request."""
        metrics = self._api.metrics
        duration = metrics.timer() - exchange.started
        metrics.request(exchange.route, request.method, status, duration)
        if status < 400:
            if not self._api.log_requests:
                return
            emit, text = log.debug, "{method} {path}: {status}"
        elif status < 500:
            emit, text = log.info, "Refused {method} {path}: {status} {code}"
        else:
            emit, text = log.error, "Failed {method} {path}: {status} {code}"
        error = body.get("error") if isinstance(body, dict) else None
        who = request.principal
        emit(
            text,
            method=request.method.decode("ascii", "replace"),
            route=exchange.route,
            path=request.path.decode("utf-8", "replace")[:MAX_LOGGED_PATH],
            client=request.client,
            status=status,
            code=error.get("code") if isinstance(error, dict) else None,
            user=who.name if isinstance(who, Principal) else None,
            duration=duration,
        )

    def refused_early(self, method: bytes, uri: bytes, client: str, status: int, code: str) -> None:
        """Count and log a request the HTTP server refused before it was complete (so never handled)."""
        path, _, _ = uri.partition(b"?")
        route = route_label(path_segments(path))
        self._api.metrics.request(route, method, status, 0.0)
        log.info(
            "Refused {method} {path}: {status} {code}",
            method=method.decode("ascii", "replace"),
            route=route,
            path=path.decode("utf-8", "replace")[:MAX_LOGGED_PATH],
            client=client,
            status=status,
            code=code,
            user=None,
            duration=0.0,
        )

    def _write(self, answer: Answer, request: ApiRequest, exchange: _Exchange) -> Response:
        status, headers, body = answer
        self._observe(request, exchange, status, body)
        if isinstance(body, bytes):  # a Reply with its own content type
            data = body
        else:
            data = _JSON_ENCODER.encode(body).encode("utf-8")
        if not headers:
            return status, JSON_HEADERS, data
        content_type = headers.get("Content-Type")
        out = list(JSON_HEADERS)
        if content_type is not None:
            out[0] = (b"Content-Type", content_type.encode("ascii"))
        out.extend((k.encode("ascii"), v.encode("ascii")) for k, v in headers.items() if k != "Content-Type")
        return status, out, data
