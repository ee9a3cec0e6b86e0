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
    a few connections, and two that only read, in autocommit (one round
    trip per node list); several tracker processes may share one database.

How they differ is kept in two places:

  - every statement is in L{_SQL} and uses C{?} placeholders, written in the
    SQL both engines accept (C{INSERT ... ON CONFLICT ... DO ...},
    C{DELETE ... RETURNING});
  - L{Dialect.sql} rewrites placeholders for a driver's paramstyle (C{qmark}
    for sqlite3, C{format} for psycopg) and column types (C{REAL} is a 4-byte
    float in PostgreSQL, so it becomes C{DOUBLE PRECISION}); the
    L{Dialect} also says how a transaction begins, how the migration is
    serialised between processes (C{pg_advisory_xact_lock}) and whether
    node reads fence their joins for PostgreSQL's planner (C{LATERAL ...
    OFFSET 0}: index lookups, see L{Dialect.lateral}).  It also spells
    the byte-order collation (C{COLLATE BINARY} is C{COLLATE "C"} there),
    so that node ids sort as Python sorts them whatever the database's
    locale, and how many rows travel: on SQLite, a read of many rows
    (node lists, a group's owners) returns them as one JSON row
    (L{Dialect.rows_as_json}: sqlite3 takes the GIL back at every row, which
    behind a busy reactor thread costs up to a switch interval each); on
    PostgreSQL, a statement about many rows takes one array per column
    (C{unnest}, C{= ANY}; L{Dialect.arrays}), so that its text, converted
    and prepared once by psycopg, does not vary with the number of rows.

L{parse_db_url} / L{open_store} turn a URL into a pool and a dialect.

Write transactions touch C{nodes} before C{holdings}, and a group of
announces touches its nodes in node id order, so that concurrent announces
and leaves from several trackers lock rows in one order.  A purge deletes
expired nodes in the order it finds them; should it deadlock with a group
of announces on PostgreSQL, the group's announces are written again one by
one (see L{GroupCommit}).  Only the servers' C{last_seen} is indexed (a
partial index, for C{/servers}): an index of every node's would cost every
announce an entry rewritten, and with one SQLite answered node lists by
walking all live nodes; the purge, once an interval, scans the nodes.

A group of announces reads its nodes' owners in one query (an announce of
a node another user owns fails alone, with L{NodeOwned}) and, for the
answers, the reservations of its users in one more (L{TrackerStore.announce_answer}).

An announce rewrites only what changed: the node's row, and the holdings it
gained or dropped (usually none: a node re-announces what it announced).
Each node row keeps a digest of its holdings set (L{holdings_digest}), so
that holdings rows are read only for nodes whose set changed.
Content ids known to have a manifest are remembered (manifests are never
deleted), so announces and node lists look up only ids not seen before.

Node lists are pre-selected by the database: each node row carries the two
figures of L{meshstream.tracker.ranking.rank_columns} (free upload, load
factor), and one query returns the best few of a content's live holders of
each sort (L{meshstream.tracker.ranking.candidate_count}), with those
figures (L{Candidate}); the tracker weighs and spreads only those, and
decodes only the chosen ones' states.  That query reads O(candidates) rows,
not every holder: each holdings row carries its node's kind and
pre-selection key (L{meshstream.tracker.ranking.preselect_key}) under the
C{holdings_rank} index, walked best first for each sort up to its limit.
The node row keeps the key its holdings carry and when it was written
(C{held_*}); an announce rewrites a node's keys (one index entry per
content it holds) only for a new kind or when
L{meshstream.tracker.ranking.key_is_current} says the kept one is off and
old, and then within a budget of rewrites a second
(L{meshstream.tracker.ranking.RekeyBudget}; L{TrackerStore.rekeyed} counts
them), so which holders are candidates may lag a state by
L{meshstream.tracker.ranking.KEY_REFRESH} or, with many changing nodes,
longer; their weights never do.  A node row read for a group gives its
kept key at SQLite's 15 digits (no exact reals needed: it is only
compared); rows whose key stays are written with NULL there, which keeps
the stored one.

Schema (version 7)::

  schema_version(version INTEGER)
  manifests(content_id TEXT PK, json TEXT, created REAL)
  nodes(node_id TEXT PK, address TEXT, state TEXT (JSON), last_seen REAL,
        owner TEXT (the user whose box it is),
        kind TEXT ('peer', or 'server' for a content server),
        rank_free REAL NULL (NULL: free upload unknown), rank_load REAL,
        holdings_digest TEXT NULL (NULL: not known, read the holdings),
        held_known INTEGER, held_rank REAL, held_at REAL (the key its
        holdings rows carry, since when; NULL: rewrite them))
  holdings(node_id TEXT, content_id TEXT, PK (node_id, content_id),
           kind TEXT, rank_known INTEGER, rank REAL (the node's, as kept),
           index holdings_rank (content_id, kind, rank_known, rank DESC, node_id))
  (indexes on nodes: PK, last_seen WHERE kind = 'server')
  users(name TEXT PK, password TEXT (scrypt hash), role TEXT,
        disabled INTEGER, quota_bytes BIGINT NULL, created REAL)
  tokens(digest TEXT PK (SHA-256 of the bearer token), name TEXT, expires REAL)
  usage(name TEXT, period TEXT (YYYY-MM, UTC), content_id TEXT,
        from_peers, from_servers, from_origin, uploaded BIGINT,
        PK (name, period, content_id))
  usage_reports(node_id TEXT, name TEXT, seq BIGINT (the last one counted),
                received REAL, PK (node_id, name))
  reservations(id TEXT PK, name TEXT, content_id TEXT, starts BIGINT,
               ends BIGINT (unix seconds), created REAL)
  contents(content_id TEXT PK, title TEXT NULL, name TEXT, mime_type TEXT NULL,
           size BIGINT, duration REAL NULL, bitrate BIGINT NULL, created REAL,
           search TEXT (folded title and name, see L{catalog.search_key}))

C{contents} is the catalogue (L{meshstream.tracker.catalog}): one row per
manifest, written in the manifest's transaction; L{TrackerStore.start} also
indexes any manifest without a row (those registered before version 4, or by
an older tracker process sharing the database).

Migration 6 computes the rank columns of the nodes already stored (from
their stored states) and leaves their holdings digests NULL: each node's
first announce afterwards reads its holdings once and stores the digest.
Migration 7 gives every node and holdings row the key of its rank columns.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from attrs import frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshstream.tracker import catalog
from meshstream.tracker.batch import GroupCommit
from meshstream.tracker.billing import Reservation, ReservationRequest, Standing, UsageEntry, UsageRow
from meshstream.tracker.catalog import ContentEntry, ContentInfo
from meshstream.tracker.ranking import (
    RekeyBudget,
    key_change,
    key_is_current,
    preselect_key,
    rank_columns,
)

SCHEMA_VERSION = 7

#: Node kinds: an agent (peer) or a content server (claims 37, 38).
PEER = "peer"
SERVER = "server"
NODE_KINDS = (PEER, SERVER)

# Connections (and threads) per PostgreSQL pool; SQLite uses one.
POSTGRES_POOL_SIZE = 4
# And reading ones (autocommit: node lists, manifests), as for SQLite.
POSTGRES_READERS = 2

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


T = TypeVar("T")
Cursor = Any  # a DB-API cursor (adbapi's Transaction proxies one)


class StoreError(Exception):
    """The database cannot be used (bad URL, newer schema, closed store)."""


class NodeOwned(Exception):
    """An announce or leave for a node id another user's box holds."""

    def __init__(self, node_id: str, owner: str) -> None:
        super().__init__(f"node {node_id} belongs to another user")
        self.node_id = node_id
        self.owner = owner


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
    # Whether node reads use the _SQL statements written with LATERAL
    # subqueries fenced by OFFSET 0.  PostgreSQL's planner, costing a page
    # read at four times a cached one, would join a content's thousand
    # holders by scanning every node; index lookups take a third of that,
    # and the fence makes them the only plan (no planner setting, so no
    # statement more: see open_store's read pool).
    lateral: bool = False
    # Whether a statement returning many rows should return them as one
    # JSON text (L{json_rows}).  Python's sqlite3 releases the GIL around
    # every row it steps to and must take it back from the reactor's
    # thread each time, which, while the reactor is busy, waits out the
    # interpreter's switch interval: a 300-row node list read on a pool
    # thread took 400 ms (median) beside a busy thread, 8 ms as one row.
    rows_as_json: bool = False
    # Whether statements about many rows take one array per column
    # (C{unnest}, C{= ANY(?)}) rather than one placeholder per value: one
    # statement text whatever the count, which psycopg converts and
    # prepares once (it caches neither for texts of varying length).
    arrays: bool = False

    def sql(self, statement: str) -> str:
        """Rewrite a C{?}-placeholder statement for this driver."""
        for written, used in self.types:
            statement = re.sub(rf"\b{written}\b", used, statement)
        if self.paramstyle == "qmark":
            return statement
        if self.paramstyle == "format":
            return statement.replace("%", "%%").replace("?", "%s")
        raise StoreError(f"unsupported paramstyle {self.paramstyle!r}")


SQLITE = Dialect("sqlite", "qmark", explicit_begin=True, rows_as_json=True)
POSTGRESQL = Dialect(
    "postgresql",
    "format",
    # psycopg opens a transaction at the first statement (autocommit off).
    explicit_begin=False,
    types=(("REAL", "DOUBLE PRECISION"), ("BINARY", '"C"')),
    migration_lock=f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})",
    arrays=True,
    lateral=True,
)


#: A migration step: a statement, or a function of the transaction's cursor.
MigrationStep = str | Callable[[Cursor, Dialect], None]


@functools.lru_cache(maxsize=64)
def json_rows(statement: str, columns: tuple[str, ...], reals: frozenset[str]) -> str:
    """
    SQLite: C{statement} rewritten to return its rows as one row, one JSON
    array of arrays (C{columns}, the names of C{statement}'s result columns,
    in order; no particular row order).  A C{REAL} column, named in
    C{reals}, is written as a JSON number of 17 significant digits
    (C{%!.17g}), which reads back as the same float: SQLite's own rendering
    keeps 15.
    """
    items = ", ".join(
        f"CASE WHEN r.{c} IS NULL THEN NULL ELSE json(printf('%!.17g', r.{c})) END"
        if c in reals
        else f"r.{c}"
        for c in columns
    )
    return f"SELECT json_group_array(json_array({items})) FROM ({statement}) r"


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
        2: (
            "CREATE TABLE users ("
            " name TEXT PRIMARY KEY, password TEXT NOT NULL, role TEXT NOT NULL,"
            " disabled INTEGER NOT NULL DEFAULT 0, quota_bytes BIGINT, created REAL NOT NULL)",
            "CREATE TABLE tokens ( digest TEXT PRIMARY KEY, name TEXT NOT NULL, expires REAL NOT NULL)",
            "CREATE INDEX tokens_name ON tokens (name)",
            "CREATE INDEX tokens_expires ON tokens (expires)",
            "ALTER TABLE nodes ADD COLUMN owner TEXT",
        ),
        # Billing (usage records) and reservations.
        3: (
            "CREATE TABLE usage ("
            " name TEXT NOT NULL, period TEXT NOT NULL, content_id TEXT NOT NULL,"
            " from_peers BIGINT NOT NULL, from_servers BIGINT NOT NULL,"
            " from_origin BIGINT NOT NULL, uploaded BIGINT NOT NULL,"
            " PRIMARY KEY (name, period, content_id))",
            "CREATE INDEX usage_period ON usage (period)",
            "CREATE TABLE usage_reports ("
            " node_id TEXT NOT NULL, name TEXT NOT NULL, seq BIGINT NOT NULL, received REAL NOT NULL,"
            " PRIMARY KEY (node_id, name))",
            "CREATE TABLE reservations ("
            " id TEXT PRIMARY KEY, name TEXT NOT NULL, content_id TEXT NOT NULL,"
            " starts BIGINT NOT NULL, ends BIGINT NOT NULL, created REAL NOT NULL)",
            "CREATE INDEX reservations_name ON reservations (name, ends)",
        ),
        # The content catalogue (claim 35).
        4: (
            "CREATE TABLE contents ("
            " content_id TEXT PRIMARY KEY, title TEXT, name TEXT NOT NULL, mime_type TEXT,"
            " size BIGINT NOT NULL, duration REAL, bitrate BIGINT, created REAL NOT NULL,"
            " search TEXT NOT NULL)",
            "CREATE INDEX contents_created ON contents (created, content_id)",
        ),
        # Content servers (claims 37, 38): nodes announced with kind 'server'.
        5: (
            "ALTER TABLE nodes ADD COLUMN kind TEXT NOT NULL DEFAULT 'peer'",
            "CREATE INDEX nodes_kind_seen ON nodes (kind, last_seen)",
        ),
        # Tracker under load (issue 4): node lists pre-selected by stored
        # weights, announces that rewrite only changed holdings, a holdings
        # index that covers the node-list join, no index on every node's
        # last_seen (every announce would rewrite an entry of it, and
        # SQLite's planner would scan all nodes by it for a node list; the
        # purge scans instead): only the servers' (few, and /servers lists
        # them by it).
        6: (
            "ALTER TABLE nodes ADD COLUMN rank_free REAL",
            "ALTER TABLE nodes ADD COLUMN rank_load REAL NOT NULL DEFAULT 1",
            "ALTER TABLE nodes ADD COLUMN holdings_digest TEXT",
            "CREATE INDEX holdings_content_node ON holdings (content_id, node_id)",
            "DROP INDEX holdings_content",
            "DROP INDEX nodes_last_seen",
            "DROP INDEX nodes_kind_seen",
            "CREATE INDEX nodes_servers_seen ON nodes (last_seen) WHERE kind = 'server'",
            _fill_rank_columns,
        ),
        # Node lists read O(candidates) rows (issue 4): each holdings row
        # carries its node's kind and pre-selection key, under an index
        # that a node list reads best first; the node row keeps the key its
        # holdings carry and since when (see TrackerStore._announce_group).
        7: (
            "ALTER TABLE nodes ADD COLUMN held_known INTEGER",
            "ALTER TABLE nodes ADD COLUMN held_rank REAL",
            "ALTER TABLE nodes ADD COLUMN held_at REAL",
            "ALTER TABLE holdings ADD COLUMN kind TEXT NOT NULL DEFAULT 'peer'",
            "ALTER TABLE holdings ADD COLUMN rank_known INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE holdings ADD COLUMN rank REAL NOT NULL DEFAULT 0",
            "UPDATE nodes SET held_known = CASE WHEN rank_free IS NULL THEN 0 ELSE 1 END,"
            " held_rank = COALESCE(rank_free * rank_load, rank_load), held_at = last_seen",
            "UPDATE holdings SET kind = n.kind, rank_known = n.held_known, rank = n.held_rank"
            " FROM nodes n WHERE n.node_id = holdings.node_id",
            "DROP INDEX holdings_content_node",
            "CREATE INDEX holdings_rank ON holdings (content_id, kind, rank_known, rank DESC, node_id COLLATE BINARY)",
        ),
    }

    insert_manifest = (
        "INSERT INTO manifests (content_id, json, created) VALUES (?, ?, ?)"
        " ON CONFLICT (content_id) DO NOTHING"
    )
    get_manifest = "SELECT json FROM manifests WHERE content_id = ?"
    has_manifest = "SELECT 1 FROM manifests WHERE content_id = ?"
    known_manifests = "SELECT content_id FROM manifests WHERE content_id IN ({marks})"

    # {rows}: one upsert_node_row per node, no node twice.  The first owner
    # stays (an announce by another user is refused before this).
    _upsert_nodes = (
        "INSERT INTO nodes (node_id, address, state, last_seen, owner, kind, rank_free, rank_load,"
        " held_known, held_rank, held_at) {rows}"
        " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
        " state = excluded.state, last_seen = excluded.last_seen,"
        " owner = COALESCE(nodes.owner, excluded.owner), kind = excluded.kind,"
        " rank_free = excluded.rank_free, rank_load = excluded.rank_load,"
        " held_known = COALESCE(excluded.held_known, nodes.held_known),"
        " held_rank = COALESCE(excluded.held_rank, nodes.held_rank),"
        " held_at = COALESCE(excluded.held_at, nodes.held_at)"
    )
    upsert_nodes = _upsert_nodes.replace("{rows}", "VALUES {rows}")
    upsert_node_row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    delete_node = "DELETE FROM nodes WHERE node_id = ?"
    delete_holdings = "DELETE FROM holdings WHERE node_id = ?"
    insert_holdings = "INSERT INTO holdings (node_id, content_id, kind, rank_known, rank) VALUES {rows}"
    insert_holdings_row = "(?, ?, ?, ?, ?)"
    # A node's kind and pre-selection key, into all its holdings rows.
    update_held_keys = (
        "UPDATE holdings SET kind = u.kind, rank_known = u.known, rank = u.rank"
        " FROM (SELECT column1 AS node_id, column2 AS kind, column3 AS known, column4 AS rank"
        " FROM (VALUES {rows})) AS u WHERE holdings.node_id = u.node_id"
    )
    update_held_keys_row = "(?, ?, ?, ?)"
    update_held_keys_arrays = (
        "UPDATE holdings SET kind = u.kind, rank_known = u.known, rank = u.rank"
        " FROM unnest(?::TEXT[], ?::TEXT[], ?::INTEGER[], ?::REAL[]) AS u (node_id, kind, known, rank)"
        " WHERE holdings.node_id = u.node_id"
    )
    # The same, for PostgreSQL (Dialect.arrays): one array per column, so
    # one statement text whatever the number of rows.
    upsert_nodes_arrays = _upsert_nodes.replace(
        "{rows}",
        "SELECT * FROM unnest(?::TEXT[], ?::TEXT[], ?::TEXT[], ?::REAL[], ?::TEXT[], ?::TEXT[], ?::REAL[], ?::REAL[],"
        " ?::INTEGER[], ?::REAL[], ?::REAL[])",
    )
    # On PostgreSQL the group's nodes are written with the rewrite of the
    # rekeyed ones' holdings (update_held_keys_arrays) as a data-modifying
    # WITH: one statement, not two, so one round trip fewer per group, after
    # which the pool thread would wait for the GIL again.
    upsert_nodes_rekey_arrays = f"WITH rekeyed AS ({update_held_keys_arrays}) {upsert_nodes_arrays}"
    insert_holdings_arrays = (
        "INSERT INTO holdings (node_id, content_id, kind, rank_known, rank)"
        " SELECT * FROM unnest(?::TEXT[], ?::TEXT[], ?::TEXT[], ?::INTEGER[], ?::REAL[])"
    )
    # (CROSS JOIN: SQLite then starts from the content's holdings, never
    # from a scan of the nodes; PostgreSQL has its own, _lateral, below.)
    nodes_for_content = (
        "SELECT n.node_id, n.address, n.state, n.last_seen FROM holdings h CROSS JOIN nodes n"
        " WHERE h.content_id = ? AND n.node_id = h.node_id AND n.last_seen >= ? AND n.kind = ?"
    )
    # The candidates of a node list (see meshstream.tracker.ranking): of
    # the live holders of a kind, those with the largest pre-selection keys
    # among those whose free upload is known, and among the others: two
    # walks of the holdings_rank index, best first, each stopping at its
    # LIMIT, so a node list reads O(candidates) rows, not every holder.
    _best_holders = (
        "SELECT n.node_id, n.last_seen, n.rank_free, n.rank_load"
        " FROM holdings h CROSS JOIN nodes n"
        " WHERE h.content_id = ? AND n.node_id = h.node_id AND n.last_seen >= ? AND h.kind = ?"
        " AND n.kind = h.kind AND h.rank_known = {known}"
        " ORDER BY h.rank DESC, h.node_id COLLATE BINARY LIMIT ?"
    )
    candidates_for_content = (
        f"SELECT * FROM ({_best_holders.format(known=1)}) k"
        f" UNION ALL SELECT * FROM ({_best_holders.format(known=0)}) u"
    )
    # The rows of the nodes a node list names (of its candidates, the
    # chosen ones), if they are still there.
    listed_nodes = "SELECT node_id, address, state, last_seen FROM nodes WHERE node_id IN ({marks})"
    # nodes_for_content for PostgreSQL (Dialect.lateral), with the same
    # placeholders in the same order.
    nodes_for_content_lateral = (
        "SELECT m.node_id, m.address, m.state, m.last_seen"
        " FROM (SELECT node_id FROM holdings WHERE content_id = ?) h CROSS JOIN LATERAL"
        " (SELECT n.node_id, n.address, n.state, n.last_seen FROM nodes n"
        " WHERE n.node_id = h.node_id AND n.last_seen >= ? AND n.kind = ? OFFSET 0) m"
    )
    purge_nodes = "DELETE FROM nodes WHERE last_seen < ? RETURNING node_id"
    purge_holdings = "DELETE FROM holdings WHERE node_id IN ({marks})"
    count_nodes = "SELECT COUNT(*) FROM nodes"
    node_owner = "SELECT owner FROM nodes WHERE node_id = ?"

    insert_user = (
        "INSERT INTO users (name, password, role, disabled, quota_bytes, created)"
        " VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (name) DO NOTHING"
    )
    get_user = "SELECT name, password, role, disabled, quota_bytes, created FROM users WHERE name = ?"
    list_users = "SELECT name, password, role, disabled, quota_bytes, created FROM users ORDER BY name"
    update_user = "UPDATE users SET {column} = ? WHERE name = ?"
    insert_token = "INSERT INTO tokens (digest, name, expires) VALUES (?, ?, ?)"
    token_principal = (
        "SELECT u.name, u.role, t.expires FROM tokens t JOIN users u ON u.name = t.name"
        " WHERE t.digest = ? AND u.disabled = 0"
    )
    delete_token = "DELETE FROM tokens WHERE digest = ?"
    delete_user_tokens = "DELETE FROM tokens WHERE name = ?"
    purge_tokens = "DELETE FROM tokens WHERE expires <= ?"

    # Operations: the health check and the metrics' gauges.
    ping = "SELECT 1"
    count_live_nodes = "SELECT COUNT(*) FROM nodes WHERE last_seen >= ?"
    count_manifests = "SELECT COUNT(*) FROM manifests"

    # -- billing and reservations
    # Counts a report unless its seq is not above the last one counted.
    claim_report = (
        "INSERT INTO usage_reports (node_id, name, seq, received) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (node_id, name) DO UPDATE SET seq = excluded.seq, received = excluded.received"
        " WHERE usage_reports.seq < excluded.seq"
    )
    add_usage = (
        "INSERT INTO usage (name, period, content_id, from_peers, from_servers, from_origin, uploaded)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name, period, content_id) DO UPDATE SET"
        " from_peers = usage.from_peers + excluded.from_peers,"
        " from_servers = usage.from_servers + excluded.from_servers,"
        " from_origin = usage.from_origin + excluded.from_origin,"
        " uploaded = usage.uploaded + excluded.uploaded"
    )
    # One row (if the user exists): the quota and the bytes downloaded in a period.
    standing = (
        "SELECT quota_bytes, (SELECT COALESCE(SUM(g.from_peers + g.from_servers + g.from_origin), 0)"
        " FROM usage g WHERE g.name = ? AND g.period = ?) FROM users WHERE name = ?"
    )
    _usage_columns = "name, period, content_id, from_peers, from_servers, from_origin, uploaded"
    usage_of_user = f"SELECT {_usage_columns} FROM usage WHERE period = ? AND name = ? ORDER BY content_id"
    usage_of_period = f"SELECT {_usage_columns} FROM usage WHERE period = ? ORDER BY name, content_id"

    _reservation_columns = "id, name, content_id, starts, ends, created"
    insert_reservation = f"INSERT INTO reservations ({_reservation_columns}) VALUES (?, ?, ?, ?, ?, ?)"
    count_reservations = "SELECT COUNT(*) FROM reservations WHERE name = ? AND ends > ?"
    delete_ended_reservations = "DELETE FROM reservations WHERE name = ? AND ends <= ?"
    active_reservations = (
        f"SELECT {_reservation_columns} FROM reservations WHERE name = ? AND ends > ?"
        " ORDER BY starts, id LIMIT ?"
    )
    # {marks}: the users of a group of announces (see TrackerStore._announce_group).
    users_reservations = (
        f"SELECT {_reservation_columns} FROM reservations WHERE ends > ? AND name IN ({{marks}})"
        " ORDER BY name, starts, id"
    )
    delete_reservation = "DELETE FROM reservations WHERE id = ?"
    delete_own_reservation = "DELETE FROM reservations WHERE id = ? AND name = ?"

    # -- the content catalogue ------------------------------------------------
    insert_content = (
        "INSERT INTO contents"
        " (content_id, title, name, mime_type, size, duration, bitrate, created, search)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (content_id) DO NOTHING"
    )
    unindexed_manifests = (
        "SELECT m.content_id, m.created FROM manifests m"
        " WHERE NOT EXISTS (SELECT 1 FROM contents c WHERE c.content_id = m.content_id)"
    )
    # {where} is built from the fixed clauses below.  The live holders are
    # counted for the page's rows only.
    contents_page = (
        "SELECT p.content_id, p.title, p.name, p.mime_type, p.size, p.duration, p.bitrate, p.created,"
        " (SELECT COUNT(*) FROM holdings h JOIN nodes n ON n.node_id = h.node_id"
        " WHERE h.content_id = p.content_id AND n.last_seen >= ?)"
        " FROM (SELECT content_id, title, name, mime_type, size, duration, bitrate, created"
        " FROM contents{where} ORDER BY created DESC, content_id DESC LIMIT ? OFFSET ?) p"
        " ORDER BY p.created DESC, p.content_id DESC"
    )
    count_contents = "SELECT COUNT(*) FROM contents{where}"
    content_matches = f"search LIKE ? ESCAPE '{catalog.LIKE_ESCAPE}'"
    content_mime_prefix = f"mime_type LIKE ? ESCAPE '{catalog.LIKE_ESCAPE}'"
    content_by_id = "content_id = ?"

    # -- content servers
    # (kind spelt out: the nodes_servers_seen index is for that kind only.)
    live_servers = (
        "SELECT n.node_id, n.address, n.state, n.last_seen, COUNT(h.content_id) AS holdings"
        " FROM nodes n LEFT JOIN holdings h ON h.node_id = n.node_id"
        " WHERE n.kind = 'server' AND n.last_seen >= ?"
        " GROUP BY n.node_id, n.address, n.state, n.last_seen"
    )

    # -- load (issue 4): announces write only what changed.
    holdings_of = "SELECT node_id, content_id FROM holdings WHERE node_id IN ({marks})"
    node_rows = (
        "SELECT node_id, owner, holdings_digest, kind, held_known, held_rank, held_at"
        " FROM nodes WHERE node_id IN ({marks})"
    )
    set_holdings_digest = "UPDATE nodes SET holdings_digest = ? WHERE node_id = ?"
    delete_holdings_rows = "DELETE FROM holdings WHERE (node_id, content_id) IN ({rows})"
    delete_holdings_arrays = (
        "DELETE FROM holdings h USING unnest(?::TEXT[], ?::TEXT[]) AS d (node_id, content_id)"
        " WHERE h.node_id = d.node_id AND h.content_id = d.content_id"
    )
    all_node_states = "SELECT node_id, state FROM nodes"
    set_rank_columns = "UPDATE nodes SET rank_free = ?, rank_load = ? WHERE node_id = ?"


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


@frozen
class UserRecord:
    """A row of C{users}."""

    name: str
    password: str  # the scrypt hash (see L{meshstream.tracker.auth})
    role: str
    disabled: bool
    quota_bytes: int | None
    created: float

    def to_dict(self) -> dict[str, Any]:
        """The public view (no password hash)."""
        return {
            "name": self.name,
            "role": self.role,
            "disabled": self.disabled,
            "quota_bytes": self.quota_bytes,
            "created": self.created,
        }


def _user(row: Sequence[Any]) -> UserRecord:
    name, password, role, disabled, quota, created = row
    return UserRecord(
        str(name),
        str(password),
        str(role),
        bool(disabled),
        None if quota is None else int(quota),
        float(created),
    )


#: The user columns L{TrackerStore.update_user} may set.
_USER_COLUMNS = frozenset({"password", "role", "disabled", "quota_bytes"})


class ReservationLimit(Exception):
    """A user already holds as many unfinished reservations as allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} unfinished reservations per user")
        self.limit = limit


@frozen
class UsageResult:
    """What the store did with a usage report."""

    #: False when the report's seq was not above the last one counted (nothing added).
    accepted: bool
    #: Content ids with no registered manifest (not counted).
    unknown: list[str]
    #: The user's standing after the report.
    standing: Standing


def _reservation(row: Sequence[Any]) -> Reservation:
    rid, name, content_id, starts, ends, created = row
    return Reservation(str(rid), str(name), str(content_id), int(starts), int(ends), float(created))


def _usage_row(row: Sequence[Any]) -> UsageRow:
    name, period, content_id, *counters = row
    return UsageRow(str(name), str(period), str(content_id), *(int(c) for c in counters))


class Candidate(NamedTuple):
    """
    A node a node list may name: what the ranking weighs it by, its
    L{meshstream.tracker.ranking.rank_columns} as stored and when it last
    announced.  (A named tuple: a node list makes a few hundred, at 0.26 µs
    each against attrs' 0.44.)
    """

    node_id: str
    last_seen: float
    rank: tuple[float | None, float]


class ListedNode(NamedTuple):
    """A node a node list names: its row, with the state as stored (JSON text, not decoded)."""

    node_id: str
    address: str
    state_text: str
    last_seen: float

    def record(self) -> NodeRecord:
        return NodeRecord(self.node_id, self.address, _decode_state(self.state_text), self.last_seen)

    def to_json(self) -> str:
        """
        C{self.record().to_dict()} as JSON text, at a sixth of the cost:
        the stored state is spliced in as it is, not decoded and encoded
        again.  The store writes a state only as L{_STATE_JSON} encodes a
        dict of numbers, so the text is a JSON object; one that does not
        even look like one (a row written by something else) reads as
        C{{}}, as in L{record}.
        """
        state = self.state_text
        if not (state.startswith("{") and state.endswith("}")):
            state = "{}"
        return (
            f'{{"node_id":{_json_str(self.node_id)},"address":{_json_str(self.address)},'
            f'"state":{state},"last_seen":{float(self.last_seen)!r}}}'
        )


# How node states are stored (json.dumps given arguments builds one per call).
_STATE_JSON = json.JSONEncoder(sort_keys=True, allow_nan=False)


# The result columns (and the REAL ones) of the node reads, for _rows.
_NODE_COLUMNS = (("node_id", "address", "state", "last_seen"), frozenset({"last_seen"}))
_CANDIDATE_COLUMNS = (
    ("node_id", "last_seen", "rank_free", "rank_load"),
    frozenset({"last_seen", "rank_free", "rank_load"}),
)
_SERVER_COLUMNS = (("node_id", "address", "state", "last_seen", "holdings"), frozenset({"last_seen"}))


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
class Announced:
    """What L{TrackerStore.announce_answer} fires with."""

    #: The announced content ids with no manifest, in the order given.
    unknown: list[str]
    #: The owner's unfinished reservations, by start, read in the same transaction.
    reservations: list[Reservation]


class _NodeRow(NamedTuple):
    """
    What a group of announces reads of a stored node (L{_SQL.node_rows}).
    (A named tuple: one is made per announce, from a row, by C{_make}.)
    """

    owner: str | None
    digest: str | None
    kind: str
    held_known: int | None
    held_rank: float | None
    held_at: float | None

    def held(self) -> tuple[int, float, float] | None:
        """The pre-selection key its holdings carry, and since when; None if not known."""
        if self.held_known is None or self.held_rank is None or self.held_at is None:
            return None
        return int(self.held_known), float(self.held_rank), float(self.held_at)


_NODE_ROW_COLUMNS = ("node_id", "owner", "holdings_digest", "kind", "held_known", "held_rank", "held_at")


@frozen
class _Announce:
    """One announce waiting for its group's transaction."""

    node_id: str
    address: str
    state_text: str
    last_seen: float
    contents: tuple[str, ...]
    rank: tuple[float | None, float]
    owner: str | None
    kind: str
    reservations: int  # read the owner's reservations (at most this many), 0: no


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
        self._rekey_budget = RekeyBudget()
        self._rekey_lock = threading.Lock()  # (groups may run on several pool threads)
        #: How many nodes' holdings rows had their pre-selection key
        #: rewritten by announces (L{_announce_group}); read by the metrics.
        self.rekeyed = 0
        self._read_pool = read_pool
        self._dialect = dialect
        self._ready = False
        self._failed: Failure | None = None
        self._closed = False
        self._waiting: list[Deferred[None]] = []
        #: How many calls failed because of the database itself (see
        #: L{_count_error}); read by the metrics.
        self.errors = 0
        dbapi = getattr(pool, "dbapi", None)
        self._driver_errors: tuple[type[BaseException], ...] = (dbapi.Error,) if dbapi is not None else ()
        #: How many manifests the last L{start} indexed into the catalogue,
        #: and the ids of those it could not read.
        self.indexed_at_start = 0
        self.unindexable: list[str] = []
        self._statements: dict[str, str] = {}  # _SQL text -> this dialect's
        # Content ids that have a manifest: only ever grows (nothing deletes
        # a manifest), read and extended from the pool's threads.
        self._manifest_ids: set[str] = set()
        self.announces: GroupCommit[_Announce, Announced] = GroupCommit(
            self._write_announces, max_items=ANNOUNCE_GROUP, max_running=announce_writers
        )

    # -- plumbing ----------------------------------------------------------

    def _q(self, statement: str) -> str:
        q = self._statements.get(statement)
        if q is None:
            q = self._statements[statement] = self._dialect.sql(statement)
        return q

    def _many(
        self, txn: Cursor, template: str, row: str, rows: Sequence[tuple[Any, ...]], arrays: str
    ) -> None:
        """
        Run C{template} with its C{{rows}} standing for as many C{row}s as
        there are C{rows} (in chunks: one statement, one round trip, per
        chunk instead of per row); on PostgreSQL, C{arrays} instead, given
        one array per column (L{Dialect.arrays}).
        """
        if not rows:
            return
        if self._dialect.arrays:
            txn.execute(self._q(arrays), [list(column) for column in zip(*rows, strict=True)])
            return
        per = max(1, _IN_CHUNK // len(rows[0]))
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            statement = template.format(rows=", ".join([row] * len(chunk)))
            txn.execute(self._q(statement), tuple(v for r in chunk for v in r))

    def _rows(
        self,
        txn: Cursor,
        statement: str,
        params: Sequence[Any],
        columns: tuple[str, ...],
        reals: frozenset[str] = frozenset(),
    ) -> list[Sequence[Any]]:
        """
        The rows of C{statement} (its result C{columns} named, in order, the
        C{REAL} ones in C{reals}): C{execute} then C{fetchall}, except on
        SQLite, where they come as one row (L{Dialect.rows_as_json}).
        """
        if not self._dialect.rows_as_json:
            txn.execute(self._q(statement), params)
            rows: list[Sequence[Any]] = txn.fetchall()
            return rows
        txn.execute(self._q(json_rows(statement, columns, reals)), params)
        decoded: list[Sequence[Any]] = json.loads(txn.fetchone()[0])
        return decoded

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
        result: Deferred[T] = d.addCallback(lambda _: self._pool.runInteraction(fn, *args))
        return result.addErrback(self._count_error)

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
            if self.indexed_at_start:
                self.log.info("Indexed {count} manifests into the catalogue", count=self.indexed_at_start)
            for content_id in self.unindexable:
                self.log.warn(
                    "Stored manifest {content_id} is unreadable: not in the catalogue", content_id=content_id
                )
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
        self._index_manifests(txn)
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

    def add_manifest(
        self, content_id: str, text: str, created: float, entry: ContentEntry | None = None
    ) -> Deferred[tuple[bool, str]]:
        """
        Store a manifest unless one with that id exists (first one wins),
        and its catalogue C{entry} with it (without one, the next L{start}
        indexes it).

        Fire with C{(created, stored_json)}.
        """

        def run(txn: Cursor) -> tuple[bool, str]:
            self._begin(txn)
            txn.execute(self._q(_SQL.insert_manifest), (content_id, text, created))
            inserted = txn.rowcount == 1
            if inserted and entry is not None:
                self._insert_content(txn, entry, created)
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
            found = {str(row[0]) for row in self._select_in(txn, _SQL.known_manifests, ("content_id",), ask)}
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
        owner: str | None = None,
        kind: str = PEER,
    ) -> Deferred[list[str]]:
        """
        Replace a node's record and its holdings, atomically.

        Contents the tracker has no manifest for are not stored; fire with
        their ids, in the order given.  A node id belongs to the first user
        (C{owner}) who announced it: another user's announce fails with
        L{NodeOwned} and changes nothing.  C{kind} (L{PEER} or L{SERVER})
        replaces the node's kind too.  Fires once the transaction holding
        this announce (and those queued with it, see L{GroupCommit}) has
        committed.
        """
        d = self.announce_answer(node_id, address, state, last_seen, contents, owner, kind)
        return d.addCallback(lambda announced: announced.unknown)

    def announce_answer(
        self,
        node_id: str,
        address: str,
        state: dict[str, Any],
        last_seen: float,
        contents: Iterable[str],
        owner: str | None = None,
        kind: str = PEER,
        reservations: int = 0,
    ) -> Deferred[Announced]:
        """
        L{announce}, and with C{reservations} > 0 the owner's unfinished
        reservations at C{last_seen} (at most that many, as L{reservations}
        gives them) read in the same transaction: what an announce's answer
        needs, in one round trip (one query for the whole group).
        """
        if kind not in NODE_KINDS:
            return fail(StoreError(f"unknown node kind {kind!r}"))
        item = _Announce(
            node_id,
            address,
            _STATE_JSON.encode(state),
            last_seen,
            tuple(dict.fromkeys(contents)),
            rank_columns(state),
            owner,
            kind,
            reservations if owner is not None else 0,
        )
        return self.announces.submit(item)

    # -- load (issue 4): announces written in groups -------------------------

    def _write_announces(self, items: Sequence[_Announce]) -> Deferred[list[Announced | BaseException]]:
        return self._interaction(self._announce_group, items)

    def _announce_group(self, txn: Cursor, items: Sequence[_Announce]) -> list[Announced | BaseException]:
        """
        Write C{items} in one transaction, as if one after the other.

        One query reads the owners (and holdings digests) of the group's
        nodes.  An announce of a node another user owns gets L{NodeOwned}
        as its own result and changes nothing; of two users announcing a
        new node in one group, the first in order takes it.  The last
        accepted announce of a node decides its row and holdings, as it
        would written alone after the others.  Rows are written in node id
        order (see the module docstring), and only holdings that change.
        Last, one query reads the reservations the accepted announces ask
        for (L{announce_answer}).
        """
        self._begin(txn)
        ids = sorted({a.node_id for a in items})
        rows = {
            str(row[0]): _NodeRow._make(row[1:])
            for row in self._select_in(txn, _SQL.node_rows, _NODE_ROW_COLUMNS, ids)
        }
        owners: dict[str, str | None] = {
            n: (None if r.owner is None else str(r.owner)) for n, r in rows.items()
        }
        results: list[Announced | BaseException] = []
        last: dict[str, _Announce] = {}
        for a in items:
            owner = owners.get(a.node_id)
            if a.owner is not None and owner is not None and owner != a.owner:
                results.append(NodeOwned(a.node_id, owner))
                continue
            if owner is None and a.owner is not None:
                owners[a.node_id] = a.owner
            last[a.node_id] = a
            results.append(Announced([], []))
        if not last:
            return results
        known = self._known(
            txn,
            {
                c
                for a, r in zip(items, results, strict=True)
                if not isinstance(r, BaseException)
                for c in a.contents
            },
        )
        order = sorted(last)
        # Holdings are read and written only for nodes whose set changed:
        # each node row keeps a digest of the set its holdings rows hold.
        want = {n: [c for c in last[n].contents if c in known] for n in order}
        digest = {n: holdings_digest(want[n]) for n in order}
        stale = [n for n in order if n not in rows or rows[n].digest != digest[n]]
        # The kind and pre-selection key in a node's holdings rows (its new
        # rows too): the announced ones for a new node or a new kind, and
        # for the nodes whose kept key is no longer current
        # (ranking.key_is_current) as many as the rekey budget allows, the
        # most changed first; else the kept ones.  Only those written go
        # into the node rows (None: keep).
        held: dict[str, tuple[int, float, float]] = {}
        written: dict[str, tuple[int, float, float]] = {}
        due: list[tuple[float, str, tuple[int, float, float]]] = []  # (-change, node, new key)
        for n in order:
            a, row = last[n], rows.get(n)
            key = preselect_key(a.rank)
            kept = None if row is None or row.kind != a.kind else row.held()
            if kept is None:
                held[n] = written[n] = (*key, a.last_seen)
                continue
            held[n] = kept
            if not key_is_current(kept[:2], kept[2], key, a.last_seen):
                due.append((-key_change(kept[:2], key), n, (*key, a.last_seen)))
        if due:
            with self._rekey_lock:
                granted = self._rekey_budget.take(max(a.last_seen for a in last.values()), len(due))
            for _, n, new in sorted(due)[:granted]:
                held[n] = written[n] = new
        # (in node id order: holdings rows are locked in that order, see the module docstring)
        rekeyed = [(n, last[n].kind, *written[n][:2]) for n in order if n in written and n in rows]
        keep = (None, None, None)
        node_rows = [
            (
                a.node_id,
                a.address,
                a.state_text,
                a.last_seen,
                owners.get(a.node_id),
                a.kind,
                *a.rank,
                *written.get(a.node_id, keep),
            )
            for a in (last[n] for n in order)
        ]
        if self._dialect.arrays:
            # (Without keys to rewrite, the plain upsert: most groups.)
            arrays = [list(c) for c in zip(*node_rows, strict=True)]
            if rekeyed:
                arrays = [list(c) for c in zip(*rekeyed, strict=True)] + arrays
            statement = _SQL.upsert_nodes_rekey_arrays if rekeyed else _SQL.upsert_nodes_arrays
            txn.execute(self._q(statement), arrays)
        else:
            self._many(txn, _SQL.upsert_nodes, _SQL.upsert_node_row, node_rows, _SQL.upsert_nodes_arrays)
            self._many(
                txn, _SQL.update_held_keys, _SQL.update_held_keys_row, rekeyed, _SQL.update_held_keys_arrays
            )
        self.rekeyed += len(rekeyed)
        if stale:
            holding: dict[str, set[str]] = {}
            for node_id, content_id in self._select_in(
                txn, _SQL.holdings_of, ("node_id", "content_id"), stale
            ):
                holding.setdefault(str(node_id), set()).add(str(content_id))
            dropped: list[tuple[str, str]] = []
            added: list[tuple[str, str]] = []
            for node_id in stale:
                have = holding.get(node_id, set())
                dropped.extend((node_id, c) for c in sorted(have.difference(want[node_id])))
                added.extend((node_id, c) for c in want[node_id] if c not in have)
            self._many(txn, _SQL.delete_holdings_rows, "(?, ?)", dropped, _SQL.delete_holdings_arrays)
            self._many(
                txn,
                _SQL.insert_holdings,
                _SQL.insert_holdings_row,
                [(n, c, last[n].kind, *held[n][:2]) for n, c in added],
                _SQL.insert_holdings_arrays,
            )
            txn.executemany(self._q(_SQL.set_holdings_digest), [(digest[n], n) for n in stale])
        asking = [
            i
            for i, (a, r) in enumerate(zip(items, results, strict=True))
            if a.reservations > 0 and not isinstance(r, BaseException)
        ]
        found = self._reservations_of(
            txn, [(str(items[i].owner), items[i].last_seen, items[i].reservations) for i in asking]
        )
        reserved = dict(zip(asking, found, strict=True))
        return [
            r
            if isinstance(r, BaseException)
            else Announced([c for c in a.contents if c not in known], reserved.get(i, []))
            for i, (a, r) in enumerate(zip(items, results, strict=True))
        ]

    def _select_in(
        self,
        txn: Cursor,
        template: str,
        columns: tuple[str, ...],
        values: Sequence[str],
        reals: frozenset[str] = frozenset(),
    ) -> list[Sequence[Any]]:
        """
        Rows of C{template} (see L{_rows}) with its C{IN ({marks})} standing
        for C{values} (in chunks), or on PostgreSQL C{= ANY(?)} given them
        as one array (L{Dialect.arrays}).
        """
        if self._dialect.arrays:
            any_of = template.replace("IN ({marks})", "= ANY(?)")
            assert any_of != template, template
            return self._rows(txn, any_of, (list(values),), columns, reals)
        rows: list[Sequence[Any]] = []
        for i in range(0, len(values), _IN_CHUNK):
            chunk = values[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows.extend(self._rows(txn, template.format(marks=marks), tuple(chunk), columns, reals))
        return rows

    def _check_owner(self, txn: Cursor, node_id: str, owner: str | None) -> None:
        if owner is None:
            return
        txn.execute(self._q(_SQL.node_owner), (node_id,))
        row = txn.fetchone()
        if row is not None and row[0] is not None and row[0] != owner:
            raise NodeOwned(node_id, str(row[0]))

    def leave(self, node_id: str, owner: str | None = None) -> Deferred[bool]:
        """
        Forget a node and its holdings; fire with whether it was known.

        Fails with L{NodeOwned} if the node belongs to another C{owner}.
        """

        def run(txn: Cursor) -> bool:
            self._begin(txn)
            self._check_owner(txn, node_id, owner)
            txn.execute(self._q(_SQL.delete_node), (node_id,))
            known = bool(txn.rowcount)
            txn.execute(self._q(_SQL.delete_holdings), (node_id,))
            return known

        return self._interaction(run)

    def nodes_for(
        self, content_id: str, seen_since: float, kind: str = PEER
    ) -> Deferred[list[NodeRecord] | None]:
        """
        The nodes of C{kind} (peers, or content servers) holding
        C{content_id} heard from at or after C{seen_since}, unordered; None
        if the content is unknown.
        """

        def run(txn: Cursor) -> list[NodeRecord] | None:
            if not self._known(txn, (content_id,)):
                return None
            statement = _SQL.nodes_for_content_lateral if self._dialect.lateral else _SQL.nodes_for_content
            rows = self._rows(txn, statement, (content_id, seen_since, kind), *_NODE_COLUMNS)
            return [
                NodeRecord(str(node_id), str(address), _decode_state(state), float(last_seen))
                for node_id, address, state, last_seen in rows
            ]

        return self._read(run)

    def node_list(
        self,
        content_id: str,
        seen_since: float,
        kind: str,
        count: int,
        exclude: Collection[str],
        choose: Callable[[list[Candidate]], Sequence[Candidate]],
    ) -> Deferred[list[ListedNode] | None]:
        """
        A node list, in one round trip: the candidates (see
        L{meshstream.tracker.ranking}) given to C{choose} (on the store's
        thread: it must be quick and not touch the reactor), then the rows
        of the nodes it chose, in its order (a chosen node gone since, by a
        leave or a purge, is left out); None if the content is unknown.

        The candidates: of the nodes L{nodes_for} would list, leaving out
        the ids in C{exclude}, the C{count} with the largest C{free upload
        × load factor} among those whose free upload is known and the
        C{count} with the best load factor among the others, by the rank
        columns stored at their last announce (each sort fetched with as
        many more as C{exclude} names, then the excluded left out), in no
        particular order.

        Only the chosen nodes' addresses and states are read: a node list
        weighs a few hundred candidates to name a few dozen, and on SQLite
        carrying every candidate's state text through the JSON of
        L{json_rows} cost about a sixth of the list's time (0.7 of 4.2 ms
        on the benchmark's data, bench/RESULTS.md).
        """

        def run(txn: Cursor) -> list[ListedNode] | None:
            candidates = self._candidates(txn, content_id, seen_since, kind, count, exclude)
            if candidates is None:
                return None
            chosen = [c.node_id for c in choose(candidates)]
            columns, reals = _NODE_COLUMNS
            found = self._select_in(txn, _SQL.listed_nodes, columns, chosen, reals)
            rows = {row[0]: ListedNode(*row) for row in found}
            return [rows[node_id] for node_id in chosen if node_id in rows]

        return self._read(run)

    def _candidates(
        self, txn: Cursor, content_id: str, seen_since: float, kind: str, count: int, exclude: Collection[str]
    ) -> list[Candidate] | None:
        if not self._known(txn, (content_id,)):
            return None
        one = (content_id, seen_since, kind, count + len(exclude))
        rows = self._rows(txn, _SQL.candidates_for_content, one + one, *_CANDIDATE_COLUMNS)
        # (The rows' values have their types already, TEXT as str and REAL
        # as float, from either dialect: see json_rows.)
        return [
            Candidate(node_id, last_seen, (free, load))
            for node_id, last_seen, free, load in rows
            if node_id not in exclude
        ]

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

    def servers(self, seen_since: float) -> Deferred[list[tuple[NodeRecord, int]]]:
        """
        Every content server heard from at or after C{seen_since}, unordered,
        each with the number of contents it holds.
        """

        def run(txn: Cursor) -> list[tuple[NodeRecord, int]]:
            rows = self._rows(txn, _SQL.live_servers, (seen_since,), *_SERVER_COLUMNS)
            return [
                (NodeRecord(str(node_id), str(address), _decode_state(state), float(last_seen)), int(n))
                for node_id, address, state, last_seen, n in rows
            ]

        return self._interaction(run)

    # -- users and tokens ----------------------------------------------------

    def add_user(
        self, name: str, password_hash: str, role: str, created: float, quota_bytes: int | None = None
    ) -> Deferred[bool]:
        """Create a user; fire with False (changing nothing) if the name is taken."""

        def run(txn: Cursor) -> bool:
            self._begin(txn)
            txn.execute(self._q(_SQL.insert_user), (name, password_hash, role, quota_bytes, created))
            return bool(txn.rowcount == 1)

        return self._interaction(run)

    def get_user(self, name: str) -> Deferred[UserRecord | None]:
        def run(txn: Cursor) -> UserRecord | None:
            txn.execute(self._q(_SQL.get_user), (name,))
            row = txn.fetchone()
            return None if row is None else _user(row)

        return self._interaction(run)

    def list_users(self) -> Deferred[list[UserRecord]]:
        def run(txn: Cursor) -> list[UserRecord]:
            txn.execute(self._q(_SQL.list_users))
            return [_user(row) for row in txn.fetchall()]

        return self._interaction(run)

    def update_user(self, name: str, **changes: object) -> Deferred[bool]:
        """
        Set some of C{password}, C{role}, C{disabled}, C{quota_bytes}; fire
        with whether the user exists.  Disabling a user or changing their
        password or role also revokes their tokens.
        """
        unknown = set(changes) - _USER_COLUMNS
        if unknown:
            return fail(StoreError(f"cannot update user columns {sorted(unknown)}"))

        def run(txn: Cursor) -> bool:
            self._begin(txn)
            found = False
            for column, value in sorted(changes.items()):
                if column == "disabled":
                    value = 1 if value else 0
                statement = _SQL.update_user.format(column=column)
                txn.execute(self._q(statement), (value, name))
                found = bool(txn.rowcount)
            if found and (changes.keys() & {"password", "role"} or changes.get("disabled")):
                txn.execute(self._q(_SQL.delete_user_tokens), (name,))
            return found

        return self._interaction(run)

    def add_token(self, digest: str, name: str, expires: float) -> Deferred[None]:
        def run(txn: Cursor) -> None:
            self._begin(txn)
            txn.execute(self._q(_SQL.insert_token), (digest, name, expires))

        return self._interaction(run)

    def token_principal(self, digest: str) -> Deferred[tuple[str, str, float] | None]:
        """C{(name, role, expires)} of an enabled user's token, or None."""

        def run(txn: Cursor) -> tuple[str, str, float] | None:
            txn.execute(self._q(_SQL.token_principal), (digest,))
            row = txn.fetchone()
            return None if row is None else (str(row[0]), str(row[1]), float(row[2]))

        return self._interaction(run)

    def delete_token(self, digest: str) -> Deferred[bool]:
        def run(txn: Cursor) -> bool:
            self._begin(txn)
            txn.execute(self._q(_SQL.delete_token), (digest,))
            return bool(txn.rowcount)

        return self._interaction(run)

    def purge_tokens(self, now: float) -> Deferred[int]:
        """Drop the tokens expired at C{now}; fire with how many."""

        def run(txn: Cursor) -> int:
            self._begin(txn)
            txn.execute(self._q(_SQL.purge_tokens), (now,))
            return int(txn.rowcount)

        return self._interaction(run)

    # -- operations: health and statistics -----------------------------------

    def _count_error(self, f: Failure) -> Failure:
        """
        Count database failures: the driver's errors, a lost connection, a
        closed or unmigrated store; not the domain errors (L{NodeOwned}, ...)
        that interactions raise on purpose.
        """
        if f.check(StoreError, adbapi.ConnectionLost, *self._driver_errors):
            self.errors += 1
        return f

    def ping(self) -> Deferred[None]:
        """Run a trivial query: fires once the database answers, fails if it cannot."""

        def run(txn: Cursor) -> None:
            txn.execute(self._q(_SQL.ping))
            txn.fetchall()

        return self._interaction(run)

    def stats(self, seen_since: float) -> Deferred[tuple[int, int]]:
        """C{(live nodes, registered contents)}: nodes heard from at or after C{seen_since}."""

        def run(txn: Cursor) -> tuple[int, int]:
            txn.execute(self._q(_SQL.count_live_nodes), (seen_since,))
            nodes = int(txn.fetchone()[0])
            txn.execute(self._q(_SQL.count_manifests))
            return nodes, int(txn.fetchone()[0])

        return self._interaction(run)

    # -- billing and reservations ---------------------------------------------

    def _standing(self, txn: Cursor, name: str, period: str) -> Standing:
        txn.execute(self._q(_SQL.standing), (name, period, name))
        row = txn.fetchone()
        if row is None:
            return Standing(period, 0, None)
        quota, used = row
        return Standing(period, int(used), None if quota is None else int(quota))

    def add_usage(
        self,
        name: str,
        node_id: str,
        seq: int,
        period: str,
        entries: Sequence[UsageEntry],
        received: float,
    ) -> Deferred[UsageResult]:
        """
        Add a node's report to user C{name}'s rows for C{period}, in one
        transaction, unless C{seq} is not above the last one counted for
        (C{node_id}, C{name}).  Contents with no manifest are left out.
        Fails with L{NodeOwned} (adding nothing) if the node belongs to
        another user; a node never announced is fine.
        """
        # Sorted, so that concurrent reports lock usage rows in one order.
        ordered = sorted(entries, key=lambda e: e.content_id)

        def run(txn: Cursor) -> UsageResult:
            self._begin(txn)
            self._check_owner(txn, node_id, name)
            known = self._known(txn, [e.content_id for e in ordered])
            unknown = [e.content_id for e in entries if e.content_id not in known]
            txn.execute(self._q(_SQL.claim_report), (node_id, name, seq, received))
            accepted = txn.rowcount == 1
            if accepted:
                txn.executemany(
                    self._q(_SQL.add_usage),
                    [(name, period, e.content_id, *e.counters()) for e in ordered if e.content_id in known],
                )
            return UsageResult(accepted, unknown, self._standing(txn, name, period))

        return self._interaction(run)

    def standing(self, name: str, period: str) -> Deferred[Standing]:
        """User C{name}'s downloaded bytes in C{period} and quota (one query)."""
        return self._interaction(self._standing, name, period)

    def usage(self, period: str, name: str | None = None) -> Deferred[list[UsageRow]]:
        """The usage rows of C{period} (of one user, or of all), by user and content id."""

        def run(txn: Cursor) -> list[UsageRow]:
            if name is None:
                txn.execute(self._q(_SQL.usage_of_period), (period,))
            else:
                txn.execute(self._q(_SQL.usage_of_user), (period, name))
            return [_usage_row(row) for row in txn.fetchall()]

        return self._interaction(run)

    def add_reservation(
        self, rid: str, name: str, wanted: ReservationRequest, now: float, limit: int
    ) -> Deferred[Reservation | None]:
        """
        Store a reservation; fire with it, or with None if the content is
        unknown.  Fails with L{ReservationLimit} if C{name} already holds
        C{limit} unfinished ones.  The user's finished reservations go.
        """

        def run(txn: Cursor) -> Reservation | None:
            self._begin(txn)
            txn.execute(self._q(_SQL.has_manifest), (wanted.content_id,))
            if txn.fetchone() is None:
                return None
            txn.execute(self._q(_SQL.delete_ended_reservations), (name, now))
            txn.execute(self._q(_SQL.count_reservations), (name, now))
            if int(txn.fetchone()[0]) >= limit:
                raise ReservationLimit(limit)
            row = (rid, name, wanted.content_id, wanted.start, wanted.end, now)
            txn.execute(self._q(_SQL.insert_reservation), row)
            return _reservation(row)

        return self._interaction(run)

    def reservations(self, name: str, now: float, limit: int) -> Deferred[list[Reservation]]:
        """User C{name}'s unfinished reservations (at most C{limit}), by start."""

        def run(txn: Cursor) -> list[Reservation]:
            txn.execute(self._q(_SQL.active_reservations), (name, now, limit))
            return [_reservation(row) for row in txn.fetchall()]

        return self._interaction(run)

    def _reservations_of(
        self, txn: Cursor, asks: Sequence[tuple[str, float, int]]
    ) -> list[list[Reservation]]:
        """
        For each C{(user, now, limit)} of C{asks}, what L{reservations}
        would return, in one query for all of them.
        """
        if not asks:
            return []
        names = sorted({name for name, _, _ in asks})
        since = min(now for _, now, _ in asks)
        found: dict[str, list[Reservation]] = {}
        for i in range(0, len(names), _IN_CHUNK):
            chunk = names[i : i + _IN_CHUNK]
            statement = _SQL.users_reservations.format(marks=", ".join("?" * len(chunk)))
            txn.execute(self._q(statement), (since, *chunk))
            for row in txn.fetchall():
                r = _reservation(row)
                found.setdefault(r.user, []).append(r)
        return [[r for r in found.get(name, ()) if r.end > now][:limit] for name, now, limit in asks]

    def delete_reservation(self, rid: str, owner: str | None = None) -> Deferred[bool]:
        """Delete a reservation (only if it is C{owner}'s, when given); fire with whether it went."""

        def run(txn: Cursor) -> bool:
            self._begin(txn)
            if owner is None:
                txn.execute(self._q(_SQL.delete_reservation), (rid,))
            else:
                txn.execute(self._q(_SQL.delete_own_reservation), (rid, owner))
            return bool(txn.rowcount)

        return self._interaction(run)

    # -- the content catalogue ------------------------------------------------

    def _insert_content(self, txn: Cursor, entry: ContentEntry, created: float) -> None:
        txn.execute(
            self._q(_SQL.insert_content),
            (
                entry.content_id,
                entry.title,
                entry.name,
                entry.mime_type,
                entry.size,
                entry.duration,
                entry.bitrate,
                created,
                entry.search_key,
            ),
        )

    def _index_manifests(self, txn: Cursor) -> None:
        """
        Give every manifest without a catalogue row its row (one manifest
        read at a time: they may be large).  Runs in the migration's
        transaction, so trackers starting together do it one after the other.
        """
        self.unindexable = []
        txn.execute(self._q(_SQL.unindexed_manifests))
        missing = [(str(cid), float(created)) for cid, created in txn.fetchall()]
        indexed = 0
        for content_id, created in missing:
            txn.execute(self._q(_SQL.get_manifest), (content_id,))
            row = txn.fetchone()
            try:
                doc = json.loads(row[0]) if row is not None else None
            except (ValueError, RecursionError):
                doc = None
            entry = catalog.entry_from_document(content_id, doc)
            if entry is None:
                self.unindexable.append(content_id)
                continue
            self._insert_content(txn, entry, created)
            indexed += 1
        self.indexed_at_start = indexed

    def search_contents(
        self,
        seen_since: float,
        query: str | None = None,
        mime_prefix: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Deferred[tuple[list[ContentInfo], int]]:
        """
        The catalogue, newest first: the contents whose title or name
        contains C{query} (caselessly, see L{catalog.fold}) and whose MIME
        type starts with C{mime_prefix}; fire with C{(page, total)}, each
        entry counting its holders heard from at or after C{seen_since}.
        """
        clauses: list[str] = []
        params: list[object] = []
        if query is not None:
            clauses.append(_SQL.content_matches)
            params.append(catalog.contains_pattern(query))
        if mime_prefix is not None:
            clauses.append(_SQL.content_mime_prefix)
            params.append(catalog.prefix_pattern(mime_prefix))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""

        def run(txn: Cursor) -> tuple[list[ContentInfo], int]:
            self._begin(txn)  # the page and the total in one transaction
            txn.execute(self._q(_SQL.contents_page.format(where=where)), (seen_since, *params, limit, offset))
            page = [catalog.info_from_row(tuple(row)) for row in txn.fetchall()]
            txn.execute(self._q(_SQL.count_contents.format(where=where)), tuple(params))
            return page, int(txn.fetchone()[0])

        return self._interaction(run)

    def get_content(self, content_id: str, seen_since: float) -> Deferred[ContentInfo | None]:
        """One content's catalogue entry (see L{search_contents}), or None."""
        where = " WHERE " + _SQL.content_by_id

        def run(txn: Cursor) -> ContentInfo | None:
            txn.execute(self._q(_SQL.contents_page.format(where=where)), (seen_since, content_id, 1, 0))
            row = txn.fetchone()
            return None if row is None else catalog.info_from_row(tuple(row))

        return self._interaction(run)

    def count_nodes(self) -> Deferred[int]:
        def run(txn: Cursor) -> int:
            txn.execute(self._q(_SQL.count_nodes))
            return int(txn.fetchone()[0])

        return self._read(run)

    # -- peer tickets ------------------------------------------------------

    def node_owner(self, node_id: str) -> Deferred[str | None]:
        """The user whose box node C{node_id} is; None if unknown or unowned."""

        def run(txn: Cursor) -> str | None:
            txn.execute(self._q(_SQL.node_owner), (node_id,))
            row = txn.fetchone()
            return None if row is None or row[0] is None else str(row[0])

        return self._interaction(run)


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


def _postgres_read_open(conn: Any) -> None:
    """
    A reading connection in autocommit: each of its (single-statement,
    read-only) interactions is one round trip, with no COMMIT after it.
    Every round trip on a pool thread gives the GIL up and must take it back
    from the reactor's thread, which, while that is busy, can wait a whole
    switch interval: fewer round trips, a shorter tail.
    """
    conn.autocommit = True


def open_store(url: str, reactor: IReactorCore) -> TrackerStore:
    """
    Build a (not yet started) store for a C{--db} URL.

    Raises L{StoreError} for URLs it cannot serve.  Nothing connects yet:
    a PostgreSQL server that cannot be reached fails L{TrackerStore.start}.
    """
    parsed = parse_db_url(url)
    if parsed.scheme == "postgresql":
        pg_pool, pg_read_pool = (
            adbapi.ConnectionPool(
                "psycopg",
                parsed.path,
                cp_min=1,
                cp_max=size,
                cp_reconnect=True,  # a connection the server dropped is reopened
                cp_openfun=openfun,
                cp_reactor=reactor,
                cp_noisy=False,
            )
            for size, openfun in ((POSTGRES_POOL_SIZE, None), (POSTGRES_READERS, _postgres_read_open))
        )
        return TrackerStore(pg_pool, POSTGRESQL, read_pool=pg_read_pool)
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
