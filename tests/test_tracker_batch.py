# -*- test-case-name: tests.test_tracker_batch -*-
"""
Tests for L{meshstream.tracker.batch.GroupCommit}: pure, no reactor; the
writes are Deferreds the tests fire by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from meshstream.tracker.batch import GroupCommit

Result = str | BaseException


class Writes:
    """A fake write: records each group and hands back a Deferred to fire."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.waiting: list[tuple[list[str], Deferred[list[Result]]]] = []

    def __call__(self, items: Sequence[str]) -> Deferred[list[Result]]:
        self.groups.append(list(items))
        d: Deferred[list[Result]] = Deferred()
        self.waiting.append((list(items), d))
        return d

    def commit(self, index: int = 0, results: list[Result] | None = None) -> None:
        """Fire write C{index} (of those still waiting) with C{results} (default: items upper-cased)."""
        group, d = self.waiting.pop(index)
        d.callback(results if results is not None else [item.upper() for item in group])

    def fail(self, error: Exception) -> None:
        """Fail the oldest write still waiting."""
        self.waiting.pop(0)[1].errback(error)


class GroupCommitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.writes = Writes()
        self.commit: GroupCommit[str, str] = GroupCommit(self.writes, max_items=3)

    def test_idle_item_written_at_once_alone(self) -> None:
        d = self.commit.submit("a")
        self.assertEqual(self.writes.groups, [["a"]])
        self.assertNoResult(d)  # answered only once its write has committed
        self.writes.commit()
        self.assertEqual(self.successResultOf(d), "A")

    def test_items_arriving_during_a_write_go_together_next(self) -> None:
        first = self.commit.submit("a")
        later = [self.commit.submit(x) for x in "bcdef"]
        self.assertEqual(self.writes.groups, [["a"]])
        self.assertEqual(self.commit.pending, 5)
        self.writes.commit()
        self.successResultOf(first)
        # At most max_items per group, in submission order.
        self.assertEqual(self.writes.groups, [["a"], ["b", "c", "d"]])
        for d in later:
            self.assertNoResult(d)
        self.writes.commit()
        self.assertEqual([self.successResultOf(d) for d in later[:3]], ["B", "C", "D"])
        self.assertEqual(self.writes.groups[-1], ["e", "f"])
        self.writes.commit()
        self.assertEqual([self.successResultOf(d) for d in later[3:]], ["E", "F"])
        self.assertEqual((self.commit.groups, self.commit.items, self.commit.pending), (3, 6, 0))

    def test_max_running(self) -> None:
        commit: GroupCommit[str, str] = GroupCommit(self.writes, max_items=2, max_running=2)
        ds = [commit.submit(x) for x in "abcde"]
        # Two writes at once, each started as soon as a slot was free.
        self.assertEqual(self.writes.groups, [["a"], ["b"]])
        self.writes.commit(1)  # the second write finishes first
        self.assertEqual(self.successResultOf(ds[1]), "B")
        self.assertNoResult(ds[0])
        self.assertEqual(self.writes.groups[-1], ["c", "d"])
        self.writes.commit(0)
        self.assertEqual(self.writes.groups[-1], ["e"])
        self.writes.commit(0)
        self.writes.commit(0)
        self.assertEqual([self.successResultOf(ds[i]) for i in (0, 2, 3, 4)], ["A", "C", "D", "E"])

    def test_one_item_fails_alone(self) -> None:
        self.commit.submit("a")
        ds = [self.commit.submit(x) for x in "bcd"]
        self.writes.commit()
        self.writes.commit(results=["B", ValueError("bad c"), "D"])
        self.assertEqual(self.successResultOf(ds[0]), "B")
        self.failureResultOf(ds[1], ValueError)
        self.assertEqual(self.successResultOf(ds[2]), "D")

    def test_failed_group_retried_item_by_item(self) -> None:
        """A failed write of several items: each is written again alone, before newer items."""
        self.commit.submit("a")
        ds = [self.commit.submit(x) for x in "bcd"]
        self.writes.commit()
        self.writes.fail(RuntimeError("deadlock"))
        newer = self.commit.submit("e")
        self.assertEqual(self.writes.groups[2:], [["b"]])
        self.writes.commit()
        self.assertEqual(self.writes.groups[3:], [["c"]])
        self.writes.fail(KeyError("c again"))  # fails alone: no more retries
        self.assertEqual(self.writes.groups[4:], [["d"]])
        self.writes.commit()
        self.assertEqual(self.writes.groups[5:], [["e"]])
        self.writes.commit()
        self.assertEqual(self.successResultOf(ds[0]), "B")
        self.failureResultOf(ds[1], KeyError)
        self.assertEqual(self.successResultOf(ds[2]), "D")
        self.assertEqual(self.successResultOf(newer), "E")
        self.assertEqual(self.commit.pending, 0)

    def test_single_item_failure_is_final(self) -> None:
        d = self.commit.submit("a")
        self.writes.fail(RuntimeError("disk on fire"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.writes.groups, [["a"]])
        # The committer is not stuck.
        again = self.commit.submit("b")
        self.writes.commit()
        self.assertEqual(self.successResultOf(again), "B")

    def test_write_raising_counts_as_failing(self) -> None:
        def broken(items: Sequence[str]) -> Deferred[list[Result]]:
            raise RuntimeError("cannot even start")

        commit: GroupCommit[str, str] = GroupCommit(broken)
        self.failureResultOf(commit.submit("a"), RuntimeError)
        self.assertEqual(commit.pending, 0)

    def test_wrong_number_of_results_fails_the_group(self) -> None:
        first = self.commit.submit("a")
        ds = [self.commit.submit(x) for x in "bc"]
        self.writes.commit(results=["A", "extra"])
        # Its submitter hears of the bug; the committer goes on.
        self.failureResultOf(first, RuntimeError)
        self.assertEqual(self.writes.groups[-1], ["b", "c"])
        self.writes.commit()
        self.assertEqual([self.successResultOf(d) for d in ds], ["B", "C"])

    def test_bad_limits(self) -> None:
        for kwargs in ({"max_items": 0}, {"max_running": 0}):
            with self.assertRaises(ValueError):
                GroupCommit(self.writes, **kwargs)  # type: ignore[arg-type]
