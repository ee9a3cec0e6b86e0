# -*- test-case-name: tests.test_probe -*-
"""
L{meshstream.probe}: ffprobe's JSON to manifest metadata.

The pure part (L{media_meta}) is tested on ffprobe's answers recorded in
C{tests/data/ffprobe/} (ffprobe 5.1, Debian 12, on files ffmpeg made: the
name of each is the file probed), and the whole on the real ffprobe reading a
clip the real ffmpeg makes at test time.  Misbehaving ffprobes are real
processes too: small shell scripts standing in for it.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from meshstream import probe
from meshstream.probe import describe, file_title, media_meta, run_ffprobe
from meshstream.tracker import catalog
from tests._media import FFPROBE, SKIP_MEDIA, make_clip

DATA = os.path.join(os.path.dirname(__file__), "data", "ffprobe")


def recorded(name: str) -> dict[str, Any]:
    with open(os.path.join(DATA, name + ".json"), encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def video(codec: str, width: int, height: int) -> dict[str, Any]:
    return {"type": "video", "codec": codec, "width": width, "height": height}


def audio(codec: str, rate: int = 44100, channels: int = 1) -> dict[str, Any]:
    return {"type": "audio", "codec": codec, "sample_rate": rate, "channels": channels}


class RecordedSampleTests(unittest.SynchronousTestCase):
    """L{media_meta} on real ffprobe answers."""

    def meta(self, name: str, size: int = 1000, title: str | None = None) -> dict[str, Any]:
        return media_meta(recorded(name), "/media/" + name, size, title)

    def test_mp4_with_title_tag(self) -> None:
        self.assertEqual(
            self.meta("clip.mp4"),
            {
                "title": "Test Clip",
                "mime_type": "video/mp4",
                "duration": 3.0,
                "bitrate": 350021,
                "streams": [video("mpeg4", 320, 240), audio("aac")],
            },
        )

    def test_given_title_wins(self) -> None:
        self.assertEqual(self.meta("clip.mp4", title="Mine")["title"], "Mine")

    def test_containers(self) -> None:
        """The MIME type comes from the container (and brand, codecs), not the extension."""
        expected = {
            "audio.m4a": ("audio", "audio/mp4", 2.0, 75116, [audio("aac")]),
            "clip.mov": ("clip", "video/quicktime", 2.0, 219260, [video("mpeg4", 160, 120)]),
            "clip.3gp": ("Test Clip", "video/3gpp", 3.0, 350021, [video("mpeg4", 320, 240), audio("aac")]),
            "clip.mkv": ("MKVTitle", "video/x-matroska", 2.0, 219456, [video("mpeg4", 160, 120)]),
            "clip.webm": ("clip", "video/webm", 2.0, 58116, [video("vp8", 160, 120)]),
            "audio.mp3": ("audio", "audio/mpeg", 2.037551, 64889, [audio("mp3")]),
            "audio.ogg": ("audio", "audio/ogg", 2.0065, 71950, [audio("opus", 48000)]),
        }
        for name, (title, mime, duration, bitrate, streams) in expected.items():
            self.assertEqual(
                self.meta(name),
                {
                    "title": title,
                    "mime_type": mime,
                    "duration": duration,
                    "bitrate": bitrate,
                    "streams": streams,
                },
                name,
            )
        # Same answer whatever the file is called.
        self.assertEqual(media_meta(recorded("clip.mp4"), "x.mp3", 1)["mime_type"], "video/mp4")

    def test_not_media(self) -> None:
        """Text art, still images and subtitles: name-only metadata, though ffprobe read them."""
        self.assertEqual(self.meta("code.ans"), {"title": "code", "mime_type": probe.guess_mime("code.ans")})
        self.assertEqual(self.meta("img.png"), {"title": "img", "mime_type": "image/png"})
        self.assertEqual(set(self.meta("subs.srt")), {"title", "mime_type"})

    def test_no_probe(self) -> None:
        self.assertEqual(
            media_meta(None, "/m/Holiday 2024.mp4", 10), {"title": "Holiday 2024", "mime_type": "video/mp4"}
        )
        self.assertEqual(
            media_meta(None, "/m/blob", 10, "Blob"),
            {"title": "Blob", "mime_type": "application/octet-stream"},
        )

    def test_missing_numbers_derived(self) -> None:
        """No container bitrate: size over duration; no container duration: the longest stream's."""
        doc = recorded("clip.mp4")
        del doc["format"]["bit_rate"]
        self.assertEqual(media_meta(doc, "c.mp4", 131258)["bitrate"], round(131258 * 8 / 3.0))
        del doc["format"]["duration"]
        doc["streams"][1]["duration"] = "3.5"
        meta = media_meta(doc, "c.mp4", 131258)
        self.assertEqual((meta["duration"], meta["bitrate"]), (3.5, round(131258 * 8 / 3.5)))
        for stream in doc["streams"]:
            del stream["duration"]
        meta = media_meta(doc, "c.mp4", 131258)
        self.assertNotIn("duration", meta)
        self.assertNotIn("bitrate", meta)
        self.assertEqual(meta["mime_type"], "video/mp4")

    def test_audio_only_and_cover_art(self) -> None:
        """A cover picture is not video: an MP4 of sound and a cover is audio/mp4."""
        doc = recorded("clip.mp4")
        doc["streams"][0]["disposition"]["attached_pic"] = 1
        doc["format"]["tags"]["major_brand"] = "isom"
        meta = media_meta(doc, "song.mp4", 1)
        self.assertEqual((meta["mime_type"], meta["streams"]), ("audio/mp4", [audio("aac")]))

    def test_titles_cleaned(self) -> None:
        doc = recorded("clip.mp4")
        doc["format"]["tags"]["title"] = "  Two\tlines\nhere  " + "x" * 300
        title = media_meta(doc, "c.mp4", 1)["title"]
        self.assertEqual(len(title), catalog.MAX_TITLE)
        self.assertTrue(title.startswith("Two lines here xx"))
        doc["format"]["tags"]["title"] = " \n "
        self.assertEqual(media_meta(doc, "c.mp4", 1)["title"], "c")
        self.assertEqual(file_title("/a/.hidden"), ".hidden")
        self.assertEqual(file_title("/a/b.tar.gz"), "b.tar")

    def test_malformed_answers(self) -> None:
        """Whatever ffprobe says, the answer is metadata, never an exception."""
        good = recorded("clip.mp4")
        weird: list[Any] = [None, [], "x", {}, {"format": 3}, {"format": {}, "streams": "no"}]
        for path, value in (
            (("format", "duration"), "NaN"),
            (("format", "duration"), "-5"),
            (("format", "bit_rate"), "fast"),
            (("format", "tags"), ["title"]),
            (("streams",), [1, {"codec_type": 2}, {"codec_type": "video", "width": "wide"}]),
        ):
            doc = copy.deepcopy(good)
            doc[path[0]] = value if len(path) == 1 else {**doc[path[0]], path[1]: value}
            weird.append(doc)
        for doc in weird:
            meta = media_meta(doc, "c.mp4", 1)
            self.assertIn("mime_type", meta)
            self.assertIn("title", meta)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
            ),
            max_leaves=30,
        )
    )
    def test_any_json_gives_indexable_meta(self, doc: object) -> None:
        meta = media_meta(
            {"format": {"format_name": "mp3"}, "streams": [{"codec_type": "audio"}], "x": doc}, "a", 1
        )
        self.assertEqual(meta["mime_type"], "audio/mpeg")
        for noise in (doc, {"format": doc, "streams": doc}, {"format": {"format_name": "mp3", "tags": doc}}):
            meta = media_meta(noise, "/x/a.mp4", 1)
            entry = catalog.entry_for("ab" * 32, "a.mp4", 1, meta)
            self.assertEqual(entry.title, meta["title"])
            self.assertEqual(entry.mime_type, meta["mime_type"])
            self.assertEqual(entry.duration, meta.get("duration"))
            self.assertEqual(entry.bitrate, meta.get("bitrate"))
            json.dumps(meta, allow_nan=False)


class FakeFFprobeTests(unittest.SynchronousTestCase):
    """ffprobes that fail, hang or babble only mean less metadata."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.media = os.path.join(self.dir, "film.mkv")
        with open(self.media, "wb") as f:
            f.write(b"\x1a\x45\xdf\xa3" + os.urandom(1000))

    def script(self, body: str) -> str:
        path = os.path.join(self.dir, f"ffprobe-{len(os.listdir(self.dir))}")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, stat.S_IRWXU)
        return path

    def test_fake_answer_used(self) -> None:
        """The stand-in's JSON is what is parsed, and the file is named with file: (so a name may hold colons)."""
        answer = json.dumps(recorded("clip.mkv"))
        log = os.path.join(self.dir, "argv")
        fake = self.script(f"echo \"$@\" > {log}\ncat <<'EOF'\n{answer}\nEOF")
        self.assertEqual(run_ffprobe(self.media, fake), recorded("clip.mkv"))
        with open(log) as f:
            self.assertTrue(f.read().strip().endswith("file:" + self.media))
        self.assertEqual(describe(self.media, ffprobe=fake)["duration"], 2.0)

    def test_failures(self) -> None:
        for body in ("exit 1", "echo 'not json'", "echo '{\"format\": '", "kill -9 $$"):
            fake = self.script(body)
            self.assertIsNone(run_ffprobe(self.media, fake), body)
            self.assertEqual(
                describe(self.media, ffprobe=fake), {"title": "film", "mime_type": probe.guess_mime("x.mkv")}
            )
        self.assertIsNone(run_ffprobe(self.media, os.path.join(self.dir, "missing")))
        not_executable = os.path.join(self.dir, "plain")
        open(not_executable, "w").close()
        self.assertIsNone(run_ffprobe(self.media, not_executable))

    def test_hang_is_killed(self) -> None:
        fake = self.script("exec sleep 60")
        started = time.monotonic()
        self.assertIsNone(run_ffprobe(self.media, fake, timeout=0.2))
        self.assertLess(time.monotonic() - started, 10)

    def test_babble_is_cut(self) -> None:
        self.patch(probe, "MAX_PROBE_OUTPUT", 10_000)
        fake = self.script("exec yes '{}'")
        started = time.monotonic()
        self.assertIsNone(run_ffprobe(self.media, fake, timeout=30))
        self.assertLess(time.monotonic() - started, 10)


class RealFFprobeTests(unittest.TestCase):
    """The real ffprobe on files the real ffmpeg made."""

    skip = SKIP_MEDIA
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def test_clip(self) -> None:
        path = os.path.join(self.dir, "clip: the movie.mp4")
        await make_clip(path, 2.0, title="Real Clip")
        meta = describe(path, ffprobe=FFPROBE)
        self.assertEqual((meta["title"], meta["mime_type"]), ("Real Clip", "video/mp4"))
        self.assertAlmostEqual(meta["duration"], 2.0, delta=0.1)
        # The container's bitrate is about the file's size over its duration.
        self.assertAlmostEqual(
            meta["bitrate"], os.path.getsize(path) * 8 / meta["duration"], delta=meta["bitrate"] * 0.1
        )
        self.assertEqual(meta["streams"], [video("mpeg4", 320, 240), audio("aac")])
        # Without a title tag, the file name; without ffprobe, no numbers.
        untitled = os.path.join(self.dir, "-untitled.mp4")
        await make_clip(untitled, 1.0)
        self.assertEqual(describe(untitled, ffprobe=FFPROBE)["title"], "-untitled")
        self.assertEqual(describe(path), {"title": "clip: the movie", "mime_type": "video/mp4"})

    def test_random_bytes_and_text(self) -> None:
        noise = os.path.join(self.dir, "noise.mp4")
        with open(noise, "wb") as f:
            f.write(os.urandom(100_000))
        self.assertEqual(describe(noise, ffprobe=FFPROBE), {"title": "noise", "mime_type": "video/mp4"})
        text = os.path.join(self.dir, "readme.txt")
        with open(text, "w") as f:
            f.write("plain words\n" * 100)
        self.assertEqual(describe(text, ffprobe=FFPROBE), {"title": "readme", "mime_type": "text/plain"})
