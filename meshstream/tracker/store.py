# -*- test-case-name: tests.test_tracker_api -*-
"""
The tracker's database: manifests, nodes and what each node holds.

Every call returns a Deferred; the work runs on L{adbapi.ConnectionPool}'s
threads, one transaction per call, except announces: those that arrive
while an announce transaction runs are written together in the next one
(L{meshstream.tracker.batch.GroupCommit}), each answered after that commit.
Two backends, same schema and migrations:

  - SQLite (C{sqlite:PATH}, the embedded default): WAL journal, one
    connection that writes and two that only read (node lists, manifests:
    WAL lets them read while the other writes);
  - PostgreSQL (C{postgresql://...} or C{postgres://...}, through psycopg 3):
    a few connections; several tracker processes may share one database.

How they differ is kept in two places:

  - every statement is in L{_SQL} and uses C{?} placeholders, written in the
    SQL both engines accept (C{INSERT ... ON CONFLICT ... DO ...},
    C{DELETE ... RETURNING});
  - L{Dialect.sql} rewrites placeholders for a driver's paramstyle (C{qmark}
    for sqlite3, C{format} for psycopg) and column types (C{REAL} is a 4-byte
    float in PostgreSQL, so it becomes C{DOUBLE PRECISION}); the
    L{Dialect} also says how a transaction begins, how the migration is
    serialised between processes (C{pg_advisory_xact_lock}) and what a
    node-list transaction tells PostgreSQL's planner first.  It also spells
    the byte-order collation (C{COLLATE BINARY} is C{COLLATE "C"} there),
    so that node ids sort as Python sorts them whatever the database's
    locale.

L{parse_db_url} / L{open_store} turn a URL into a pool and a dialect.

Write transactions touch C{nodes} before C{holdings}, and a group of
announces touches its nodes in node id order, so that concurrent announces
and leaves from several trackers lock rows in one order.  A purge deletes
expired nodes in the order it finds them; should it deadlock with a group
of announces on PostgreSQL, the group's announces are written again one by
one (see L{GroupCommit}).  Nothing indexes C{nodes.last_seen}: every
announce would rewrite an entry of it, and the purge, once an interval,
scans the nodes instead.

An announce rewrites only what changed: the node's row, and the holdings it
gained or dropped (usually none: a node re-announces what it announced).
Each node row keeps a digest of its holdings set (L{holdings_digest}), so
that holdings rows are read only for nodes whose set changed.
Content ids known to have a manifest are remembered (manifests are never
deleted), so announces and node lists look up only ids not seen before.

Node lists are ranked by the database: each node row carries the two
figures of L{meshstream.tracker.ranking.rank_columns}, and one query orders
a content's live holders by them and returns the best few.

Schema (version 2)::

  schema_version(version INTEGER)
  manifests(content_id TEXT PK, json TEXT, created REAL)
  nodes(node_id TEXT PK, address TEXT, state TEXT (JSON), last_seen REAL,
        rank_free_upload REAL NULL, rank_connections REAL NULL,
        holdings_digest TEXT NULL (NULL: not known, read the holdings))
  holdings(node_id TEXT, content_id TEXT, PK (node_id, content_id),
           index (content_id, node_id))
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sqlite3
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from attrs import frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshstream.tracker.batch import GroupCommit
from meshstream.tracker.ranking import rank_columns

SCHEMA_VERSION = 2

# Connections (and threads) per PostgreSQL pool; SQLite uses one.
POSTGRES_POOL_SIZE = 4

# Stay well below SQLite's host-parameter limit (999 before 3.32).
_IN_CHUNK = 500

# The most announces written in one transaction.  One such transaction
# runs at a time, so announces commit in the order they arrived (a second
# one in flight on PostgreSQL made smaller groups and cost more CPU per
# announce, for no more throughput).
ANNOUNCE_GROUP = 256

# Connections (and threads) reading an SQLite file, beside the one writing:
# a node list spends most of its time in SQLite's C code, which runs
# outside the GIL, so two of them use a second core.
SQLITE_READERS = 2

# Bytes of an SQLite file read through a memory map (SQLite caps it at 2 GiB).
SQLITE_MMAP_SIZE = 1 << 30

# "No limit" for the node-list query (LIMIT NULL is not valid SQLite).
_NO_LIMIT = 2**62

T = TypeVar("T")
Cursor = Any  # a DB-API cursor (adbapi's Transaction proxies one)


class StoreError(Exception):
    """The database cannot be used (bad URL, newer schema, closed store)."""


# Any constant will do: it only has to be the same for every tracker process.
_MIGRATION_LOCK_KEY = 0x6D657368  # "mesh"

_POSTGRES_SCHEMES = ("postgresql", "postgres")


@frozen
class DatabaseURL:
    """
    A parsed C{--db} value.

    C{scheme} is C{"sqlite"} (C{path} is the file) or C{"postgresql"}
    (C{path} is the whole libpq URL, handed to psycopg unchanged).
    """

    scheme: str
    path: str


def _redacted(url: str) -> str:
    """C{url} without its password, for error messages."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _parse_postgres_url(url: str) -> DatabaseURL:
    shown = _redacted(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError as e:
        raise StoreError(f"bad PostgreSQL URL {shown!r}: {e}") from None
    if not parts.path.strip("/"):
        raise StoreError(
            f"PostgreSQL URL {shown!r} names no database (postgresql://USER:PASSWORD@HOST:PORT/DBNAME)"
        )
    try:
        importlib.import_module("psycopg")
    except ImportError as e:
        raise StoreError(
            f"a PostgreSQL --db needs psycopg 3 ({e}); install it with: pip install 'meshstream[postgres]'"
        ) from None
    return DatabaseURL("postgresql", url)


def parse_db_url(url: str) -> DatabaseURL:
    """
    Parse C{sqlite:PATH}, C{postgresql://USER:PASSWORD@HOST:PORT/DBNAME} or
    C{postgres://...}; raise L{StoreError} for anything else, for a
    PostgreSQL URL without a database name and when psycopg is missing.
    """
    scheme, sep, rest = url.partition(":")
    if sep and scheme in _POSTGRES_SCHEMES:
        if not rest.startswith("//"):
            raise StoreError(f"bad PostgreSQL URL {_redacted(url)!r} (expected postgresql://...)")
        return _parse_postgres_url(url)
    if not sep or scheme != "sqlite":
        raise StoreError(
            f"unsupported database URL {_redacted(url)!r} (expected sqlite:PATH or postgresql://...)"
        )
    if not rest or rest == ":memory:":
        raise StoreError("sqlite URL needs a file path: sqlite:PATH")
    return DatabaseURL(scheme, rest)


@frozen
class Dialect:
    """What differs between database drivers, as data."""

    name: str
    paramstyle: str  # "qmark" or "format"
    # sqlite3 (in its default mode) runs DDL outside any transaction and
    # begins one only at the first DML statement; an explicit BEGIN makes
    # migrations and read-then-write interactions atomic.
    explicit_begin: bool = False
    # Column types and collations spelt differently: {written in _SQL: used here}.
    types: tuple[tuple[str, str], ...] = ()
    # Run first in the migration transaction, so that trackers starting at
    # once on one database migrate one after the other.  (SQLite needs none:
    # the first DDL statement takes the file's write lock.)
    migration_lock: str | None = None
    # Run first in a node-list transaction.  PostgreSQL's planner, costing
    # a page read at four times a cached one, joins a content's thousand
    # holders by scanning every node; index lookups take a third of that.
    node_list_hint: str | None = None

    def sql(self, statement: str) -> str:
        """Rewrite a C{?}-placeholder statement for this driver."""
        for written, used in self.types:
            statement = re.sub(rf"\b{written}\b", used, statement)
        if self.paramstyle == "qmark":
            return statement
        if self.paramstyle == "format":
            return statement.replace("%", "%%").replace("?", "%s")
        raise StoreError(f"unsupported paramstyle {self.paramstyle!r}")


SQLITE = Dialect("sqlite", "qmark", explicit_begin=True)
POSTGRESQL = Dialect(
    "postgresql",
    "format",
    # psycopg opens a transaction at the first statement (autocommit off).
    explicit_begin=False,
    types=(("REAL", "DOUBLE PRECISION"), ("BINARY", '"C"')),
    migration_lock=f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})",
    node_list_hint=(
        "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
    ),
)


#: A migration step: a statement, or a function of the transaction's cursor.
MigrationStep = str | Callable[[Cursor, Dialect], None]


def _fill_rank_columns(txn: Cursor, dialect: Dialect) -> None:
    """Compute the rank columns of the nodes announced before they existed."""
    txn.execute(dialect.sql(_SQL.all_node_states))
    rows = [(*rank_columns(_decode_state(str(state))), str(node_id)) for node_id, state in txn.fetchall()]
    rows = [row for row in rows if row[0] is not None or row[1] is not None]
    if rows:
        txn.executemany(dialect.sql(_SQL.set_rank_columns), rows)


class _SQL:
    """Every statement the tracker runs, with C{?} placeholders."""

    create_schema_version = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    get_schema_version = "SELECT MAX(version) FROM schema_version"
    set_schema_version = "INSERT INTO schema_version (version) VALUES (?)"

    migrations: dict[int, tuple[MigrationStep, ...]] = {
        1: (
            "CREATE TABLE manifests ("
            " content_id TEXT PRIMARY KEY, json TEXT NOT NULL, created REAL NOT NULL)",
            "CREATE TABLE nodes ("
            " node_id TEXT PRIMARY KEY, address TEXT NOT NULL,"
            " state TEXT NOT NULL, last_seen REAL NOT NULL)",
            "CREATE INDEX nodes_last_seen ON nodes (last_seen)",
            "CREATE TABLE holdings ("
            " node_id TEXT NOT NULL, content_id TEXT NOT NULL,"
            " PRIMARY KEY (node_id, content_id))",
            "CREATE INDEX holdings_content ON holdings (content_id)",
        ),
        # -- load (issue 4): ranking in the database, a covering index.
        2: (
            "ALTER TABLE nodes ADD COLUMN rank_free_upload REAL",
            "ALTER TABLE nodes ADD COLUMN rank_connections REAL",
            "ALTER TABLE nodes ADD COLUMN holdings_digest TEXT",
            "CREATE INDEX holdings_content_node ON holdings (content_id, node_id)",
            "DROP INDEX holdings_content",
            "DROP INDEX nodes_last_seen",
            _fill_rank_columns,
        ),
    }

    insert_manifest = (
        "INSERT INTO manifests (content_id, json, created) VALUES (?, ?, ?)"
        " ON CONFLICT (content_id) DO NOTHING"
    )
    get_manifest = "SELECT json FROM manifests WHERE content_id = ?"
    has_manifest = "SELECT 1 FROM manifests WHERE content_id = ?"
    known_manifests = "SELECT content_id FROM manifests WHERE content_id IN ({marks})"

    # {rows}: one "(?, ?, ?, ?, ?, ?)" per node, no node twice.
    upsert_nodes = (
        "INSERT INTO nodes (node_id, address, state, last_seen, rank_free_upload, rank_connections)"
        " VALUES {rows}"
        " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
        " state = excluded.state, last_seen = excluded.last_seen,"
        " rank_free_upload = excluded.rank_free_upload, rank_connections = excluded.rank_connections"
    )
    upsert_node_row = "(?, ?, ?, ?, ?, ?)"
    delete_node = "DELETE FROM nodes WHERE node_id = ?"
    delete_holdings = "DELETE FROM holdings WHERE node_id = ?"
    insert_holdings = "INSERT INTO holdings (node_id, content_id) VALUES {rows}"
    # The order of meshstream.tracker.ranking.rank_key.
    nodes_for_content = (
        "SELECT n.node_id, n.address, n.state, n.last_seen"
        " FROM holdings h JOIN nodes n ON n.node_id = h.node_id"
        " WHERE h.content_id = ? AND n.last_seen >= ?"
        " ORDER BY n.rank_free_upload IS NULL, n.rank_free_upload DESC,"
        " n.rank_connections IS NULL, n.rank_connections, n.node_id COLLATE BINARY"
        " LIMIT ?"
    )
    purge_nodes = "DELETE FROM nodes WHERE last_seen < ? RETURNING node_id"
    purge_holdings = "DELETE FROM holdings WHERE node_id IN ({marks})"
    count_nodes = "SELECT COUNT(*) FROM nodes"

    # -- load (issue 4): announces write only what changed.
    holdings_of = "SELECT node_id, content_id FROM holdings WHERE node_id IN ({marks})"
    node_digests = "SELECT node_id, holdings_digest FROM nodes WHERE node_id IN ({marks})"
    set_holdings_digest = "UPDATE nodes SET holdings_digest = ? WHERE node_id = ?"
    delete_holdings_rows = "DELETE FROM holdings WHERE (node_id, content_id) IN ({rows})"
    all_node_states = "SELECT node_id, state FROM nodes"
    set_rank_columns = "UPDATE nodes SET rank_free_upload = ?, rank_connections = ? WHERE node_id = ?"


@frozen
class NodeRecord:
    """A node as the tracker last heard of it."""

    node_id: str
    address: str
    state: dict[str, Any]
    last_seen: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "state": self.state,
            "last_seen": self.last_seen,
        }


# How node states are stored (json.dumps given arguments builds one per call).
_STATE_JSON = json.JSONEncoder(sort_keys=True, allow_nan=False)


def holdings_digest(content_ids: Iterable[str]) -> str:
    """What a node row keeps of the set of contents its holdings rows hold."""
    return hashlib.blake2b(",".join(sorted(content_ids)).encode("ascii"), digest_size=16).hexdigest()


def _decode_state(text: str) -> dict[str, Any]:
    try:
        state = json.loads(text)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


@frozen
class _Announce:
    """One announce waiting for its group's transaction."""

    node_id: str
    address: str
    state_text: str
    last_seen: float
    contents: tuple[str, ...]
    rank: tuple[float | None, float | None]


class TrackerStore:
    """
    The tracker's tables behind Deferred-returning methods.

    Call L{start} once (it runs the migrations); calls made before the
    migrations finish wait for them.  L{close} stops the pool.

    @param pool: runs every transaction that writes (and the reads, without
        C{read_pool}).
    @param read_pool: runs the read-only queries, if given.
    @param announce_writers: announce transactions in flight at once (see
        L{GroupCommit}); with more than one, concurrent announces of one node
        may commit in either order.
    """

    log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        dialect: Dialect,
        announce_writers: int = 1,
        read_pool: adbapi.ConnectionPool | None = None,
    ) -> None:
        self._pool = pool
        self._read_pool = read_pool
        self._dialect = dialect
        self._ready = False
        self._failed: Failure | None = None
        self._closed = False
        self._waiting: list[Deferred[None]] = []
        self._statements: dict[str, str] = {}  # _SQL text -> this dialect's
        # Content ids that have a manifest: only ever grows (nothing deletes
        # a manifest), read and extended from the pool's threads.
        self._manifest_ids: set[str] = set()
        self.announces: GroupCommit[_Announce, list[str]] = GroupCommit(
            self._write_announces, max_items=ANNOUNCE_GROUP, max_running=announce_writers
        )

    # -- plumbing ----------------------------------------------------------

    def _q(self, statement: str) -> str:
        q = self._statements.get(statement)
        if q is None:
            q = self._statements[statement] = self._dialect.sql(statement)
        return q

    def _many(self, txn: Cursor, template: str, row: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """
        Run C{template} with its C{{rows}} standing for as many C{row}s as
        there are C{rows} (in chunks: one statement, one round trip, per
        chunk instead of per row).
        """
        if not rows:
            return
        per = max(1, _IN_CHUNK // len(rows[0]))
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            statement = template.format(rows=", ".join([row] * len(chunk)))
            txn.execute(self._q(statement), tuple(v for r in chunk for v in r))

    def _begin(self, txn: Cursor) -> None:
        if self._dialect.explicit_begin:
            txn.execute("BEGIN")

    def _when_ready(self) -> Deferred[None]:
        if self._closed:
            return fail(StoreError("the store is closed"))
        if self._failed is not None:
            return fail(self._failed)
        if self._ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def _interaction(self, fn: Callable[..., T], *args: object) -> Deferred[T]:
        d = self._when_ready()
        return d.addCallback(lambda _: self._pool.runInteraction(fn, *args))

    def _read(self, fn: Callable[..., T], *args: object) -> Deferred[T]:
        """Like L{_interaction}, on the read pool if there is one (C{fn} must not write)."""
        pool = self._read_pool or self._pool
        d = self._when_ready()
        return d.addCallback(lambda _: pool.runInteraction(fn, *args))

    def _release(self, failure: Failure | None) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[int]:
        """Run the migrations; fire with the schema version."""

        def done(version: int) -> int:
            self._ready = True
            self._release(None)
            return version

        def failed(f: Failure) -> Failure:
            self._failed = f
            self._release(f)
            return f

        d = self._pool.runInteraction(self._migrate)
        d.addCallbacks(done, failed)
        return d

    def _migrate(self, txn: Cursor) -> int:
        self._begin(txn)
        if self._dialect.migration_lock is not None:
            txn.execute(self._dialect.migration_lock)
        txn.execute(self._q(_SQL.create_schema_version))
        txn.execute(self._q(_SQL.get_schema_version))
        row = txn.fetchone()
        version = row[0] if row and row[0] is not None else 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"database schema {version} is newer than this tracker ({SCHEMA_VERSION})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _SQL.migrations[step]:
                if isinstance(statement, str):
                    txn.execute(self._q(statement))
                else:
                    statement(txn, self._dialect)
            txn.execute(self._q(_SQL.set_schema_version), (step,))
        return SCHEMA_VERSION

    def close(self) -> None:
        """Stop the pool (waits for a running query); later calls fail."""
        if self._closed:
            return
        self._closed = True
        if self.announces.groups:
            self.log.info(
                "Wrote {items} announces in {groups} transactions",
                items=self.announces.items,
                groups=self.announces.groups,
            )
        self._release(Failure(StoreError("the store is closed")))
        self._pool.close()
        if self._read_pool is not None:
            self._read_pool.close()

    # -- queries -----------------------------------------------------------

    def schema_version(self) -> Deferred[int]:
        def run(txn: Cursor) -> int:
            txn.execute(self._q(_SQL.get_schema_version))
            row = txn.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return self._read(run)

    def add_manifest(self, content_id: str, text: str, created: float) -> Deferred[tuple[bool, str]]:
        """
        Store a manifest unless one with that id exists (first one wins).

        Fire with C{(created, stored_json)}.
        """

        def run(txn: Cursor) -> tuple[bool, str]:
            self._begin(txn)
            txn.execute(self._q(_SQL.insert_manifest), (content_id, text, created))
            inserted = txn.rowcount == 1
            txn.execute(self._q(_SQL.get_manifest), (content_id,))
            row = txn.fetchone()
            return inserted, str(row[0])

        return self._interaction(run)

    def get_manifest(self, content_id: str) -> Deferred[str | None]:
        def run(txn: Cursor) -> str | None:
            txn.execute(self._q(_SQL.get_manifest), (content_id,))
            row = txn.fetchone()
            return None if row is None else str(row[0])

        return self._read(run)

    def _known(self, txn: Cursor, content_ids: Iterable[str]) -> set[str]:
        """Which of C{content_ids} have a manifest (asking only about ids not known yet)."""
        remembered = self._manifest_ids
        known: set[str] = set()
        ask: list[str] = []
        for c in content_ids:
            if c in remembered:
                known.add(c)
            else:
                ask.append(c)
        if ask:
            found = {str(row[0]) for row in self._select_in(txn, _SQL.known_manifests, ask)}
            known |= found
            remembered |= found
        return known

    def announce(
        self,
        node_id: str,
        address: str,
        state: dict[str, Any],
        last_seen: float,
        contents: Iterable[str],
    ) -> Deferred[list[str]]:
        """
        Replace a node's record and its holdings, atomically.

        Contents the tracker has no manifest for are not stored; fire with
        their ids, in the order given.  Fires once the transaction holding
        this announce (and those queued with it) has committed.
        """
        item = _Announce(
            node_id,
            address,
            _STATE_JSON.encode(state),
            last_seen,
            tuple(dict.fromkeys(contents)),
            rank_columns(state),
        )
        return self.announces.submit(item)

    # -- load (issue 4): announces written in groups -------------------------

    def _write_announces(self, items: Sequence[_Announce]) -> Deferred[list[list[str] | BaseException]]:
        return self._interaction(self._announce_group, items)

    def _announce_group(self, txn: Cursor, items: Sequence[_Announce]) -> list[list[str] | BaseException]:
        """
        Write C{items} in one transaction, as if one after the other.

        The last announce of a node decides its row and holdings, as it
        would written alone after the others.  Rows are written in node id
        order (see the module docstring), and only holdings that change.
        """
        self._begin(txn)
        known = self._known(txn, {c for a in items for c in a.contents})
        last = {a.node_id: a for a in items}
        order = sorted(last)
        self._many(
            txn,
            _SQL.upsert_nodes,
            _SQL.upsert_node_row,
            [(a.node_id, a.address, a.state_text, a.last_seen, *a.rank) for a in (last[n] for n in order)],
        )
        # Holdings are read and written only for nodes whose set changed:
        # each node row keeps a digest of the set its holdings rows hold.
        want = {n: [c for c in last[n].contents if c in known] for n in order}
        digest = {n: holdings_digest(want[n]) for n in order}
        stored = dict(self._select_in(txn, _SQL.node_digests, order))
        stale = [n for n in order if stored.get(n) != digest[n]]
        if stale:
            held: dict[str, set[str]] = {}
            for node_id, content_id in self._select_in(txn, _SQL.holdings_of, stale):
                held.setdefault(str(node_id), set()).add(str(content_id))
            dropped: list[tuple[str, str]] = []
            added: list[tuple[str, str]] = []
            for node_id in stale:
                have = held.get(node_id, set())
                dropped.extend((node_id, c) for c in sorted(have.difference(want[node_id])))
                added.extend((node_id, c) for c in want[node_id] if c not in have)
            self._many(txn, _SQL.delete_holdings_rows, "(?, ?)", dropped)
            self._many(txn, _SQL.insert_holdings, "(?, ?)", added)
            txn.executemany(self._q(_SQL.set_holdings_digest), [(digest[n], n) for n in stale])
        return [[c for c in a.contents if c not in known] for a in items]

    def _select_in(self, txn: Cursor, template: str, values: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of C{template} with its C{{marks}} standing for C{values} (in chunks)."""
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(values), _IN_CHUNK):
            chunk = values[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            txn.execute(self._q(template.format(marks=marks)), tuple(chunk))
            rows.extend(txn.fetchall())
        return rows

    def leave(self, node_id: str) -> Deferred[bool]:
        """Forget a node and its holdings; fire with whether it was known."""

        def run(txn: Cursor) -> bool:
            self._begin(txn)
            txn.execute(self._q(_SQL.delete_node), (node_id,))
            known = bool(txn.rowcount)
            txn.execute(self._q(_SQL.delete_holdings), (node_id,))
            return known

        return self._interaction(run)

    def nodes_for(
        self,
        content_id: str,
        seen_since: float,
        limit: int | None = None,
        exclude: Collection[str] = frozenset(),
    ) -> Deferred[list[NodeRecord] | None]:
        """
        The nodes holding C{content_id} heard from at or after C{seen_since},
        best first (L{meshstream.tracker.ranking}'s order), leaving out the
        ids in C{exclude}, at most C{limit} of them (all when None); None
        if the content is unknown.
        """
        fetch = _NO_LIMIT if limit is None else limit + len(exclude)

        def run(txn: Cursor) -> list[NodeRecord] | None:
            if not self._known(txn, (content_id,)):
                return None
            if self._dialect.node_list_hint is not None:
                txn.execute(self._dialect.node_list_hint)
            txn.execute(self._q(_SQL.nodes_for_content), (content_id, seen_since, fetch))
            records = [
                NodeRecord(str(node_id), str(address), _decode_state(state), float(last_seen))
                for node_id, address, state, last_seen in txn.fetchall()
                if node_id not in exclude
            ]
            return records if limit is None else records[:limit]

        return self._read(run)

    def purge(self, seen_before: float) -> Deferred[int]:
        """Remove the nodes last heard from before C{seen_before}; fire with how many."""

        def run(txn: Cursor) -> int:
            self._begin(txn)
            txn.execute(self._q(_SQL.purge_nodes), (seen_before,))
            gone = [str(row[0]) for row in txn.fetchall()]
            for i in range(0, len(gone), _IN_CHUNK):
                chunk = gone[i : i + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                txn.execute(self._q(_SQL.purge_holdings.format(marks=marks)), tuple(chunk))
            return len(gone)

        return self._interaction(run)

    def count_nodes(self) -> Deferred[int]:
        def run(txn: Cursor) -> int:
            txn.execute(self._q(_SQL.count_nodes))
            return int(txn.fetchone()[0])

        return self._read(run)


def _sqlite_open(conn: sqlite3.Connection) -> None:
    """
    Per-connection setup: WAL journal, wait a little on a busy file, and
    read the file through a memory map (a node list visits a thousand rows
    spread over the file: through a map, without copying each page into
    SQLite's own small cache, it takes about half the time).
    """
    cursor = conn.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=5000")  # first: the other connection may be migrating
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_SIZE}")
    finally:
        cursor.close()


def open_store(url: str, reactor: IReactorCore) -> TrackerStore:
    """
    Build a (not yet started) store for a C{--db} URL.

    Raises L{StoreError} for URLs it cannot serve.  Nothing connects yet:
    a PostgreSQL server that cannot be reached fails L{TrackerStore.start}.
    """
    parsed = parse_db_url(url)
    if parsed.scheme == "postgresql":
        pg_pool = adbapi.ConnectionPool(
            "psycopg",
            parsed.path,
            cp_min=1,
            cp_max=POSTGRES_POOL_SIZE,
            cp_reconnect=True,  # a connection the server dropped is reopened
            cp_reactor=reactor,
            cp_noisy=False,
        )
        return TrackerStore(pg_pool, POSTGRESQL)
    pool, read_pool = (
        adbapi.ConnectionPool(
            "sqlite3",
            parsed.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=size,
            cp_openfun=_sqlite_open,
            cp_reactor=reactor,
            cp_noisy=False,
        )
        for size in (1, SQLITE_READERS)
    )
    return TrackerStore(pool, SQLITE, read_pool=read_pool)
