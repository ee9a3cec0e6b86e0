# -*- test-case-name: tests.test_tracker_contents -*-
"""
The content catalogue over real HTTP on loopback (C{GET /api/v1/contents},
C{GET /api/v1/contents/<id>}), against a real SQLite file and a real
PostgreSQL database (C{MESHSTREAM_TEST_PG}): what registration indexes, the
search (same rows on both databases), paging, the live holders count, the
errors, and the indexing of manifests stored before the catalogue existed.
"""

from __future__ import annotations

import sqlite3
from typing import Any
from urllib.parse import urlencode

from attrs import evolve
from twisted.internet import reactor
from twisted.trial import unittest

from meshstream.errors import TrackerError, UnknownContent
from meshstream.manifest import Manifest
from meshstream.tracker.catalog import ContentInfo
from meshstream.tracker.client import ContentPage
from meshstream.tracker.store import _SQL, POSTGRESQL, SCHEMA_VERSION, SQLITE, open_store, parse_db_url
from tests._pg import SKIP_PG, pg_schema_url
from tests.test_tracker_api import (
    EXPIRE_AFTER,
    INTERVAL,
    START,
    _TrackerHTTPMixin,
    make_manifest,
    temp_path,
)

CLIP_META = {
    "title": "Big Buck Bunny",
    "mime_type": "video/mp4",
    "duration": 596.5,
    "bitrate": 2_500_000,
    "streams": [{"type": "video", "codec": "h264", "width": 1280, "height": 720}],
}


def with_meta(seed: int, name: str = "", **meta: Any) -> Manifest:
    return evolve(make_manifest(seed, name), meta=meta)


def execute(url: str, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    """Run C{_SQL}-style statements on the database C{url} names, in one transaction (blocking)."""
    parsed = parse_db_url(url)
    conn: Any
    if parsed.scheme == "sqlite":
        conn, dialect = sqlite3.connect(parsed.path), SQLITE
    else:
        import psycopg

        conn, dialect = psycopg.connect(parsed.path), POSTGRESQL
    try:
        cursor = conn.cursor()
        for statement, params in statements:
            cursor.execute(dialect.sql(statement), params)
        conn.commit()
    finally:
        conn.close()


def schema_2(url: str, manifests: list[tuple[str, str, float]]) -> None:
    """Make the database a schema-2 tracker left: its tables, and these manifest rows."""
    statements: list[tuple[str, tuple[object, ...]]] = [(_SQL.create_schema_version, ())]
    for version in (1, 2):
        statements += [(s, ()) for s in _SQL.migrations[version]]
        statements.append((_SQL.set_schema_version, (version,)))
    statements += [(_SQL.insert_manifest, row) for row in manifests]
    execute(url, statements)


class _ContentsMixin:
    """The catalogue, over HTTP, on the store C{db_url()} names."""

    # The tracker, its clients and helpers, without _TrackerHTTPMixin's tests.
    setUp = _TrackerHTTPMixin.setUp
    request = _TrackerHTTPMixin.request
    assert_error = _TrackerHTTPMixin.assert_error
    user_client = _TrackerHTTPMixin.user_client

    async def publish(self, manifest: Manifest, advance: float = 1.0) -> str:
        """Register C{manifest}, then let C{advance} seconds pass (newest first needs distinct times)."""
        signed = await self.client.register_manifest(manifest)
        self.clock.advance(advance)
        return signed.content_id

    async def titles(self, **params: str) -> list[str | None]:
        page = await self.search(**params)
        return [c["title"] for c in page["contents"]]

    async def search(self, **params: str) -> Any:
        status, doc, _ = await self.request("GET", "/api/v1/contents?" + urlencode(params))
        self.assertEqual(status, 200, doc)
        self.assertEqual(set(doc), {"contents", "total"})
        return doc

    # -- tests ---------------------------------------------------------------

    async def test_registration_indexes_meta(self) -> None:
        created = self.clock.seconds()
        cid = await self.publish(with_meta(1, "bbb.mp4", **CLIP_META))
        expected = {
            "content_id": cid,
            "title": "Big Buck Bunny",
            "name": "bbb.mp4",
            "mime_type": "video/mp4",
            "size": 3 * 1024 - 100,
            "duration": 596.5,
            "bitrate": 2_500_000,
            "created": created,
            "nodes": 0,
        }
        status, doc, _ = await self.request("GET", f"/api/v1/contents/{cid}")
        self.assertEqual((status, doc), (200, expected))
        self.assertEqual(await self.search(), {"contents": [expected], "total": 1})
        # The client.
        info = await self.client.content(cid)
        self.assertEqual(info, ContentInfo.from_dict(expected))
        self.assertEqual(await self.client.search("bunny"), ContentPage([info], 1))
        # The manifest keeps its whole meta (streams included).
        manifest = await self.client.get_manifest(cid)
        self.assertEqual(manifest.meta, CLIP_META)

    async def test_bad_meta_not_indexed_manifest_accepted(self) -> None:
        meta = {"title": "x" * 257, "mime_type": "nonsense", "duration": "long", "bitrate": -1}
        cid = await self.publish(with_meta(2, "odd\x00name\ud800.bin", **meta))
        info = await self.client.content(cid)
        self.assertEqual(
            (info.title, info.mime_type, info.duration, info.bitrate, info.name),
            (None, None, None, None, "odd\ufffdname\ufffd.bin"),
        )
        self.assertEqual((await self.client.get_manifest(cid)).meta, meta)
        # Found by its name.
        self.assertEqual([c.content_id for c in (await self.client.search("ODD")).contents], [cid])
        # Values of the wrong type, title with a control character.
        bad = {"title": "a\nb", "mime_type": ["video/mp4"], "duration": True, "bitrate": 1.5}
        info = await self.client.content(await self.publish(with_meta(3, **bad)))
        self.assertEqual((info.title, info.mime_type, info.duration, info.bitrate), (None,) * 4)

    async def test_first_registration_wins(self) -> None:
        cid = await self.publish(with_meta(4, title="First"))
        again = await self.publish(with_meta(4, title="Second"))
        self.assertEqual(again, cid)
        self.assertEqual(await self.titles(), ["First"])

    async def test_search_substring_caseless(self) -> None:
        titles = ["Big Buck Bunny", "Sintel", "Tears of Steel", "ÉTÉ À PARIS", "Straße", "ℌ𝔢𝔩𝔩𝔬 World"]
        for seed, title in enumerate(titles):
            await self.publish(with_meta(10 + seed, f"file-{seed}.mp4", title=title))
        await self.publish(make_manifest(20, "bunny-extras.zip"))  # no title: found by name
        self.assertEqual(await self.titles(q="BUNNY"), [None, "Big Buck Bunny"])
        self.assertEqual(await self.titles(q="s of st"), ["Tears of Steel"])
        self.assertEqual(await self.titles(q="été à"), ["ÉTÉ À PARIS"])
        self.assertEqual(await self.titles(q="STRASSE"), ["Straße"])
        self.assertEqual(await self.titles(q="file-1"), ["Sintel"])
        self.assertEqual(await self.titles(q="HELLO w"), ["ℌ𝔢𝔩𝔩𝔬 World"])
        self.assertEqual(await self.titles(q="nothing like it"), [])
        # No match across the title and the name.
        self.assertEqual(await self.titles(q="bunnyfile"), [])
        # A viewer may search too.
        viewer = await self.user_client("viewer")
        page = await viewer.search("te")
        self.assertEqual(sorted(c.title or "" for c in page.contents), ["Sintel", "Tears of Steel"])

    async def test_wildcards_taken_literally(self) -> None:
        for seed, title in enumerate(["100% Pure", "100 Pure", "snake_case", "snakeXcase", "Wow!", "a\\b"]):
            await self.publish(with_meta(30 + seed, title=title))
        self.assertEqual(await self.titles(q="%"), ["100% Pure"])
        self.assertEqual(await self.titles(q="0% p"), ["100% Pure"])
        self.assertEqual(await self.titles(q="_"), ["snake_case"])
        self.assertEqual(await self.titles(q="e_c"), ["snake_case"])
        self.assertEqual(await self.titles(q="!"), ["Wow!"])
        self.assertEqual(await self.titles(q="\\"), ["a\\b"])
        self.assertEqual((await self.search(q="%%"))["total"], 0)

    async def test_mime_filter(self) -> None:
        for seed, mime in enumerate(
            ["video/mp4", "video/webm", "audio/mpeg", "Video/MP4; codecs=avc1", None]
        ):
            meta = {"title": f"t{seed}"} if mime is None else {"title": f"t{seed}", "mime_type": mime}
            await self.publish(with_meta(40 + seed, **meta))
        self.assertEqual(await self.titles(mime="video/"), ["t3", "t1", "t0"])
        self.assertEqual(await self.titles(mime="VIDEO/MP4"), ["t3", "t0"])
        self.assertEqual(await self.titles(mime="audio"), ["t2"])
        self.assertEqual(await self.titles(mime="video/", q="T1"), ["t1"])
        self.assertEqual(await self.titles(mime="text/"), [])
        page = await self.client.search(mime="audio/")
        self.assertEqual([(c.title, c.mime_type) for c in page.contents], [("t2", "audio/mpeg")])

    async def test_paging_newest_first(self) -> None:
        cids = [await self.publish(with_meta(50 + i, title=f"p{i}")) for i in range(5)]
        # Two at the same instant: the larger content id comes first.
        same = [await self.publish(with_meta(60 + i, title=f"s{i}"), advance=0) for i in range(2)]
        top = sorted(same, reverse=True)
        page = await self.search(limit="3")
        self.assertEqual([c["content_id"] for c in page["contents"]], [*top, cids[4]])
        self.assertEqual(page["total"], 7)
        page = await self.search(limit="3", offset="3")
        self.assertEqual([c["content_id"] for c in page["contents"]], cids[3:0:-1])
        page = await self.search(limit="3", offset="6")
        self.assertEqual([c["content_id"] for c in page["contents"]], [cids[0]])
        self.assertEqual(await self.search(offset="100"), {"contents": [], "total": 7})
        self.assertEqual((await self.search(q="p", limit="2"))["total"], 5)
        # Over 200 is treated as 200.
        self.assertEqual(len((await self.search(limit="100000"))["contents"]), 7)
        client_page = await self.client.search(limit=2, offset=1)
        self.assertEqual([c.content_id for c in client_page.contents], [top[1], cids[4]])

    async def test_live_holders_counted(self) -> None:
        a = await self.publish(with_meta(70, title="held"))
        b = await self.publish(with_meta(71, title="alone"))
        await self.client.announce("old", "10.0.0.1:1", [a], {})
        self.clock.advance(INTERVAL * EXPIRE_AFTER)  # "old" is at the limit: still live
        await self.client.announce("n1", "10.0.0.2:1", [a, b], {})
        await self.client.announce("n2", "10.0.0.3:1", [a], {})
        page = await self.search()
        self.assertEqual([(c["title"], c["nodes"]) for c in page["contents"]], [("alone", 1), ("held", 3)])
        self.clock.advance(1)  # "old" expires (listing filters by last_seen at once)
        self.assertEqual((await self.client.content(a)).nodes, 2)
        self.assertEqual((await self.client.content(b)).nodes, 1)

    async def test_auth_required(self) -> None:
        cid = await self.publish(with_meta(80, title="t"))
        for path in ("/api/v1/contents", f"/api/v1/contents/{cid}", "/api/v1/contents?q=t"):
            status, doc, headers = await self.request("GET", path, token=None)
            self.assertEqual((status, doc["error"]["code"]), (401, "unauthenticated"))
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="meshstream"'])
            await self.assert_error("GET", path, None, 401, "bad_token", token="forged")

    async def test_bad_requests(self) -> None:
        cid = await self.publish(with_meta(90, title="t"))
        missing = "cd" * 32
        cases: list[tuple[str, str, int, str]] = [
            ("GET", "/api/v1/contents?limit=0", 400, "bad_request"),
            ("GET", "/api/v1/contents?limit=-3", 400, "bad_request"),
            ("GET", "/api/v1/contents?limit=x", 400, "bad_request"),
            ("GET", "/api/v1/contents?limit=1&limit=2", 400, "bad_request"),
            ("GET", "/api/v1/contents?offset=-1", 400, "bad_request"),
            ("GET", "/api/v1/contents?offset=1.5", 400, "bad_request"),
            ("GET", "/api/v1/contents?q=" + "x" * 257, 400, "bad_request"),
            ("GET", "/api/v1/contents?q=a%0Ab", 400, "bad_request"),
            ("GET", "/api/v1/contents?q=%FF", 400, "bad_request"),
            ("GET", "/api/v1/contents?mime=video%20mp4", 400, "bad_request"),
            ("GET", "/api/v1/contents/xyz", 400, "bad_content_id"),
            ("GET", f"/api/v1/contents/{cid.upper()}", 400, "bad_content_id"),
            ("GET", f"/api/v1/contents/{missing}", 404, "unknown_content"),
            ("POST", "/api/v1/contents", 405, "method_not_allowed"),
            ("DELETE", f"/api/v1/contents/{cid}", 405, "method_not_allowed"),
            ("GET", f"/api/v1/contents/{cid}/nope", 404, "not_found"),
        ]
        for method, path, status, code in cases:
            await self.assert_error(method, path, b"{}" if method == "POST" else None, status, code)
        with self.assertRaises(UnknownContent):
            await self.client.content(missing)
        with self.assertRaises(TrackerError) as e:
            await self.client.search(limit=0)
        self.assertEqual((e.exception.status, e.exception.code), (400, "bad_request"))
        # The node list under the same prefix still answers.
        await self.client.announce("n", "10.0.0.1:1", [cid], {})
        self.assertEqual([n.node_id for n in await self.client.nodes(cid)], ["n"])

    async def test_manifests_stored_before_the_catalogue_are_indexed(self) -> None:
        """
        Manifests written by a schema-2 tracker (no catalogue) are indexed when
        a current one starts on the database; unreadable ones are reported.
        """
        url = self.db_url()  # a fresh database
        manifest = with_meta(100, "old.mp4", title="Old Clip", mime_type="video/mp4", duration=12.5)
        bare = make_manifest(101, "bare.bin")
        broken = "ef" * 32
        schema_2(
            url,
            [
                (manifest.content_id, manifest.to_json().decode("ascii"), START - 20),
                (bare.content_id, bare.to_json().decode("ascii"), START - 10),
                (broken, "{not json", START - 5),
            ],
        )

        new = open_store(url, reactor)
        self.addCleanup(new.close)
        self.assertEqual(await new.start(), SCHEMA_VERSION)
        self.assertEqual((new.indexed_at_start, new.unindexable), (2, [broken]))
        page, total = await new.search_contents(0.0)
        self.assertEqual(total, 2)
        self.assertEqual(
            [(c.content_id, c.title, c.name, c.mime_type, c.duration, c.created) for c in page],
            [
                (bare.content_id, None, "bare.bin", None, None, START - 10),
                (manifest.content_id, "Old Clip", "old.mp4", "video/mp4", 12.5, START - 20),
            ],
        )
        found, _ = await new.search_contents(0.0, query="old clip")
        self.assertEqual([c.content_id for c in found], [manifest.content_id])
        new.close()
        # A second start has nothing left to index (the broken one is reported again).
        again = open_store(url, reactor)
        self.addCleanup(again.close)
        await again.start()
        self.assertEqual((again.indexed_at_start, again.unindexable), (0, [broken]))


class ContentsSQLiteTests(_ContentsMixin, unittest.TestCase):
    """The catalogue on SQLite."""

    def db_url(self) -> str:
        return f"sqlite:{temp_path(self)}"


class ContentsPostgresTests(_ContentsMixin, unittest.TestCase):
    """The catalogue on PostgreSQL, each test in a schema of its own."""

    skip = SKIP_PG

    def db_url(self) -> str:
        return pg_schema_url(self)
