# -*- test-case-name: tests.test_agent_usage -*-
"""Tests for L{meshstream.agent.usage}: running totals in, reports (sent again until acknowledged) out."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial import unittest

from meshstream.agent.usage import KINDS, UsageMeter

A, B = "aa" * 32, "bb" * 32


def counts(**given: int) -> dict[str, int]:
    return {**dict.fromkeys(KINDS, 0), **given}


class Source:
    """Anything that keeps running totals (a session, the peer server)."""


class UsageMeterTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.5)
        self.meter = UsageMeter(self.clock)

    def test_deltas_of_running_totals(self) -> None:
        s1, s2 = Source(), Source()
        self.meter.observe(s1, A, "from_peers", 100)
        self.meter.observe(s1, A, "from_peers", 150)
        self.meter.observe(s2, A, "from_peers", 10)  # another session of A: its own total
        self.meter.observe(s1, A, "from_origin", 5)
        self.meter.observe(s1, B, "uploaded", 7)
        report = self.meter.next_report()
        assert report is not None
        self.assertEqual(report.contents, {A: counts(from_peers=160, from_origin=5), B: counts(uploaded=7)})
        self.meter.acknowledged(report)
        self.assertIsNone(self.meter.next_report())
        self.meter.observe(s1, A, "from_peers", 150)  # unchanged
        self.assertIsNone(self.meter.next_report())
        self.meter.observe(s1, A, "from_peers", 40)  # started over: nothing
        self.meter.observe(s1, A, "from_peers", 45)  # grows from there
        report = self.meter.next_report()
        assert report is not None
        self.assertEqual(report.contents, {A: counts(from_peers=5)})

    def test_sent_again_until_acknowledged(self) -> None:
        """A report that was not acknowledged comes back unchanged; new bytes wait for the next one."""
        s = Source()
        self.meter.observe(s, A, "from_peers", 100)
        first = self.meter.next_report()
        assert first is not None
        self.assertEqual(first.seq, 1_000_500)  # the clock in milliseconds
        self.meter.observe(s, A, "from_peers", 130)
        self.assertIs(self.meter.next_report(), first)
        self.assertEqual(self.meter.pending(), {A: counts(from_peers=130)})
        self.meter.acknowledged(first)
        second = self.meter.next_report()
        assert second is not None
        self.assertEqual(second.contents, {A: counts(from_peers=30)})
        self.assertEqual(second.seq, first.seq + 1)  # the clock has not moved: still growing
        self.meter.acknowledged(first)  # a late answer to an older report changes nothing
        self.assertIs(self.meter.next_report(), second)
        self.meter.dropped(second)
        self.assertIsNone(self.meter.next_report())
        self.assertEqual(self.meter.pending(), {})
        self.clock.advance(60)
        self.meter.observe(s, A, "uploaded", 1)
        third = self.meter.next_report()
        assert third is not None
        self.assertEqual(third.seq, 1_060_500)

    def test_seq_grows_across_restarts(self) -> None:
        """A meter made later (an agent restarted) starts above the earlier one's seqs."""
        for _ in range(3):
            self.meter.observe(Source(), A, "from_peers", 1)
            report = self.meter.next_report()
            assert report is not None
            self.meter.acknowledged(report)
        self.clock.advance(0.01)
        restarted = UsageMeter(self.clock)
        restarted.observe(Source(), A, "from_peers", 1)
        report = restarted.next_report()
        assert report is not None
        self.assertGreater(report.seq, self.meter.seq)

    def test_report_size_bounded(self) -> None:
        meter = UsageMeter(self.clock, max_entries=2)
        s = Source()
        for i in range(5):
            meter.observe(s, f"{i:064x}", "from_peers", i + 1)
        sizes = []
        while (report := meter.next_report()) is not None:
            sizes.append(len(report.contents))
            meter.acknowledged(report)
        self.assertEqual(sizes, [2, 2, 1])

    def test_gone_sources_forgotten(self) -> None:
        s = Source()
        self.meter.observe(s, A, "from_peers", 1)
        del s
        gc.collect()
        self.assertEqual(len(self.meter._seen), 0)

    def test_unknown_kind(self) -> None:
        with self.assertRaises(ValueError):
            self.meter.observe(Source(), A, "from_mars", 1)
