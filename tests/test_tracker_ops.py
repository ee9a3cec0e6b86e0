# -*- test-case-name: tests.test_tracker_ops -*-
"""
Tests for the tracker's operations side: the Prometheus metrics (on their own
listener), the health check against a real database (working, closed,
unreachable, hung, and a PostgreSQL that goes away and comes back) and the
structured request events.  Over real HTTP on loopback, against SQLite and
(with C{MESHSTREAM_TEST_PG}) PostgreSQL; the tracker's clock is a L{Clock}.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream.tap import tracker as tap
from meshstream.tracker import auth
from meshstream.tracker.api import HEALTH_TIMEOUT, Route, TrackerAPI, parse_login, route_label
from meshstream.tracker.metrics import LATENCY_BUCKETS, TrackerMetrics, method_label
from meshstream.tracker.service import TrackerService, build_tracker_service
from meshstream.tracker.store import POSTGRES_POOL_SIZE, SCHEMA_VERSION
from tests._accounts import PASSWORD, make_user
from tests._pg import SKIP_PG, pg_schema_url
from tests.test_tracker_api import START, make_manifest, temp_path

INTERVAL = 30.0
EXPIRE_AFTER = 3
LOOPBACK = "tcp:0:interface=127.0.0.1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


class Tracker:
    """A tracker service on loopback, with an HTTP client; the parts the tests poke at."""

    def __init__(self, case: unittest.TestCase, db: str, clock: Clock) -> None:
        self.case = case
        self.clock = clock
        self.service = build_tracker_service(
            reactor,
            [LOOPBACK],
            db,
            Ed25519PrivateKey.generate(),
            announce_interval=INTERVAL,
            expire_after=EXPIRE_AFTER,
            clock=clock,
            metrics_listen=[LOOPBACK],
        )
        # The timer's runs (a purge, then a count), to wait for.
        self.runs: list[Deferred[Any]] = []
        api = self.service.api
        for name in ("purge_expired", "refresh_stats"):
            case.patch(api, name, self._recorded(getattr(api, name)))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.base = self.metrics_base = ""

    def _recorded(self, run: Callable[[], Deferred[Any]]) -> Callable[[], Deferred[Any]]:
        def recorded() -> Deferred[Any]:
            d = run()
            self.runs.append(d)
            return d

        return recorded

    async def start(self) -> None:
        self.service.startService()
        self.case.addCleanup(self.service.stopService)
        (api,) = await self.service.listening()
        (metrics,) = await self.service.metrics_listening()
        self.base = _url(api.getHost())
        self.metrics_base = _url(metrics.getHost())

    async def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None, base: str = ""
    ) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = await self.http.request(method, (base or self.base) + path, data=body, headers=headers)
        raw = await response.content()
        return response.code, json.loads(raw)

    async def login(self, name: str, password: str = PASSWORD) -> tuple[int, Any]:
        body = json.dumps({"user": name, "password": password}).encode()
        return await self.request("POST", "/api/v1/login", body)

    async def scrape(self, accept: str | None = None) -> tuple[str, str]:
        headers = {} if accept is None else {"Accept": accept}
        response = await self.http.get(self.metrics_base + "/metrics", headers=headers)
        self.case.assertEqual(response.code, 200)
        (content_type,) = response.headers.getRawHeaders(b"content-type")
        return (await response.content()).decode("utf-8"), content_type.decode("ascii")

    async def metric_samples(self) -> Samples:
        text, _ = await self.scrape()
        return samples(text)

    async def refreshed(self) -> None:
        """Wait for the timer's runs: a purge's callbacks start the count, before this resumes."""
        while self.runs:
            await self.runs.pop(0)


def _url(address: object) -> str:
    assert isinstance(address, IPv4Address)
    return f"http://127.0.0.1:{address.port}"


class Events:
    """The log events published while a test runs."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def where(self, **fields: object) -> list[LogEvent]:
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]


class _OpsMixin:
    """Metrics, health and request events against the database C{db_url()} names."""

    def db_url(self) -> str:
        raise NotImplementedError

    async def setUp(self) -> None:
        assert isinstance(self, unittest.TestCase)
        self.clock = Clock()
        self.clock.advance(START)
        self.db = self.db_url()
        self.tracker = Tracker(self, self.db, self.clock)
        await self.tracker.start()
        await self.tracker.service.ready()
        await make_user(self.tracker.service.store, "admin", auth.ADMIN)
        _, doc = await self.tracker.login("admin")
        self.token: str = doc["token"]

    # -- metrics -------------------------------------------------------------

    async def test_requests_counted_by_route(self: Any) -> None:
        t = self.tracker
        cid = make_manifest(1).content_id
        await t.request("POST", "/api/v1/manifests", make_manifest(1).to_json(), token=self.token)
        await t.request("GET", f"/api/v1/contents/{cid}/nodes?limit=3", token=self.token)
        await t.request("GET", f"/api/v1/contents/{'ab' * 32}/nodes", token=self.token)  # 404
        await t.request("GET", f"/api/v1/contents/{cid}/nodes")  # 401
        await t.request("GET", "/api/v1/no/such/thing")
        await t.request("PUT", f"/api/v1/manifests/{cid}")  # 405
        await t.request("GET", "/api/v1/health")
        await t.login("admin", "wrong")
        text, content_type = await t.scrape()
        self.assertEqual(content_type, "text/plain; version=0.0.4; charset=utf-8")
        self.assertNotIn(cid, text)  # routes, never raw paths
        got = samples(text)
        requests = "meshstream_tracker_requests_total"
        for (route, method, status), count in {
            ("manifests", "POST", "201"): 1,
            ("contents/{id}/nodes", "GET", "200"): 1,
            ("contents/{id}/nodes", "GET", "404"): 1,
            ("contents/{id}/nodes", "GET", "401"): 1,
            ("unmatched", "GET", "404"): 1,
            ("manifests/{id}", "PUT", "405"): 1,
            ("health", "GET", "200"): 1,
            ("login", "POST", "200"): 1,
            ("login", "POST", "401"): 1,
        }.items():
            key = (requests, labels(route=route, method=method, status=status))
            self.assertEqual(got.get(key), count, key)
        self.assertEqual(got[("meshstream_tracker_logins_total", labels(outcome="ok"))], 1)
        self.assertEqual(got[("meshstream_tracker_logins_total", labels(outcome="bad_credentials"))], 1)
        self.assertEqual(got[("meshstream_tracker_logins_total", labels(outcome="disabled"))], 0)
        # One latency observation per request, in the configured buckets.
        nodes_count = got[
            ("meshstream_tracker_request_duration_seconds_count", labels(route="contents/{id}/nodes"))
        ]
        self.assertEqual(nodes_count, 3)
        buckets = {
            dict(k[1])["le"]
            for k in got
            if k[0] == "meshstream_tracker_request_duration_seconds_bucket"
            and dict(k[1])["route"] == "health"
        }
        self.assertEqual(buckets, {str(b) for b in LATENCY_BUCKETS} | {"+Inf"})

    async def test_announces_and_gauges(self: Any) -> None:
        """The gauges hold what the purge timer last counted."""
        t = self.tracker
        for seed in (2, 3):
            await t.request("POST", "/api/v1/manifests", make_manifest(seed).to_json(), token=self.token)
        cid = make_manifest(2).content_id
        for node in ("a", "b"):
            body = json.dumps({"node_id": node, "address": "10.0.0.1:7000", "contents": [cid]}).encode()
            status, _ = await t.request("POST", "/api/v1/announce", body, token=self.token)
            self.assertEqual(status, 200)
        await t.request("POST", "/api/v1/announce", b"{}", token=self.token)  # refused: not counted
        got = await t.metric_samples()
        self.assertEqual(got[("meshstream_tracker_announces_total", labels())], 2)
        # New nodes' holdings are written with their keys: none rewritten; the counter is the store's.
        self.assertEqual(got[("meshstream_tracker_node_keys_rewritten_total", labels())], 0)
        t.service.store.rekeyed = 5
        got = await t.metric_samples()
        self.assertEqual(got[("meshstream_tracker_node_keys_rewritten_total", labels())], 5)
        await t.refreshed()  # the timer's first run, at start
        self.clock.advance(INTERVAL)
        await t.refreshed()
        got = await t.metric_samples()
        self.assertEqual(got[("meshstream_tracker_live_nodes", labels())], 2)
        self.assertEqual(got[("meshstream_tracker_contents", labels())], 2)
        self.clock.advance(INTERVAL * EXPIRE_AFTER)
        await t.refreshed()
        got = await t.metric_samples()
        self.assertEqual(got[("meshstream_tracker_live_nodes", labels())], 0)
        self.assertEqual(got[("meshstream_tracker_contents", labels())], 2)

    async def test_metrics_only_on_their_listener(self: Any) -> None:
        t = self.tracker
        status, doc = await t.request("GET", "/metrics")
        self.assertEqual((status, doc["error"]["code"]), (404, "not_found"))
        response = await t.http.get(t.metrics_base + "/api/v1/health")
        self.assertEqual(response.code, 404)
        await response.content()
        response = await t.http.post(t.metrics_base + "/metrics", data=b"")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")), (405, [b"GET, HEAD"]))
        await response.content()

    async def test_openmetrics(self: Any) -> None:
        text, content_type = await self.tracker.scrape("application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertTrue(text.endswith("# EOF\n"))

    async def test_declared_too_large_counted_and_logged(self: Any) -> None:
        """A body declared over the cap is refused before it is sent, and still counted and logged."""
        events = Events(self)
        t = self.tracker
        raw = await _raw_exchange(
            t.base,
            b"POST /api/v1/announce HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), raw)
        self.assertEqual(json.loads(body)["error"]["code"], "body_too_large")
        (event,) = events.where(status=413)
        self.assertEqual(
            (event["route"], event["method"], event["code"]), ("announce", "POST", "body_too_large")
        )
        got = await t.metric_samples()
        key = ("meshstream_tracker_requests_total", labels(route="announce", method="POST", status="413"))
        self.assertEqual(got[key], 1)

    # -- health ----------------------------------------------------------------

    async def test_health_closed_store(self: Any) -> None:
        """A store that cannot answer: 503, and a store error counted."""
        t = self.tracker
        status, doc = await t.request("GET", "/api/v1/health")
        self.assertEqual((status, doc), (200, {"status": "ok", "schema": SCHEMA_VERSION}))
        t.service.store.close()
        status, doc = await t.request("GET", "/api/v1/health")
        self.assertEqual(status, 503)
        self.assertEqual((doc["status"], doc["schema"]), ("unavailable", SCHEMA_VERSION))
        self.assertEqual(doc["error"]["code"], "database_unavailable")
        self.assertIn("closed", doc["error"]["message"])
        got = await t.metric_samples()
        self.assertEqual(got[("meshstream_tracker_store_errors_total", labels())], 1)
        key = ("meshstream_tracker_requests_total", labels(route="health", method="GET", status="503"))
        self.assertEqual(got[key], 1)

    async def test_health_times_out(self: Any) -> None:
        """
        A database that does not answer: 503 after C{HEALTH_TIMEOUT} seconds
        on the tracker's clock; concurrent checks share one ping.
        """
        t = self.tracker
        pings: list[Deferred[None]] = []
        self.patch(t.service.store, "ping", lambda: pings.append(Deferred()) or pings[-1])
        first = Deferred.fromCoroutine(t.request("GET", "/api/v1/health"))
        second = Deferred.fromCoroutine(t.request("GET", "/api/v1/health"))
        while t.service.api._ping.waiting < 2:  # both requests arrived
            await _turn()
        self.assertEqual(len(pings), 1)
        self.clock.advance(HEALTH_TIMEOUT - 0.1)
        self.assertNoResult(first)
        self.clock.advance(0.1)
        for d in (first, second):
            status, doc = await d
            self.assertEqual((status, doc["status"]), (503, "unavailable"))
            self.assertIn("timed out", doc["error"]["message"])
        self.assertEqual(t.service.api._ping.waiting, 0)
        # The hung ping still holds its place: a new check does not queue another...
        third = Deferred.fromCoroutine(t.request("GET", "/api/v1/health"))
        while not t.service.api._ping.waiting:
            await _turn()
        self.assertEqual(len(pings), 1)
        # ...and when the database answers at last, it is healthy again.
        pings[0].callback(None)
        self.assertEqual(await third, (200, {"status": "ok", "schema": SCHEMA_VERSION}))

    # -- request events ------------------------------------------------------

    async def test_request_events(self: Any) -> None:
        """
        With C{log_requests}, each request is one event with the same fields;
        refused ones at info with their code.
        """
        events = Events(self)
        t = self.tracker
        t.service.api.log_requests = True
        await t.request("GET", "/api/v1/me", token=self.token)
        await t.request("GET", "/api/v1/me", token="forged")
        await t.login("admin", "wrong")
        fields = {"method", "route", "path", "client", "status", "code", "user", "duration"}
        (ok,) = events.where(route="me", status=200)
        (refused,) = events.where(route="me", status=401)
        (failed_login,) = events.where(route="login", status=401)
        for event in (ok, refused, failed_login):
            self.assertLessEqual(fields, set(event), event)
            self.assertEqual(event["log_namespace"], "meshstream.tracker.api")
            self.assertEqual(event["client"], "127.0.0.1")
            self.assertIsInstance(event["duration"], float)
            self.assertGreaterEqual(event["duration"], 0)
        self.assertEqual((ok["log_level"].name, ok["user"], ok["code"]), ("debug", "admin", None))
        self.assertEqual(
            (refused["log_level"].name, refused["user"], refused["code"]), ("info", None, "bad_token")
        )
        self.assertEqual(refused["path"], "/api/v1/me")
        self.assertEqual(failed_login["code"], "bad_credentials")
        # The login's own event says who tried.
        (attempt,) = events.where(log_format="Failed login for {user} from {client}")
        self.assertEqual(
            (attempt["user"], attempt["client"], attempt["code"]), ("admin", "127.0.0.1", "bad_credentials")
        )

    async def test_successes_not_logged_by_default(self: Any) -> None:
        """Without C{log_requests}, a successful request makes no event; a refused one does."""
        events = Events(self)
        t = self.tracker
        self.assertFalse(t.service.api.log_requests)
        await t.request("GET", "/api/v1/me", token=self.token)
        await t.request("GET", "/api/v1/me", token="forged")
        self.assertEqual(events.where(route="me", status=200), [])
        (refused,) = events.where(route="me", status=401)
        self.assertEqual(refused["code"], "bad_token")

    async def test_unhandled_error_events(self: Any) -> None:
        events = Events(self)
        t = self.tracker

        def broken(*args: object) -> Deferred[Any]:
            return Deferred.fromCoroutine(_raise(RuntimeError("disk on fire")))

        self.patch(t.service.store, "node_list", broken)
        status, doc = await t.request("GET", f"/api/v1/contents/{'ab' * 32}/nodes", token=self.token)
        self.assertEqual((status, doc["error"]["code"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        (failure,) = [e for e in events.events if "log_failure" in e]
        self.assertEqual((failure["route"], failure["method"]), ("contents/{id}/nodes", "GET"))
        self.assertIsInstance(failure["log_failure"], Failure)
        (answered,) = events.where(status=500)
        self.assertEqual(
            (answered["log_level"].name, answered["code"], answered["user"]),
            ("error", "internal_error", "admin"),
        )


async def _raise(e: Exception) -> Any:
    raise e


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(b"".join(self.data))


async def _raw_exchange(base: str, data: bytes) -> bytes:
    """Send C{data} to C{base}'s port; everything the tracker sent until it closed."""
    port = urlsplit(base).port
    assert port is not None
    collect = _Collect()
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), collect)
    protocol.transport.write(data)
    return await collect.closed


async def _turn() -> None:
    """Let the reactor run once (the HTTP exchange is real)."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    await d


class SQLiteOpsTests(_OpsMixin, unittest.TestCase):
    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class PostgresOpsTests(_OpsMixin, unittest.TestCase):
    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)

    async def test_health_while_postgresql_is_away(self) -> None:
        """
        A tracker reaching PostgreSQL through a TCP proxy: when the proxy
        drops every connection and stops listening (as a stopped server
        would), the health check answers 503; when it listens again, the
        pool reconnects and the check answers 200.
        """
        parts = urlsplit(self.db)
        proxy = _Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        port = await proxy.listen(0)
        netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
        proxied = urlunsplit(parts._replace(netloc=netloc))
        t = Tracker(self, proxied, self.clock)
        await t.start()
        self.addCleanup(proxy.stop)  # runs before the tracker stops
        await t.service.ready()
        self.assertEqual(
            await t.request("GET", "/api/v1/health"), (200, {"status": "ok", "schema": SCHEMA_VERSION})
        )

        await proxy.stop()
        for _ in range(POSTGRES_POOL_SIZE + 1):
            status, doc = await t.request("GET", "/api/v1/health")
            self.assertEqual((status, doc["error"]["code"]), (503, "database_unavailable"))
        self.flushLoggedErrors()  # adbapi logs the failed rollbacks of the dead connections

        await proxy.listen(port)
        statuses = []
        for _ in range(POSTGRES_POOL_SIZE + 1):  # each pool thread finds its connection dead once
            status, _ = await t.request("GET", "/api/v1/health")
            statuses.append(status)
            if status == 200:
                break
        self.assertEqual(statuses[-1], 200, statuses)
        self.flushLoggedErrors()
        got = await t.metric_samples()
        self.assertGreaterEqual(
            got[("meshstream_tracker_store_errors_total", labels())], POSTGRES_POOL_SIZE + 1
        )


class _Proxy:
    """A TCP forwarder that can drop every connection and stop listening, then listen again."""

    def __init__(self, host: str, port: int) -> None:
        self.factory = portforward.ProxyFactory(host, port)
        self.factory.noisy = False
        self.open: set[Protocol] = set()
        proxy = self

        class Server(portforward.ProxyServer):
            noisy = False

            def connectionMade(self) -> None:
                proxy.open.add(self)
                super().connectionMade()

            def connectionLost(self, reason: Failure | None = None) -> None:
                proxy.open.discard(self)
                super().connectionLost(reason)

        self.factory.protocol = Server
        self.port: Any = None

    async def listen(self, port: int) -> int:
        self.port = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        while self.open:
            for p in list(self.open):
                if p.transport is not None:
                    p.transport.abortConnection()
            await _turn()


class HealthWithoutDatabaseTests(unittest.TestCase):
    """A tracker whose PostgreSQL cannot be reached at all: 503, never a hang or a 500."""

    async def test_refused(self) -> None:
        """Nothing listens at the database's address: the store fails to open."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        clock = Clock()
        t = Tracker(self, f"postgresql://nobody@127.0.0.1:{port}/db?connect_timeout=2", clock)
        await t.start()
        await self.assertFailure(t.service.ready(), psycopg.OperationalError)
        status, doc = await t.request("GET", "/api/v1/health")
        self.assertEqual(
            (status, doc["status"], doc["error"]["code"]), (503, "unavailable", "database_unavailable")
        )
        self.flushLoggedErrors()

    async def test_hung(self) -> None:
        """A database address that accepts and never answers: 503 when the check times out."""
        silent = _Silent()
        listening = reactor.listenTCP(0, silent, interface="127.0.0.1")
        clock = Clock()
        url = f"postgresql://nobody@127.0.0.1:{listening.getHost().port}/db?connect_timeout=30"
        t = Tracker(self, url, clock)
        await t.start()
        self.addCleanup(silent.hang_up, listening)  # before the tracker stops: frees the pool's thread
        answer = Deferred.fromCoroutine(t.request("GET", "/api/v1/health"))
        while not t.service.api._ping.waiting:
            await _turn()
        clock.advance(HEALTH_TIMEOUT)
        status, doc = await answer
        self.assertEqual((status, doc["error"]["code"]), (503, "database_unavailable"))
        self.assertIn("timed out", doc["error"]["message"])
        await silent.hang_up(listening)
        await self.assertFailure(t.service.ready(), Exception)
        await _turn()  # ready() fires before the service's own errback logs the failure
        self.assertEqual(len(self.flushLoggedErrors(psycopg.OperationalError)), 3)


class _Silent(Factory):
    """Accepts connections and says nothing."""

    noisy = False

    def __init__(self) -> None:
        self.connections: list[Protocol] = []

    def buildProtocol(self, addr: object) -> Protocol:
        p = Protocol()
        self.connections.append(p)
        return p

    async def hang_up(self, listening: Any) -> None:
        if listening.connected:
            await listening.stopListening()
        for p in self.connections:
            if p.transport is not None:
                p.transport.abortConnection()
        self.connections.clear()


class UnitTests(unittest.SynchronousTestCase):
    """Labels, validators and options, without a network."""

    def test_route_labels(self) -> None:
        route = Route(b"GET", ("contents", None, "nodes"), TrackerAPI.nodes)
        self.assertEqual(route.label, "contents/{id}/nodes")
        self.assertEqual(route_label(["api", "v1", "manifests", "x" * 64]), "manifests/{id}")
        self.assertEqual(route_label(["api", "v1", "manifests", "a", "b"]), "unmatched")
        self.assertEqual(route_label(["metrics"]), "unmatched")
        self.assertEqual([method_label(m) for m in (b"GET", b"BREW", b"\xff")], ["GET", "other", "other"])

    def test_registries_are_separate(self) -> None:
        """Two trackers in one process count apart (and neither uses the global registry)."""
        a, b = TrackerMetrics(), TrackerMetrics()
        a.request("health", b"GET", 200, 0.001)
        self.assertEqual(
            a.registry.get_sample_value(
                "meshstream_tracker_requests_total", {"route": "health", "method": "GET", "status": "200"}
            ),
            1,
        )
        self.assertIsNone(
            b.registry.get_sample_value(
                "meshstream_tracker_requests_total", {"route": "health", "method": "GET", "status": "200"}
            )
        )

    def test_store_errors_read_at_scrape(self) -> None:
        errors = [0]
        metrics = TrackerMetrics(store_errors=lambda: errors[0])
        errors[0] = 3
        self.assertEqual(metrics.registry.get_sample_value("meshstream_tracker_store_errors_total"), 3)

    def test_login_refuses_lone_surrogates(self) -> None:
        """Found by the fuzz tests: such a password made the hash function fail (a 500)."""
        from meshstream.tracker.api import ApiError

        with self.assertRaises(ApiError) as e:
            parse_login({"user": "alice", "password": "a\ud800"})
        self.assertEqual((e.exception.status, e.exception.code), (400, "bad_request"))
        self.assertEqual(parse_login({"user": "alice", "password": "pässwörd 🔑"}), ("alice", "pässwörd 🔑"))

    def test_state_refuses_integers_beyond_floats(self) -> None:
        """Found by the fuzz tests: math.isfinite() raised OverflowError on them (a 500)."""
        from meshstream.tracker.api import ApiError, parse_state

        for value in (10**309, -(10**309)):
            with self.assertRaises(ApiError) as e:
                parse_state({"upload_bps": value})
            self.assertEqual((e.exception.status, e.exception.code), (400, "bad_request"))
        self.assertEqual(parse_state({"upload_bps": 10**18}), {"upload_bps": 10**18})

    def test_metrics_listen_option(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["metrics-listen"], [])
        options = tap.Options()
        options.parseOptions(
            ["--metrics-listen", "tcp:9107:interface=127.0.0.1", "--metrics-listen", "unix:/run/m.sock"]
        )
        self.assertEqual(options["metrics-listen"], ["tcp:9107:interface=127.0.0.1", "unix:/run/m.sock"])

    def test_service_tree_with_metrics(self) -> None:
        path = temp_path(self)
        service = build_tracker_service(
            reactor,
            [LOOPBACK],
            f"sqlite:{path}",
            Ed25519PrivateKey.generate(),
            metrics_listen=[LOOPBACK, LOOPBACK],
        )
        self.addCleanup(service.store.close)
        assert isinstance(service, TrackerService)
        self.assertEqual(sum(isinstance(c, StreamServerEndpointService) for c in service), 3)
