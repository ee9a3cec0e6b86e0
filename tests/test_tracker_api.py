# -*- test-case-name: tests.test_tracker_api -*-
"""
Tests for the tracker: the API over real HTTP on loopback with a real SQLite
file and (when C{MESHSTREAM_TEST_PG} is set, see C{tests/_pg.py}) a real
PostgreSQL database, the request validators, the service tree and the twistd
options.

The tracker's clock is a L{Clock} (so expiry is driven by the test) while the
real reactor does the networking.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import sys
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream.errors import TrackerError, UnknownContent
from meshstream.manifest import Manifest
from meshstream.tap import tracker as tap
from meshstream.tracker import auth
from meshstream.tracker.api import (
    DEFAULT_TOKEN_TTL,
    TOKEN_CACHE_SECONDS,
    TOKEN_PURGE_GRACE,
    ApiError,
    parse_address,
    parse_announce,
    parse_nodes_query,
)
from meshstream.tracker.client import TrackerClient
from meshstream.tracker.service import (
    TrackerKeyError,
    TrackerService,
    build_tracker_service,
    load_or_create_key,
)
from meshstream.tracker.store import SCHEMA_VERSION, StoreError, parse_db_url
from tests._accounts import PASSWORD, make_user
from tests._pg import SKIP_PG, pg_query, pg_schema_url
from tests.test_tracker_ranking import NoSpread

TABLES = {
    "manifests",
    "nodes",
    "holdings",
    "schema_version",
    "users",
    "tokens",
    "usage",
    "usage_reports",
    "reservations",
    "contents",
}
ALL_VERSIONS = [(v,) for v in range(1, SCHEMA_VERSION + 1)]
INTERVAL = 30.0
EXPIRE_AFTER = 3
START = 1_000_000.0


def temp_path(case: unittest.TestCase) -> str:
    """
    C{case.mktemp()}, removed (with its emptied parents) after the test:
    pytest, unlike trial, does not run tests in a scratch directory.
    """
    path = case.mktemp()
    leaf = os.path.dirname(path)

    def remove() -> None:
        shutil.rmtree(leaf, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.removedirs(os.path.dirname(leaf))

    case.addCleanup(remove)
    return path


def make_manifest(seed: int, name: str = "") -> Manifest:
    """A small manifest whose content id depends on C{seed}."""
    roots = tuple(bytes([seed % 256, b]) * 16 for b in range(3))
    return Manifest(
        size=3 * 1024 - 100,
        block_size=1024,
        sub_block_size=1024,
        block_roots=roots,
        name=name or f"content-{seed}",
        origins=("https://origin.example/c",),
    )


def state(capacity: int, used: int, connections: int) -> dict[str, float]:
    return {"upload_capacity_bps": capacity, "upload_bps": used, "connections": connections}


class _TrackerHTTPMixin:
    """
    The API, over HTTP, against the store C{db_url()} names; mixed into one
    L{unittest.TestCase} per database.
    """

    def db_url(self) -> str:
        """A C{--db} URL for a fresh, empty database."""
        raise NotImplementedError

    async def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.key = Ed25519PrivateKey.generate()
        self.db = self.db_url()
        self.service = build_tracker_service(
            reactor,
            ["tcp:0:interface=127.0.0.1"],
            self.db,
            self.key,
            announce_interval=INTERVAL,
            expire_after=EXPIRE_AFTER,
            clock=self.clock,
        )
        # The purge timer's runs, to wait for: a PostgreSQL pool has several
        # connections, so a later query may overtake a purge in flight.
        self.purges: list[Deferred[Any]] = []
        purge_expired = self.service.api.purge_expired

        def recorded() -> Deferred[Any]:
            d = purge_expired()
            self.purges.append(d)
            return d

        self.patch(self.service.api, "purge_expired", recorded)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)  # runs before stopService
        self.http = HTTPClient(Agent(reactor, pool=pool))
        ports = await self.service.listening()
        host = ports[0].getHost()
        assert isinstance(host, IPv4Address)
        self.base = f"http://127.0.0.1:{host.port}"
        await self.service.ready()
        self.admin = await make_user(self.service.store, "admin", auth.ADMIN)
        self.client = TrackerClient(self.http, self.base, reactor, credentials=self.admin)
        self.token = await self.client.login()

    # -- helpers -------------------------------------------------------------

    async def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = ""
    ) -> tuple[int, Any, Any]:
        """
        One request, with the admin's token unless C{token} is given
        (None: no Authorization header).
        """
        token = self.token if token == "" else token
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = await self.http.request(method, self.base + path, data=body, headers=headers)
        raw = await response.content()
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(raw), response.headers

    async def assert_error(
        self,
        method: str,
        path: str,
        body: bytes | None,
        status: int,
        code: str,
        token: str | None = "",
    ) -> None:
        got_status, doc, _ = await self.request(method, path, body, token)
        self.assertEqual((got_status, doc["error"]["code"]), (status, code), doc)
        self.assertEqual(set(doc), {"error"})
        self.assertEqual(set(doc["error"]), {"code", "message"})
        self.assertIsInstance(doc["error"]["message"], str)

    async def purged(self) -> None:
        """Wait for the purges the timer started."""
        while self.purges:
            await self.purges.pop(0)

    async def register(self, seed: int) -> str:
        signed = await self.client.register_manifest(make_manifest(seed))
        return signed.content_id

    # -- tests ---------------------------------------------------------------

    async def test_health(self) -> None:
        status, doc, _ = await self.request("GET", "/api/v1/health")
        self.assertEqual((status, doc), (200, {"status": "ok", "schema": SCHEMA_VERSION}))

    async def test_register_fetch_verify(self) -> None:
        manifest = make_manifest(1)
        status, doc, _ = await self.request("POST", "/api/v1/manifests", manifest.to_json())
        self.assertEqual(status, 201)
        self.assertEqual(doc["content_id"], manifest.content_id)
        key = await self.client.public_key()
        signed = Manifest.from_dict(doc["manifest"])
        signed.verify(key)
        fetched = await self.client.get_manifest(manifest.content_id)
        self.assertEqual(fetched, signed)
        fetched.verify(key)
        # The key endpoint's shape.
        status, doc, _ = await self.request("GET", "/api/v1/key")
        self.assertEqual((status, doc["algorithm"]), (200, "ed25519"))

    async def test_reregister_returns_first(self) -> None:
        first = make_manifest(2, name="first")
        _, doc1, _ = await self.request("POST", "/api/v1/manifests", first.to_json())
        second = make_manifest(2, name="second")  # same info, so same content id
        self.assertEqual(first.content_id, second.content_id)
        status, doc2, _ = await self.request("POST", "/api/v1/manifests", second.to_json())
        self.assertEqual(status, 200)
        self.assertEqual(doc2, doc1)
        self.assertEqual(doc2["manifest"]["name"], "first")

    async def test_supplied_signature_ignored(self) -> None:
        forged = Manifest.from_dict(make_manifest(3).to_dict()).sign(Ed25519PrivateKey.generate())
        signed = await self.client.register_manifest(forged)
        signed.verify(self.key.public_key())

    async def test_announce_and_rank(self) -> None:
        cid = await self.register(4)
        other = await self.register(5)
        unknown = "ab" * 32
        announced = {
            "slow": state(1000, 900, 1),  # 100 free
            "fast": state(10_000, 1000, 9),  # 9000 free
            "busy": state(5000, 1000, 7),  # 4000 free, 7 connections
            "calm": state(5000, 1000, 2),  # 4000 free, 2 connections
            "mute": {},  # unknown: neutral (the median free upload, 4000)
        }
        self.service.api.rng = NoSpread()  # the weight order, without the random spread
        for node_id, st_ in announced.items():
            result = await self.client.announce(node_id, f"10.0.0.{len(node_id)}:7000", [cid, unknown], st_)
            self.assertEqual(
                result,
                {"interval": INTERVAL, "expires_in": INTERVAL * 3, "unknown": [unknown], "reservations": []},
            )
        await self.client.announce("elsewhere", "10.9.9.9:1", [other], state(10**9, 0, 0))
        nodes = await self.client.nodes(cid)
        self.assertEqual([n.node_id for n in nodes], ["fast", "mute", "calm", "busy", "slow"])
        self.assertEqual((nodes[0].host, nodes[0].port), ("10.0.0.4", 7000))
        self.assertEqual(nodes[0].state, announced["fast"])
        self.assertEqual(nodes[0].last_seen, START)
        limited = await self.client.nodes(cid, limit=2, exclude=["fast", "busy"])
        # Without "fast" and "busy" the median free upload, mute's base, is 2050.
        self.assertEqual([n.node_id for n in limited], ["calm", "mute"])
        # Raw shape.
        status, doc, _ = await self.request("GET", f"/api/v1/contents/{cid}/nodes?limit=1")
        self.assertEqual(status, 200)
        self.assertEqual(
            doc,
            {
                "content_id": cid,
                "nodes": [
                    {
                        "node_id": "fast",
                        "address": "10.0.0.4:7000",
                        "state": announced["fast"],
                        "last_seen": START,
                    }
                ],
            },
        )

    # -- authentication ----------------------------------------------------

    async def login(self, name: str, password: str = PASSWORD) -> tuple[int, Any]:
        body = json.dumps({"user": name, "password": password}).encode()
        status, doc, _ = await self.request("POST", "/api/v1/login", body, token=None)
        return status, doc

    async def user_client(self, name: str, role: str = auth.USER) -> TrackerClient:
        creds = await make_user(self.service.store, name, role)
        return TrackerClient(self.http, self.base, reactor, credentials=creds)

    async def test_login_gives_an_expiring_token(self) -> None:
        await make_user(self.service.store, "alice")
        status, doc = await self.login("alice")
        self.assertEqual(status, 200)
        self.assertEqual(set(doc), {"token", "expires_in", "user", "role"})
        self.assertEqual((doc["user"], doc["role"], doc["expires_in"]), ("alice", "user", DEFAULT_TOKEN_TTL))
        status, me, _ = await self.request("GET", "/api/v1/me", token=doc["token"])
        self.assertEqual((status, me), (200, {"user": "alice", "role": "user", "quota_bytes": None}))
        # The store keeps only a digest of the token.
        self.assertIsNone(await self.service.store.token_principal(doc["token"]))

    async def test_bad_credentials(self) -> None:
        await make_user(self.service.store, "alice")
        for name, password in (("alice", "wrong"), ("nobody", PASSWORD)):
            status, doc = await self.login(name, password)
            self.assertEqual((status, doc["error"]["code"]), (401, "bad_credentials"))
        for body in (b"{", b"[]", b'{"user": "alice"}', b'{"user": "a b", "password": "x"}'):
            await self.assert_error(
                "POST", "/api/v1/login", body, 400, "bad_json" if body == b"{" else "bad_request"
            )

    async def test_disabled_user(self) -> None:
        """A disabled user cannot log in, and their tokens stop working."""
        creds = await make_user(self.service.store, "alice")
        _, doc = await self.login("alice")
        token = doc["token"]
        await self.service.store.update_user("alice", disabled=True)
        status, doc = await self.login("alice", creds.password)
        self.assertEqual((status, doc["error"]["code"]), (403, "user_disabled"))
        # Revoked in the store; this process notices when its cache entry lapses.
        self.clock.advance(TOKEN_CACHE_SECONDS)
        await self.assert_error("GET", "/api/v1/me", None, 401, "bad_token", token=token)

    async def test_calls_need_a_valid_token(self) -> None:
        cid = await self.register(40)
        body = json.dumps({"node_id": "n1", "address": "10.0.0.1:7000", "contents": [cid]}).encode()
        status, doc, headers = await self.request("POST", "/api/v1/announce", body, token=None)
        self.assertEqual((status, doc["error"]["code"]), (401, "unauthenticated"))
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="meshstream"'])
        await self.assert_error("POST", "/api/v1/announce", body, 401, "bad_token", token="forged")
        await self.assert_error(
            "GET", f"/api/v1/contents/{cid}/nodes", None, 401, "unauthenticated", token=None
        )
        await self.assert_error("GET", f"/api/v1/manifests/{cid}", None, 401, "unauthenticated", token=None)
        # Expired.
        self.clock.advance(DEFAULT_TOKEN_TTL)
        await self.assert_error("POST", "/api/v1/announce", body, 401, "token_expired")
        # Nothing was stored by the refused announces.
        self.assertEqual(await self.service.store.count_nodes(), 0)
        # Public endpoints stay public.
        status, _, _ = await self.request("GET", "/api/v1/key", token=None)
        self.assertEqual(status, 200)

    async def test_roles(self) -> None:
        """Only publishers (admin, server) register manifests."""
        viewer = await self.user_client("viewer")
        with self.assertRaises(TrackerError) as e:
            await viewer.register_manifest(make_manifest(41))
        self.assertEqual((e.exception.status, e.exception.code), (403, "forbidden"))
        with self.assertRaises(UnknownContent):
            await self.client.get_manifest(make_manifest(41).content_id)
        server = await self.user_client("cdn", auth.SERVER)
        signed = await server.register_manifest(make_manifest(41))
        self.assertEqual(await viewer.get_manifest(signed.content_id), signed)

    async def test_node_belongs_to_its_user(self) -> None:
        cid = await self.register(42)
        alice, bob = await self.user_client("alice"), await self.user_client("bob")
        await alice.announce("box-1", "10.0.0.1:7000", [cid], {})
        with self.assertRaises(TrackerError) as e:
            await bob.announce("box-1", "10.6.6.6:7000", [cid], {})
        self.assertEqual((e.exception.status, e.exception.code), (403, "node_owned"))
        with self.assertRaises(TrackerError) as e:
            await bob.leave("box-1")
        self.assertEqual(e.exception.code, "node_owned")
        nodes = await bob.nodes(cid)
        self.assertEqual([(n.node_id, n.host) for n in nodes], [("box-1", "10.0.0.1")])
        await alice.leave("box-1")
        await bob.announce("box-1", "10.6.6.6:7000", [cid], {})  # free again

    async def test_expired_tokens_are_purged(self) -> None:
        """The purge timer drops tokens an hour after they expired."""
        alice = await self.user_client("alice")
        await alice.login()  # expires at START + TTL, like the admin's first token
        self.clock.advance(DEFAULT_TOKEN_TTL + TOKEN_PURGE_GRACE - INTERVAL)
        await self.purged()
        await self.client.login()  # a fresh admin token
        self.clock.advance(INTERVAL)
        await self.purged()
        # Only the fresh token is left.
        self.assertEqual(
            await self.service.store.purge_tokens(self.clock.seconds() + 2 * DEFAULT_TOKEN_TTL), 1
        )

    async def test_logout_revokes(self) -> None:
        alice = await self.user_client("alice")
        token = await alice.login()
        status, _, _ = await self.request("POST", "/api/v1/logout", b"", token=token)
        self.assertEqual(status, 200)
        await self.assert_error("GET", "/api/v1/me", None, 401, "bad_token", token=token)

    async def test_client_logs_in_again(self) -> None:
        """A client with credentials replaces an expired or revoked token by itself."""
        alice = await self.user_client("alice")
        first = await alice.login()
        self.clock.advance(DEFAULT_TOKEN_TTL + 1)
        me = await alice.whoami()
        self.assertEqual(me["user"], "alice")
        self.assertNotEqual(alice.token, first)
        anonymous = TrackerClient(self.http, self.base, reactor)
        with self.assertRaises(TrackerError) as e:
            await anonymous.whoami()
        self.assertEqual((e.exception.status, e.exception.code), (401, "unauthenticated"))

    async def test_announce_replaces_holdings(self) -> None:
        a, b = await self.register(6), await self.register(7)
        await self.client.announce("n1", "10.0.0.1:7000", [a], {})
        await self.client.announce("n1", "10.0.0.2:7001", [b], {"cpu": 0.5})
        self.assertEqual(await self.client.nodes(a), [])
        (node,) = await self.client.nodes(b)
        self.assertEqual((node.host, node.port, node.state), ("10.0.0.2", 7001, {"cpu": 0.5}))

    async def test_wildcard_host_is_client_ip(self) -> None:
        cid = await self.register(8)
        for i, address in enumerate([":7000", "0.0.0.0:7001", ":::7002", "[::]:7003"]):
            await self.client.announce(f"n{i}", address, [cid], {})
        nodes = await self.client.nodes(cid)
        self.assertEqual(
            sorted((n.host, n.port) for n in nodes),
            [("127.0.0.1", 7000 + i) for i in range(4)],
        )

    async def test_unknown_state_keys_dropped(self) -> None:
        cid = await self.register(9)
        await self.client.announce("n", "10.0.0.1:1", [cid], {"cpu": 0.1, "colour": 3})
        (node,) = await self.client.nodes(cid)
        self.assertEqual(node.state, {"cpu": 0.1})

    async def test_expiry(self) -> None:
        cid = await self.register(10)
        await self.client.announce("old", "10.0.0.1:1", [cid], {})
        self.clock.advance(60)
        await self.client.announce("new", "10.0.0.2:1", [cid], {})
        self.clock.advance(INTERVAL * EXPIRE_AFTER - 60)  # "old" is exactly at the limit
        self.assertEqual(sorted(n.node_id for n in await self.client.nodes(cid)), ["new", "old"])
        self.clock.advance(1)  # listing filters by last_seen at once...
        self.assertEqual([n.node_id for n in await self.client.nodes(cid)], ["new"])
        self.assertEqual(await self.service.store.count_nodes(), 2)
        # (A purge still in flight when the clock passes the next run would
        # make the timer skip that run.)
        await self.purged()
        self.clock.advance(INTERVAL - 1)  # ...and the purge timer (every INTERVAL) deletes
        await self.purged()
        self.assertEqual(await self.service.store.count_nodes(), 1)
        self.clock.advance(INTERVAL * EXPIRE_AFTER)
        self.assertEqual(await self.client.nodes(cid), [])
        await self.purged()
        self.assertEqual(await self.service.store.count_nodes(), 0)

    async def test_leave(self) -> None:
        cid = await self.register(11)
        await self.client.announce("a", "10.0.0.1:1", [cid], {})
        await self.client.announce("b", "10.0.0.2:1", [cid], {})
        await self.client.leave("a")
        self.assertEqual([n.node_id for n in await self.client.nodes(cid)], ["b"])
        await self.client.leave("a")  # leaving twice is fine
        status, doc, _ = await self.request("POST", "/api/v1/leave", b'{"node_id": "b"}')
        self.assertEqual((status, doc), (200, {}))
        self.assertEqual(await self.client.nodes(cid), [])
        self.assertEqual(await self.service.store.count_nodes(), 0)

    async def test_unknown_content(self) -> None:
        missing = "cd" * 32
        await self.assert_error("GET", f"/api/v1/manifests/{missing}", None, 404, "unknown_content")
        await self.assert_error("GET", f"/api/v1/contents/{missing}/nodes", None, 404, "unknown_content")
        with self.assertRaises(UnknownContent):
            await self.client.get_manifest(missing)
        with self.assertRaises(UnknownContent):
            await self.client.nodes(missing)

    async def test_bad_requests_change_nothing(self) -> None:
        cid = await self.register(12)
        good = {"node_id": "n", "address": "10.0.0.1:7000", "contents": [cid], "state": {}}

        def ann(**changes: Any) -> bytes:
            return json.dumps({**good, **changes}).encode()

        big = json.dumps({**good, "pad": "x" * (1024 * 1024)}).encode()
        doc = make_manifest(99).to_dict()
        nan_meta = json.dumps({**doc, "meta": {"x": float("nan")}}).encode()
        deep = b"[" * 100_000 + b"]" * 100_000
        deep_meta = make_manifest(99).to_json().replace(b'"meta":{}', b'"meta":{"x":' + deep + b"}")
        self.assertIn(deep, deep_meta)
        cases: list[tuple[str, str, bytes | None, int, str]] = [
            ("POST", "/api/v1/announce", b"{not json", 400, "bad_json"),
            ("POST", "/api/v1/announce", b"", 400, "bad_json"),
            ("POST", "/api/v1/announce", b"\xff\xfe", 400, "bad_json"),
            ("POST", "/api/v1/announce", b'{"node_id": NaN}', 400, "bad_json"),
            ("POST", "/api/v1/announce", b"[1, 2]", 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(node_id=7), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(node_id=""), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(node_id="a/b"), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(node_id="x" * 65), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(address="10.0.0.1"), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(address="10.0.0.1:0"), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(address="10.0.0.1:65536"), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(address=["h", 1]), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(contents=cid), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(contents=[cid, "XYZ"]), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(contents=[cid.upper()]), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state=[]), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state={"cpu": 2}), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state={"upload_bps": -1}), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state={"upload_bps": "1"}), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state={"upload_bps": True}), 400, "bad_request"),
            ("POST", "/api/v1/announce", ann(state={"connections": 1.5}), 400, "bad_request"),
            ("POST", "/api/v1/announce", b'{"address": "h:1", "contents": []}', 400, "bad_request"),
            ("POST", "/api/v1/announce", big, 413, "body_too_large"),
            ("POST", "/api/v1/leave", b'{"node_id": 1}', 400, "bad_request"),
            ("POST", "/api/v1/manifests", b"{}", 400, "bad_manifest"),
            ("POST", "/api/v1/manifests", b"nope", 400, "bad_manifest"),
            ("POST", "/api/v1/manifests", nan_meta, 400, "bad_manifest"),
            ("POST", "/api/v1/manifests", deep_meta, 400, "bad_manifest"),
            ("GET", "/api/v1/manifests/abc", None, 400, "bad_content_id"),
            ("GET", f"/api/v1/manifests/{cid.upper()}", None, 400, "bad_content_id"),
            ("GET", "/api/v1/contents/xyz/nodes", None, 400, "bad_content_id"),
            ("GET", f"/api/v1/contents/{cid}/nodes?limit=0", None, 400, "bad_request"),
            ("GET", f"/api/v1/contents/{cid}/nodes?limit=many", None, 400, "bad_request"),
            ("GET", "/api/v1/nope", None, 404, "not_found"),
            ("GET", "/", None, 404, "not_found"),
            ("GET", "/api/v2/health", None, 404, "not_found"),
            ("GET", "/api/v1/health/extra", None, 404, "not_found"),
            ("POST", "/api/v1/health", b"{}", 405, "method_not_allowed"),
            ("GET", "/api/v1/announce", None, 405, "method_not_allowed"),
            ("DELETE", f"/api/v1/manifests/{cid}", None, 405, "method_not_allowed"),
        ]
        for method, path, body, status, code in cases:
            await self.assert_error(method, path, body, status, code)
        self.assertEqual(await self.client.nodes(cid), [])
        self.assertEqual(await self.service.store.count_nodes(), 0)
        # The same body, made valid, is accepted.
        await self.request("POST", "/api/v1/announce", ann())
        self.assertEqual([n.node_id for n in await self.client.nodes(cid)], ["n"])

    async def test_method_not_allowed_has_allow(self) -> None:
        _, _, headers = await self.request("PUT", "/api/v1/announce", b"{}")
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])

    async def test_oversized_manifest(self) -> None:
        """Manifests may be up to 16 MiB on the wire; more is refused before parsing."""
        self.service.api.manifest_limit = 1000
        body = make_manifest(13).to_json() + b" " * 1000
        await self.assert_error("POST", "/api/v1/manifests", body, 413, "body_too_large")

    async def test_endless_body_not_buffered(self) -> None:
        """Past the hard cap the body is dropped, not buffered, and answered 413."""
        self.service.http.max_body = 1000
        body = make_manifest(14).to_json() + b" " * 1000
        await self.assert_error("POST", "/api/v1/manifests", body, 413, "body_too_large")

    async def test_unexpected_error_is_logged_500(self) -> None:
        def broken(*args: object) -> Deferred[Any]:
            return fail(RuntimeError("disk on fire"))

        self.patch(self.service.store, "node_list", broken)
        await self.assert_error("GET", f"/api/v1/contents/{'ab' * 32}/nodes", None, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_client_errors_carry_status_and_code(self) -> None:
        with self.assertRaises(TrackerError) as ctx:
            await self.client.announce("bad id", "h:1", [], {})
        self.assertEqual((ctx.exception.status, ctx.exception.code), (400, "bad_request"))

    async def test_last_seen_keeps_subsecond_precision(self) -> None:
        """Timestamps round-trip as doubles (PostgreSQL's REAL would round them)."""
        cid = await self.register(15)
        self.clock.advance(1_700_000_000.123456 - self.clock.seconds())
        await self.client.announce("n", "10.0.0.1:1", [cid], {})
        (node,) = await self.client.nodes(cid)
        self.assertEqual(node.last_seen, 1_700_000_000.123456)

    async def test_purge_many(self) -> None:
        """A purge of more nodes than one IN list holds removes them and their holdings."""
        cid = await self.register(16)
        ids = [f"n{i}" for i in range(620)]
        for node_id in ids:
            await self.service.store.announce(node_id, "10.0.0.1:1", {}, START, [cid])
        self.assertEqual(await self.service.store.purge(START + 1), 620)
        self.assertEqual(await self.service.store.count_nodes(), 0)
        await self.client.announce("late", "10.0.0.1:1", [cid], {})
        self.assertEqual([n.node_id for n in await self.client.nodes(cid)], ["late"])


class TrackerHTTPTests(_TrackerHTTPMixin, unittest.TestCase):
    """The API on SQLite."""

    def db_url(self) -> str:
        self.db_path = temp_path(self)
        return f"sqlite:{self.db_path}"

    async def test_schema_version_and_wal(self) -> None:
        """After start the file has every schema version, the tables and WAL mode."""
        conn = sqlite3.connect(self.db_path)
        try:
            self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), ALL_VERSIONS)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            self.assertEqual(tables, TABLES)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        finally:
            conn.close()


class PostgresTrackerHTTPTests(_TrackerHTTPMixin, unittest.TestCase):
    """The API on PostgreSQL (C{MESHSTREAM_TEST_PG}), each test in a schema of its own."""

    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)

    async def test_schema_version_and_types(self) -> None:
        """After start the schema has every version, the tables, and doubles for times."""
        self.assertEqual(pg_query(self.db, "SELECT version FROM schema_version"), ALL_VERSIONS)
        columns = dict(
            pg_query(
                self.db,
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema()",
            )
        )
        self.assertEqual(columns["manifests.created"], "double precision")
        self.assertEqual(columns["nodes.last_seen"], "double precision")
        self.assertEqual(columns["nodes.rank_free"], "double precision")
        self.assertEqual(columns["nodes.rank_load"], "double precision")
        self.assertEqual(columns["holdings.content_id"], "text")
        self.assertEqual(columns["users.quota_bytes"], "bigint")
        self.assertEqual({name.partition(".")[0] for name in columns}, TABLES)


class AnnounceValidatorTests(unittest.SynchronousTestCase):
    """L{parse_announce} and friends, one level below HTTP."""

    def test_valid(self) -> None:
        ann = parse_announce(
            {
                "node_id": "node-1.a_b",
                "address": "[2001:db8::1]:7000",
                "contents": ["ab" * 32, "ab" * 32],
                "state": {"cpu": 0, "memory": 1.0, "connections": 3, "other": "x"},
            }
        )
        self.assertEqual((ann.host, ann.port), ("2001:db8::1", 7000))
        self.assertEqual(ann.contents, ("ab" * 32,))
        self.assertEqual(ann.state, {"cpu": 0, "memory": 1.0, "connections": 3})

    def test_addresses(self) -> None:
        self.assertEqual(parse_address("example.org:80"), ("example.org", 80))
        self.assertEqual(parse_address(":80"), ("", 80))
        self.assertEqual(parse_address(":::80"), ("::", 80))
        for bad in ["h", "h:", "h:x", "h:+1", "h: 1", "[1.2.3.4]:1", "[zz]:1", "a b:1", "h:٣"]:
            with self.assertRaises(ApiError, msg=bad):
                parse_address(bad)

    def test_content_ids(self) -> None:
        """Every content id is 64 lowercase hex characters, checked together but each on its own."""
        good = ["ab" * 32, "0123456789abcdef" * 4]
        self.assertEqual(
            parse_announce({"node_id": "n", "address": "h:1", "contents": good}).contents, tuple(good)
        )
        self.assertEqual(parse_announce({"node_id": "n", "address": "h:1", "contents": []}).contents, ())
        for bad in [
            ["ab" * 32, "AB" * 32],  # uppercase
            ["ab" * 32, "ab" * 31 + "ag"],  # not hex
            ["ab" * 32 + "a", "b" * 63],  # two wrong lengths that add up to two ids
            ["ab" * 32, "ab" * 32 + "\n"],
            ["ab" * 32, 7],
            [["ab" * 32]],
            ["ab" * 31 + "\u00e9\u00e9"],
        ]:
            with self.assertRaises(ApiError, msg=repr(bad)):
                parse_announce({"node_id": "n", "address": "h:1", "contents": bad})

    def test_too_many_contents(self) -> None:
        body = {"node_id": "n", "address": "h:1", "contents": ["ab" * 32] * 10_001}
        with self.assertRaises(ApiError):
            parse_announce(body)

    def test_nodes_query(self) -> None:
        self.assertEqual(parse_nodes_query({}), (50, frozenset()))
        self.assertEqual(
            parse_nodes_query({b"limit": [b"500"], b"exclude": [b"a", b"b"]}),
            (200, frozenset({"a", "b"})),
        )

    @settings(max_examples=50, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=12,
        )
    )
    def test_fuzz_any_json(self, value: object) -> None:
        """Any JSON value is either a valid announce or a 4xx ApiError."""
        self._check(value)

    @settings(max_examples=50, deadline=None)
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "node_id": st.one_of(st.text(max_size=70), st.integers(), st.none()),
                "address": st.one_of(
                    st.text(max_size=30),
                    st.from_regex(r"\[?[0-9a-f.:]{0,12}\]?:[0-9]{0,6}", fullmatch=True),
                ),
                "contents": st.lists(
                    st.one_of(st.just("ab" * 32), st.text(max_size=64), st.integers()), max_size=5
                ),
                "state": st.dictionaries(
                    st.sampled_from(["cpu", "memory", "connections", "upload_bps", "x"]),
                    st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=3)),
                ),
            },
        )
    )
    def test_fuzz_announce_shapes(self, value: dict[str, Any]) -> None:
        """Near-valid announces too."""
        self._check(value)

    def _check(self, value: object) -> None:
        try:
            ann = parse_announce(value)
        except ApiError as e:
            self.assertTrue(400 <= e.status < 500)
            self.assertEqual(e.code, "bad_request")
        else:
            self.assertTrue(1 <= ann.port <= 65535)
            json.dumps(ann.state, allow_nan=False)


class ServiceTests(unittest.TestCase):
    """The service tree, the key file and the twistd options."""

    def test_options_defaults(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(
            {k: options[k] for k in ("listen", "db", "key", "announce-interval", "expire-after")},
            {
                "listen": ["tcp:7070"],
                "db": "sqlite:meshstream-tracker.sqlite",
                "key": "meshstream-tracker.key",
                "announce-interval": 30.0,
                "expire-after": 3,
            },
        )

    def test_options_given(self) -> None:
        options = tap.Options()
        options.parseOptions(
            [
                "--listen", "tcp:1",
                "--listen", "tcp:2",
                "--db", "sqlite:/tmp/x.sqlite",
                "--announce-interval", "2.5",
                "--expire-after", "5",
            ]
        )  # fmt: skip
        self.assertEqual(options["listen"], ["tcp:1", "tcp:2"])
        self.assertEqual((options["announce-interval"], options["expire-after"]), (2.5, 5))

    def test_options_refused(self) -> None:
        for args in (
            ["--db", "postgresql://x"],  # no database name
            ["--db", "postgresql://h:port/db"],
            ["--db", "mysql://h/db"],
            ["--db", "sqlite:"],
            ["--announce-interval", "0"],
            ["--expire-after", "0"],
        ):
            with self.assertRaises(usage.UsageError, msg=args):
                tap.Options().parseOptions(args)

    def test_db_url(self) -> None:
        self.assertEqual(parse_db_url("sqlite:/a/b.sqlite").path, "/a/b.sqlite")
        for bad in ("sqlite::memory:", "mysql:x", "nothing", "postgresql:db", "postgres://h:5432"):
            with self.assertRaises(StoreError):
                parse_db_url(bad)

    def test_postgres_url(self) -> None:
        for url in ("postgresql://u:p@db.example:5433/tracker", "postgres://db.example/tracker"):
            parsed = parse_db_url(url)
            self.assertEqual((parsed.scheme, parsed.path), ("postgresql", url))
        options = tap.Options()
        options.parseOptions(["--db", "postgresql://u:p@127.0.0.1:1/tracker"])
        self.assertEqual(options["db"], "postgresql://u:p@127.0.0.1:1/tracker")

    def test_postgres_url_errors_hide_password(self) -> None:
        with self.assertRaises(StoreError) as ctx:
            parse_db_url("postgresql://u:hunter2@h:port/db")
        self.assertNotIn("hunter2", str(ctx.exception))

    def test_postgres_without_psycopg(self) -> None:
        """Without psycopg a PostgreSQL URL is a usage error that says what to install."""
        self.patch(sys, "modules", {**sys.modules, "psycopg": None})
        with self.assertRaises(StoreError) as ctx:
            parse_db_url("postgresql://h/db")
        self.assertIn("meshstream[postgres]", str(ctx.exception))
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--db", "postgresql://h/db"])

    def test_key_created_0600_and_reloaded(self) -> None:
        path = temp_path(self)
        key = load_or_create_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            self.assertIn(b"BEGIN PRIVATE KEY", f.read())
        again = load_or_create_key(path)
        self.assertEqual(again.public_key().public_bytes_raw(), key.public_key().public_bytes_raw())

    def test_bad_key_file(self) -> None:
        path = temp_path(self)
        with open(path, "wb") as f:
            f.write(b"not a key")
        with self.assertRaises(TrackerKeyError):
            load_or_create_key(path)

    def test_make_service_tree(self) -> None:
        base = temp_path(self)
        os.makedirs(base)
        options = tap.Options()
        options.parseOptions(
            [
                "--listen", "tcp:0:interface=127.0.0.1",
                "--listen", "tcp:0:interface=127.0.0.1",
                "--db", f"sqlite:{base}/t.sqlite",
                "--key", f"{base}/t.key",
            ]
        )  # fmt: skip
        # makeService asks to stop the reactor, once it runs, if the store
        # fails; this store is closed unstarted, which counts as failing, so
        # keep that hook from stopping a later test's reactor.
        when_running: list[object] = []
        self.patch(reactor, "callWhenRunning", lambda f, *a, **kw: when_running.append(f))
        service = tap.makeService(options)
        assert isinstance(service, TrackerService)
        self.addCleanup(service.store.close)
        children = list(service)
        self.assertEqual(
            sorted(type(c).__name__ for c in children),
            sorted(["StreamServerEndpointService"] * 2 + ["TimerService"]),
        )
        self.assertTrue(all(isinstance(c, StreamServerEndpointService | TimerService) for c in children))
        self.assertTrue(os.path.exists(f"{base}/t.key"))
        self.assertEqual(service.api.ttl, 90.0)
