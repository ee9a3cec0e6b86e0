"""
Two trackers on one PostgreSQL database (C{MESHSTREAM_TEST_PG}, see
C{tests/_pg.py}): two L{TrackerService}s in this process, each with its own
connection pool and loopback port, started at the same time on an empty
schema, give the same answers.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream.tracker.client import TrackerClient
from meshstream.tracker.service import TrackerService, build_tracker_service
from tests._pg import SKIP_PG, pg_query, pg_schema_url
from tests.test_tracker_api import EXPIRE_AFTER, INTERVAL, START, make_manifest


class TwoTrackersTests(unittest.TestCase):
    skip = SKIP_PG

    async def setUp(self) -> None:
        self.db = pg_schema_url(self)
        self.clock = Clock()
        self.clock.advance(START)
        self.key = Ed25519PrivateKey.generate()  # both trackers sign with it
        pool = HTTPConnectionPool(reactor, persistent=True)
        http = HTTPClient(Agent(reactor, pool=pool))
        self.services: list[TrackerService] = []
        self.clients: list[TrackerClient] = []
        for _ in range(2):
            service = build_tracker_service(
                reactor,
                ["tcp:0:interface=127.0.0.1"],
                self.db,
                self.key,
                announce_interval=INTERVAL,
                expire_after=EXPIRE_AFTER,
                clock=self.clock,
            )
            self.services.append(service)
        for service in self.services:  # both migrate at once
            service.startService()
            self.addCleanup(service.stopService)
        self.addCleanup(pool.closeCachedConnections)
        for service in self.services:
            (port,) = await service.listening()
            host = port.getHost()
            assert isinstance(host, IPv4Address)
            self.clients.append(TrackerClient(http, f"http://127.0.0.1:{host.port}", reactor))
        self.versions = await gatherResults([s.ready() for s in self.services])
        self.a, self.b = self.clients

    async def both(self, cid: str) -> list[list[tuple[str, str, int, float]]]:
        """C{cid}'s nodes as each tracker lists them, sorted."""
        answers = []
        for client in self.clients:
            nodes = await client.nodes(cid)
            answers.append(sorted((n.node_id, n.host, n.port, n.last_seen) for n in nodes))
        return answers

    async def test_one_migration(self) -> None:
        """Started together on an empty schema, the trackers migrate it once."""
        self.assertEqual(self.versions, [2, 2])
        self.assertEqual(
            pg_query(self.db, "SELECT version FROM schema_version ORDER BY version"), [(1,), (2,)]
        )

    async def test_manifest_registered_at_a_served_by_b(self) -> None:
        manifest = make_manifest(1)
        signed = await self.a.register_manifest(manifest)
        fetched = await self.b.get_manifest(manifest.content_id)
        self.assertEqual(fetched, signed)
        key_b = await self.b.public_key()
        fetched.verify(key_b)
        # Registering it again at B returns A's (first) registration.
        again = await self.b.register_manifest(make_manifest(1, name="other"))
        self.assertEqual(again, signed)

    async def test_announce_leave_across_trackers(self) -> None:
        cid = (await self.a.register_manifest(make_manifest(2))).content_id
        other = (await self.b.register_manifest(make_manifest(3))).content_id
        result = await self.a.announce("n1", "10.0.0.1:7000", [cid], {"cpu": 0.5})
        self.assertEqual(result["unknown"], [])
        await self.b.announce("n2", "10.0.0.2:7000", [cid, other], {})
        expected = [("n1", "10.0.0.1", 7000, START), ("n2", "10.0.0.2", 7000, START)]
        self.assertEqual(await self.both(cid), [expected, expected])
        (n1,) = [n for n in await self.b.nodes(cid) if n.node_id == "n1"]
        self.assertEqual(n1.state, {"cpu": 0.5})
        # n1 moves to other content via B; A sees it.
        await self.b.announce("n1", "10.0.0.1:7000", [other], {})
        self.assertEqual([n.node_id for n in await self.a.nodes(cid)], ["n2"])
        await self.a.leave("n2")
        self.assertEqual(await self.both(cid), [[], []])
        self.assertEqual([n.node_id for n in await self.b.nodes(other)], ["n1"])

    async def test_expiry_consistent(self) -> None:
        cid = (await self.a.register_manifest(make_manifest(4))).content_id
        await self.a.announce("old", "10.0.0.1:1", [cid], {})
        self.clock.advance(60)
        await self.b.announce("new", "10.0.0.2:1", [cid], {})
        self.clock.advance(INTERVAL * EXPIRE_AFTER - 60)
        self.assertEqual([[n[0] for n in answer] for answer in await self.both(cid)], [["new", "old"]] * 2)
        self.clock.advance(1)
        self.assertEqual([[n[0] for n in answer] for answer in await self.both(cid)], [["new"]] * 2)
        # Both purge timers run; they agree and neither fails.
        self.clock.advance(INTERVAL)
        await gatherResults([s.api.purge_expired() for s in self.services])
        counts = await gatherResults([s.store.count_nodes() for s in self.services])
        self.assertEqual(counts, [1, 1])

    async def test_concurrent_announces(self) -> None:
        """Announces of the same nodes through both trackers at once all succeed and agree."""
        cids = [(await self.a.register_manifest(make_manifest(10 + i))).content_id for i in range(3)]
        calls: list[Deferred[Any]] = []
        for round_ in range(4):
            for i in range(8):
                client = self.clients[(i + round_) % 2]
                calls.append(client.announce(f"n{i}", f"10.0.0.{i}:1", cids[: 1 + (i + round_) % 3], {}))
            calls.extend(s.api.purge_expired() for s in self.services)
        await gatherResults(calls, consumeErrors=True)
        answers = [await self.both(cid) for cid in cids]
        for a_view, b_view in answers:
            self.assertEqual(a_view, b_view)
        self.assertEqual({n[0] for n in answers[0][0]}, {f"n{i}" for i in range(8)})
