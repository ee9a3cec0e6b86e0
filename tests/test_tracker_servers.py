# -*- test-case-name: tests.test_tracker_servers -*-
"""
Content servers at the tracker (claims 37, 38) and the spread node lists
(claims 33, 36), over real HTTP on loopback against real SQLite and (with
C{MESHSTREAM_TEST_PG}) PostgreSQL.

The harness (a tracker on a L{Clock}, an admin client, request helpers) is
L{tests.test_tracker_api._TrackerHTTPMixin}'s, borrowed method by method so
that its own tests do not run twice.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

from twisted.trial import unittest

from meshstream.errors import TrackerError, UnknownContent
from meshstream.tracker import auth
from meshstream.tracker.client import TrackerClient
from tests._pg import SKIP_PG, pg_query, pg_schema_url
from tests.test_tracker_api import (
    EXPIRE_AFTER,
    INTERVAL,
    START,
    _TrackerHTTPMixin,
    temp_path,
)
from tests.test_tracker_ranking import NoSpread

H = _TrackerHTTPMixin


def up(free: int, **more: Any) -> dict[str, Any]:
    """A state with C{free} bytes/s of free upload."""
    return {"upload_capacity_bps": free + 1000, "upload_bps": 1000, **more}


class _ServersMixin:
    """The tests, for one database (C{db_url})."""

    setUp = H.setUp
    request = H.request
    assert_error = H.assert_error
    purged = H.purged
    register = H.register
    user_client = H.user_client

    # Set by H.setUp.
    client: TrackerClient
    service: Any
    clock: Any

    async def server_client(self, name: str = "cdn") -> TrackerClient:
        client: TrackerClient = await self.user_client(name, auth.SERVER)  # type: ignore[arg-type]
        return client

    async def ids(self, cid: str, servers: bool = False, **kw: Any) -> list[str]:
        lookup = self.client.servers if servers else self.client.nodes
        return [n.node_id for n in await lookup(cid, **kw)]

    async def test_servers_are_listed_apart_from_peers(self) -> None:
        cid = await self.register(60)
        cdn = await self.server_client()
        viewer = await self.user_client("viewer")  # type: ignore[arg-type]
        await cdn.announce("cdn-1", "10.1.0.1:7001", [cid], up(10**8), kind="server")
        await cdn.announce("cdn-as-peer", "10.1.0.2:7001", [cid], up(10**8))  # a server account's peer
        await viewer.announce("peer-1", "10.2.0.1:7001", [cid], up(10**6))
        self.assertEqual(sorted(await self.ids(cid)), ["cdn-as-peer", "peer-1"])
        self.assertEqual(await self.ids(cid, servers=True), ["cdn-1"])
        (server,) = await viewer.servers(cid)
        self.assertEqual((server.host, server.port, server.state), ("10.1.0.1", 7001, up(10**8)))
        status, doc, _ = await self.request("GET", f"/api/v1/contents/{cid}/servers?limit=5")
        self.assertEqual(status, 200)
        self.assertEqual(
            doc,
            {
                "content_id": cid,
                "servers": [
                    {
                        "node_id": "cdn-1",
                        "address": "10.1.0.1:7001",
                        "state": up(10**8),
                        "last_seen": START,
                    }
                ],
            },
        )

    async def test_servers_ranked_by_state(self) -> None:
        cid = await self.register(61)
        cdn = await self.server_client()
        states = {
            "big": up(8000, cpu=0.0, upload_slots=64, connections=0),  # 8000
            "hot": up(8000, cpu=0.75),  # 2000
            "full": up(8000, connections=16, upload_slots=16),  # 0: last
            "busy-disk": up(8000, disk_io_bps=300 * 2**20),  # 2000
            "mid": up(3000, memory=0.5, connections=32),  # 1500
        }
        for name, st_ in states.items():
            await cdn.announce(name, f"10.1.0.{len(name)}:7001", [cid], st_, kind="server")
        self.service.api.rng = NoSpread()
        self.assertEqual(await self.ids(cid, servers=True), ["big", "busy-disk", "hot", "mid", "full"])
        self.assertEqual(await self.ids(cid, servers=True, limit=2, exclude=["big"]), ["busy-disk", "hot"])
        # With randomness the heaviest server leads most lists, not all; the
        # full one never comes before another.
        self.service.api.rng = random.Random(61)
        first: Counter[str] = Counter()
        for _ in range(60):
            listed = await self.ids(cid, servers=True)
            first[listed[0]] += 1
            self.assertEqual(listed[-1], "full")
        self.assertGreater(first["big"], 20)
        self.assertLess(first["big"], 55)
        self.assertGreater(len(first), 2, first)

    async def test_peers_spread_too(self) -> None:
        """One seed with 10x the free upload of each of nine others leads about 10/19 of the lists."""
        cid = await self.register(62)
        await self.client.announce("seed", "10.3.0.1:1", [cid], up(10_000))
        for i in range(9):
            await self.client.announce(f"p{i}", f"10.3.0.{i + 2}:1", [cid], up(1000))
        self.service.api.rng = random.Random(62)
        first: Counter[str] = Counter()
        for _ in range(100):
            first[(await self.ids(cid, limit=3))[0]] += 1
        self.assertTrue(35 <= first["seed"] <= 70, first)  # 52.6 expected
        self.assertGreater(len(first), 4, first)

    async def test_user_role_may_not_announce_a_server(self) -> None:
        cid = await self.register(63)
        viewer = await self.user_client("viewer")  # type: ignore[arg-type]
        with self.assertRaises(TrackerError) as e:
            await viewer.announce("sneaky", "10.4.0.1:7001", [cid], {}, kind="server")
        self.assertEqual((e.exception.status, e.exception.code), (403, "forbidden"))
        self.assertEqual(await self.service.store.count_nodes(), 0)
        self.assertEqual(await self.ids(cid, servers=True), [])
        self.assertEqual(await self.ids(cid), [])
        # An existing peer of that user stays a peer, unchanged.
        await viewer.announce("box", "10.4.0.2:7001", [cid], {"cpu": 0.5})
        with self.assertRaises(TrackerError):
            await viewer.announce("box", "10.4.0.3:7001", [], {"cpu": 0.9}, kind="server")
        (box,) = await self.client.nodes(cid)
        self.assertEqual((box.node_id, box.host, box.state), ("box", "10.4.0.2", {"cpu": 0.5}))
        # Admins may announce servers (they may do everything).
        await self.client.announce("admin-cdn", "10.4.0.9:7001", [cid], {}, kind="server")
        self.assertEqual(await self.ids(cid, servers=True), ["admin-cdn"])

    async def test_announce_changes_the_kind(self) -> None:
        cid = await self.register(64)
        cdn = await self.server_client()
        await cdn.announce("n", "10.5.0.1:7001", [cid], {}, kind="server")
        self.assertEqual((await self.ids(cid), await self.ids(cid, servers=True)), ([], ["n"]))
        await cdn.announce("n", "10.5.0.1:7001", [cid], {})  # no kind: a peer again
        self.assertEqual((await self.ids(cid), await self.ids(cid, servers=True)), (["n"], []))
        await cdn.announce("n", "10.5.0.1:7001", [cid], {}, kind="server")
        self.assertEqual((await self.ids(cid), await self.ids(cid, servers=True)), ([], ["n"]))
        await cdn.announce("n", "10.5.0.1:7001", [cid], {}, kind="peer")
        self.assertEqual((await self.ids(cid), await self.ids(cid, servers=True)), (["n"], []))

    async def test_bad_kind_and_state_change_nothing(self) -> None:
        cid = await self.register(65)

        def body(**changes: Any) -> bytes:
            doc: dict[str, Any] = {"node_id": "n", "address": "10.6.0.1:1", "contents": [cid]}
            doc.update(changes)
            return json.dumps(doc).encode()

        for bad in (
            body(kind="mirror"),
            body(kind=None),
            body(kind=["server"]),
            body(kind=1),
            body(kind="server", state={"upload_slots": 1.5}),
            body(kind="server", state={"upload_slots": -1}),
        ):
            await self.assert_error("POST", "/api/v1/announce", bad, 400, "bad_request")
        self.assertEqual(await self.service.store.count_nodes(), 0)
        status, _, _ = await self.request("POST", "/api/v1/announce", body(state={"upload_slots": 8}))
        self.assertEqual(status, 200)
        (node,) = await self.client.nodes(cid)
        self.assertEqual(node.state, {"upload_slots": 8})

    async def test_errors(self) -> None:
        await self.assert_error("GET", f"/api/v1/contents/{'ab' * 32}/servers", None, 404, "unknown_content")
        with self.assertRaises(UnknownContent):
            await self.client.servers("ab" * 32)
        await self.assert_error("GET", "/api/v1/contents/xyz/servers", None, 400, "bad_content_id")
        cid = await self.register(66)
        await self.assert_error("GET", f"/api/v1/contents/{cid}/servers?limit=0", None, 400, "bad_request")
        await self.assert_error(
            "GET", f"/api/v1/contents/{cid}/servers", None, 401, "unauthenticated", token=None
        )
        await self.assert_error("POST", f"/api/v1/contents/{cid}/servers", b"{}", 405, "method_not_allowed")
        await self.assert_error("GET", "/api/v1/servers", None, 401, "unauthenticated", token=None)
        await self.assert_error("GET", "/api/v1/servers?limit=x", None, 400, "bad_request")

    async def test_all_servers_and_expiry(self) -> None:
        a, b = await self.register(67), await self.register(68)
        cdn = await self.server_client()
        viewer = await self.user_client("viewer")  # type: ignore[arg-type]
        await cdn.announce("cdn-old", "10.7.0.1:7001", [a], up(1000), kind="server")
        self.clock.advance(60)
        await cdn.announce("cdn-new", "10.7.0.2:7001", [a, b], up(1000, cpu=0.2), kind="server")
        await cdn.announce("cdn-empty", "10.7.0.3:7001", [], up(1000), kind="server")
        await viewer.announce("peer", "10.7.0.4:7001", [a, b], up(10**6))
        viewer_token = await viewer.login()
        status, doc, _ = await self.request("GET", "/api/v1/servers", token=viewer_token)
        self.assertEqual(status, 200)
        self.assertEqual(
            {s["node_id"]: (s["contents"], s["last_seen"]) for s in doc["servers"]},
            {
                "cdn-old": (1, START),
                "cdn-new": (2, START + 60),
                "cdn-empty": (0, START + 60),
            },
        )
        self.assertEqual(doc["servers"][0].keys(), {"node_id", "address", "state", "last_seen", "contents"})
        _, doc, _ = await self.request("GET", "/api/v1/servers?limit=1&exclude=cdn-old&exclude=cdn-empty")
        self.assertEqual([s["node_id"] for s in doc["servers"]], ["cdn-new"])
        # Expiry applies as for peers.
        self.clock.advance(INTERVAL * EXPIRE_AFTER - 59)
        self.assertEqual(await self.ids(a, servers=True), ["cdn-new"])
        _, doc, _ = await self.request("GET", "/api/v1/servers")
        self.assertEqual(sorted(s["node_id"] for s in doc["servers"]), ["cdn-empty", "cdn-new"])
        # Leaving removes a server like a peer.
        await cdn.leave("cdn-new")
        self.assertEqual(await self.ids(b, servers=True), [])


class TrackerServersTests(_ServersMixin, unittest.TestCase):
    """Content servers on SQLite."""

    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class PostgresTrackerServersTests(_ServersMixin, unittest.TestCase):
    """Content servers on PostgreSQL."""

    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)

    async def test_kind_column(self) -> None:
        columns = dict(
            pg_query(
                self.db,
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'nodes'",
            )
        )
        self.assertEqual(columns["kind"], "text")
