# -*- test-case-name: tests.test_tracker_catalog -*-
"""
The content catalogue's pure parts: what of a manifest is indexed, the search
folding and C{LIKE} escaping, the entry shape and the C{GET /contents} query
validator.  (The catalogue over HTTP, on both databases, is in
C{tests/test_tracker_contents.py}.)
"""

from __future__ import annotations

import re
import sqlite3

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from meshstream.tracker import catalog
from meshstream.tracker.api import ApiError, ContentsQuery, parse_contents_query
from meshstream.tracker.catalog import ContentInfo, entry_for, entry_from_document

CID = "ab" * 32


class CleanValuesTests(unittest.SynchronousTestCase):
    def test_title(self) -> None:
        self.assertEqual(catalog.clean_text("  Big Buck Bunny ", 256), "Big Buck Bunny")
        self.assertEqual(catalog.clean_text("é" * 256, 256), "é" * 256)
        for bad in ("", "   ", "x" * 257, "a\nb", "a\x00b", "\ud800", 7, None, ["t"]):
            self.assertIsNone(catalog.clean_text(bad, 256), repr(bad))

    def test_mime(self) -> None:
        self.assertEqual(catalog.clean_mime("video/mp4"), "video/mp4")
        self.assertEqual(catalog.clean_mime(' Video/MP4; codecs="avc1.42E01E"'), "video/mp4")
        self.assertEqual(catalog.clean_mime("application/vnd.apple.mpegurl"), "application/vnd.apple.mpegurl")
        for bad in ("video", "video/", "/mp4", "video/mp4/x", "vid eo/mp4", "vidéo/mp4", "", 3, None):
            self.assertIsNone(catalog.clean_mime(bad), repr(bad))

    def test_duration(self) -> None:
        self.assertEqual(catalog.clean_duration(3), 3.0)
        self.assertEqual(catalog.clean_duration(2.5), 2.5)
        self.assertEqual(catalog.clean_duration(0), 0.0)
        for bad in (-1, float("nan"), float("inf"), 1e10, True, "3.0", None):
            self.assertIsNone(catalog.clean_duration(bad), repr(bad))

    def test_bitrate(self) -> None:
        self.assertEqual(catalog.clean_bitrate(350021), 350021)
        self.assertEqual(catalog.clean_bitrate(128000.0), 128000)
        for bad in (0, -5, 1.5, 10**13, True, "128000", float("nan"), None):
            self.assertIsNone(catalog.clean_bitrate(bad), repr(bad))

    def test_safe_name(self) -> None:
        self.assertEqual(catalog.safe_name("a\x00b\ud800c.mp4"), "a\ufffdb\ufffdc.mp4")
        self.assertEqual(catalog.safe_name("plain.mp4"), "plain.mp4")


class EntryTests(unittest.SynchronousTestCase):
    def test_good_meta_indexed(self) -> None:
        meta = {"title": "Clip", "mime_type": "video/mp4", "duration": 3.0, "bitrate": 350021, "x": [1]}
        entry = entry_for(CID, "clip.mp4", 1000, meta)
        self.assertEqual(
            (entry.title, entry.name, entry.mime_type, entry.size, entry.duration, entry.bitrate),
            ("Clip", "clip.mp4", "video/mp4", 1000, 3.0, 350021),
        )
        self.assertEqual(entry.search_key, "clip\nclip.mp4")

    def test_bad_meta_not_indexed(self) -> None:
        meta = {"title": "x" * 300, "mime_type": "nonsense", "duration": "long", "bitrate": -1}
        entry = entry_for(CID, "n", 1, meta)
        self.assertEqual((entry.title, entry.mime_type, entry.duration, entry.bitrate), (None,) * 4)
        self.assertEqual(entry.search_key, "\nn")

    def test_from_document(self) -> None:
        doc = {"info": {"size": 10}, "name": "n", "meta": {"title": "T"}}
        entry = entry_from_document(CID, doc)
        assert entry is not None
        self.assertEqual((entry.size, entry.name, entry.title), (10, "n", "T"))
        for bad in (
            None,
            [],
            {"info": {}},
            {"info": {"size": True}},
            {**doc, "meta": []},
            {**doc, "name": 1},
        ):
            self.assertIsNone(entry_from_document(CID, bad), repr(bad))


class SearchPatternTests(unittest.SynchronousTestCase):
    def test_fold(self) -> None:
        self.assertEqual(catalog.fold("Straße ÉTÉ"), "strasse été")
        self.assertEqual(catalog.fold("ﬁlm"), "film")  # NFKC

    def test_fold_leaves_no_ascii_capitals(self) -> None:
        """
        SQLite's C{LIKE} ignores ASCII case and PostgreSQL's does not: no
        character may fold to an ASCII capital, or the two would differ
        (U+1D34, modifier letter capital H, would without the first NFKC).
        """
        capitals = re.compile("[A-Z]")
        for code in range(0x110000):
            if not 0xD800 <= code < 0xE000:
                self.assertIsNone(capitals.search(catalog.fold(chr(code))), hex(code))
        self.assertEqual(catalog.fold("\u1d34\u210c"), "hh")

    def test_wildcards_escaped(self) -> None:
        self.assertEqual(catalog.contains_pattern("50%_Off!"), "%50!%!_off!!%")
        self.assertEqual(catalog.prefix_pattern("Video/"), "video/%")

    @given(st.text(max_size=20), st.text(min_size=1, max_size=5))
    def test_like_matches_substring(self, haystack: str, needle: str) -> None:
        """The escaped pattern matches exactly when the folded needle is in the folded text (SQLite)."""
        haystack, needle = catalog.safe_name(haystack), catalog.safe_name(needle)
        key = catalog.search_key(None, haystack)
        conn = sqlite3.connect(":memory:")
        try:
            row = conn.execute(
                f"SELECT ? LIKE ? ESCAPE '{catalog.LIKE_ESCAPE}'", (key, catalog.contains_pattern(needle))
            ).fetchone()
        finally:
            conn.close()
        self.assertEqual(bool(row[0]), catalog.fold(needle) in key)

    def test_valid_query(self) -> None:
        self.assertTrue(catalog.valid_query("bunny"))
        for bad in ("", "a\nb", "x" * 257, "\ud800"):
            self.assertFalse(catalog.valid_query(bad), repr(bad))


class ContentInfoTests(unittest.SynchronousTestCase):
    def test_round_trip(self) -> None:
        info = ContentInfo(CID, "n", 5, "T", "video/mp4", 2.5, 1000, 12.0, 3)
        self.assertEqual(ContentInfo.from_dict(info.to_dict()), info)
        bare = ContentInfo(CID, "n", 5, None, None, None, None, 12.0, 0)
        self.assertEqual(ContentInfo.from_dict(bare.to_dict()), bare)

    def test_malformed(self) -> None:
        good = ContentInfo(CID, "n", 5, "T", "video/mp4", 2.5, 1000, 12.0, 3).to_dict()
        for key, value in (("size", "5"), ("nodes", None), ("title", 3), ("bitrate", 1.5), ("size", True)):
            with self.assertRaises(ValueError):
                ContentInfo.from_dict({**good, key: value})
        with self.assertRaises(ValueError):
            ContentInfo.from_dict([])


class ContentsQueryTests(unittest.SynchronousTestCase):
    def parse(self, **args: str | list[str]) -> ContentsQuery:
        raw = {
            k.encode(): [v.encode()] if isinstance(v, str) else [x.encode() for x in v]
            for k, v in args.items()
        }
        return parse_contents_query(raw)

    def test_defaults(self) -> None:
        q = self.parse()
        self.assertEqual((q.query, q.mime_prefix, q.limit, q.offset), (None, None, 50, 0))
        self.assertEqual(self.parse(q="", mime="").query, None)

    def test_values(self) -> None:
        q = self.parse(q="Bunny 50%", mime="Video/", limit="500", offset="20")
        self.assertEqual((q.query, q.mime_prefix, q.limit, q.offset), ("Bunny 50%", "video/", 200, 20))

    def test_bad(self) -> None:
        for args in (
            {"limit": "0"},
            {"limit": "-1"},
            {"limit": "ten"},
            {"limit": ["1", "2"]},
            {"offset": "-1"},
            {"offset": "1e3"},
            {"offset": "9" * 10},
            {"q": "x" * 257},
            {"q": "a\tb"},
            {"q": ["a", "b"]},
            {"mime": "video mp4"},
            {"mime": "vidéo"},
        ):
            with self.assertRaises(ApiError) as e:
                self.parse(**args)
            self.assertEqual((e.exception.status, e.exception.code), (400, "bad_request"), args)
        with self.assertRaises(ApiError):
            parse_contents_query({b"q": [b"\xff"]})
