"""
PostgreSQL for the tracker tests.

C{MESHSTREAM_TEST_PG} is a libpq URL (C{postgresql://USER@HOST:PORT/DBNAME})
to a database the tests may use freely; without it the PostgreSQL tests are
skipped.  Each test gets a schema of its own (created here, dropped when the
test ends) and a URL whose C{search_path} points at it, so tests never see
each other's tables.
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import quote

from twisted.trial import unittest

PG_URL = os.environ.get("MESHSTREAM_TEST_PG", "")
SKIP_PG = None if PG_URL else "MESHSTREAM_TEST_PG (a PostgreSQL URL the tests may use) is not set"


def _connect() -> Any:
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=10)


def pg_schema_url(case: unittest.TestCase) -> str:
    """
    Create a fresh schema; return C{MESHSTREAM_TEST_PG} with its
    C{search_path} set to it.  The schema is dropped after the test (register
    this before the cleanups that stop the trackers using it).
    """
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with _connect() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with _connect() as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    case.addCleanup(drop)
    separator = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{separator}options={quote(f'-csearch_path={schema}')}"


def pg_query(url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run one statement on C{url} (blocking); return its rows."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return list(conn.execute(statement).fetchall())
