# -*- test-case-name: tests.test_tracker_client -*-
"""
A client of the tracker's HTTP/JSON API, for agents and tools.

L{TrackerClient} holds an injected treq-like HTTP client (the C{treq}
module, a C{treq.client.HTTPClient} or C{treq.testing.StubTreq}: anything
whose C{request(method, url, headers=, data=)} returns a Deferred of a
response), the tracker's base URL and a clock.  Every call is bounded in time
(C{timeout}, covering the response body too) and in size (C{max_body}).

Failures: L{TrackerError} (with the HTTP status and the tracker's error code
when there is one) for HTTP errors, timeouts, unreachable trackers and
malformed answers; L{UnknownContent} when the tracker has no such content;
L{QuotaExceeded} (a L{TrackerError}) when the user's byte quota is used up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, cast
from urllib.parse import quote, urlencode

from attrs import define, field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from meshstream.coalesce import Coalesced
from meshstream.errors import QuotaExceeded, TrackerError, UnknownContent
from meshstream.manifest import Manifest, ManifestError, load_public_key
from meshstream.tracker.catalog import ContentInfo

log = Logger()

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY = 20 * 1024 * 1024  # a signed manifest is at most 8 MiB of JSON


@frozen
class NodeInfo:
    """A node the tracker listed for a content."""

    node_id: str
    host: str
    port: int
    state: dict[str, Any] = field(hash=False)
    last_seen: float


@frozen
class NodeList:
    """
    A node lookup's answer: the nodes, and the peer ticket that lets the
    asking node fetch the content from them (None when the tracker issued
    none), with its expiry in the tracker's Unix seconds.
    """

    nodes: list[NodeInfo] = field(hash=False)
    ticket: bytes | None = None
    expires: float | None = None


@frozen
class ContentPage:
    """A page of the tracker's catalogue, and how many contents matched in all."""

    contents: list[ContentInfo] = field(hash=False)
    total: int


def split_address(address: str) -> tuple[str, int]:
    """C{host:port} or C{[v6]:port} to C{(host, port)}; ValueError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"bad address {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host, port


class _BoundedBody(Protocol):
    """Collects a response body, failing once it grows past C{limit} bytes."""

    def __init__(self, limit: int, finished: Deferred[bytes]) -> None:
        self._limit = limit
        self._finished = finished
        self._parts: list[bytes] = []
        self._size = 0
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(TrackerError(f"tracker response larger than {self._limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._done:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done = True
            self._finished.callback(b"".join(self._parts))
        else:
            self._done = True
            self._finished.errback(reason)

    def _fail(self, error: Exception) -> None:
        self._done = True
        self._parts = []
        if self.transport is not None:
            # The response body transport is a push producer: stopping it
            # drops the connection rather than read the rest.
            cast(Any, self.transport).stopProducing()
        self._finished.errback(error)

    def refuse(self, error: Exception) -> None:
        if not self._done:
            self._fail(error)

    def cancel(self) -> None:
        self.refuse(CancelledError())


def read_body(response: Any, limit: int) -> Deferred[bytes]:
    """Read a response body of at most C{limit} bytes (cancellable)."""
    protocol: _BoundedBody | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if protocol is not None:
            protocol.cancel()

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _BoundedBody(limit, finished)
    response.deliverBody(protocol)
    length = getattr(response, "length", None)
    if isinstance(length, int) and length > limit:
        protocol.refuse(TrackerError(f"tracker response larger than {limit} bytes"))
    return finished


def _strip_slash(url: str) -> str:
    return str(url).rstrip("/")


@frozen(repr=False)
class Credentials:
    """A user name and password to log in with."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password=***)"


def read_password_file(path: str) -> str:
    """The first line of C{path}, without its line end; ValueError if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the password file {path}: {e}") from None
    if not line:
        raise ValueError(f"the password file {path} is empty")
    return line


def load_credentials(user: str | None, password_file: str | None) -> Credentials | None:
    """
    Credentials from a user name and a password file, or (without a file)
    the C{MESHSTREAM_PASSWORD} environment variable.  None without a user;
    ValueError when there is a user but no usable password.  Blocking: call
    it while parsing options.
    """
    if not user:
        if password_file:
            raise ValueError("a password file needs a user name (--user)")
        return None
    if password_file:
        return Credentials(user, read_password_file(password_file))
    password = os.environ.get("MESHSTREAM_PASSWORD")
    if not password:
        raise ValueError(f"no password for user {user}: give --password-file or set MESHSTREAM_PASSWORD")
    return Credentials(user, password)


#: Error codes after which a fresh login may help.
_RELOGIN_CODES = frozenset({"token_expired", "bad_token", "unauthenticated"})


@define
class TrackerClient:
    """
    Talks to one tracker.

    @param http: a treq-like client (C{treq}, C{HTTPClient}, C{StubTreq}).
    @param base_url: e.g. C{"https://tracker.example:7070"} (no trailing path).
    @param clock: for the timeouts.
    @param credentials: logs in with these before the first call that needs
        a token, and again (once per call) when the tracker says the token
        expired or was revoked.  Without them, calls that need a token fail
        with a 401 L{TrackerError}.
    """

    _http: Any
    base_url: str = field(converter=_strip_slash)
    _clock: IReactorTime
    timeout: float = DEFAULT_TIMEOUT
    max_body: int = DEFAULT_MAX_BODY
    credentials: Credentials | None = None
    token: str | None = None
    _login: Coalesced[str] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._login = Coalesced(self._login_once)

    # -- authentication --------------------------------------------------------

    def login(self) -> Deferred[str]:
        """
        Log in with the credentials; fire with the new token (also kept in
        C{token}).  One login at a time: callers asking while one is under
        way share its outcome.
        """
        if self.credentials is None:
            return fail(TrackerError("no credentials to log in with", 401, "unauthenticated"))
        return self._login()

    def _login_once(self) -> Deferred[str]:
        assert self.credentials is not None
        body = _encode({"user": self.credentials.user, "password": self.credentials.password})

        def got(doc: object) -> str:
            token = _object(doc).get("token")
            if not isinstance(token, str) or not token:
                raise TrackerError("tracker login answer is malformed")
            self.token = token
            return token

        return self._request("POST", "/api/v1/login", body, None, None).addCallback(got)

    def whoami(self) -> Deferred[dict[str, Any]]:
        """C{{"user", "role", "quota_bytes"}} of the logged-in user."""
        return self._call("GET", "/api/v1/me").addCallback(_object)

    # -- the endpoints -------------------------------------------------------

    def public_key(self) -> Deferred[Ed25519PublicKey]:
        """The tracker's manifest signing key."""

        def parse(body: object) -> Ed25519PublicKey:
            doc = _object(body)
            if doc.get("algorithm") != "ed25519" or not isinstance(doc.get("public_key"), str):
                raise TrackerError("tracker key answer is malformed")
            try:
                return load_public_key(doc["public_key"].encode("ascii"))
            except (ManifestError, UnicodeEncodeError) as e:
                raise TrackerError(f"tracker key is invalid: {e}") from None

        return self._request("GET", "/api/v1/key", None, None, None).addCallback(parse)

    def register_manifest(self, manifest: Manifest) -> Deferred[Manifest]:
        """Register C{manifest}; fire with the tracker-signed manifest (the first one
        registered under that content id, if it was registered before)."""

        def parse(body: object) -> Manifest:
            return _manifest(_object(body).get("manifest"))

        return self._call("POST", "/api/v1/manifests", manifest.to_json()).addCallback(parse)

    def get_manifest(self, content_id: str) -> Deferred[Manifest]:
        """The manifest as the tracker has it (parsed, not verified)."""
        path = f"/api/v1/manifests/{quote(content_id, safe='')}"
        return self._call("GET", path, content_id=content_id).addCallback(_manifest)

    def announce(
        self,
        node_id: str,
        address: str,
        contents: Iterable[str],
        state: Mapping[str, float],
        kind: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Announce; fire with C{{"interval", "expires_in", "unknown",
        "reservations"}} (the user's unfinished reservations, as
        L{reservations} gives them).

        @param kind: C{"server"} to announce a content server (the account
            needs the server role), C{"peer"} or None (the default) for a peer.
        """
        body: dict[str, Any] = {
            "node_id": node_id,
            "address": address,
            "contents": list(contents),
            "state": dict(state),
        }
        if kind is not None:
            body["kind"] = kind
        return self._call("POST", "/api/v1/announce", _encode(body)).addCallback(_object)

    def nodes(
        self, content_id: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[list[NodeInfo]]:
        """The best nodes holding C{content_id}, best first."""
        d = self._holders(content_id, "nodes", None, limit, exclude)
        return d.addCallback(lambda found: found.nodes)

    def nodes_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[NodeList]:
        """
        The best nodes holding C{content_id}, best first, and a peer ticket
        for node C{node} (one of this user's) to present to them.  Fails
        with a 403 L{TrackerError} (code C{node_owned}) if C{node} is
        another user's.
        """
        return self._holders(content_id, "nodes", node, limit, exclude)

    def servers(
        self, content_id: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[list[NodeInfo]]:
        """The best content servers holding C{content_id}, best first."""
        d = self._holders(content_id, "servers", None, limit, exclude)
        return d.addCallback(lambda found: found.nodes)

    def servers_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[NodeList]:
        """The best content servers holding C{content_id}, and a peer ticket (see L{nodes_with_ticket})."""
        return self._holders(content_id, "servers", node, limit, exclude)

    def _holders(
        self, content_id: str, key: str, node: str | None, limit: int, exclude: Iterable[str]
    ) -> Deferred[NodeList]:
        params = [("limit", str(limit))] + [("exclude", e) for e in exclude]
        if node is not None:
            params.append(("node", node))
        path = f"/api/v1/contents/{quote(content_id, safe='')}/{key}?{urlencode(params)}"

        def parse(body: object) -> NodeList:
            doc = _object(body)
            entries = doc.get(key)
            if not isinstance(entries, list):
                raise TrackerError(f"tracker {key} list is malformed")
            nodes = [n for n in (_node(e) for e in entries) if n is not None]
            ticket, expires = doc.get("ticket"), doc.get("ticket_expires")
            if ticket is None:
                return NodeList(nodes)
            if (
                not isinstance(ticket, str)
                or not ticket.isascii()
                or isinstance(expires, bool)
                or not isinstance(expires, int | float)
            ):
                raise TrackerError("tracker ticket is malformed")
            return NodeList(nodes, ticket.encode("ascii"), float(expires))

        return self._call("GET", path, content_id=content_id).addCallback(parse)

    def search(
        self,
        query: str | None = None,
        mime: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Deferred[ContentPage]:
        """
        The tracker's catalogue, newest first: the contents whose title or
        name contains C{query} (caselessly) and whose MIME type starts with
        C{mime}.  Malformed entries are logged and left out.
        """
        params = [("limit", str(limit)), ("offset", str(offset))]
        if query:
            params.append(("q", query))
        if mime:
            params.append(("mime", mime))
        path = f"/api/v1/contents?{urlencode(params)}"

        def parse(body: object) -> ContentPage:
            doc = _object(body)
            entries, total = doc.get("contents"), doc.get("total")
            if not isinstance(entries, list) or isinstance(total, bool) or not isinstance(total, int):
                raise TrackerError("tracker content list is malformed")
            return ContentPage([c for c in (_content(e) for e in entries) if c is not None], total)

        return self._call("GET", path).addCallback(parse)

    def content(self, content_id: str) -> Deferred[ContentInfo]:
        """One content's catalogue entry; L{UnknownContent} if the tracker has none."""
        path = f"/api/v1/contents/{quote(content_id, safe='')}"

        def parse(body: object) -> ContentInfo:
            try:
                return ContentInfo.from_dict(body)
            except ValueError as e:
                raise TrackerError(f"tracker sent a bad content entry: {e}") from None

        return self._call("GET", path, content_id=content_id).addCallback(parse)

    def leave(self, node_id: str) -> Deferred[None]:
        """Tell the tracker this node is gone."""
        d = self._call("POST", "/api/v1/leave", _encode({"node_id": node_id}))
        return d.addCallback(lambda _: None)

    # -- billing and reservations ----------------------------------------------

    def report_usage(
        self, node_id: str, seq: int, contents: Mapping[str, Mapping[str, int]]
    ) -> Deferred[dict[str, Any]]:
        """
        Report what node C{node_id} counted since its previous report:
        C{contents} maps content ids to C{{"from_peers", "from_servers",
        "from_origin", "uploaded"}} (missing counters are 0).  C{seq} must
        grow from one new report to the next; a report sent again with the
        same C{seq} is not counted twice.  Fire with C{{"period",
        "used_bytes", "quota_bytes", "accepted", "unknown"}}.
        """
        body = {
            "node_id": node_id,
            "seq": seq,
            "contents": [{"content_id": cid, **counts} for cid, counts in contents.items()],
        }
        return self._call("POST", "/api/v1/usage", _encode(body)).addCallback(_object)

    def usage(self, period: str | None = None) -> Deferred[dict[str, Any]]:
        """
        The logged-in user's usage in C{period} (C{YYYY-MM}; default the
        current month): C{{"user", "period", "used_bytes", "quota_bytes",
        "uploaded_bytes", "contents": [...]}}.
        """
        path = "/api/v1/me/usage" + _query(period=period)
        return self._call("GET", path).addCallback(_object)

    def usage_export(self, period: str | None = None, user: str | None = None) -> Deferred[dict[str, Any]]:
        """(Admins.) Every user's (or C{user}'s) usage rows: C{{"period", "usage": [...]}}."""
        path = "/api/v1/usage" + _query(period=period, user=user, format="json")
        return self._call("GET", path).addCallback(_object)

    def reserve(self, content_id: str, start: float, end: float) -> Deferred[dict[str, Any]]:
        """
        Reserve C{content_id} from C{start} to C{end} (unix seconds, rounded
        down); fire with C{{"id", "content_id", "start", "end", "created"}}.
        """
        body = {"content_id": content_id, "start": int(start), "end": int(end)}
        d = self._call("POST", "/api/v1/reservations", _encode(body), content_id=content_id)
        return d.addCallback(_object)

    def reservations(self) -> Deferred[list[dict[str, Any]]]:
        """The logged-in user's reservations that have not ended, by start."""

        def parse(body: object) -> list[dict[str, Any]]:
            found = _object(body).get("reservations")
            if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
                raise TrackerError("tracker reservation list is malformed")
            return found

        return self._call("GET", "/api/v1/reservations").addCallback(parse)

    def cancel_reservation(self, reservation_id: str) -> Deferred[None]:
        """Delete one of the user's reservations (an admin may delete anyone's)."""
        path = f"/api/v1/reservations/{quote(reservation_id, safe='')}"
        return self._call("DELETE", path).addCallback(lambda _: None)

    # -- plumbing ------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        content_id: str | None = None,
    ) -> Deferred[object]:
        """
        One authenticated request (logging in first if need be, and once
        more if the token was refused): fire with the decoded JSON of a 2xx
        answer, or fail.
        """
        d: Deferred[str | None]
        if self.token is None and self.credentials is not None:
            d = self.login().addCallback(lambda token: token)
        else:
            d = succeed(self.token)

        def send(token: str | None) -> Deferred[object]:
            return self._request(method, path, data, content_id, token)

        def retry(f: Failure, used: str | None) -> Deferred[object] | Failure:
            error = f.value
            if (
                self.credentials is None
                or not isinstance(error, TrackerError)
                or error.status != 401
                or error.code not in _RELOGIN_CODES
            ):
                return f
            if self.token is not None and self.token != used:
                return send(self.token)  # another call has logged in again meanwhile
            self.token = None
            return self.login().addCallback(send)

        def first(token: str | None) -> Deferred[object]:
            return send(token).addErrback(retry, token)

        return d.addCallback(first)

    def _request(
        self,
        method: str,
        path: str,
        data: bytes | None,
        content_id: str | None,
        token: str | None,
    ) -> Deferred[object]:
        url = self.base_url + path
        headers = Headers({b"Accept": [b"application/json"]})
        if token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + token.encode("ascii"))
        if data is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
        d: Deferred[Any] = self._http.request(method, url, headers=headers, data=data)

        def got_response(response: Any) -> Deferred[object]:
            status = int(response.code)
            body = read_body(response, self.max_body)
            return body.addCallback(self._decode, status, content_id)

        d.addCallback(got_response)

        def timed_out(result: object, timeout: float) -> Failure:
            # Whatever the cancelled request failed with (CancelledError,
            # ResponseNeverReceived, ...), the cause is the timeout.
            return Failure(TrackerError(f"{method} {url} timed out after {timeout}s", None, "timeout"))

        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=timed_out)
        d.addErrback(self._translate, method, url)
        return d

    def _decode(self, body: bytes, status: int, content_id: str | None) -> object:
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        if 200 <= status < 300:
            if doc is None and body:
                raise TrackerError("tracker answered with invalid JSON", status)
            return doc
        code: str | None = None
        message = f"tracker answered HTTP {status}"
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            err = doc["error"]
            if isinstance(err.get("code"), str):
                code = err["code"]
            if isinstance(err.get("message"), str):
                message = f"{message}: {err['message']}"
        if status == 404 and code == "unknown_content":
            raise UnknownContent(content_id or message)
        if status == 402 and code == "quota_exceeded":
            raise QuotaExceeded(message, status, code)
        raise TrackerError(message, status, code)

    def _translate(self, f: Failure, method: str, url: str) -> Failure:
        if f.check(TrackerError, UnknownContent):
            return f
        if f.check(CancelledError):
            return f
        return Failure(TrackerError(f"{method} {url} failed: {describe_failure(f)}"))


def describe_failure(f: Failure) -> str:
    """
    Why a request failed, in words: L{twisted.web.client} wraps the causes
    (a refused connection, a TLS handshake that failed) in
    C{ResponseNeverReceived} and the like, whose message is a list of
    L{Failure} reprs; this shows the causes themselves.
    """
    reasons = getattr(f.value, "reasons", None)
    if isinstance(reasons, list) and reasons and all(isinstance(r, Failure) for r in reasons):
        return "; ".join(describe_failure(r) for r in reasons)
    if f.check(SSL.Error):
        return f"TLS handshake failed: {f.getErrorMessage()}"
    if f.check(VerificationError):
        return f"TLS certificate is not for this host: {f.getErrorMessage()}"
    return f.getErrorMessage()


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _query(**params: str | None) -> str:
    """C{?a=1&b=2} of the parameters that are not None, or C{""}."""
    given = [(k, v) for k, v in params.items() if v is not None]
    return "?" + urlencode(given) if given else ""


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TrackerError("tracker answer is not a JSON object")
    return body


def _manifest(doc: object) -> Manifest:
    try:
        return Manifest.from_dict(doc)
    except ManifestError as e:
        raise TrackerError(f"tracker sent a bad manifest: {e}") from None


def _node(entry: object) -> NodeInfo | None:
    """One entry of a node list, or None (logged) if it is malformed."""
    try:
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        node_id, address = entry.get("node_id"), entry.get("address")
        state, last_seen = entry.get("state", {}), entry.get("last_seen")
        if not isinstance(node_id, str) or not isinstance(address, str):
            raise ValueError("node_id and address must be strings")
        if not isinstance(state, dict):
            raise ValueError("state must be an object")
        if isinstance(last_seen, bool) or not isinstance(last_seen, int | float):
            raise ValueError("last_seen must be a number")
        host, port = split_address(address)
    except ValueError as e:
        log.warn("Ignoring a malformed node entry from the tracker: {error}", error=e)
        return None
    return NodeInfo(node_id, host, port, state, float(last_seen))


def _content(entry: object) -> ContentInfo | None:
    """One entry of a content list, or None (logged) if it is malformed."""
    try:
        return ContentInfo.from_dict(entry)
    except ValueError as e:
        log.warn("Ignoring a malformed content entry from the tracker: {error}", error=e)
        return None
