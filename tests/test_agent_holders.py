# -*- test-case-name: tests.test_agent_holders -*-
"""Tests for L{meshstream.agent.holders}: in memory, with a fake tracker's Deferreds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from meshstream.agent.holders import BESIDE, INSTEAD, OFF, holder_finder, interleave
from meshstream.errors import TrackerError, UnknownContent
from meshstream.tracker.client import NodeList

CID = "cd" * 32


@frozen
class Node:
    node_id: str


def nodes(*names: str) -> list[Node]:
    return [Node(n) for n in names]


def ids(listed: list[Any]) -> list[str]:
    return [n.node_id for n in listed]


class FakeTracker:
    """Answers C{nodes} and C{servers} with what the test set; records the calls."""

    def __init__(self, peers: Deferred[Any], servers: Deferred[Any]) -> None:
        self.answers = {"nodes": peers, "servers": servers}
        self.calls: list[tuple[str, str, int, list[str]]] = []

    def _answer(
        self, what: str, content_id: str, node: str, limit: int, exclude: Iterable[str]
    ) -> Deferred[Any]:
        assert node == "me"
        self.calls.append((what, content_id, limit, list(exclude)))
        return self.answers[what]

    def nodes_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[Any]:
        return self._answer("nodes", content_id, node, limit, exclude)

    def servers_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[Any]:
        return self._answer("servers", content_id, node, limit, exclude)


class InterleaveTests(unittest.SynchronousTestCase):
    def test_alternates_peer_first(self) -> None:
        got = interleave(nodes("p1", "p2", "p3", "p4"), nodes("s1", "s2"))
        self.assertEqual(ids(got), ["p1", "s1", "p2", "s2", "p3", "p4"])
        got = interleave(nodes("p1"), nodes("s1", "s2", "s3"))
        self.assertEqual(ids(got), ["p1", "s1", "s2", "s3"])

    def test_empty_sides(self) -> None:
        self.assertEqual(ids(interleave([], nodes("s1", "s2"))), ["s1", "s2"])
        self.assertEqual(ids(interleave(nodes("p1", "p2"), [])), ["p1", "p2"])
        self.assertEqual(interleave([], []), [])

    def test_a_node_listed_twice_keeps_its_first_place(self) -> None:
        got = interleave(nodes("a", "b", "c"), nodes("b", "d", "a"))
        self.assertEqual(ids(got), ["a", "b", "d", "c"])


class FinderTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_off_asks_only_for_peers(self) -> None:
        tracker = FakeTracker(succeed(NodeList(nodes("p1"))), fail(AssertionError("not asked")))
        find = holder_finder(tracker, CID, OFF, "me", exclude=["me"], limit=7)
        self.assertEqual(ids(self.successResultOf(find()).nodes), ["p1"])
        self.assertEqual(tracker.calls, [("nodes", CID, 7, ["me"])])
        tracker.answers["servers"].addErrback(lambda _: None)

    def test_instead_asks_only_for_servers(self) -> None:
        tracker = FakeTracker(fail(AssertionError("not asked")), succeed(NodeList(nodes("s1", "s2"))))
        find = holder_finder(tracker, CID, INSTEAD, "me", exclude=["me"])
        self.assertEqual(ids(self.successResultOf(find()).nodes), ["s1", "s2"])
        self.assertEqual(tracker.calls, [("servers", CID, 50, ["me"])])
        tracker.answers["nodes"].addErrback(lambda _: None)

    def test_beside_asks_both_at_once_and_interleaves(self) -> None:
        peers: Deferred[Any] = Deferred()
        servers: Deferred[Any] = Deferred()
        tracker = FakeTracker(peers, servers)
        d = holder_finder(tracker, CID, BESIDE, "me", exclude=["me"])()
        self.assertEqual([c[0] for c in tracker.calls], ["nodes", "servers"])
        servers.callback(NodeList(nodes("s1", "s2")))
        self.assertNoResult(d)
        peers.callback(NodeList(nodes("p1", "p2", "p3")))
        self.assertEqual(ids(self.successResultOf(d).nodes), ["p1", "s1", "p2", "s2", "p3"])

    def test_beside_uses_one_list_when_the_other_fails(self) -> None:
        tracker = FakeTracker(succeed(NodeList(nodes("p1"))), fail(TrackerError("no servers endpoint", 404)))
        self.assertEqual(ids(self.successResultOf(holder_finder(tracker, CID, BESIDE, "me")()).nodes), ["p1"])
        tracker = FakeTracker(fail(TrackerError("timed out")), succeed(NodeList(nodes("s1"))))
        self.assertEqual(ids(self.successResultOf(holder_finder(tracker, CID, BESIDE, "me")()).nodes), ["s1"])
        messages = [e["log_format"].format(**e) for e in self.logged]
        self.assertEqual(
            messages,
            [
                f"The server lookup for {CID[:12]} failed: no servers endpoint",
                f"The peer lookup for {CID[:12]} failed: timed out",
            ],
        )

    def test_beside_keeps_a_ticket(self) -> None:
        """Either lookup's ticket will do: both are for this node and content."""
        with_ticket = NodeList(nodes("s1"), b"mt1.ticket", 1234.0)
        tracker = FakeTracker(succeed(NodeList(nodes("p1"))), succeed(with_ticket))
        found = self.successResultOf(holder_finder(tracker, CID, BESIDE, "me")())
        self.assertEqual(
            (ids(found.nodes), found.ticket, found.expires), (["p1", "s1"], b"mt1.ticket", 1234.0)
        )
        tracker = FakeTracker(succeed(NodeList(nodes("p1"))), succeed(NodeList([])))
        self.assertIsNone(self.successResultOf(holder_finder(tracker, CID, BESIDE, "me")()).ticket)

    def test_beside_fails_when_both_fail(self) -> None:
        tracker = FakeTracker(fail(UnknownContent(CID)), fail(UnknownContent(CID)))
        self.failureResultOf(holder_finder(tracker, CID, BESIDE, "me")(), UnknownContent)

    def test_each_call_asks_again(self) -> None:
        tracker = FakeTracker(succeed(NodeList(nodes("p1"))), succeed(NodeList([])))
        find = holder_finder(tracker, CID, BESIDE, "me")
        find()
        find()
        self.assertEqual(len(tracker.calls), 4)

    def test_bad_mode(self) -> None:
        tracker = FakeTracker(succeed(NodeList([])), succeed(NodeList([])))
        self.assertRaises(ValueError, holder_finder, tracker, CID, "sometimes", "me")
