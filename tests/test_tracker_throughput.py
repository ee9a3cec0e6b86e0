# -*- test-case-name: tests.test_tracker_throughput -*-
"""
Tests for what lets one tracker take thousands of announces a second (issue
4), against a real SQLite file and (with C{MESHSTREAM_TEST_PG}, see
C{tests/_pg.py}) a real PostgreSQL schema:

  - announces submitted together are written in groups, with the same end
    state as one after the other, each answered with its own unknown ids;
  - an announce rewrites only the holdings that changed;
  - node lists are ranked by the database exactly as
    L{meshstream.tracker.ranking.rank_nodes} ranks them (ties, missing
    figures, node ids that differ in case or punctuation, C{limit},
    C{exclude}, expiry);
  - a schema 1 database is migrated, its rank columns computed;
  - the HTTP site's access log options.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream.tap import tracker as tap
from meshstream.tracker.ranking import rank_columns, rank_nodes
from meshstream.tracker.service import ACCESS_LOG_IN_LOG, NO_ACCESS_LOG, build_tracker_service
from meshstream.tracker.store import (
    _SQL,
    POSTGRESQL,
    SQLITE,
    NodeRecord,
    TrackerStore,
    open_store,
)
from tests._pg import SKIP_PG, pg_query, pg_schema_url
from tests.test_tracker_api import START, temp_path


def cid(n: int) -> str:
    return f"{n:064x}"


UNKNOWN = "ee" * 32


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
        self.assertEqual(await store.start(), 2)  # type: ignore[attr-defined]
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
            expected = rank_nodes(
                NodeRecord(node, address, state, seen)
                for node, (address, state, seen, held) in last.items()
                if c in held
            )
            self.assertEqual(await store.nodes_for(c, 0.0), expected)

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

    # -- ranking ------------------------------------------------------------------

    async def test_ranking_matches_rank_nodes(self) -> None:
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
        since = START - 10
        live = [r for r in records if r.last_seen >= since]
        expected = rank_nodes(live)
        self.assertEqual(await store.nodes_for(a, since), expected)
        self.assertEqual(await store.nodes_for(a, since, limit=7), expected[:7])
        exclude = frozenset([expected[0].node_id, expected[3].node_id, "nobody", records[0].node_id])
        self.assertEqual(
            await store.nodes_for(a, since, limit=7, exclude=exclude),
            [r for r in expected if r.node_id not in exclude][:7],
        )
        self.assertEqual(await store.nodes_for(a, since, limit=1000), expected)

    # -- migration -------------------------------------------------------------------

    async def test_migration_from_schema_1(self) -> None:
        """A schema 1 database gets version 2: rank columns filled, indexes replaced."""
        rng = random.Random(9)
        a = cid(1)
        script: list[tuple[str, tuple[Any, ...]]] = [
            (s, ()) for s in _SQL.migrations[1] if isinstance(s, str)
        ]
        script += [
            (_SQL.create_schema_version, ()),
            (_SQL.set_schema_version, (1,)),
            (_SQL.insert_manifest, (a, "{}", START)),
        ]
        records = []
        for i in range(20):
            st = state_from(rng)
            records.append(NodeRecord(f"n{i}", f"10.0.0.{i}:1", st, START))
            script.append(
                (
                    "INSERT INTO nodes (node_id, address, state, last_seen) VALUES (?, ?, ?, ?)",
                    (f"n{i}", f"10.0.0.{i}:1", json.dumps(st, sort_keys=True), START),
                )
            )
            script.append(("INSERT INTO holdings (node_id, content_id) VALUES (?, ?)", (f"n{i}", a)))
        self.run_script(script)
        store = await self.open()
        self.assertEqual(await store.nodes_for(a, 0.0), rank_nodes(records))
        stored = dict(
            (str(row[0]), (row[1], row[2]))
            for row in self.raw("SELECT node_id, rank_free_upload, rank_connections FROM nodes")
        )
        self.assertEqual(stored, {r.node_id: rank_columns(r.state) for r in records})
        # No holdings digest yet: the next announces read the holdings.
        await store.announce("n0", "10.0.0.0:1", {}, START + 1, [])
        await store.announce("n1", "10.0.0.1:1", {}, START + 1, [a])
        self.assertEqual(
            await store.nodes_for(a, 0.0),
            rank_nodes([NodeRecord("n1", "10.0.0.1:1", {}, START + 1), *records[2:]]),
        )
        indexes = self.index_names()
        self.assertIn("holdings_content_node", indexes)
        self.assertNotIn("holdings_content", indexes)
        self.assertNotIn("nodes_last_seen", indexes)

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


class SiteOptionsTests(unittest.TestCase):
    """The access log options, over real HTTP on loopback (SQLite)."""

    async def serve(self, access_log: str) -> str:
        service = build_tracker_service(
            reactor,
            ["tcp:0:interface=127.0.0.1"],
            f"sqlite:{temp_path(self)}",
            Ed25519PrivateKey.generate(),
            access_log=access_log,
        )
        service.startService()
        self.addCleanup(service.stopService)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        (port,) = await service.listening()
        host = port.getHost()
        assert isinstance(host, IPv4Address)
        await service.ready()
        return f"http://127.0.0.1:{host.port}"

    async def get_health(self, base: str) -> list[str]:
        """GET /health; return the texts of the log events it caused."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            response = await self.http.get(base + "/api/v1/health")
            await response.content()
        finally:
            globalLogPublisher.removeObserver(events.append)
        return [formatEvent(e) for e in events]

    async def test_access_log_in_the_log(self) -> None:
        texts = await self.get_health(await self.serve(ACCESS_LOG_IN_LOG))
        self.assertTrue(any("GET /api/v1/health" in t for t in texts), texts)

    async def test_no_access_log(self) -> None:
        texts = await self.get_health(await self.serve(NO_ACCESS_LOG))
        self.assertFalse(any("/api/v1/health" in t for t in texts), texts)

    async def test_access_log_file(self) -> None:
        path = temp_path(self)
        texts = await self.get_health(await self.serve(path))
        self.assertFalse(any("/api/v1/health" in t for t in texts), texts)
        with open(path) as f:
            self.assertIn('"GET /api/v1/health HTTP/1.1" 200', f.read())

    def test_options(self) -> None:
        for args, expected in (
            ([], "-"),
            (["--access-log", "none"], ""),
            (["--access-log", "/x/a.log"], "/x/a.log"),
        ):
            options = tap.Options()
            options.parseOptions(args)
            self.assertEqual(options["access-log"], expected)
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--access-log"])
