# -*- test-case-name: tests.test_tracker_tickets -*-
"""
Peer tickets from the tracker: the node lookup's ticket over real HTTP on
SQLite and PostgreSQL (the L{tests.test_tracker_api} harness), the client's
parsing of it in memory, and the C{--ticket-ttl} option.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial import unittest

from meshstream import tickets
from meshstream.errors import TrackerError
from meshstream.tap import tracker as tap
from meshstream.tracker.api import DEFAULT_TICKET_TTL, parse_ticket_node
from meshstream.tracker.client import NodeInfo, NodeList, TrackerClient
from meshstream.tracker.service import TrackerService, build_tracker_service, load_or_create_key
from tests._pg import SKIP_PG, pg_schema_url
from tests.test_tracker_api import START, _TrackerHTTPMixin, temp_path
from tests.test_tracker_client import BASE, Canned


class _TicketHTTPMixin:
    """Ticket tests over HTTP; the set-up and helpers are those of L{_TrackerHTTPMixin}."""

    setUp = _TrackerHTTPMixin.setUp
    request = _TrackerHTTPMixin.request
    assert_error = _TrackerHTTPMixin.assert_error
    user_client = _TrackerHTTPMixin.user_client
    register = _TrackerHTTPMixin.register

    # Set by the harness's setUp.
    clock: Clock
    key: Any
    service: TrackerService
    client: TrackerClient

    def nodes_path(self, cid: str, query: str) -> str:
        return f"/api/v1/contents/{cid}/nodes?{query}"

    async def test_ticket_verifies_for_user_node_content(self) -> None:
        cid = await self.register(1)
        await self.client.announce("seed", "10.0.0.1:7000", [cid], {})
        alice = await self.user_client("alice")
        await alice.announce("box-a", "10.0.0.2:7000", [], {})
        found = await alice.nodes_with_ticket(cid, "box-a", exclude=["box-a"])
        self.assertEqual([n.node_id for n in found.nodes], ["seed"])
        assert found.ticket is not None
        expires = int(START + DEFAULT_TICKET_TTL)
        self.assertEqual(found.expires, expires)
        ticket = tickets.verify(self.key.public_key(), found.ticket, START, "box-a")
        self.assertEqual(ticket, tickets.Ticket(user="alice", node="box-a", content=cid, expires=expires))
        # Another node presenting it, or anyone after its expiry, is refused.
        with self.assertRaises(tickets.TicketError):
            tickets.verify(self.key.public_key(), found.ticket, START, "seed")
        with self.assertRaises(tickets.TicketError):
            tickets.verify(self.key.public_key(), found.ticket, expires + tickets.CLOCK_SKEW + 1, "box-a")

    async def test_answer_shape(self) -> None:
        cid = await self.register(1)
        status, doc, _ = await self.request("GET", self.nodes_path(cid, "node=admin-box"))
        self.assertEqual(status, 200)
        self.assertEqual(set(doc), {"content_id", "nodes", "ticket", "ticket_expires"})
        self.assertIsInstance(doc["ticket"], str)
        self.assertIsInstance(doc["ticket_expires"], int)
        # A node id nobody announced yet may have a ticket (it is the asker's to claim).
        got = tickets.verify(self.key.public_key(), doc["ticket"].encode(), START, "admin-box")
        self.assertEqual((got.user, got.content), ("admin", cid))

    async def test_no_node_no_ticket(self) -> None:
        cid = await self.register(1)
        status, doc, _ = await self.request("GET", self.nodes_path(cid, "exclude=x"))
        self.assertEqual((status, set(doc)), (200, {"content_id", "nodes"}))
        self.assertEqual(await self.client.nodes(cid), [])

    async def test_expiry_follows_the_clock_and_ttl(self) -> None:
        cid = await self.register(1)
        self.clock.advance(1000.7)
        self.service.api.ticket_ttl = 42.0
        found = await self.client.nodes_with_ticket(cid, "n1")
        self.assertEqual(found.expires, int(START + 1000.7 + 42.0))
        assert found.ticket is not None
        self.assertEqual(
            tickets.verify(self.key.public_key(), found.ticket, START + 1000, "n1").expires,
            int(START + 1042.7),
        )

    async def test_another_users_node_is_403(self) -> None:
        cid = await self.register(1)
        alice = await self.user_client("alice")
        await alice.announce("box-a", "10.0.0.2:7000", [cid], {})
        bob = await self.user_client("bob")
        with self.assertRaises(TrackerError) as ctx:
            await bob.nodes_with_ticket(cid, "box-a")
        self.assertEqual((ctx.exception.status, ctx.exception.code), (403, "node_owned"))
        # Not even the admin gets a ticket for alice's box.
        await self.assert_error("GET", self.nodes_path(cid, "node=box-a"), None, 403, "node_owned")
        # The plain lookup still lists it, and alice gets her ticket.
        self.assertEqual([n.node_id for n in await bob.nodes(cid)], ["box-a"])
        self.assertIsNotNone((await alice.nodes_with_ticket(cid, "box-a")).ticket)

    async def test_bad_node_parameter(self) -> None:
        cid = await self.register(1)
        for query in ("node=a%20b", "node=", "node=" + "n" * 65, "node=a&node=b"):
            await self.assert_error("GET", self.nodes_path(cid, query), None, 400, "bad_request")
        await self.assert_error("GET", self.nodes_path("ab" * 32, "node=n1"), None, 404, "unknown_content")
        await self.assert_error(
            "GET", self.nodes_path(cid, "node=n1"), None, 401, "unauthenticated", token=None
        )


class TrackerTicketTests(_TicketHTTPMixin, unittest.TestCase):
    """On SQLite."""

    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class PostgresTrackerTicketTests(_TicketHTTPMixin, unittest.TestCase):
    """On PostgreSQL (C{MESHSTREAM_TEST_PG})."""

    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)


class ClientTicketTests(unittest.TestCase):
    """L{TrackerClient.nodes_with_ticket} in memory."""

    def client(self, body: dict[str, Any]) -> tuple[TrackerClient, Canned]:
        resource = Canned(200, json.dumps(body).encode())
        return TrackerClient(StubTreq(resource), BASE, Clock()), resource

    def test_parsed(self) -> None:
        node = {"node_id": "a", "address": "10.0.0.1:7000", "state": {}, "last_seen": 5}
        client, resource = self.client({"nodes": [node], "ticket": "mt1.x.y", "ticket_expires": 99})
        got = self.successResultOf(client.nodes_with_ticket("ab" * 32, "me", limit=3, exclude=["me"]))
        self.assertEqual(got, NodeList([NodeInfo("a", "10.0.0.1", 7000, {}, 5.0)], b"mt1.x.y", 99.0))
        self.assertEqual(
            resource.requests[0][1],
            f"/api/v1/contents/{'ab' * 32}/nodes?limit=3&exclude=me&node=me".encode(),
        )
        # nodes() still gives the bare list.
        self.assertEqual(self.successResultOf(client.nodes("ab" * 32)), got.nodes)

    def test_no_ticket(self) -> None:
        client, _ = self.client({"nodes": []})
        self.assertEqual(self.successResultOf(client.nodes_with_ticket("ab" * 32, "me")), NodeList([]))

    def test_malformed_ticket(self) -> None:
        for extra in (
            {"ticket": 5, "ticket_expires": 1},
            {"ticket": "mt1.é", "ticket_expires": 1},
            {"ticket": "mt1.x.y"},
            {"ticket": "mt1.x.y", "ticket_expires": "soon"},
            {"ticket": "mt1.x.y", "ticket_expires": True},
        ):
            client, _ = self.client({"nodes": [], **extra})
            self.failureResultOf(client.nodes_with_ticket("ab" * 32, "me"), TrackerError)


class TicketOptionTests(unittest.TestCase):
    def test_default_and_given(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["ticket-ttl"], DEFAULT_TICKET_TTL)
        options = tap.Options()
        options.parseOptions(["--ticket-ttl", "60.5"])
        self.assertEqual(options["ticket-ttl"], 60.5)
        for bad in ("0", "-1", "soon"):
            with self.assertRaises(usage.UsageError):
                tap.Options().parseOptions(["--ticket-ttl", bad])

    def test_reaches_the_api(self) -> None:
        base = temp_path(self)
        os.makedirs(base)
        key = load_or_create_key(os.path.join(base, "t.key"))
        service = build_tracker_service(reactor, [], f"sqlite:{base}/t.sqlite", key, ticket_ttl=12.5)
        self.addCleanup(service.store.close)
        self.assertEqual(service.api.ticket_ttl, 12.5)
        when_running: list[object] = []
        self.patch(reactor, "callWhenRunning", lambda f, *a, **kw: when_running.append(f))
        options = tap.Options()
        options.parseOptions(
            ["--db", f"sqlite:{base}/u.sqlite", "--key", f"{base}/t.key", "--ticket-ttl", "7"]
        )
        made = tap.makeService(options)
        assert isinstance(made, TrackerService)
        self.addCleanup(made.store.close)
        self.assertEqual(made.api.ticket_ttl, 7.0)


class ValidatorTests(unittest.SynchronousTestCase):
    def test_parse_ticket_node(self) -> None:
        self.assertIsNone(parse_ticket_node({}))
        self.assertEqual(parse_ticket_node({b"node": [b"n-1"]}), "n-1")
