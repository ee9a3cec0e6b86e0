# -*- test-case-name: tests.test_tracker_api -*-
"""
The tracker's HTTP/JSON API (version 1), on plain twisted.web.

L{TrackerAPI} holds what the handlers need (the store, the signing key, the
clock and the announce timing) and L{TrackerAPI.resource} is the root to
serve.  Requests are routed in one place (L{_ROUTES}); every handler returns
(or fires with) a L{Reply} or raises L{ApiError}, and L{TrackerResource}
turns both into JSON.  Anything else that goes wrong is logged with its
traceback and answered with a 500 JSON error.

Request bodies are validated by pure functions (L{parse_announce},
L{parse_node_id}, ...) that raise L{ApiError}; nothing is written to the
store unless the whole body is valid.  See docs/api.md for the endpoints.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from ipaddress import ip_address
from typing import Any

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from meshstream.manifest import Manifest, ManifestError, public_key_text
from meshstream.tracker.store import SCHEMA_VERSION, NodeRecord, TrackerStore

log = Logger()

KIB = 1024
MIB = 1024 * KIB
DEFAULT_ANNOUNCE_LIMIT = 1 * MIB
DEFAULT_MANIFEST_LIMIT = 16 * MIB
SMALL_BODY_LIMIT = 64 * KIB  # leave

MAX_CONTENTS = 10_000
DEFAULT_NODES_LIMIT = 50
MAX_NODES_LIMIT = 200
MAX_EXCLUDE = 1000
MAX_HOST = 253

CONTENT_ID_RE = re.compile(r"[0-9a-f]{64}\Z")
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
}
INTEGER_FIELDS = frozenset({"connections"})
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
    """A successful answer: a status and a JSON-able body."""

    status: int
    body: object


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
        if not math.isfinite(v) or v < 0 or v > limit:
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
    for c in contents:
        if not isinstance(c, str) or not CONTENT_ID_RE.match(c):
            raise bad_request("contents must be a list of content ids")
    state = parse_state(obj.get("state"))
    return Announce(node_id, host, port, tuple(dict.fromkeys(contents)), state)


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


# -- the API -----------------------------------------------------------------


Handler = Callable[["TrackerAPI", Request, Sequence[str]], "Reply | Deferred[Reply]"]


@frozen
class Route:
    method: bytes
    pattern: tuple[str | None, ...]  # None matches one path segment
    handler: Handler


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
    ) -> None:
        self.store = store
        self._key = signing_key
        self._public_text = public_key_text(signing_key.public_key())
        self.clock = clock
        self.announce_interval = announce_interval
        self.expire_after = expire_after
        self.announce_limit = announce_limit
        self.manifest_limit = manifest_limit

    @property
    def ttl(self) -> float:
        """How long a node stays listed after its last announce."""
        return self.announce_interval * self.expire_after

    def resource(self) -> TrackerResource:
        return TrackerResource(self)

    def purge_expired(self) -> Deferred[int]:
        """Drop the nodes that missed C{expire_after} announces."""
        d = self.store.purge(self.clock.seconds() - self.ttl)

        def logged(n: int) -> int:
            if n:
                log.info("Purged {count} expired nodes", count=n)
            return n

        return d.addCallback(logged)

    # -- handlers ----------------------------------------------------------

    def health(self, request: Request, args: Sequence[str]) -> Reply:
        return Reply(200, {"status": "ok", "schema": SCHEMA_VERSION})

    def key(self, request: Request, args: Sequence[str]) -> Reply:
        return Reply(200, {"algorithm": "ed25519", "public_key": self._public_text})

    def register_manifest(self, request: Request, args: Sequence[str]) -> Deferred[Reply]:
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
        d = self.store.add_manifest(signed.content_id, text, self.clock.seconds())

        def stored(result: tuple[bool, str]) -> Reply:
            created, stored_text = result
            if created:
                log.info("Registered content {content_id}", content_id=signed.content_id)
            return Reply(
                201 if created else 200,
                {"content_id": signed.content_id, "manifest": json.loads(stored_text)},
            )

        return d.addCallback(stored)

    def get_manifest(self, request: Request, args: Sequence[str]) -> Deferred[Reply]:
        content_id = parse_content_id(args[0])

        def found(text: str | None) -> Reply:
            if text is None:
                raise ApiError(404, "unknown_content", f"no content {content_id}")
            return Reply(200, json.loads(text))

        return self.store.get_manifest(content_id).addCallback(found)

    def announce(self, request: Request, args: Sequence[str]) -> Deferred[Reply]:
        ann = parse_announce(parse_json(read_body(request, self.announce_limit)))
        host = ann.host
        if host in WILDCARD_HOSTS:
            host = client_host(request)
        d = self.store.announce(
            ann.node_id,
            format_address(host, ann.port),
            ann.state,
            self.clock.seconds(),
            ann.contents,
        )

        def done(unknown: list[str]) -> Reply:
            return Reply(
                200,
                {"interval": self.announce_interval, "expires_in": self.ttl, "unknown": unknown},
            )

        return d.addCallback(done)

    def leave(self, request: Request, args: Sequence[str]) -> Deferred[Reply]:
        node_id = parse_leave(parse_json(read_body(request, SMALL_BODY_LIMIT)))
        return self.store.leave(node_id).addCallback(lambda _: Reply(200, {}))

    def nodes(self, request: Request, args: Sequence[str]) -> Deferred[Reply]:
        content_id = parse_content_id(args[0])
        limit, exclude = parse_nodes_query(request.args or {})
        # The store ranks, excludes and limits (in the database).
        d = self.store.nodes_for(content_id, self.clock.seconds() - self.ttl, limit, exclude)

        def ranked(records: list[NodeRecord] | None) -> Reply:
            if records is None:
                raise ApiError(404, "unknown_content", f"no content {content_id}")
            return Reply(200, {"content_id": content_id, "nodes": [r.to_dict() for r in records]})

        return d.addCallback(ranked)


_ROUTES: tuple[Route, ...] = (
    Route(b"GET", ("health",), TrackerAPI.health),
    Route(b"GET", ("key",), TrackerAPI.key),
    Route(b"POST", ("manifests",), TrackerAPI.register_manifest),
    Route(b"GET", ("manifests", None), TrackerAPI.get_manifest),
    Route(b"POST", ("announce",), TrackerAPI.announce),
    Route(b"POST", ("leave",), TrackerAPI.leave),
    Route(b"GET", ("contents", None, "nodes"), TrackerAPI.nodes),
)
API_PREFIX = ("api", "v1")


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


def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, or raise 413 if it is (or claims to be) over C{limit}."""

    def too_large() -> ApiError:
        return ApiError(413, "body_too_large", f"the request body is limited to {limit} bytes")

    if getattr(request, "body_too_large", False):
        raise too_large()
    length = request.getHeader("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise bad_request("invalid Content-Length") from None
        if declared > limit:
            raise too_large()
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(limit + 1)
    if len(body) > limit:
        raise too_large()
    return body


class BoundedRequest(Request):
    """
    A request that stops buffering its body past C{max_body} bytes.

    twisted.web reads the whole body before a resource sees the request; this
    keeps a client from filling memory or disk with a huge (or endless
    chunked) body.  L{read_body} answers 413 when C{body_too_large} is set.
    """

    max_body = DEFAULT_MANIFEST_LIMIT
    body_too_large = False
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


def client_host(request: IRequest) -> str:
    """The IP address the request came from (what a wildcard host stands for)."""
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else "127.0.0.1"


def _path_segments(request: Request) -> list[str]:
    return [seg.decode("utf-8", "replace") for seg in request.postpath or []]


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


Answer = tuple[int, dict[str, str], object]


class TrackerResource(Resource):
    """The root resource: routes, runs the handler and writes the JSON answer."""

    isLeaf = True

    def __init__(self, api: TrackerAPI) -> None:
        super().__init__()
        self._api = api

    def render(self, request: Request) -> int:
        finished = [False]

        def lost(_: object) -> None:
            finished[0] = True

        request.notifyFinish().addBoth(lost)
        d = self._answer(request)
        d.addCallback(self._write, request, finished)
        d.addErrback(self._unwritten)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> Deferred[Answer]:
        try:
            route, captured = find_route(request.method, _path_segments(request))
            result = route.handler(self._api, request, captured)
        except Exception:
            return succeed(self._failure(Failure(), request))
        d = result if isinstance(result, Deferred) else succeed(result)
        return d.addCallbacks(self._success, self._failure, errbackArgs=(request,))

    def _unwritten(self, f: Failure) -> None:
        log.failure("Could not write a response", f)

    def _success(self, reply: Reply) -> Answer:
        return reply.status, {}, reply.body

    def _failure(self, f: Failure, request: Request) -> Answer:
        if f.check(ApiError):
            e = f.value
            assert isinstance(e, ApiError)
            return e.status, e.headers, error_body(e.code, e.message)
        log.failure("Unhandled error in {method} {uri}", f, method=request.method, uri=request.uri)
        return 500, {}, error_body("internal_error", "the tracker failed to answer")

    def _write(
        self,
        answer: Answer,
        request: Request,
        finished: list[bool],
    ) -> None:
        if finished[0]:
            return
        status, headers, body = answer
        data = _JSON_ENCODER.encode(body).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        for name, value in headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        request.setHeader(b"content-length", str(len(data)).encode("ascii"))
        request.write(data)
        request.finish()
