"""Tests for L{meshstream.coalesce}."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from meshstream.coalesce import Coalesced


class CoalescedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.started: list[Deferred[str]] = []

        def start() -> Deferred[str]:
            d: Deferred[str] = Deferred()
            self.started.append(d)
            return d

        self.call = Coalesced(start)

    def test_shared(self) -> None:
        """Callers asking while an operation runs share it and its result."""
        first, second = self.call(), self.call()
        self.assertEqual(len(self.started), 1)
        self.assertTrue(self.call.running)
        self.assertEqual(self.call.waiting, 2)
        self.started[0].callback("token")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("token", "token"))
        self.assertFalse(self.call.running)
        self.assertEqual(self.call.waiting, 0)

    def test_failure_shared(self) -> None:
        """A failure reaches every caller."""
        first, second = self.call(), self.call()
        self.started[0].errback(ValueError("down"))
        for d in (first, second):
            self.assertEqual(str(self.failureResultOf(d, ValueError).value), "down")

    def test_next_call_starts_anew(self) -> None:
        """Once settled, the next caller starts a new operation."""
        first = self.call()
        self.started[0].callback("a")
        self.assertEqual(self.successResultOf(first), "a")
        second = self.call()
        self.assertEqual(len(self.started), 2)
        self.started[1].callback("b")
        self.assertEqual(self.successResultOf(second), "b")

    def test_ask_again_from_callback(self) -> None:
        """A caller asking again from its callback starts a new operation."""
        again: list[Deferred[str]] = []
        self.call().addCallback(lambda r: again.append(self.call()))
        self.started[0].callback("a")
        self.assertEqual(len(self.started), 2)
        self.assertTrue(self.call.running)
        self.started[1].callback("b")
        self.assertEqual(self.successResultOf(again[0]), "b")

    def test_cancel_one(self) -> None:
        """A cancelled caller leaves; the operation goes on for the others."""
        first, second = self.call(), self.call()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.call.waiting, 1)
        self.assertTrue(self.call.running)
        third = self.call()
        self.assertEqual(len(self.started), 1)
        self.started[0].callback("x")
        self.assertEqual((self.successResultOf(second), self.successResultOf(third)), ("x", "x"))

    def test_all_cancelled(self) -> None:
        """With every caller gone, the outcome (even a failure) is dropped quietly."""
        first = self.call()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.started[0].errback(ValueError("late"))
        self.assertFalse(self.call.running)
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_synchronous(self) -> None:
        """An operation that fires or fails at once settles at once."""
        ok = Coalesced(lambda: succeed(3))
        self.assertEqual(self.successResultOf(ok()), 3)
        self.assertFalse(ok.running)
        bad: Coalesced[int] = Coalesced(lambda: fail(KeyError("k")))
        self.failureResultOf(bad(), KeyError)
        self.assertFalse(bad.running)

    def test_start_raises(self) -> None:
        """A start that raises fails the callers and lets the next try."""
        calls = []

        def start() -> Deferred[int]:
            calls.append(1)
            raise RuntimeError("no")

        raising = Coalesced(start)
        self.failureResultOf(raising(), RuntimeError)
        self.failureResultOf(raising(), RuntimeError)
        self.assertEqual(len(calls), 2)
