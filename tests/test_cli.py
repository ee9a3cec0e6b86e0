"""``meshstream publish``: with and without a tracker, and what it says of media files."""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from meshstream import cli
from meshstream.manifest import Manifest
from meshstream.tracker import auth
from meshstream.tracker.client import Credentials, TrackerClient
from meshstream.tracker.service import build_tracker_service, load_or_create_key
from tests._accounts import make_user
from tests._media import SKIP_MEDIA, make_clip

reactor = _reactor


class _Tracker(NamedTuple):
    url: str
    #: Gives C{pub}'s password to C{meshstream publish --user pub}.
    env: dict[str, str]
    key: Ed25519PrivateKey
    creds: Credentials


async def publishing_tracker(case: unittest.TestCase, directory: str) -> _Tracker:
    """
    Start a tracker on loopback (SQLite in C{directory}) with a content
    server account C{pub}.
    """
    key = load_or_create_key(os.path.join(directory, "t.key"))
    service = build_tracker_service(
        reactor, ["tcp:0:interface=127.0.0.1"], f"sqlite:{directory}/t.sqlite", key
    )
    service.startService()
    case.addCleanup(service.stopService)
    (port,) = await service.listening()
    await service.ready()
    creds = await make_user(service.store, "pub", auth.SERVER)
    url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    return _Tracker(url, {**os.environ, "MESHSTREAM_PASSWORD": creds.password}, key, creds)


class PublishTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "clip.mp4")
        with open(self.path, "wb") as f:
            f.write(os.urandom(300_000))

    def test_without_tracker_writes_unsigned_manifest(self) -> None:
        out = os.path.join(self.dir, "m.json")
        code = cli.main(["publish", self.path, "-o", out, "--block-size", "64K", "--sub-block-size", "16K"])
        self.assertEqual(code, 0)
        with open(out, "rb") as f:
            manifest = Manifest.from_json(f.read())
        self.assertIsNone(manifest.signature)
        self.assertEqual((manifest.size, manifest.block_size, manifest.num_blocks), (300_000, 65536, 5))
        # Random bytes: ffprobe (if any) reads nothing, so the name is all there is.
        self.assertEqual(manifest.meta, {"title": "clip", "mime_type": "video/mp4"})
        self.assertEqual(manifest.name, "clip.mp4")

    def test_title_option(self) -> None:
        out = os.path.join(self.dir, "m.json")
        self.assertEqual(cli.main(["publish", self.path, "-o", out, "--title", " My Film "]), 0)
        with open(out, "rb") as f:
            self.assertEqual(Manifest.from_json(f.read()).meta["title"], "My Film")
        for bad in ("", "x" * 257, "two\nlines"):
            with self.assertRaises(SystemExit) as e:
                cli.main(["publish", self.path, "--title", bad.replace("\\n", "\n")])
            self.assertEqual(e.exception.code, 2)

    def test_default_output_beside_file(self) -> None:
        self.assertEqual(cli.main(["publish", self.path, "--origin", "http://o/clip.mp4"]), 0)
        with open(self.path + ".manifest.json", "rb") as f:
            self.assertEqual(Manifest.from_json(f.read()).origins, ("http://o/clip.mp4",))

    def test_errors(self) -> None:
        self.assertEqual(cli.main(["publish", os.path.join(self.dir, "missing")]), 2)
        self.assertEqual(cli.main(["publish", self.path, "--block-size", "1000"]), 2)
        self.assertEqual(cli.main(["publish", self.path, "--origin", "ftp://x"]), 2)

    def test_with_tracker_signs(self) -> Deferred[None]:
        return ensureDeferred(self._with_tracker())

    async def _with_tracker(self) -> None:
        t = await publishing_tracker(self, self.dir)
        url, env = t.url, t.env
        args = ["-m", "meshstream.cli", "publish", self.path, "--tracker", url, "--user", "pub"]
        # A wrong password: a clear failure.
        _, err, code = await getProcessOutputAndValue(
            sys.executable, args, env={**env, "MESHSTREAM_PASSWORD": "wrong"}
        )
        self.assertEqual(code, 1)
        self.assertIn(b"wrong user name or password", err)
        out, err, code = await getProcessOutputAndValue(sys.executable, args, env=env)
        self.assertEqual(code, 0, err)
        with open(self.path + ".manifest.json", "rb") as f:
            manifest = Manifest.from_json(f.read())
        manifest.verify(t.key.public_key())
        self.assertIn(manifest.content_id.encode(), out)
        # An unreachable tracker: a clear failure, exit code 1.
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "meshstream.cli",
                "publish",
                self.path,
                "--tracker",
                "http://127.0.0.1:9",
                "--user",
                "pub",
            ],
            env=env,
        )
        self.assertEqual(code, 1)
        self.assertIn(b"registering with the tracker failed", err)


class MediaPublishTests(unittest.TestCase):
    """The real ffprobe describes a clip the real ffmpeg made; the tracker indexes it."""

    skip = SKIP_MEDIA
    timeout = 60

    async def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "holiday.mp4")
        await make_clip(self.path, 2.0, title="Our Holiday")
        self.out = os.path.join(self.dir, "m.json")

    def manifest(self) -> Manifest:
        with open(self.out, "rb") as f:
            return Manifest.from_json(f.read())

    def test_probed(self) -> None:
        self.assertEqual(cli.main(["publish", self.path, "-o", self.out]), 0)
        meta = self.manifest().meta
        self.assertEqual((meta["title"], meta["mime_type"]), ("Our Holiday", "video/mp4"))
        self.assertAlmostEqual(meta["duration"], 2.0, delta=0.1)
        self.assertGreater(meta["bitrate"], 0)
        self.assertEqual([s["type"] for s in meta["streams"]], ["video", "audio"])
        self.assertEqual(cli.main(["publish", self.path, "-o", self.out, "--title", "Mine"]), 0)
        self.assertEqual(self.manifest().meta["title"], "Mine")

    def test_no_probe(self) -> None:
        self.assertEqual(cli.main(["publish", self.path, "-o", self.out, "--no-probe"]), 0)
        self.assertEqual(self.manifest().meta, {"title": "holiday", "mime_type": "video/mp4"})

    def test_without_ffprobe_on_path(self) -> None:
        """No ffprobe installed: the publish still works, from the name."""
        empty = os.path.join(self.dir, "empty-bin")
        os.makedirs(empty)
        self.patch(os, "environ", {**os.environ, "PATH": empty})
        self.assertEqual(cli.main(["publish", self.path, "-o", self.out]), 0)
        self.assertEqual(self.manifest().meta, {"title": "holiday", "mime_type": "video/mp4"})

    async def test_published_and_found(self) -> None:
        """Publish through the command to a tracker; search finds it with its duration."""
        t = await publishing_tracker(self, self.dir)
        url, env = t.url, t.env
        args = ["-m", "meshstream.cli", "publish", self.path, "--tracker", url, "--user", "pub"]
        out, err, code = await getProcessOutputAndValue(sys.executable, args, env=env)
        self.assertEqual(code, 0, err)
        self.assertIn(b'"Our Holiday" video/mp4, 2.0 s', out)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        client = TrackerClient(HTTPClient(Agent(reactor, pool=pool)), url, reactor, credentials=t.creds)
        page = await client.search("holiday", mime="video/")
        self.assertEqual(page.total, 1)
        (info,) = page.contents
        self.assertEqual((info.title, info.name, info.mime_type), ("Our Holiday", "holiday.mp4", "video/mp4"))
        self.assertAlmostEqual(info.duration or 0, 2.0, delta=0.1)
        self.assertEqual(info.size, os.path.getsize(self.path))
