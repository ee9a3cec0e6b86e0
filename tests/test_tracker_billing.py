# -*- test-case-name: tests.test_tracker_billing -*-
"""
Tests for usage records, quotas and reservations: the pure part
(L{meshstream.tracker.billing}) and the endpoints over real HTTP on a real
SQLite file and (with C{MESHSTREAM_TEST_PG}) a real PostgreSQL database.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from meshstream.errors import QuotaExceeded, TrackerError, UnknownContent
from meshstream.tracker import auth, billing
from meshstream.tracker.api import USAGE_LIMIT
from meshstream.tracker.client import TrackerClient
from tests._accounts import make_user
from tests._pg import SKIP_PG, pg_schema_url
from tests.test_tracker_api import START, _TrackerHTTPMixin, temp_path

#: START (the tests' clock) is in January 1970.
JANUARY = "1970-01"
FEBRUARY_1 = calendar.timegm((1970, 2, 1, 0, 0, 0))


def report(node_id: str, seq: int, *entries: dict[str, Any]) -> bytes:
    return json.dumps({"node_id": node_id, "seq": seq, "contents": list(entries)}).encode()


def entry(cid: str, peers: int = 0, servers: int = 0, origin: int = 0, uploaded: int = 0) -> dict[str, Any]:
    return {
        "content_id": cid,
        "from_peers": peers,
        "from_servers": servers,
        "from_origin": origin,
        "uploaded": uploaded,
    }


def row(
    user: str, cid: str, peers: int = 0, servers: int = 0, origin: int = 0, uploaded: int = 0
) -> dict[str, Any]:
    return {"user": user, "period": JANUARY, **entry(cid, peers, servers, origin, uploaded)}


class _BillingHTTPMixin:
    """
    The billing and reservation endpoints over HTTP; mixed into one
    L{unittest.TestCase} per database.  The tracker and the helpers are
    those of L{_TrackerHTTPMixin} (borrowed, not inherited, so that its
    tests do not run twice).
    """

    setUp = _TrackerHTTPMixin.setUp
    request = _TrackerHTTPMixin.request
    assert_error = _TrackerHTTPMixin.assert_error
    register = _TrackerHTTPMixin.register

    # Set by setUp (see _TrackerHTTPMixin).
    service: Any
    client: TrackerClient
    clock: Any
    http: Any
    base: str
    token: str

    async def user(
        self, name: str, role: str = auth.USER, quota: int | None = None
    ) -> tuple[TrackerClient, str]:
        """A user, its client and a token for raw requests."""
        creds = await make_user(self.service.store, name, role, quota_bytes=quota)
        client = TrackerClient(self.http, self.base, reactor, credentials=creds)
        token = await client.login()
        return client, token

    async def export(self, query: str = "") -> list[dict[str, Any]]:
        status, doc, _ = await self.request("GET", "/api/v1/usage" + query)
        assert status == 200, doc
        rows: list[dict[str, Any]] = doc["usage"]
        return rows

    async def relogin(self) -> None:
        """A new admin token for raw requests (after the clock moved past its expiry)."""
        self.token = await self.client.login()

    # -- usage reports -------------------------------------------------------

    async def test_reports_add_up(self) -> None:
        """Reports add up per user, period and content; every node of a user counts."""
        a, b = await self.register(1), await self.register(2)
        unknown = "cd" * 32
        alice, alice_token = await self.user("alice")
        bob, _ = await self.user("bob")
        await alice.announce("alice-1", "10.0.0.1:7000", [a], {})
        answer = await alice.report_usage(
            "alice-1",
            1,
            {
                a: {"from_peers": 100, "from_origin": 10, "uploaded": 5},
                b: {"from_servers": 50},
                unknown: {"from_peers": 7},
            },
        )
        self.assertEqual(
            answer,
            {
                "period": JANUARY,
                "used_bytes": 160,
                "quota_bytes": None,
                "accepted": True,
                "unknown": [unknown],
            },
        )
        # Another of alice's boxes, never announced.
        status, doc, _ = await self.request(
            "POST", "/api/v1/usage", report("alice-2", 1, entry(a, peers=1, uploaded=2)), token=alice_token
        )
        self.assertEqual((status, doc["used_bytes"], doc["accepted"]), (200, 161, True))
        await bob.report_usage("bob-1", 7, {a: {"uploaded": 1000}})

        mine = await alice.usage()
        self.assertEqual(
            mine,
            {
                "user": "alice",
                "period": JANUARY,
                "used_bytes": 161,
                "quota_bytes": None,
                "uploaded_bytes": 7,
                "contents": sorted(
                    [entry(a, peers=101, origin=10, uploaded=7), entry(b, servers=50)],
                    key=lambda e: e["content_id"],
                ),
            },
        )
        self.assertEqual((await bob.usage())["used_bytes"], 0)
        self.assertEqual(
            await self.export(),
            sorted(
                [
                    row("alice", a, peers=101, origin=10, uploaded=7),
                    row("alice", b, servers=50),
                    row("bob", a, uploaded=1000),
                ],
                key=lambda r: (r["user"], r["content_id"]),
            ),
        )
        self.assertEqual(
            await self.client.usage_export(user="bob"),
            {"period": JANUARY, "usage": [row("bob", a, uploaded=1000)]},
        )

    async def test_duplicate_seq_ignored(self) -> None:
        """A report whose seq is not above the node's last counted one is acknowledged and not counted."""
        cid = await self.register(3)
        alice, _ = await self.user("alice")
        first = await alice.report_usage("box", 5, {cid: {"from_peers": 10}})
        self.assertEqual((first["accepted"], first["used_bytes"]), (True, 10))
        for seq in (5, 4, 0):
            again = await alice.report_usage("box", seq, {cid: {"from_peers": 10}})
            self.assertEqual((again["accepted"], again["used_bytes"]), (False, 10))
        later = await alice.report_usage("box", 6, {cid: {"from_peers": 1}})
        self.assertEqual((later["accepted"], later["used_bytes"]), (True, 11))
        # Seqs are per node (and user): another box starts anywhere.
        other = await alice.report_usage("box-2", 1, {cid: {"from_peers": 1}})
        self.assertEqual((other["accepted"], other["used_bytes"]), (True, 12))

    async def test_another_users_node_refused(self) -> None:
        cid = await self.register(4)
        alice, _ = await self.user("alice")
        bob, _ = await self.user("bob")
        await bob.announce("bob-box", "10.0.0.2:7000", [cid], {})
        with self.assertRaises(TrackerError) as e:
            await alice.report_usage("bob-box", 1, {cid: {"from_peers": 10**6}})
        self.assertEqual((e.exception.status, e.exception.code), (403, "node_owned"))
        self.assertEqual(await self.export(), [])
        # Nor was bob's seq taken: his own report with seq 1 counts.
        mine = await bob.report_usage("bob-box", 1, {cid: {"from_peers": 3}})
        self.assertEqual((mine["accepted"], mine["used_bytes"]), (True, 3))

    async def test_bad_bodies(self) -> None:
        """Bad reports are 400s and store nothing (nor use up their seq)."""
        cid = await self.register(5)
        good = entry(cid, peers=1)
        bad_bodies: list[tuple[bytes, str]] = [
            (b"{", "bad_json"),
            (b"[]", "bad_request"),
            (b'{"node_id": "n", "seq": 1}', "bad_request"),
            (b'{"node_id": "n", "contents": []}', "bad_request"),
            (report("bad id", 1, good), "bad_request"),
            (report("n", -1, good), "bad_request"),
            (report("n", 2**62, good), "bad_request"),
            (json.dumps({"node_id": "n", "seq": True, "contents": [good]}).encode(), "bad_request"),
            (json.dumps({"node_id": "n", "seq": 1.0, "contents": [good]}).encode(), "bad_request"),
            (json.dumps({"node_id": "n", "seq": "1", "contents": [good]}).encode(), "bad_request"),
            (json.dumps({"node_id": "n", "seq": 1, "contents": {cid: good}}).encode(), "bad_request"),
            (report("n", 1, good, "x"), "bad_request"),  # type: ignore[arg-type]
            (report("n", 1, good, entry("AB" * 32)), "bad_request"),
            (report("n", 1, good, {"from_peers": 1}), "bad_request"),
            (report("n", 1, good, entry(cid, peers=2)), "bad_request"),  # listed twice
            (report("n", 1, {**good, "from_peers": -1}), "bad_request"),
            (report("n", 1, {**good, "uploaded": 2**50}), "bad_request"),
            (report("n", 1, {**good, "from_origin": 1.5}), "bad_request"),
            (report("n", 1, {**good, "from_servers": True}), "bad_request"),
            (report("n", 1, {**good, "from_servers": None}), "bad_request"),
            (
                report("n", 1, *[entry(f"{i:064x}") for i in range(billing.MAX_USAGE_ENTRIES + 1)]),
                "bad_request",
            ),
        ]
        for body, code in bad_bodies:
            await self.assert_error("POST", "/api/v1/usage", body, 400, code)
        await self.assert_error("POST", "/api/v1/usage", b" " * (USAGE_LIMIT + 1), 413, "body_too_large")
        self.assertEqual(await self.export(), [])
        # The largest report allowed passes (the body limit leaves room for it).
        big = [entry(f"{i:064x}", uploaded=2**50 - 1) for i in range(billing.MAX_USAGE_ENTRIES - 1)]
        status, doc, _ = await self.request("POST", "/api/v1/usage", report("n", 1, good, *big))
        self.assertEqual((status, doc["accepted"], doc["used_bytes"]), (200, True, 1))
        self.assertEqual(len(doc["unknown"]), billing.MAX_USAGE_ENTRIES - 1)

    async def test_usage_needs_a_token(self) -> None:
        cid = await self.register(6)
        await self.assert_error(
            "POST", "/api/v1/usage", report("n", 1, entry(cid)), 401, "unauthenticated", token=None
        )
        await self.assert_error("GET", "/api/v1/me/usage", None, 401, "unauthenticated", token=None)
        await self.assert_error("GET", "/api/v1/usage", None, 401, "unauthenticated", token=None)

    # -- quotas ----------------------------------------------------------------

    async def test_quota(self) -> None:
        """Node lists are refused (402) once the downloaded bytes reach the quota; uploads do not count."""
        cid = await self.register(7)
        alice, alice_token = await self.user("alice", quota=1000)
        await alice.announce("alice-box", "10.0.0.1:7000", [cid], {})
        self.assertEqual([n.node_id for n in await alice.nodes(cid)], ["alice-box"])
        answer = await alice.report_usage("alice-box", 1, {cid: {"from_peers": 600, "uploaded": 10**9}})
        self.assertEqual((answer["used_bytes"], answer["quota_bytes"]), (600, 1000))
        self.assertEqual(len(await alice.nodes(cid)), 1)
        await alice.report_usage("alice-box", 2, {cid: {"from_servers": 300, "from_origin": 99}})
        self.assertEqual(len(await alice.nodes(cid)), 1)  # 999 < 1000
        await alice.report_usage("alice-box", 3, {cid: {"from_origin": 1}})
        with self.assertRaises(QuotaExceeded) as e:
            await alice.nodes(cid)
        self.assertEqual((e.exception.status, e.exception.code), (402, "quota_exceeded"))
        await self.assert_error(
            "GET", f"/api/v1/contents/{cid}/nodes", None, 402, "quota_exceeded", token=alice_token
        )
        _, doc, _ = await self.request("GET", f"/api/v1/contents/{cid}/nodes", token=alice_token)
        message = doc["error"]["message"]
        for part in ("alice", "1000", JANUARY):
            self.assertIn(part, message)
        # Nothing else changes for her, and other users are not limited.
        await alice.announce("alice-box", "10.0.0.1:7000", [cid], {})
        await alice.get_manifest(cid)
        self.assertEqual((await alice.usage())["used_bytes"], 1000)
        self.assertEqual(len(await self.client.nodes(cid)), 1)
        # A raised quota takes effect once this tracker's cached standing lapses.
        await self.service.store.update_user("alice", quota_bytes=2000)
        with self.assertRaises(QuotaExceeded):
            await alice.nodes(cid)
        self.clock.advance(billing.QUOTA_CACHE_SECONDS)
        self.assertEqual(len(await alice.nodes(cid)), 1)
        # Lowered below the usage (read from the database, not the cache), refused again.
        await self.service.store.update_user("alice", quota_bytes=0)
        self.clock.advance(billing.QUOTA_CACHE_SECONDS)
        with self.assertRaises(QuotaExceeded):
            await alice.nodes(cid)

    async def test_month_rollover(self) -> None:
        """Usage is kept per calendar month (UTC) by the tracker's clock; a new month starts from zero."""
        cid = await self.register(8)
        alice, _ = await self.user("alice", quota=100)
        await alice.report_usage("box", 1, {cid: {"from_peers": 150}})
        with self.assertRaises(QuotaExceeded):
            await alice.nodes(cid)
        self.clock.advance(FEBRUARY_1 - 1 - self.clock.seconds())  # the last second of January
        await alice.report_usage("box", 2, {cid: {"from_peers": 1}})
        self.assertEqual((await alice.usage())["used_bytes"], 151)
        self.clock.advance(1)
        with self.assertRaises(UnknownContent):  # past the quota check; the content is unknown
            await alice.nodes("ee" * 32)
        self.assertEqual(await alice.nodes(cid), [])
        answer = await alice.report_usage("box", 3, {cid: {"from_origin": 5}})
        self.assertEqual((answer["period"], answer["used_bytes"]), ("1970-02", 5))
        self.assertEqual((await alice.usage())["contents"], [entry(cid, origin=5)])
        self.assertEqual((await alice.usage("1970-01"))["contents"], [entry(cid, peers=151)])
        self.assertEqual((await alice.usage("1969-12"))["contents"], [])
        await self.relogin()
        self.assertEqual(await self.export("?period=1970-01"), [row("alice", cid, peers=151)])
        self.assertEqual(await self.export(), [{**row("alice", cid, origin=5), "period": "1970-02"}])

    # -- export ------------------------------------------------------------------

    async def test_export_csv_matches_json(self) -> None:
        a, b = await self.register(9), await self.register(10)
        for name, counts in (("carol", (1, 2, 3, 4)), ("alice", (10, 0, 0, 2**49)), ("bob", (0, 0, 7, 0))):
            client, _ = await self.user(name)
            await client.report_usage(f"{name}-box", 1, {a: dict(zip(billing.COUNTERS, counts, strict=True))})
            await client.report_usage(f"{name}-box", 2, {b: {"from_peers": 1}})
        rows = await self.export()
        self.assertEqual(
            [(r["user"], r["content_id"]) for r in rows],
            sorted((u, c) for u in ("alice", "bob", "carol") for c in (a, b)),
        )
        self.assertIn(row("alice", a, peers=10, uploaded=2**49), rows)

        response = await self.http.request(
            "GET", self.base + "/api/v1/usage?format=csv", headers={"Authorization": f"Bearer {self.token}"}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/csv; charset=utf-8"])
        text = (await response.content()).decode("utf-8")
        self.assertTrue(
            text.startswith("user,period,content_id,from_peers,from_servers,from_origin,uploaded\r\n")
        )
        parsed = list(csv.DictReader(io.StringIO(text)))
        self.assertEqual(
            [
                {k: (v if k in ("user", "period", "content_id") else int(v)) for k, v in r.items()}
                for r in parsed
            ],
            rows,
        )
        # One user; the filter and the format combine.
        self.assertEqual(await self.export("?user=bob&format=json"), [r for r in rows if r["user"] == "bob"])
        response = await self.http.request(
            "GET",
            self.base + "/api/v1/usage?user=bob&format=csv&period=1970-01",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        lines = (await response.content()).decode().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(await self.export("?user=nobody"), [])

    async def test_export_is_for_admins(self) -> None:
        _, user_token = await self.user("alice")
        _, server_token = await self.user("cdn", auth.SERVER)
        for token in (user_token, server_token):
            for query in ("", "?format=csv"):
                await self.assert_error("GET", "/api/v1/usage" + query, None, 403, "forbidden", token=token)

    async def test_bad_queries(self) -> None:
        for path in (
            "/api/v1/usage?period=1970-13",
            "/api/v1/usage?period=70-01",
            "/api/v1/usage?period=1970-01&period=1970-02",
            "/api/v1/usage?format=xml",
            "/api/v1/usage?user=a%20b",
            "/api/v1/me/usage?period=january",
        ):
            await self.assert_error("GET", path, None, 400, "bad_request")

    # -- reservations --------------------------------------------------------------

    async def test_reservations(self) -> None:
        """Create, list, see in the announce answer, cancel."""
        a, b = await self.register(11), await self.register(12)
        alice, alice_token = await self.user("alice")
        bob, _ = await self.user("bob")
        now = int(START)
        later = await alice.reserve(b, now + 3600, now + 7200)
        current = await alice.reserve(a, now - 60, now + 600)
        self.assertEqual(set(current), {"id", "content_id", "start", "end", "created"})
        self.assertEqual(
            (current["content_id"], current["start"], current["end"], current["created"]),
            (a, now - 60, now + 600, START),
        )
        await bob.reserve(a, now, now + 10)
        self.assertEqual(await alice.reservations(), [current, later])  # by start
        answer = await alice.announce("alice-box", "10.0.0.1:7000", [], {})
        self.assertEqual(answer["reservations"], [current, later])
        self.assertEqual(len((await bob.announce("bob-box", "10.0.0.2:7000", [], {}))["reservations"]), 1)
        # Raw shape of a creation.
        body = json.dumps({"content_id": a, "start": now + 10, "end": now + 20}).encode()
        status, doc, _ = await self.request("POST", "/api/v1/reservations", body, token=alice_token)
        self.assertEqual((status, doc["start"], doc["end"]), (201, now + 10, now + 20))
        status, listed, _ = await self.request("GET", "/api/v1/reservations", token=alice_token)
        self.assertEqual((status, listed), (200, {"reservations": [current, doc, later]}))
        # Cancel.
        status, gone, _ = await self.request("DELETE", f"/api/v1/reservations/{doc['id']}", token=alice_token)
        self.assertEqual((status, gone), (200, {}))
        await alice.cancel_reservation(later["id"])
        self.assertEqual(await alice.reservations(), [current])
        await self.assert_error(
            "DELETE",
            f"/api/v1/reservations/{later['id']}",
            None,
            404,
            "unknown_reservation",
            token=alice_token,
        )

    async def test_reservation_ownership(self) -> None:
        cid = await self.register(13)
        alice, _ = await self.user("alice")
        _, bob_token = await self.user("bob")
        mine = await alice.reserve(cid, START, START + 60)
        await self.assert_error(
            "DELETE", f"/api/v1/reservations/{mine['id']}", None, 404, "unknown_reservation", token=bob_token
        )
        self.assertEqual(await alice.reservations(), [mine])
        # An admin may cancel anyone's.
        await self.client.cancel_reservation(mine["id"])
        self.assertEqual(await alice.reservations(), [])
        await self.assert_error("DELETE", "/api/v1/reservations/not-an-id", None, 400, "bad_request")

    async def test_reservations_end(self) -> None:
        """A reservation is listed (and announced) until its end, then no more."""
        cid = await self.register(14)
        alice, _ = await self.user("alice")
        short = await alice.reserve(cid, START, START + 100)
        long = await alice.reserve(cid, START + 50, START + 1000)
        self.clock.advance(99)
        self.assertEqual(await alice.reservations(), [short, long])
        self.clock.advance(1)
        self.assertEqual(await alice.reservations(), [long])
        self.assertEqual((await alice.announce("box", "10.0.0.1:7000", [], {}))["reservations"], [long])
        self.clock.advance(900)
        self.assertEqual(await alice.reservations(), [])
        self.assertEqual((await alice.announce("box", "10.0.0.1:7000", [], {}))["reservations"], [])

    async def test_reservation_validation(self) -> None:
        cid = await self.register(15)
        now = int(START)

        def body(**fields: object) -> bytes:
            return json.dumps({"content_id": cid, "start": now, "end": now + 60, **fields}).encode()

        for bad in (
            b"{",
            b"[]",
            json.dumps({"content_id": cid, "start": now}).encode(),
            body(content_id="XY"),
            body(start=now + 60),  # end == start
            body(start=now + 61),
            body(start=now - 100, end=now),  # ended
            body(start=1.5),
            body(end=True),
            body(start=-1),
            body(end=billing.MAX_TIME),
            body(start="1"),
        ):
            await self.assert_error(
                "POST", "/api/v1/reservations", bad, 400, "bad_json" if bad == b"{" else "bad_request"
            )
        await self.assert_error(
            "POST", "/api/v1/reservations", body(content_id="ef" * 32), 404, "unknown_content"
        )
        self.assertEqual(await self.client.reservations(), [])

    async def test_reservation_limit(self) -> None:
        cid = await self.register(16)
        alice, _ = await self.user("alice")
        for i in range(billing.MAX_RESERVATIONS):
            await alice.reserve(cid, START, START + 10 + i)
        with self.assertRaises(TrackerError) as e:
            await alice.reserve(cid, START, START + 5000)
        self.assertEqual((e.exception.status, e.exception.code), (409, "too_many_reservations"))
        self.assertEqual(len(await alice.reservations()), billing.MAX_RESERVATIONS)
        # Ended ones do not count.
        self.clock.advance(10)
        await alice.reserve(cid, START, START + 5000)
        self.assertEqual(len(await alice.reservations()), billing.MAX_RESERVATIONS)


class BillingHTTPTests(_BillingHTTPMixin, unittest.TestCase):
    """On SQLite."""

    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class PostgresBillingHTTPTests(_BillingHTTPMixin, unittest.TestCase):
    """On PostgreSQL (C{MESHSTREAM_TEST_PG})."""

    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)


class PureTests(unittest.SynchronousTestCase):
    """The validators, periods, the CSV and the quota cache, without a tracker."""

    def test_period_of(self) -> None:
        self.assertEqual(billing.period_of(0), "1970-01")
        self.assertEqual(billing.period_of(FEBRUARY_1 - 0.001), "1970-01")
        self.assertEqual(billing.period_of(FEBRUARY_1), "1970-02")
        self.assertEqual(billing.period_of(calendar.timegm((2024, 12, 31, 23, 59, 59))), "2024-12")
        self.assertEqual(billing.period_of(calendar.timegm((2025, 1, 1, 0, 0, 0))), "2025-01")

    def test_parse_period(self) -> None:
        self.assertEqual(billing.parse_period("2026-09"), "2026-09")
        for bad in ("2026-9", "2026-00", "2026-13", "26-01", "2026-01-01", "２０２６-01", ""):
            with self.assertRaises(ValueError):
                billing.parse_period(bad)

    def test_parse_usage_report_defaults(self) -> None:
        cid = "ab" * 32
        parsed = billing.parse_usage_report(
            {"node_id": "n", "seq": 0, "contents": [{"content_id": cid, "uploaded": 3}]}
        )
        self.assertEqual(parsed, billing.UsageReport("n", 0, (billing.UsageEntry(cid, 0, 0, 0, 3),)))
        self.assertEqual(parsed.entries[0].downloaded, 0)

    def test_csv(self) -> None:
        rows = [billing.UsageRow("a@b", "2026-01", "ab" * 32, 1, 2, 3, 4)]
        self.assertEqual(
            billing.usage_csv(rows),
            b"user,period,content_id,from_peers,from_servers,from_origin,uploaded\r\n"
            + b"a@b,2026-01,"
            + b"ab" * 32
            + b",1,2,3,4\r\n",
        )
        self.assertEqual(billing.usage_csv([]).count(b"\r\n"), 1)

    def test_quota_cache(self) -> None:
        cache = billing.QuotaCache(lifetime=5, size=2)
        standing = billing.Standing("2026-01", 10, 5)
        self.assertTrue(standing.over_quota)
        self.assertFalse(billing.Standing("2026-01", 10, None).over_quota)
        cache.put("a", standing, 100)
        self.assertEqual(cache.get("a", "2026-01", 104.9), standing)
        self.assertIsNone(cache.get("a", "2026-02", 101))  # another period
        cache.put("a", standing, 100)
        self.assertIsNone(cache.get("a", "2026-01", 105))  # lapsed
        cache.put("a", standing, 100)
        cache.put("b", standing, 100)
        cache.put("c", standing, 100)  # full: starts over
        self.assertIsNone(cache.get("a", "2026-01", 100))
        self.assertEqual(cache.get("c", "2026-01", 100), standing)
