# -*- test-case-name: tests.test_lookup -*-
"""
Tests for L{meshstream.agent.lookup.TicketedLookup}: which ticket a dialing
agent presents, and when it asks the tracker for a new one.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshstream.agent.lookup import TicketedLookup
from meshstream.errors import TrackerError
from meshstream.tracker.client import NodeInfo, NodeList

CID = "cd" * 32
NODE = NodeInfo("seed", "10.0.0.1", 7000, {}, 1.0)


class FakeTracker:
    """Node lookups that the test answers by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, list[str]]] = []
        self.pending: list[Deferred[NodeList]] = []

    def nodes_with_ticket(
        self, content_id: str, node: str, limit: int = 50, exclude: Iterable[str] = ()
    ) -> Deferred[NodeList]:
        self.calls.append((content_id, node, limit, list(exclude)))
        d: Deferred[NodeList] = Deferred()
        self.pending.append(d)
        return d

    def answer(self, ticket: bytes | None, expires: float | None) -> None:
        self.pending.pop(0).callback(NodeList([NODE], ticket, expires))


class TicketedLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.tracker = FakeTracker()
        self.lookup = TicketedLookup(self.tracker, CID, "me", self.clock, limit=20)

    def test_find_nodes_keeps_the_ticket(self) -> None:
        d = self.lookup.find_nodes()
        self.assertEqual(self.tracker.calls, [(CID, "me", 20, ["me"])])
        self.tracker.answer(b"T1", 1300)
        self.assertEqual(self.successResultOf(d), [NODE])
        self.assertEqual(self.successResultOf(self.lookup.ticket()), b"T1")
        self.assertEqual(len(self.tracker.calls), 1)  # fresh: no new lookup

    def test_refreshed_after_half_its_lifetime(self) -> None:
        self.lookup.find_nodes()
        self.tracker.answer(b"T1", 1300)
        self.clock.advance(149)
        self.assertEqual(self.successResultOf(self.lookup.ticket()), b"T1")
        self.clock.advance(1)
        d = self.lookup.ticket()
        self.assertNoResult(d)
        self.assertEqual(len(self.tracker.calls), 2)
        self.tracker.answer(b"T2", 1450)
        self.assertEqual(self.successResultOf(d), b"T2")

    def test_first_ticket_needs_a_lookup_shared_by_all(self) -> None:
        first, second = self.lookup.ticket(), self.lookup.ticket()
        self.assertEqual(len(self.tracker.calls), 1)
        self.tracker.answer(b"T1", 1300)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (b"T1", b"T1"))

    def test_an_old_looking_answer_is_used_anyway(self) -> None:
        """A tracker clock behind ours: the new ticket looks stale here but is what we have."""
        d = self.lookup.ticket()
        self.tracker.answer(b"T1", 900)
        self.assertEqual(self.successResultOf(d), b"T1")
        self.assertFalse(self.lookup.fresh())

    def test_no_ticket_from_the_tracker(self) -> None:
        d = self.lookup.ticket()
        self.tracker.answer(None, None)
        self.assertEqual(self.successResultOf(d), b"")

    def test_failed_lookup_fails_every_waiter(self) -> None:
        first, second = self.lookup.ticket(), self.lookup.ticket()
        self.tracker.pending.pop(0).errback(TrackerError("down", 503))
        self.failureResultOf(first, TrackerError)
        self.failureResultOf(second, TrackerError)
        # The next call tries again.
        d = self.lookup.ticket()
        self.assertEqual(len(self.tracker.calls), 2)
        self.tracker.answer(b"T1", 1300)
        self.assertEqual(self.successResultOf(d), b"T1")
