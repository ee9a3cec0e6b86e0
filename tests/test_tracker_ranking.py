# -*- test-case-name: tests.test_tracker_ranking -*-
"""Tests for L{meshstream.tracker.ranking}: pure, no reactor."""

from __future__ import annotations

from typing import Any

from attrs import frozen
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from meshstream.tracker.ranking import free_upload, rank_key, rank_nodes


@frozen
class N:
    node_id: str
    state: dict[str, Any]


def ids(nodes: list[N]) -> list[str]:
    return [n.node_id for n in nodes]


class FreeUploadTests(unittest.SynchronousTestCase):
    def test_difference(self) -> None:
        self.assertEqual(free_upload({"upload_capacity_bps": 100, "upload_bps": 30}), 70)

    def test_never_negative(self) -> None:
        self.assertEqual(free_upload({"upload_capacity_bps": 10, "upload_bps": 30}), 0)

    def test_unknown_without_both_fields(self) -> None:
        self.assertIsNone(free_upload({}))
        self.assertIsNone(free_upload({"upload_capacity_bps": 10}))
        self.assertIsNone(free_upload({"upload_bps": 10}))

    def test_non_numbers_are_unknown(self) -> None:
        for bad in ("10", None, True, -1, float("nan"), float("inf"), [1]):
            self.assertIsNone(free_upload({"upload_capacity_bps": bad, "upload_bps": 0}), bad)


class RankTests(unittest.SynchronousTestCase):
    def test_more_free_upload_first(self) -> None:
        nodes = [
            N("a", {"upload_capacity_bps": 100, "upload_bps": 90}),  # 10 free
            N("b", {"upload_capacity_bps": 1000, "upload_bps": 0}),  # 1000 free
            N("c", {"upload_capacity_bps": 500, "upload_bps": 100}),  # 400 free
        ]
        self.assertEqual(ids(rank_nodes(nodes)), ["b", "c", "a"])

    def test_unknown_after_known(self) -> None:
        nodes = [
            N("a", {}),
            N("b", {"upload_capacity_bps": 10, "upload_bps": 10}),  # 0 free, but known
            N("c", {"upload_capacity_bps": 10}),
        ]
        self.assertEqual(ids(rank_nodes(nodes)), ["b", "a", "c"])

    def test_fewer_connections_break_ties(self) -> None:
        free = {"upload_capacity_bps": 100, "upload_bps": 0}
        nodes = [
            N("a", {**free, "connections": 5}),
            N("b", {**free}),  # unknown connections: after known ones
            N("c", {**free, "connections": 1}),
        ]
        self.assertEqual(ids(rank_nodes(nodes)), ["c", "a", "b"])

    def test_free_upload_beats_connections(self) -> None:
        nodes = [
            N("a", {"upload_capacity_bps": 100, "upload_bps": 0, "connections": 50}),
            N("b", {"upload_capacity_bps": 50, "upload_bps": 0, "connections": 0}),
        ]
        self.assertEqual(ids(rank_nodes(nodes)), ["a", "b"])

    def test_node_id_last(self) -> None:
        nodes = [N("z", {}), N("m", {}), N("a", {})]
        self.assertEqual(ids(rank_nodes(nodes)), ["a", "m", "z"])

    def test_empty(self) -> None:
        self.assertEqual(rank_nodes([]), [])

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.builds(
                N,
                st.text(min_size=1, max_size=8),
                st.dictionaries(
                    st.sampled_from(["upload_bps", "upload_capacity_bps", "connections", "x"]),
                    st.one_of(st.integers(-5, 10**6), st.floats(), st.none(), st.text()),
                ),
            ),
            unique_by=lambda n: n.node_id,
            max_size=20,
        )
    )
    def test_total_and_deterministic(self, nodes: list[N]) -> None:
        """Any input ranks without error, to the same order whatever it starts in."""
        ranked = rank_nodes(nodes)
        self.assertEqual(ranked, rank_nodes(list(reversed(nodes))))
        keys = [rank_key(n.node_id, n.state) for n in ranked]
        self.assertEqual(keys, sorted(keys))
