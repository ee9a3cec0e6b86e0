# -*- test-case-name: tests.test_tracker_api -*-
"""
The tracker's database: manifests, nodes and what each node holds.

Every call returns a Deferred; the work runs on L{adbapi.ConnectionPool}'s
threads, one transaction per call.  Two backends, same schema and migrations:

  - SQLite (C{sqlite:PATH}, the embedded default): WAL journal, one
    connection;
  - PostgreSQL (C{postgresql://...} or C{postgres://...}, through psycopg 3):
    a few connections; several tracker processes may share one database.

How they differ is kept in two places:

  - every statement is in L{_SQL} and uses C{?} placeholders, written in the
    SQL both engines accept (C{INSERT ... ON CONFLICT ... DO ...},
    C{DELETE ... RETURNING});
  - L{Dialect.sql} rewrites placeholders for a driver's paramstyle (C{qmark}
    for sqlite3, C{format} for psycopg) and column types (C{REAL} is a 4-byte
    float in PostgreSQL, so it becomes C{DOUBLE PRECISION}); the
    L{Dialect} also says how a transaction begins and how the migration is
    serialised between processes (C{pg_advisory_xact_lock}).

L{parse_db_url} / L{open_store} turn a URL into a pool and a dialect.

Write transactions touch C{nodes} before C{holdings}, so that concurrent
announces, leaves and purges from several trackers lock rows in one order.

Schema (version 3)::

  schema_version(version INTEGER)
  manifests(content_id TEXT PK, json TEXT, created REAL)
  nodes(node_id TEXT PK, address TEXT, state TEXT (JSON), last_seen REAL,
        owner TEXT (the user whose box it is),
        kind TEXT ('peer', or 'server' for a content server))
  holdings(node_id TEXT, content_id TEXT, PK (node_id, content_id))
  users(name TEXT PK, password TEXT (scrypt hash), role TEXT,
        disabled INTEGER, quota_bytes BIGINT NULL, created REAL)
  tokens(digest TEXT PK (SHA-256 of the bearer token), name TEXT, expires REAL)
"""

from __future__ import annotations

import importlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from attrs import frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

SCHEMA_VERSION = 3

#: Node kinds: an agent (peer) or a content server (claims 37, 38).
PEER = "peer"
SERVER = "server"
NODE_KINDS = (PEER, SERVER)

# Connections (and threads) per PostgreSQL pool; SQLite uses one.
POSTGRES_POOL_SIZE = 4

# Stay well below SQLite's host-parameter limit (999 before 3.32).
_IN_CHUNK = 500

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
    # Column types spelt differently: {written in _SQL: used here}.
    types: tuple[tuple[str, str], ...] = ()
    # Run first in the migration transaction, so that trackers starting at
    # once on one database migrate one after the other.  (SQLite needs none:
    # the first DDL statement takes the file's write lock.)
    migration_lock: str | None = None

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
    types=(("REAL", "DOUBLE PRECISION"),),
    migration_lock=f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})",
)


class _SQL:
    """Every statement the tracker runs, with C{?} placeholders."""

    create_schema_version = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    get_schema_version = "SELECT MAX(version) FROM schema_version"
    set_schema_version = "INSERT INTO schema_version (version) VALUES (?)"

    migrations: dict[int, tuple[str, ...]] = {
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
        3: (
            # Content servers: nodes announced with kind 'server'.
            "ALTER TABLE nodes ADD COLUMN kind TEXT NOT NULL DEFAULT 'peer'",
            "CREATE INDEX nodes_kind_seen ON nodes (kind, last_seen)",
        ),
    }

    insert_manifest = (
        "INSERT INTO manifests (content_id, json, created) VALUES (?, ?, ?)"
        " ON CONFLICT (content_id) DO NOTHING"
    )
    get_manifest = "SELECT json FROM manifests WHERE content_id = ?"
    has_manifest = "SELECT 1 FROM manifests WHERE content_id = ?"
    known_manifests = "SELECT content_id FROM manifests WHERE content_id IN ({marks})"

    upsert_node = (
        "INSERT INTO nodes (node_id, address, state, last_seen, owner) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
        " state = excluded.state, last_seen = excluded.last_seen,"
        " owner = COALESCE(excluded.owner, nodes.owner)"
    )
    delete_node = "DELETE FROM nodes WHERE node_id = ?"
    delete_holdings = "DELETE FROM holdings WHERE node_id = ?"
    insert_holding = "INSERT INTO holdings (node_id, content_id) VALUES (?, ?)"
    nodes_for_content = (
        "SELECT n.node_id, n.address, n.state, n.last_seen"
        " FROM holdings h JOIN nodes n ON n.node_id = h.node_id"
        " WHERE h.content_id = ? AND n.last_seen >= ? AND n.kind = ?"
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
    purge_tokens = "DELETE FROM tokens WHERE expires < ?"

    # -- content servers
    # (A separate statement rather than a column of upsert_node, so that an
    # announce sets its kind whichever way upsert_node grows.)
    set_node_kind = "UPDATE nodes SET kind = ? WHERE node_id = ?"
    nodes_of_kind = (
        "SELECT n.node_id, n.address, n.state, n.last_seen, COUNT(h.content_id)"
        " FROM nodes n LEFT JOIN holdings h ON h.node_id = n.node_id"
        " WHERE n.kind = ? AND n.last_seen >= ?"
        " GROUP BY n.node_id, n.address, n.state, n.last_seen"
    )


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


def _decode_state(text: str) -> dict[str, Any]:
    try:
        state = json.loads(text)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


class TrackerStore:
    """
    The tracker's tables behind Deferred-returning methods.

    Call L{start} once (it runs the migrations); calls made before the
    migrations finish wait for them.  L{close} stops the pool.
    """

    log = Logger()

    def __init__(self, pool: adbapi.ConnectionPool, dialect: Dialect) -> None:
        self._pool = pool
        self._dialect = dialect
        self._ready = False
        self._failed: Failure | None = None
        self._closed = False
        self._waiting: list[Deferred[None]] = []

    # -- plumbing ----------------------------------------------------------

    def _q(self, statement: str) -> str:
        return self._dialect.sql(statement)

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
                txn.execute(self._q(statement))
            txn.execute(self._q(_SQL.set_schema_version), (step,))
        return SCHEMA_VERSION

    def close(self) -> None:
        """Stop the pool (waits for a running query); later calls fail."""
        if self._closed:
            return
        self._closed = True
        self._release(Failure(StoreError("the store is closed")))
        self._pool.close()

    # -- queries -----------------------------------------------------------

    def schema_version(self) -> Deferred[int]:
        def run(txn: Cursor) -> int:
            txn.execute(self._q(_SQL.get_schema_version))
            row = txn.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return self._interaction(run)

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

        return self._interaction(run)

    def _known(self, txn: Cursor, content_ids: Sequence[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(content_ids), _IN_CHUNK):
            chunk = content_ids[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            txn.execute(self._q(_SQL.known_manifests.format(marks=marks)), tuple(chunk))
            known.update(str(row[0]) for row in txn.fetchall())
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
        replaces the node's kind too.
        """
        if kind not in NODE_KINDS:
            return fail(StoreError(f"unknown node kind {kind!r}"))
        wanted = list(dict.fromkeys(contents))
        state_text = json.dumps(state, sort_keys=True, allow_nan=False)

        def run(txn: Cursor) -> list[str]:
            self._begin(txn)
            self._check_owner(txn, node_id, owner)
            known = self._known(txn, wanted)
            txn.execute(self._q(_SQL.upsert_node), (node_id, address, state_text, last_seen, owner))
            txn.execute(self._q(_SQL.set_node_kind), (kind, node_id))
            txn.execute(self._q(_SQL.delete_holdings), (node_id,))
            txn.executemany(
                self._q(_SQL.insert_holding),
                [(node_id, c) for c in wanted if c in known],
            )
            return [c for c in wanted if c not in known]

        return self._interaction(run)

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
            txn.execute(self._q(_SQL.has_manifest), (content_id,))
            if txn.fetchone() is None:
                return None
            txn.execute(self._q(_SQL.nodes_for_content), (content_id, seen_since, kind))
            return [
                NodeRecord(str(node_id), str(address), _decode_state(state), float(last_seen))
                for node_id, address, state, last_seen in txn.fetchall()
            ]

        return self._interaction(run)

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
            txn.execute(self._q(_SQL.nodes_of_kind), (SERVER, seen_since))
            return [
                (NodeRecord(str(node_id), str(address), _decode_state(state), float(last_seen)), int(n))
                for node_id, address, state, last_seen, n in txn.fetchall()
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
        """Drop the tokens that expired before C{now}; fire with how many."""

        def run(txn: Cursor) -> int:
            self._begin(txn)
            txn.execute(self._q(_SQL.purge_tokens), (now,))
            return int(txn.rowcount)

        return self._interaction(run)

    def count_nodes(self) -> Deferred[int]:
        def run(txn: Cursor) -> int:
            txn.execute(self._q(_SQL.count_nodes))
            return int(txn.fetchone()[0])

        return self._interaction(run)


def _sqlite_open(conn: sqlite3.Connection) -> None:
    """Per-connection setup: WAL journal, and wait a little on a busy file."""
    cursor = conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA synchronous=NORMAL")
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
    pool = adbapi.ConnectionPool(
        "sqlite3",
        parsed.path,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=_sqlite_open,
        cp_reactor=reactor,
        cp_noisy=False,
    )
    return TrackerStore(pool, SQLITE)
