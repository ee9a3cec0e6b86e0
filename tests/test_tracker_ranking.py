# -*- test-case-name: tests.test_tracker_ranking -*-
"""Tests for L{meshstream.tracker.ranking}: pure, no reactor; randomness seeded."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from attrs import frozen
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from meshstream.tracker.ranking import (
    DEFAULT_UPLOAD_SLOTS,
    DISK_IO_HALF_BPS,
    KEY_REFRESH,
    KEY_TOLERANCE,
    MEMORY_KNEE,
    STALE_PENALTY,
    RekeyBudget,
    free_upload,
    freshness,
    key_change,
    key_is_current,
    load_factor,
    neutral_base,
    node_weight,
    preselect_key,
    rank_nodes,
    spread_nodes,
    weigh,
)


@frozen
class N:
    node_id: str
    state: dict[str, Any]
    last_seen: float = 0.0


def ids(nodes: list[N]) -> list[str]:
    return [n.node_id for n in nodes]


def up(free: float, **more: Any) -> dict[str, Any]:
    """A state with C{free} bytes/s of free upload."""
    return {"upload_capacity_bps": free + 100, "upload_bps": 100, **more}


class NoSpread(random.Random):
    """Every exponential draw is the same: the spread degenerates to the weight order."""

    def random(self) -> float:
        return 0.5


# A plain transcription of the module docstring, field by field, to check
# the hand-inlined code against.
def _num(state: dict[str, Any], name: str) -> float | None:
    v = state.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if not math.isfinite(v) or v < 0 or v >= 2.0**1000:
        return None
    return float(v)


def reference_weight(state: dict[str, Any], base: float, age: float, horizon: float | None) -> float:
    cap, used = _num(state, "upload_capacity_bps"), _num(state, "upload_bps")
    w = base if cap is None or used is None else max(0.0, cap - used)
    if (cpu := _num(state, "cpu")) is not None:
        w *= 1 - min(cpu, 1.0)
    if (mem := _num(state, "memory")) is not None and mem > MEMORY_KNEE:
        w *= max(0.0, (1 - mem) / (1 - MEMORY_KNEE))
    if (disk := _num(state, "disk_io_bps")) is not None:
        w *= 1 / (1 + disk / DISK_IO_HALF_BPS)
    if (conns := _num(state, "connections")) is not None:
        slots = _num(state, "upload_slots")
        if slots:
            w *= max(0.0, 1 - conns / slots)
        else:
            w *= 1 / (1 + conns / DEFAULT_UPLOAD_SLOTS)
    if horizon is not None and horizon > 0 and age > 0:
        w *= 1 - STALE_PENALTY * min(1.0, age / horizon)
    return max(w, 0.0)


FIELDS = [
    "upload_bps",
    "upload_capacity_bps",
    "cpu",
    "memory",
    "disk_io_bps",
    "connections",
    "upload_slots",
    "x",
]
VALUES = st.one_of(
    st.integers(-5, 10**9),
    st.integers(),
    st.floats(),
    st.floats(0, 1),
    st.none(),
    st.text(max_size=3),
    st.booleans(),
)
STATES = st.dictionaries(st.sampled_from(FIELDS), VALUES)


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
        for bad in ("10", None, True, -1, float("nan"), float("inf"), [1], 10**400):
            self.assertIsNone(free_upload({"upload_capacity_bps": bad, "upload_bps": 0}), bad)


class WeightTests(unittest.SynchronousTestCase):
    """L{node_weight}: each factor of the module docstring."""

    def test_free_upload_is_the_base(self) -> None:
        self.assertEqual(node_weight(up(5000)), 5000)
        self.assertEqual(node_weight(up(0)), 0)

    def test_unknown_fields_are_neutral(self) -> None:
        self.assertEqual(node_weight({}, unknown_base=7.0), 7.0)
        self.assertEqual(node_weight({"colour": 3, "cpu": "high", "memory": True}, 7.0), 7.0)
        self.assertEqual(load_factor({"cpu": None, "connections": -1, "disk_io_bps": float("nan")}), 1.0)

    def test_cpu(self) -> None:
        self.assertEqual(node_weight(up(1000, cpu=0.25)), 750)
        self.assertEqual(node_weight(up(1000, cpu=1.0)), 0)
        self.assertEqual(node_weight(up(1000, cpu=3)), 0)  # clamped to 1

    def test_memory_counts_only_past_the_knee(self) -> None:
        self.assertEqual(node_weight(up(1000, memory=0.5)), 1000)
        self.assertEqual(node_weight(up(1000, memory=MEMORY_KNEE)), 1000)
        self.assertAlmostEqual(node_weight(up(1000, memory=0.9)), 500)
        self.assertEqual(node_weight(up(1000, memory=1.0)), 0)

    def test_disk_io(self) -> None:
        self.assertEqual(node_weight(up(1000, disk_io_bps=0)), 1000)
        self.assertEqual(node_weight(up(1000, disk_io_bps=DISK_IO_HALF_BPS)), 500)
        self.assertLess(node_weight(up(1000, disk_io_bps=10 * DISK_IO_HALF_BPS)), 100)

    def test_connections_per_upload_slot(self) -> None:
        self.assertEqual(node_weight(up(1000, connections=2, upload_slots=8)), 750)
        self.assertEqual(node_weight(up(1000, connections=8, upload_slots=8)), 0)
        self.assertEqual(node_weight(up(1000, connections=9, upload_slots=8)), 0)
        # Without slots: a soft discount, never zero.
        self.assertEqual(node_weight(up(1000, connections=32)), 1000 * 32 / (32 + DEFAULT_UPLOAD_SLOTS))
        self.assertGreater(node_weight(up(1000, connections=10_000)), 0)
        # Zero slots is as good as unknown.
        self.assertEqual(
            node_weight(up(1000, connections=4, upload_slots=0)), node_weight(up(1000, connections=4))
        )

    def test_factors_multiply(self) -> None:
        state = up(1000, cpu=0.5, connections=4, upload_slots=8)
        self.assertEqual(node_weight(state), 250)

    def test_freshness(self) -> None:
        self.assertEqual(freshness(0, 90), 1.0)
        self.assertEqual(freshness(45, 90), 1 - STALE_PENALTY / 2)
        self.assertEqual(freshness(90, 90), 1 - STALE_PENALTY)
        self.assertEqual(freshness(900, 90), 1 - STALE_PENALTY)
        self.assertEqual(freshness(-5, 90), 1.0)  # a clock step back is not a bonus
        self.assertEqual(freshness(45, None), 1.0)
        self.assertEqual(node_weight(up(1000), age=45, horizon=90), 1000 * (1 - STALE_PENALTY / 2))

    def test_neutral_base_is_the_median_positive_free_upload(self) -> None:
        states = [up(100), up(0), up(4000), up(9000), {}, {"cpu": 0.1}]
        self.assertEqual(neutral_base(states), 4000)
        self.assertEqual(neutral_base([up(0), {}]), 1.0)
        self.assertEqual(neutral_base([]), 1.0)

    def test_weigh_uses_the_neutral_base_and_staleness(self) -> None:
        nodes = [N("a", up(100), 100.0), N("b", up(300), 100.0), N("c", {}, 10.0)]
        self.assertEqual(weigh(nodes), [100, 300, 200])
        self.assertEqual(weigh(nodes, now=100.0, horizon=90.0), [100, 300, 200 * (1 - STALE_PENALTY)])

    @settings(max_examples=300, deadline=None)
    @given(STATES, st.floats(0, 1e9), st.floats(-100, 1000), st.one_of(st.none(), st.floats(0, 500)))
    def test_agrees_with_the_docstring(
        self, state: dict[str, Any], base: float, age: float, horizon: float | None
    ) -> None:
        """The hand-inlined weight is the plain transcription of the docstring."""
        got = node_weight(state, base, age, horizon)
        want = reference_weight(state, base, age, horizon)
        self.assertTrue(math.isfinite(got) and got >= 0, got)
        self.assertTrue(math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300), (got, want))


class RankTests(unittest.SynchronousTestCase):
    def test_heaviest_first(self) -> None:
        nodes = [N("a", up(10)), N("b", up(1000)), N("c", up(400))]
        self.assertEqual(ids(rank_nodes(nodes)), ["b", "c", "a"])

    def test_unknown_is_neutral_not_last(self) -> None:
        nodes = [N("mute", {}), N("low", up(10)), N("mid", up(500)), N("high", up(5000))]
        self.assertEqual(ids(rank_nodes(nodes)), ["high", "mid", "mute", "low"])

    def test_loaded_nodes_sink(self) -> None:
        nodes = [
            N("busy-cpu", up(1000, cpu=0.9)),
            N("full", up(1000, connections=4, upload_slots=4)),
            N("calm", up(500, cpu=0.1)),
        ]
        self.assertEqual(ids(rank_nodes(nodes)), ["calm", "busy-cpu", "full"])

    def test_stale_nodes_slightly_lower(self) -> None:
        nodes = [N("old", up(1000), last_seen=10.0), N("new", up(1000), last_seen=99.0)]
        self.assertEqual(ids(rank_nodes(nodes, now=100.0, horizon=90.0)), ["new", "old"])
        # Slightly: a stale node with twice the bandwidth still wins.
        nodes.append(N("old-fat", up(2100), last_seen=10.0))
        self.assertEqual(ids(rank_nodes(nodes, now=100.0, horizon=90.0))[0], "old-fat")

    def test_ties_by_node_id(self) -> None:
        nodes = [N("z", {}), N("m", {}), N("a", {})]
        self.assertEqual(ids(rank_nodes(nodes)), ["a", "m", "z"])

    def test_empty(self) -> None:
        self.assertEqual(rank_nodes([]), [])
        self.assertEqual(spread_nodes([], random.Random(1), limit=5), [])


class SpreadTests(unittest.SynchronousTestCase):
    """L{spread_nodes}: weighted sampling without replacement, seeded."""

    def setUp(self) -> None:
        self.big = N("big", up(10_000))
        self.small = [N(f"small-{i}", up(1000)) for i in range(9)]
        self.idle = N("zero-free", up(0))
        self.hot = N("cpu-full", up(10_000, cpu=1.0))
        self.nodes = [self.idle, *self.small, self.hot, self.big]

    def test_one_big_seed_is_not_handed_to_everyone(self) -> None:
        """
        One seed with 10x the free upload of each of nine others: over 1000
        lookups of 3 nodes it comes first for about 10/19 of them, not all;
        every node with free upload is handed out; weight-0 nodes never
        make a list of 3.
        """
        rng = random.Random(20261125)
        first: Counter[str] = Counter()
        listed: Counter[str] = Counter()
        for _ in range(1000):
            chosen = ids(spread_nodes(self.nodes, rng, limit=3))
            self.assertEqual(len(set(chosen)), 3)
            first[chosen[0]] += 1
            listed.update(chosen)
        share = first["big"] / 1000
        self.assertTrue(0.46 < share < 0.60, share)  # 10/19 = 0.526
        self.assertGreater(listed["big"], 900)  # in nearly every list, if not always first
        for n in self.small:
            self.assertGreater(first[n.node_id], 20, first)  # 1/19 of 1000 = 53 expected
            self.assertGreater(listed[n.node_id], 150, listed)
        self.assertEqual(listed["zero-free"] + listed["cpu-full"], 0)

    def test_weight_zero_comes_last_in_random_order(self) -> None:
        rng = random.Random(7)
        tails: Counter[tuple[str, ...]] = Counter()
        for _ in range(200):
            chosen = ids(spread_nodes(self.nodes, rng))
            self.assertEqual(sorted(chosen), sorted(ids(self.nodes)))
            tails[tuple(chosen[-2:])] += 1
        self.assertEqual(set(tails), {("zero-free", "cpu-full"), ("cpu-full", "zero-free")})

    def test_low_weight_rarely_first(self) -> None:
        nodes = [N("weak", up(1000, cpu=0.99)), *self.small]  # weight 10 against 9 x 1000
        rng = random.Random(3)
        firsts = sum(ids(spread_nodes(nodes, rng, limit=1)) == ["weak"] for _ in range(1000))
        self.assertLess(firsts, 10)  # 10/9010 expected: ~1

    def test_first_pick_follows_the_weights(self) -> None:
        nodes = [N("w1", up(100)), N("w2", up(200)), N("w3", up(300)), N("w4", up(400))]
        rng = random.Random(11)
        first = Counter(spread_nodes(nodes, rng, limit=1)[0].node_id for _ in range(4000))
        for i, name in enumerate(["w1", "w2", "w3", "w4"], 1):
            expected = 4000 * i / 10
            self.assertLess(abs(first[name] - expected), 4 * math.sqrt(expected), first)

    def test_stale_penalty_in_the_spread(self) -> None:
        nodes = [N("old", up(1000), last_seen=0.0), N("new", up(1000), last_seen=90.0)]
        rng = random.Random(5)
        first = Counter(spread_nodes(nodes, rng, 1, now=90.0, horizon=90.0)[0].node_id for _ in range(2000))
        self.assertLess(abs(first["new"] - 2000 * 2 / 3), 120, first)  # weights 1 : 0.5

    def test_seeded_is_reproducible(self) -> None:
        a = [ids(spread_nodes(self.nodes, random.Random(42), limit=5)) for _ in range(3)]
        self.assertEqual(a[0], a[1])
        self.assertEqual(a[0], a[2])
        b = [ids(spread_nodes(self.nodes, random.Random(seed), limit=5)) for seed in range(20)]
        self.assertGreater(len({tuple(x) for x in b}), 1)

    def test_without_randomness_it_is_the_rank_order(self) -> None:
        nodes = [*self.nodes, N("mute", {}), N("stale", up(1000), last_seen=-50.0)]
        kwargs: dict[str, Any] = {"now": 0.0, "horizon": 90.0}
        self.assertEqual(ids(spread_nodes(nodes, NoSpread(), **kwargs)), ids(rank_nodes(nodes, **kwargs)))
        self.assertEqual(
            ids(spread_nodes(nodes, NoSpread(), limit=4, **kwargs)), ids(rank_nodes(nodes, **kwargs))[:4]
        )

    def test_limit(self) -> None:
        rng = random.Random(1)
        self.assertEqual(len(spread_nodes(self.nodes, rng, limit=4)), 4)
        self.assertEqual(len(spread_nodes(self.nodes, rng, limit=100)), len(self.nodes))
        self.assertEqual(spread_nodes(self.nodes, rng, limit=0), [])

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.builds(N, st.text(min_size=1, max_size=8), STATES, st.floats(-1e6, 1e6)),
            unique_by=lambda n: n.node_id,
            max_size=20,
        ),
        st.integers(0, 2**32),
        st.integers(1, 25),
    )
    def test_any_input(self, nodes: list[N], seed: int, limit: int) -> None:
        """Any input ranks without error: a permutation (or a prefix of one), deterministic."""
        ranked = rank_nodes(nodes, now=0.0, horizon=90.0)
        self.assertEqual(ranked, rank_nodes(list(reversed(nodes)), now=0.0, horizon=90.0))
        self.assertEqual(sorted(ids(ranked)), sorted(ids(nodes)))
        spread = spread_nodes(nodes, random.Random(seed), limit, now=0.0, horizon=90.0)
        self.assertEqual(len(spread), min(limit, len(nodes)))
        self.assertEqual(len(set(ids(spread))), len(spread))
        self.assertEqual(spread, spread_nodes(nodes, random.Random(seed), limit, now=0.0, horizon=90.0))
        weights = weigh(nodes, now=0.0, horizon=90.0)
        self.assertTrue(all(math.isfinite(w) and w >= 0 for w in weights), weights)
        # Weight-0 nodes never come before a weighted one.
        zero = {n.node_id for n, w in zip(nodes, weights, strict=True) if w == 0}
        flags = [n.node_id in zero for n in spread]
        self.assertEqual(flags, sorted(flags))


class PreselectionKeyTests(unittest.SynchronousTestCase):
    """The pre-selection key of rank columns, how far two keys are apart, and when a kept one stays."""

    def test_key_per_sort(self) -> None:
        self.assertEqual(preselect_key((200.0, 0.5)), (1, 100.0))
        self.assertEqual(preselect_key((None, 0.5)), (0, 0.5))
        self.assertEqual(preselect_key((0.0, 0.5)), (1, 0.0))

    def test_change(self) -> None:
        self.assertEqual(key_change((1, 100.0), (1, 100.0)), 0.0)
        self.assertEqual(key_change((1, 100.0), (1, 75.0)), 0.25)
        self.assertEqual(key_change((1, 75.0), (1, 100.0)), 0.25)
        self.assertEqual(key_change((1, 0.0), (1, 5.0)), 1.0)
        self.assertEqual(key_change((1, 0.0), (1, 0.0)), 0.0)
        self.assertEqual(key_change((1, 0.5), (0, 0.5)), 2.0)

    @given(
        st.tuples(st.integers(0, 1), st.floats(0, 1e12)),
        st.tuples(st.integers(0, 1), st.floats(0, 1e12)),
        st.floats(0, 1e4),
    )
    def test_current(self, held: tuple[int, float], new: tuple[int, float], age: float) -> None:
        """Within the tolerance a kept key stays whatever its age; beyond it, only while young."""
        now = 1.8e9
        current = key_is_current(held, now - age, new, now)
        if key_change(held, new) <= KEY_TOLERANCE:
            self.assertTrue(current)
        else:
            self.assertEqual(current, age < KEY_REFRESH)
        self.assertTrue(key_is_current(held, now + 10, new, now))  # a clock that went back: young


class RekeyBudgetTests(unittest.SynchronousTestCase):
    """A token bucket on the announces' clock (times and rates exact in binary)."""

    def test_burst_then_rate(self) -> None:
        budget = RekeyBudget(rate=8.0, burst=5)
        self.assertEqual(budget.take(100.0, 3), 3)
        self.assertEqual(budget.take(100.0, 3), 2)  # the burst spent
        self.assertEqual(budget.take(100.0, 1), 0)
        self.assertEqual(budget.take(100.25, 9), 2)  # 2 tokens came in a quarter second
        self.assertEqual(budget.take(100.3125, 1), 0)  # half a token is none
        self.assertEqual(budget.take(100.375, 1), 1)  # two halves are one
        self.assertEqual(budget.take(1000.0, 99), 5)  # saved up to the burst only
        self.assertEqual(budget.take(1000.0, 0), 0)

    def test_clock_going_back(self) -> None:
        """An earlier time than the last one seen adds nothing (and is not remembered)."""
        budget = RekeyBudget(rate=8.0, burst=2)
        self.assertEqual(budget.take(100.0, 2), 2)
        self.assertEqual(budget.take(50.0, 1), 0)
        self.assertEqual(budget.take(100.125, 1), 1)
