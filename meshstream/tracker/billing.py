# -*- test-case-name: tests.test_tracker_billing -*-
"""
Usage records, quotas and reservations (the seed's claims 34 and 27): the
pure part.

Agents report, per content, the bytes they got from peers, from content
servers and from the origin (or HTTP mirrors), and the bytes they uploaded to
peers.  The tracker adds the numbers to the reporting user's row for that
content in the current I{period}: a calendar month in UTC, spelt C{YYYY-MM}.

Reports carry a per-node C{seq} that grows with every new report; the tracker
remembers the last one it counted for each (node, user), so a report sent
again after a lost answer is acknowledged without being counted twice.

A user's I{downloaded} bytes in a period are C{from_peers + from_servers +
from_origin}; once they reach the user's quota (C{users.quota_bytes}; NULL
means no quota), node lists are refused with C{402 quota_exceeded}.

Everything here is free of Twisted and of the database: validators raise
C{ValueError} with a message for the client (the API turns it into a 400),
L{period_of} reads a time, L{usage_csv} renders an export, and
L{QuotaCache} remembers a user's standing for a few seconds so that the
node-list path rarely waits for the database.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable
from typing import Any

from attrs import frozen

#: The counters of a usage entry, in the order of the export's columns.
COUNTERS = ("from_peers", "from_servers", "from_origin", "uploaded")
#: The counters that make up a user's downloaded bytes (what a quota limits).
DOWNLOAD_COUNTERS = ("from_peers", "from_servers", "from_origin")
#: Each counter of one report is below this (about 1 PiB).
MAX_COUNTER = 2**50
#: Entries in one report.
MAX_USAGE_ENTRIES = 10_000
#: A seq is a non-negative integer below this (it fits a BIGINT).
MAX_SEQ = 2**62

#: Unfinished reservations a user may hold at once.
MAX_RESERVATIONS = 100
#: Reservation times are whole unix seconds below this (the year 5138).
MAX_TIME = 10**11

#: How long one tracker process trusts what it read of a user's quota
#: standing: a quota raised through another process (or the admin command)
#: takes effect here within this many seconds.
QUOTA_CACHE_SECONDS = 5.0
QUOTA_CACHE_SIZE = 100_000

CSV_COLUMNS = ("user", "period", "content_id", *COUNTERS)

_CONTENT_ID_RE = re.compile(r"[0-9a-f]{64}\Z")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_PERIOD_RE = re.compile(r"([0-9]{4})-([0-9]{2})\Z")


# -- periods -------------------------------------------------------------------


def period_of(seconds: float) -> str:
    """The period (C{YYYY-MM}, UTC) holding the unix time C{seconds}."""
    t = time.gmtime(seconds)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def parse_period(text: str) -> str:
    """Check a C{YYYY-MM} period; raise C{ValueError} if it is not one."""
    m = _PERIOD_RE.match(text)
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise ValueError("period must be YYYY-MM (a month, UTC)")
    return text


# -- usage reports -------------------------------------------------------------


@frozen
class UsageEntry:
    """What a node counted for one content since its previous report."""

    content_id: str
    from_peers: int = 0
    from_servers: int = 0
    from_origin: int = 0
    uploaded: int = 0

    @property
    def downloaded(self) -> int:
        return self.from_peers + self.from_servers + self.from_origin

    def counters(self) -> tuple[int, int, int, int]:
        return self.from_peers, self.from_servers, self.from_origin, self.uploaded


@frozen
class UsageReport:
    """A validated C{POST /usage} body."""

    node_id: str
    seq: int
    entries: tuple[UsageEntry, ...]


def _counter(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNTER:
        raise ValueError(f"{where} must be an integer from 0 to 2**50 - 1")
    return value


def parse_usage_report(obj: object) -> UsageReport:
    """
    Validate C{{"node_id", "seq", "contents": [{"content_id", "from_peers",
    "from_servers", "from_origin", "uploaded"}]}}; a missing counter is 0, a
    content listed twice is an error.
    """
    if not isinstance(obj, dict):
        raise ValueError("the body must be a JSON object")
    for name in ("node_id", "seq", "contents"):
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    node_id = obj["node_id"]
    if not isinstance(node_id, str) or not _NODE_ID_RE.match(node_id):
        raise ValueError("node_id must be 1 to 64 characters of [A-Za-z0-9._-]")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ:
        raise ValueError("seq must be an integer from 0 to 2**62 - 1")
    contents = obj["contents"]
    if not isinstance(contents, list):
        raise ValueError("contents must be a list of objects")
    if len(contents) > MAX_USAGE_ENTRIES:
        raise ValueError(f"at most {MAX_USAGE_ENTRIES} contents per report")
    entries: list[UsageEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(contents):
        if not isinstance(item, dict):
            raise ValueError(f"contents[{i}] must be an object")
        cid = item.get("content_id")
        if not isinstance(cid, str) or not _CONTENT_ID_RE.match(cid):
            raise ValueError(f"contents[{i}].content_id must be 64 lowercase hex characters")
        if cid in seen:
            raise ValueError(f"content {cid} is listed twice")
        seen.add(cid)
        counts = [_counter(item.get(name, 0), f"contents[{i}].{name}") for name in COUNTERS]
        entries.append(UsageEntry(cid, *counts))
    return UsageReport(node_id, seq, tuple(entries))


@frozen
class UsageRow:
    """One row of C{usage}: a user's counters for one content in one period."""

    user: str
    period: str
    content_id: str
    from_peers: int
    from_servers: int
    from_origin: int
    uploaded: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "period": self.period,
            "content_id": self.content_id,
            "from_peers": self.from_peers,
            "from_servers": self.from_servers,
            "from_origin": self.from_origin,
            "uploaded": self.uploaded,
        }


def usage_csv(rows: Iterable[UsageRow]) -> bytes:
    """The rows as CSV (RFC 4180: CRLF line ends) with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        d = row.to_dict()
        writer.writerow([d[c] for c in CSV_COLUMNS])
    return out.getvalue().encode("utf-8")


# -- quotas --------------------------------------------------------------------


@frozen
class Standing:
    """A user's downloaded bytes in a period and their quota (None: none)."""

    period: str
    used_bytes: int
    quota_bytes: int | None

    @property
    def over_quota(self) -> bool:
        return self.quota_bytes is not None and self.used_bytes >= self.quota_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"period": self.period, "used_bytes": self.used_bytes, "quota_bytes": self.quota_bytes}


def quota_message(user: str, standing: Standing) -> str:
    return (
        f"user {user} has downloaded {standing.used_bytes} bytes in {standing.period} (UTC),"
        f" and the quota is {standing.quota_bytes} bytes; node lists are refused until"
        " the next month or until an admin raises the quota"
    )


class QuotaCache:
    """User name -> (L{Standing}, when it was read), each trusted for a few seconds."""

    def __init__(self, lifetime: float = QUOTA_CACHE_SECONDS, size: int = QUOTA_CACHE_SIZE) -> None:
        self.lifetime = lifetime
        self.size = size
        self._entries: dict[str, tuple[Standing, float]] = {}

    def get(self, user: str, period: str, now: float) -> Standing | None:
        entry = self._entries.get(user)
        if entry is None:
            return None
        standing, read_at = entry
        if standing.period != period or not 0 <= now - read_at < self.lifetime:
            del self._entries[user]
            return None
        return standing

    def put(self, user: str, standing: Standing, now: float) -> None:
        if len(self._entries) >= self.size and user not in self._entries:
            self._entries.clear()
        self._entries[user] = (standing, now)


# -- reservations --------------------------------------------------------------


@frozen
class ReservationRequest:
    """A validated C{POST /reservations} body: a content wanted from C{start} to C{end}."""

    content_id: str
    start: int
    end: int


@frozen
class Reservation:
    """A row of C{reservations}."""

    id: str
    user: str
    content_id: str
    start: int
    end: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "content_id": self.content_id,
            "start": self.start,
            "end": self.end,
            "created": self.created,
        }


def _unix_seconds(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TIME:
        raise ValueError(f"{name} must be whole unix seconds (an integer from 0 to {MAX_TIME - 1})")
    return value


def parse_reservation(obj: object, now: float) -> ReservationRequest:
    """Validate C{{"content_id", "start", "end"}}: C{start < end} and C{end} in the future."""
    if not isinstance(obj, dict):
        raise ValueError("the body must be a JSON object")
    for name in ("content_id", "start", "end"):
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
    cid = obj["content_id"]
    if not isinstance(cid, str) or not _CONTENT_ID_RE.match(cid):
        raise ValueError("content_id must be 64 lowercase hex characters")
    start = _unix_seconds(obj["start"], "start")
    end = _unix_seconds(obj["end"], "end")
    if end <= start:
        raise ValueError("end must be after start")
    if end <= now:
        raise ValueError("end is in the past")
    return ReservationRequest(cid, start, end)
