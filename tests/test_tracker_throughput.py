# -*- test-case-name: tests.test_tracker_throughput -*-
"""
Tests for what lets one tracker take thousands of announces a second (issue
4), against a real SQLite file and (with C{MESHSTREAM_TEST_PG}, see
C{tests/_pg.py}) a real PostgreSQL schema:

  - announces submitted together are written in groups, with the same end
    state as one after the other, each answered with its own unknown ids;
  - an announce rewrites only the holdings that changed;
  - ownership and node kinds hold within a group: an announce of another
    user's node fails alone, the first of two users announcing a new node
    in one group takes it, each announce's kind is written;
  - the database pre-selects a node list's candidates by the stored rank
    columns, L{meshstream.tracker.ranking.rank_columns} of their states
    (ties, unknown free upload, node ids that differ in case or
    punctuation, C{exclude}, expiry, kind), and weighing and drawing from
    those columns gives what weighing and drawing from the states gives;
  - the pre-selection key kept in a node's holdings rows follows its
    announces as L{meshstream.tracker.ranking.key_is_current} says (at
    once for a new node or a new kind; after
    L{meshstream.tracker.ranking.KEY_REFRESH} for a changed state; never
    for a change within the tolerance), and a node list reads only its
    candidates' rows, best first, through the C{holdings_rank} index;
  - the reservations an announce's answer carries are read in its group's
    transaction, one query for the group;
  - node reads give back every float exactly (SQLite returns their rows
    as one JSON row, see L{meshstream.tracker.store.Dialect.rows_as_json});
  - a schema 5 database is migrated, its rank columns computed, and its
    holdings given their nodes' kinds and keys.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from meshstream.tracker.billing import ReservationRequest
from meshstream.tracker.ranking import (
    KEY_REFRESH,
    REKEY_BURST,
    REKEY_RATE,
    preselect_key,
    rank_columns,
    spread_candidates,
    spread_nodes,
    weigh,
    weigh_columns,
)
from meshstream.tracker.store import (
    _SQL,
    _STATE_JSON,
    PEER,
    POSTGRESQL,
    SCHEMA_VERSION,
    SERVER,
    SQLITE,
    Announced,
    Candidate,
    ListedNode,
    NodeOwned,
    NodeRecord,
    TrackerStore,
    open_store,
)
from tests._pg import SKIP_PG, pg_query, pg_schema_url
from tests.test_tracker_api import START, temp_path


def cid(n: int) -> str:
    return f"{n:064x}"


UNKNOWN = "ee" * 32


def by_id(records: list[NodeRecord] | None) -> list[NodeRecord]:
    """Records in node id order (the store lists candidates in no particular order)."""
    assert records is not None
    return sorted(records, key=lambda r: r.node_id)


async def candidates_of(
    store: TrackerStore,
    content_id: str,
    since: float,
    kind: str,
    k: int,
    exclude: frozenset[str] = frozenset(),
) -> list[Candidate] | None:
    """The candidates a node list hands its chooser (which chooses none of them here)."""
    given: list[Candidate] = []

    def choose(candidates: list[Candidate]) -> list[Candidate]:
        given.extend(candidates)
        return []

    listed = await store.node_list(content_id, since, kind, k, exclude, choose)
    return None if listed is None else given


async def all_candidates(
    store: TrackerStore,
    content_id: str,
    since: float,
    kind: str,
    k: int,
    exclude: frozenset[str] = frozenset(),
) -> list[NodeRecord] | None:
    """The records of a node list that chose every candidate (in no particular order)."""
    listed = await store.node_list(content_id, since, kind, k, exclude, lambda candidates: candidates)
    return None if listed is None else [n.record() for n in listed]


def best(pool: list[NodeRecord], k: int) -> list[NodeRecord]:
    """The candidates: the k heaviest of each sort (ties by node id, in byte order), by node id."""
    known = [r for r in pool if rank_columns(r.state)[0] is not None]
    unknown = [r for r in pool if rank_columns(r.state)[0] is None]

    def weight(r: NodeRecord) -> float:
        free, load = rank_columns(r.state)
        assert free is not None
        return free * load

    known.sort(key=lambda r: (-weight(r), r.node_id.encode()))
    unknown.sort(key=lambda r: (-rank_columns(r.state)[1], r.node_id.encode()))
    return by_id(known[:k] + unknown[:k])


def state_from(rng: random.Random) -> dict[str, float]:
    """A state drawn from few values, so that ranks tie often."""
    state: dict[str, float] = {}
    capacity = rng.choice([None, 100, 200, 150.5])
    used = rng.choice([None, 0, 100, 300])
    connections = rng.choice([None, 0, 3, 3, 7])
    if capacity is not None:
        state["upload_capacity_bps"] = capacity
    if used is not None:
        state["upload_bps"] = used
    if connections is not None:
        state["connections"] = connections
    if rng.random() < 0.3:
        state["cpu"] = 0.5
    return state


class _StoreMixin:
    """The store on the database C{db_url()} names; mixed into one TestCase per engine."""

    dialect = SQLITE

    def db_url(self) -> str:
        raise NotImplementedError

    def raw(self, statement: str) -> list[tuple[Any, ...]]:
        """Run C{statement} on the database directly (blocking)."""
        raise NotImplementedError

    def run_script(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run C{?}-placeholder statements in one transaction (blocking)."""
        raise NotImplementedError

    async def open(self) -> TrackerStore:
        store = open_store(self.url, reactor)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        self.assertEqual(await store.start(), SCHEMA_VERSION)  # type: ignore[attr-defined]
        return store

    def setUp(self) -> None:
        self.url = self.db_url()

    async def manifests(self, store: TrackerStore, n: int) -> list[str]:
        ids = [cid(i + 1) for i in range(n)]
        for c in ids:
            await store.add_manifest(c, "{}", START)
        return ids

    # -- groups ------------------------------------------------------------------

    async def test_group_as_if_one_after_another(self) -> None:
        store = await self.open()
        cids = await self.manifests(store, 6)
        rng = random.Random(4)
        announces = []
        for i in range(240):
            node = f"n{rng.randrange(30)}"
            contents = rng.sample([*cids, UNKNOWN], k=rng.randrange(0, 5))
            contents += contents[:1]  # a repeated id counts once
            announces.append(
                (node, f"10.0.{i // 250}.{i % 250}:{1000 + i}", state_from(rng), START + i, contents)
            )
        results = await gatherResults([store.announce(*a) for a in announces])
        for (_, _, _, _, contents), unknown in zip(announces, results, strict=True):
            self.assertEqual(unknown, [UNKNOWN] if UNKNOWN in contents else [])
        # They went in far fewer transactions than announces.
        self.assertLess(store.announces.groups, len(announces) // 4)
        self.assertEqual(store.announces.items, len(announces))
        # The end state: each node as its last announce left it.
        last: dict[str, tuple[str, dict[str, float], float, list[str]]] = {}
        for node, address, state, seen, contents in announces:
            last[node] = (address, state, seen, [c for c in dict.fromkeys(contents) if c != UNKNOWN])
        self.assertEqual(await store.count_nodes(), len(last))
        for c in cids:
            expected = [
                NodeRecord(node, address, state, seen)
                for node, (address, state, seen, held) in sorted(last.items())
                if c in held
            ]
            self.assertEqual(by_id(await store.nodes_for(c, 0.0)), expected)

    async def test_same_node_twice_in_one_group(self) -> None:
        store = await self.open()
        a, b = await self.manifests(store, 2)
        first = store.announce("other", "10.0.0.9:1", {}, START, [a])  # written alone, at once
        one = store.announce("n1", "10.0.0.1:1", {"cpu": 0.1}, START + 1, [a, UNKNOWN])
        two = store.announce("n1", "10.0.0.2:2", {"cpu": 0.2}, START + 2, [b])
        self.assertEqual(store.announces.pending, 2)
        self.assertEqual(await gatherResults([first, one, two]), [[], [UNKNOWN], []])
        self.assertEqual(store.announces.groups, 2)
        self.assertEqual([r.node_id for r in await store.nodes_for(a, 0.0) or []], ["other"])
        self.assertEqual(
            await store.nodes_for(b, 0.0), [NodeRecord("n1", "10.0.0.2:2", {"cpu": 0.2}, START + 2)]
        )

    async def test_only_changed_holdings_rewritten(self) -> None:
        """Re-announcing the same contents leaves their rows alone; a change touches only its rows."""
        store = await self.open()
        a, b, c = await self.manifests(store, 3)
        await store.announce("n1", "10.0.0.1:1", {}, START, [a, b])
        before = self.holding_rows("n1")
        await store.announce("n1", "10.0.0.1:1", {"cpu": 1.0}, START + 30, [b, a])
        self.assertEqual(self.holding_rows("n1"), before)
        await store.announce("n1", "10.0.0.1:1", {}, START + 60, [b, c])
        after = self.holding_rows("n1")
        self.assertEqual(set(after), {b, c})
        self.assertEqual(after[b], before[b])
        self.assertEqual(await store.nodes_for(a, 0.0), [])
        self.assertEqual([r.node_id for r in await store.nodes_for(c, 0.0) or []], ["n1"])

    def holding_rows(self, node: str) -> dict[str, Any]:
        """Content id -> the physical identity of its holdings row (a rewrite changes it)."""
        raise NotImplementedError

    async def test_unknown_then_registered(self) -> None:
        """Only known ids are remembered: an id registered later is taken at the next announce."""
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        self.assertEqual(await store.announce("n1", "10.0.0.1:1", {}, START, [a, UNKNOWN]), [UNKNOWN])
        self.assertIsNone(await store.nodes_for(UNKNOWN, 0.0))
        await store.add_manifest(UNKNOWN, "{}", START)
        self.assertEqual(await store.nodes_for(UNKNOWN, 0.0), [])
        self.assertEqual(await store.announce("n1", "10.0.0.1:1", {}, START, [a, UNKNOWN]), [])
        self.assertEqual([r.node_id for r in await store.nodes_for(UNKNOWN, 0.0) or []], ["n1"])

    async def test_reads_do_not_wait_for_writes(self) -> None:
        """A node list is answered while a write transaction holds the writing connection."""
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        await store.announce("n1", "10.0.0.1:1", {}, START, [a])
        gate = threading.Event()
        busy = store._pool.runInteraction(lambda txn: gate.wait(10))
        try:
            self.assertEqual([r.node_id for r in await store.nodes_for(a, 0.0) or []], ["n1"])
            self.assertFalse(gate.is_set())
        finally:
            gate.set()
        self.assertTrue(await busy)

    # -- ownership and kinds in groups ------------------------------------------------

    async def test_owned_node_refused_alone(self) -> None:
        """In one group, an announce of another user's node fails; the others are written."""
        store = await self.open()
        a, b = await self.manifests(store, 2)
        await store.announce("n1", "10.0.0.1:1", {"cpu": 0.1}, START, [a], owner="alice")
        first = store.announce("n9", "10.0.0.9:1", {}, START, [], owner="carol")  # written alone, at once
        mine = store.announce("n2", "10.0.0.2:1", {}, START + 1, [a], owner="bob")
        theirs = store.announce("n1", "10.0.0.3:1", {"cpu": 0.9}, START + 1, [b], owner="bob")
        again = store.announce("n1", "10.0.0.1:2", {"cpu": 0.2}, START + 2, [a], owner="alice")
        self.assertEqual(store.announces.pending, 3)
        await first
        self.assertEqual(await mine, [])
        failure = await self.assertFailure(theirs, NodeOwned)  # type: ignore[attr-defined]
        self.assertEqual((failure.node_id, failure.owner), ("n1", "alice"))
        self.assertEqual(await again, [])
        self.assertEqual(store.announces.groups, 3)
        self.assertEqual(
            by_id(await store.nodes_for(a, 0.0)),
            [
                NodeRecord("n1", "10.0.0.1:2", {"cpu": 0.2}, START + 2),
                NodeRecord("n2", "10.0.0.2:1", {}, START + 1),
            ],
        )
        self.assertEqual(await store.nodes_for(b, 0.0), [])
        self.assertEqual(await store.node_owner("n1"), "alice")
        self.assertEqual(await store.node_owner("n2"), "bob")

    async def test_new_node_first_owner_wins(self) -> None:
        """Two users announce one new node in one group: the first in order takes it."""
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        first = store.announce("n0", "10.0.0.9:1", {}, START, [])  # written alone, at once
        bob = store.announce("new", "10.0.0.1:1", {}, START + 1, [a], owner="bob")
        alice = store.announce("new", "10.0.0.2:1", {}, START + 1, [a], owner="alice")
        unowned = store.announce("new", "10.0.0.3:1", {}, START + 2, [a])  # no owner: the owner stays
        self.assertEqual(store.announces.pending, 3)
        await first
        self.assertEqual(await bob, [])
        await self.assertFailure(alice, NodeOwned)  # type: ignore[attr-defined]
        self.assertEqual(await unowned, [])
        self.assertEqual(store.announces.groups, 2)
        self.assertEqual(await store.node_owner("new"), "bob")
        self.assertEqual(
            by_id(await store.nodes_for(a, 0.0)), [NodeRecord("new", "10.0.0.3:1", {}, START + 2)]
        )

    async def test_kinds_in_a_group(self) -> None:
        """Each announce's kind is written; a node's last announce decides it."""
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        first = store.announce("p0", "10.0.0.9:1", {}, START, [a])
        server = store.announce("s1", "10.0.0.1:1", {}, START, [a], kind=SERVER)
        peer = store.announce("p1", "10.0.0.2:1", {}, START, [a])
        turned = store.announce("p0", "10.0.0.9:1", {}, START + 1, [a], kind=SERVER)
        await gatherResults([first, server, peer, turned])
        self.assertEqual(store.announces.groups, 2)
        self.assertEqual([r.node_id for r in by_id(await store.nodes_for(a, 0.0))], ["p1"])
        self.assertEqual([r.node_id for r in by_id(await store.nodes_for(a, 0.0, SERVER))], ["p0", "s1"])
        self.assertEqual(sorted((r.node_id, n) for r, n in await store.servers(0.0)), [("p0", 1), ("s1", 1)])

    async def test_reservations_read_with_the_group(self) -> None:
        """Each announce of a group gets its owner's reservations, by its time and limit."""
        store = await self.open()
        a, b = await self.manifests(store, 2)
        now = int(START)
        made = {}
        for rid, name, content, start, end in (
            ("r1", "alice", a, now + 100, now + 200),
            ("r2", "alice", b, now + 10, now + 50),
            ("r3", "alice", a, now + 300, now + 400),
            ("r4", "bob", b, now + 20, now + 30),
        ):
            made[rid] = await store.add_reservation(
                rid, name, ReservationRequest(content, start, end), START, 10
            )
        first = store.announce("taken", "10.0.0.9:1", {}, START, [], owner="carol")  # written alone, at once
        asks = [
            store.announce_answer("n1", "10.0.0.1:1", {}, START, [a], "alice", reservations=10),
            store.announce_answer("n2", "10.0.0.2:1", {}, START, [a, UNKNOWN], "alice", reservations=2),
            # bob's has ended by then:
            store.announce_answer("n3", "10.0.0.3:1", {}, START + 30, [], "bob", reservations=10),
            store.announce_answer("n4", "10.0.0.4:1", {}, START + 60, [], "alice", reservations=10),
            store.announce_answer("n5", "10.0.0.5:1", {}, START, [b], "bob", reservations=10),
            store.announce_answer("n6", "10.0.0.6:1", {}, START, [b], "bob"),  # none asked for
            store.announce_answer("n7", "10.0.0.7:1", {}, START, [b], None, reservations=10),  # no owner
        ]
        refused = store.announce_answer("taken", "10.0.0.8:1", {}, START, [], "alice", reservations=10)
        self.assertEqual(store.announces.pending, 8)
        await first
        await self.assertFailure(refused, NodeOwned)  # type: ignore[attr-defined]
        self.assertEqual(store.announces.groups, 2)
        self.assertEqual(
            await gatherResults(asks),
            [
                Announced([], [made["r2"], made["r1"], made["r3"]]),
                Announced([UNKNOWN], [made["r2"], made["r1"]]),
                Announced([], []),
                Announced([], [made["r1"], made["r3"]]),
                Announced([], [made["r4"]]),
                Announced([], []),
                Announced([], []),
            ],
        )

    # -- the candidates of a node list ------------------------------------------------

    async def test_candidates_by_rank_columns(self) -> None:
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        rng = random.Random(7)
        names = ["a", "B", "b", "A", "_x", "-y", ".z", "Z9", "z10", "a.b", "a-b", "a_b", "0", "9", "aa"]
        names += [f"n{i}" for i in range(45)]
        records = []
        for i, name in enumerate(names):
            seen = START - 1000 if i % 9 == 0 else START + i  # some are stale
            record = NodeRecord(name, f"10.1.0.{i}:7000", state_from(rng), seen)
            records.append(record)
            await store.announce(record.node_id, record.address, record.state, seen, [a])
        await store.announce("srv", "10.2.0.1:7000", {"upload_capacity_bps": 10**9}, START, [a], kind=SERVER)
        since = START - 10
        live = [r for r in records if r.last_seen >= since]
        self.assertEqual(by_id(await store.nodes_for(a, since)), by_id(live))
        latest = {r.node_id: r for r in records}
        for k in (1, 3, 7, 100):
            got = await candidates_of(store, a, since, PEER, k)
            assert got is not None
            self.assertEqual(sorted(c.node_id for c in got), [r.node_id for r in best(live, k)], k)
            for c in got:
                self.assertEqual(c.rank, rank_columns(latest[c.node_id].state))
                self.assertEqual(c.last_seen, latest[c.node_id].last_seen)
            self.assertEqual(by_id(await all_candidates(store, a, since, PEER, k)), best(live, k))
        ordered = best(live, 3)
        exclude = frozenset([ordered[0].node_id, ordered[1].node_id, "nobody", records[0].node_id])
        # Each sort fetched with as many more as exclude names, then the excluded left out.
        self.assertEqual(
            by_id(await all_candidates(store, a, since, PEER, 3, exclude)),
            [r for r in best(live, 3 + len(exclude)) if r.node_id not in exclude],
        )
        servers = await candidates_of(store, a, since, SERVER, 3)
        assert servers is not None
        self.assertEqual([c.node_id for c in servers], ["srv"])
        self.assertIsNone(await candidates_of(store, UNKNOWN, since, PEER, 3))
        self.assertIsNone(await all_candidates(store, UNKNOWN, since, PEER, 3))

    async def test_node_reads_exact(self) -> None:
        """
        Node reads give back what was written, to the last bit of every
        float (on SQLite they come as one JSON row, floats as exact text),
        and nothing when nothing matches.
        """
        store = await self.open()
        a, b = await self.manifests(store, 2)
        seen = 1795608895.577071
        state = {"upload_capacity_bps": 123456789.12345679, "upload_bps": 0.1 + 0.2, "cpu": 1 / 3}
        await store.announce("exact", "[2001:db8::1]:7000", state, seen, [a])
        await store.announce("srv", "10.2.0.1:7000", {"cpu": 2 / 3}, seen + 1e-6, [a, b], kind=SERVER)
        self.assertEqual(
            await store.nodes_for(a, seen), [NodeRecord("exact", "[2001:db8::1]:7000", state, seen)]
        )
        (got,) = await candidates_of(store, a, seen, PEER, 5) or []
        self.assertEqual(got, ("exact", seen, rank_columns(state)))
        self.assertEqual(
            await all_candidates(store, a, seen, PEER, 5),
            [NodeRecord("exact", "[2001:db8::1]:7000", state, seen)],
        )
        self.assertIsNotNone(got.rank[0])
        (unknown,) = await candidates_of(store, a, seen, SERVER, 5) or []
        self.assertEqual(unknown.rank, (None, rank_columns({"cpu": 2 / 3})[1]))
        self.assertEqual(
            await store.servers(seen), [(NodeRecord("srv", "10.2.0.1:7000", {"cpu": 2 / 3}, seen + 1e-6), 2)]
        )
        self.assertEqual(await store.nodes_for(b, seen), [])
        self.assertEqual(await candidates_of(store, b, seen, PEER, 5), [])
        self.assertEqual(await store.servers(seen + 1), [])

    async def test_node_list_names_the_chosen_in_order(self) -> None:
        """
        A node list hands the chooser every candidate (but the excluded),
        then gives the rows of the nodes it chose, in its order, as they are
        now; a chosen node gone in between (a leave, a purge) is left out.
        """
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        for i in range(5):
            state = {"upload_capacity_bps": 100 * (i + 1), "upload_bps": 0}
            await store.announce(f"n{i}", f"10.0.0.{i}:1", state, START + i, [a])
        given: list[list[str]] = []

        def choose(candidates: list[Candidate]) -> list[Candidate]:
            given.append(sorted(c.node_id for c in candidates))
            self.run_script([("DELETE FROM nodes WHERE node_id = ?", ("n1",))])
            return [c for c in sorted(candidates, key=lambda c: c.node_id, reverse=True) if c.node_id != "n4"]

        listed = await store.node_list(a, START, PEER, 10, frozenset({"n0"}), choose)
        self.assertEqual(given, [["n1", "n2", "n3", "n4"]])
        assert listed is not None
        self.assertEqual([n.node_id for n in listed], ["n3", "n2"])
        state = {"upload_capacity_bps": 400, "upload_bps": 0}
        self.assertEqual(listed[0].record(), NodeRecord("n3", "10.0.0.3:1", state, START + 3))
        self.assertEqual(json.loads(listed[0].to_json()), listed[0].record().to_dict())
        self.assertEqual(await store.node_list(a, START, PEER, 10, frozenset(), lambda c: []), [])
        self.assertIsNone(await store.node_list(UNKNOWN, START, PEER, 10, frozenset(), choose))
        self.assertEqual(len(given), 1)  # never asked to choose for an unknown content

    # -- migration -------------------------------------------------------------------

    async def test_preselection_key_follows_announces(self) -> None:
        """
        The key in a node's holdings rows is the announced one at once for
        a new node or a new kind; a changed state's key comes in only once
        the kept one is KEY_REFRESH old (new holdings rows get the kept
        one), and a change within the tolerance never rewrites it.  The candidates always carry the
        rank columns of the last announce.
        """
        store = await self.open()
        a, b = await self.manifests(store, 2)
        big, small = (
            {"upload_capacity_bps": 1000, "upload_bps": 0},
            {"upload_capacity_bps": 10, "upload_bps": 0},
        )
        for i, state in enumerate([big, big, small, small]):
            await store.announce(f"n{i}", f"10.0.0.{i}:1", state, START, [a])
        self.assertEqual(store.rekeyed, 0)  # new nodes: their rows are written with their keys
        self.assertEqual(self.held_keys("n0"), {a: ("peer", *preselect_key(rank_columns(big)))})

        async def picked(at: float) -> list[str]:
            got = await candidates_of(store, a, at - 10, PEER, 2)
            assert got is not None
            for c in got:  # the weights are always the last announce's
                self.assertEqual(c.rank, rank_columns(latest[c.node_id]))
            return sorted(c.node_id for c in got)

        latest = {"n0": big, "n1": big, "n2": small, "n3": small}
        self.assertEqual(await picked(START), ["n0", "n1"])
        # n3 grows and n0 shrinks: kept keys until KEY_REFRESH has passed.
        soon = START + KEY_REFRESH - 1
        for node, state in (
            ("n0", small),
            ("n3", big),
            ("n1", {"upload_capacity_bps": 900, "upload_bps": 0}),
        ):
            latest[node] = state
            await store.announce(node, "10.0.0.9:1", state, soon, [a])
        self.assertEqual(store.rekeyed, 0)
        self.assertEqual(await picked(soon), ["n0", "n1"])
        later = START + KEY_REFRESH
        for node in ("n0", "n1", "n3"):
            await store.announce(node, "10.0.0.9:1", latest[node], later, [a])
        # n1's 10 % change is within the tolerance: its rows keep 1000.
        self.assertEqual(store.rekeyed, 2)
        self.assertEqual(await picked(later), ["n1", "n3"])
        self.assertEqual(self.held_keys("n1"), {a: ("peer", 1, 1000.0)})
        self.assertEqual(self.held_keys("n0"), {a: ("peer", *preselect_key(rank_columns(small)))})
        # n2's kept key is older than KEY_REFRESH: its rows, old and new, get its new key.
        await store.announce("n2", "10.0.0.2:1", big, later + 1, [a, b])
        self.assertEqual(self.held_keys("n2"), {c: ("peer", 1, 1000.0) for c in (a, b)})
        self.assertEqual(store.rekeyed, 3)
        # A new kind is written at once, with the new key, however young the kept one.
        await store.announce("n0", "10.0.0.0:1", big, later + 2, [a], kind=SERVER)
        self.assertEqual(self.held_keys("n0"), {a: ("server", 1, 1000.0)})
        self.assertEqual(store.rekeyed, 4)
        servers = await candidates_of(store, a, later, SERVER, 5)
        self.assertEqual([c.node_id for c in servers or []], ["n0"])
        # A young kept key stays, and a node's new holdings rows get it too.
        await store.announce("n3", "10.0.0.3:1", small, later + 3, [a, b])
        self.assertEqual(self.held_keys("n3"), {c: ("peer", 1, 1000.0) for c in (a, b)})
        self.assertEqual(store.rekeyed, 4)
        latest.update(n0=big, n2=big, n3=small)
        self.assertEqual(await picked(later + 3), ["n1", "n2"])  # all three peers kept 1000: by node id

    async def test_rekeys_within_budget_most_changed_first(self) -> None:
        """
        Announces rewrite due keys within the rekey budget (REKEY_BURST at
        once, then REKEY_RATE a second), the most changed first; the others
        keep theirs until there is room.
        """
        store = await self.open()
        (a,) = await self.manifests(store, 1)

        def offering(capacity: int) -> dict[str, int]:
            return {"upload_capacity_bps": capacity, "upload_bps": 0}

        nodes = [f"n{i:02d}" for i in range(REKEY_BURST + 5)]
        for node in nodes:
            await store.announce(node, "10.0.0.1:1", offering(10_000), START, [a])
        # Each off by more than the tolerance, n00 the most: 100, 150, 200, ...
        changed = {node: 100 + 50 * i for i, node in enumerate(nodes)}
        later = START + KEY_REFRESH
        first = store.announce("other", "10.0.0.2:1", {}, later, [a])  # written alone, at once
        group = [store.announce(n, "10.0.0.1:1", offering(c), later, [a]) for n, c in changed.items()]
        await first
        await gatherResults(group)
        self.assertEqual(store.announces.groups, len(nodes) + 2)
        self.assertEqual(store.rekeyed, REKEY_BURST)
        kept = {n: self.held_keys(n)[a][2] for n in nodes}
        self.assertEqual(
            kept, {n: float(changed[n]) if i < REKEY_BURST else 10_000.0 for i, n in enumerate(nodes)}
        )
        # The budget refills at REKEY_RATE a second, on the announces' clock:
        # two and a half tokens' time later, two more.
        soon = later + 2.5 / REKEY_RATE
        for n in nodes[REKEY_BURST:]:
            await store.announce(n, "10.0.0.1:1", offering(changed[n]), soon, [a])
        self.assertEqual(store.rekeyed, REKEY_BURST + 2)
        rewritten = [n for n in nodes[REKEY_BURST:] if self.held_keys(n)[a][2] != 10_000.0]
        self.assertEqual(rewritten, nodes[REKEY_BURST : REKEY_BURST + 2])

    async def test_node_list_reads_only_its_candidates(self) -> None:
        """A node list of a content with many holders reads its candidates' rows through holdings_rank."""
        store = await self.open()
        (a,) = await self.manifests(store, 1)
        for i in range(300):
            state = {"upload_capacity_bps": 1000 + i, "upload_bps": 0} if i % 3 else {"cpu": (i % 100) / 100}
            await store.announce(f"n{i:03d}", "10.0.0.1:1", state, START, [a])
        got = await candidates_of(store, a, START, PEER, 5)
        assert got is not None
        # The 5 largest free uploads (i % 3 != 0), and the 5 least loaded CPUs of the others.
        best_known = ["n299", "n298", "n296", "n295", "n293"]
        least_cpu = ["n000", "n201", "n102", "n003", "n204"]
        self.assertEqual(sorted(c.node_id for c in got), sorted(best_known + least_cpu))
        self.assertIn("holdings_rank", self.candidates_plan(a))

    def held_keys(self, node: str) -> dict[str, tuple[str, int, float]]:
        """The kind and pre-selection key of each of C{node}'s holdings rows."""
        rows = self.raw(f"SELECT content_id, kind, rank_known, rank FROM holdings WHERE node_id = '{node}'")
        return {str(c): (str(k), int(known), float(rank)) for c, k, known, rank in rows}

    def candidates_plan(self, content_id: str) -> str:
        raise NotImplementedError

    async def test_migration_from_schema_5(self) -> None:
        """
        A schema 5 database gets the latest version: rank columns filled,
        holdings given their nodes' kinds and keys, indexes replaced, owners
        kept.
        """
        rng = random.Random(9)
        a = cid(1)
        script: list[tuple[str, tuple[Any, ...]]] = [
            (s, ()) for v in range(1, 6) for s in _SQL.migrations[v] if isinstance(s, str)
        ]
        script += [
            (_SQL.create_schema_version, ()),
            *((_SQL.set_schema_version, (v,)) for v in range(1, 6)),
            (_SQL.insert_manifest, (a, "{}", START)),
        ]
        records = []
        for i in range(20):
            st = state_from(rng)
            records.append(NodeRecord(f"n{i}", f"10.0.0.{i}:1", st, START))
            script.append(
                (
                    "INSERT INTO nodes (node_id, address, state, last_seen, owner, kind) VALUES (?, ?, ?, ?, ?, ?)",
                    (f"n{i}", f"10.0.0.{i}:1", json.dumps(st, sort_keys=True), START, "alice", "peer"),
                )
            )
            script.append(("INSERT INTO holdings (node_id, content_id) VALUES (?, ?)", (f"n{i}", a)))
        self.run_script(script)
        store = await self.open()
        self.assertEqual(by_id(await store.nodes_for(a, 0.0)), by_id(records))
        stored = {
            str(row[0]): (row[1], row[2])
            for row in self.raw("SELECT node_id, rank_free, rank_load FROM nodes")
        }
        self.assertEqual(stored, {r.node_id: rank_columns(r.state) for r in records})
        self.assertEqual(by_id(await all_candidates(store, a, 0.0, PEER, 2)), best(records, 2))
        # No holdings digest yet: the next announces read the holdings.
        await store.announce("n0", "10.0.0.0:1", {}, START + 1, [], owner="alice")
        await store.announce("n1", "10.0.0.1:1", {}, START + 1, [a], owner="alice")
        await self.assertFailure(  # type: ignore[attr-defined]
            store.announce("n2", "10.0.0.2:1", {}, START + 1, [], owner="bob"), NodeOwned
        )
        self.assertEqual(
            by_id(await store.nodes_for(a, 0.0)),
            by_id([NodeRecord("n1", "10.0.0.1:1", {}, START + 1), *records[2:]]),
        )
        self.assertEqual(self.held_keys("n5"), {a: ("peer", *preselect_key(rank_columns(records[5].state)))})
        indexes = self.index_names()
        self.assertIn("holdings_rank", indexes)
        self.assertNotIn("holdings_content_node", indexes)
        self.assertNotIn("holdings_content", indexes)
        self.assertNotIn("nodes_last_seen", indexes)
        self.assertIn("nodes_servers_seen", indexes)
        self.assertNotIn("nodes_kind_seen", indexes)

    def index_names(self) -> set[str]:
        raise NotImplementedError


class SQLiteThroughputTests(_StoreMixin, unittest.TestCase):
    def db_url(self) -> str:
        self.path = temp_path(self)
        return f"sqlite:{self.path}"

    def raw(self, statement: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return list(conn.execute(statement).fetchall())
        finally:
            conn.close()

    def run_script(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                for statement, params in statements:
                    conn.execute(SQLITE.sql(statement), params)
        finally:
            conn.close()

    def holding_rows(self, node: str) -> dict[str, Any]:
        rows = self.raw(f"SELECT content_id, rowid FROM holdings WHERE node_id = '{node}'")
        return {str(c): r for c, r in rows}

    def index_names(self) -> set[str]:
        return {str(r[0]) for r in self.raw("SELECT name FROM sqlite_master WHERE type = 'index'")}

    def candidates_plan(self, content_id: str) -> str:
        conn = sqlite3.connect(self.path)
        try:
            args = (content_id, START, PEER, 5) * 2
            plan = conn.execute("EXPLAIN QUERY PLAN " + _SQL.candidates_for_content, args).fetchall()
        finally:
            conn.close()
        text = "\n".join(str(row[-1]) for row in plan)
        self.assertNotIn("TEMP B-TREE", text)  # read in index order: no sort of every holder
        return text


class PostgresThroughputTests(_StoreMixin, unittest.TestCase):
    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)

    def raw(self, statement: str) -> list[tuple[Any, ...]]:
        return pg_query(self.url, statement)

    def run_script(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=10) as conn:
            for statement, params in statements:
                conn.execute(POSTGRESQL.sql(statement), params)

    def holding_rows(self, node: str) -> dict[str, Any]:
        # (ctid, xmin) changes whenever a row is deleted and inserted again.
        rows = self.raw(
            f"SELECT content_id, ctid::text || '/' || xmin::text FROM holdings WHERE node_id = '{node}'"
        )
        return {str(c): r for c, r in rows}

    def index_names(self) -> set[str]:
        return {
            str(r[0])
            for r in self.raw("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
        }

    def candidates_plan(self, content_id: str) -> str:
        import psycopg

        with psycopg.connect(self.url, connect_timeout=10) as conn:
            conn.execute("ANALYZE")
            args = (content_id, START, PEER, 5) * 2
            plan = conn.execute("EXPLAIN " + POSTGRESQL.sql(_SQL.candidates_for_content), args).fetchall()
        text = "\n".join(str(row[0]) for row in plan)
        self.assertNotIn("Sort", text)  # read in index order: no sort of every holder
        return text


class ListedNodeTests(unittest.SynchronousTestCase):
    """A listed node's JSON, its stored state spliced in, is its record's."""

    def test_json_is_the_record(self) -> None:
        states: list[dict[str, Any]] = [
            {},
            {"cpu": 1 / 3, "upload_bps": 10**15, "upload_capacity_bps": 0.1 + 0.2},
            {"connections": 3, "disk_io_bps": 2.5e8, "memory": 0.0},
        ]
        for state in states:
            for node_id, address in [("n-1.x_Z", "[2001:db8::1]:7000"), ('odd"\\id\u00e9', "h\n:1")]:
                node = ListedNode(node_id, address, _STATE_JSON.encode(state), 1795608895.577071)
                self.assertEqual(json.loads(node.to_json()), node.record().to_dict())
                self.assertEqual(node.record().state, state)

    def test_state_not_an_object_reads_empty(self) -> None:
        for text in ["", "null", "[1]", "nope", '"{}"']:
            node = ListedNode("n", "h:1", text, 1.0)
            self.assertEqual(
                json.loads(node.to_json()), {"node_id": "n", "address": "h:1", "state": {}, "last_seen": 1.0}
            )
            self.assertEqual(node.record().state, {})


class ColumnsRankingTests(unittest.SynchronousTestCase):
    """Weighing and drawing from stored rank columns equals doing it from states."""

    def test_same_weights_and_draw(self) -> None:
        rng = random.Random(3)
        for trial in range(30):
            records = []
            for i in range(rng.randrange(0, 40)):
                state: dict[str, Any] = dict(state_from(rng))
                if rng.random() < 0.3:
                    state["memory"] = rng.choice([0.5, 0.9, 1.0, 2])
                if rng.random() < 0.3:
                    state["disk_io_bps"] = rng.choice([0, 10**8, 2.5e8])
                if rng.random() < 0.3:
                    state["upload_slots"] = rng.choice([0, 4, 8.5])
                # The state as the store keeps it (JSON), and the columns as it stores them.
                state = json.loads(json.dumps(state))
                records.append(NodeRecord(f"n{i}", "10.0.0.1:1", state, START - rng.randrange(0, 200)))
            candidates = [Candidate(r.node_id, r.last_seen, rank_columns(r.state)) for r in records]
            now, horizon = START, 90.0
            self.assertEqual(
                weigh_columns([c.rank for c in candidates], [c.last_seen for c in candidates], now, horizon),
                weigh(records, now, horizon),
            )
            for limit in (None, 1, 5):
                by_state = spread_nodes(records, random.Random(trial), limit, now, horizon)
                by_columns = spread_candidates(candidates, random.Random(trial), limit, now, horizon)
                self.assertEqual([c.node_id for c in by_columns], [r.node_id for r in by_state])
