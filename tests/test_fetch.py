"""``meshstream fetch``: a pool of peers and HTTP sources, verified, into a file."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import File

from meshstream.agent.store import AgentStore, SeedFile
from meshstream.fetch import OutputFile, PeerAddress, parse_source
from meshstream.manifest import build_manifest
from meshstream.wire.protocol import PeerFactory, TokenBucket

reactor: Any = _reactor
BLOCK, SUB = 256 * 1024, 16 * 1024


class ParseSourceTests(unittest.SynchronousTestCase):
    def test_kinds(self) -> None:
        self.assertEqual(parse_source("meshstream://10.0.0.1:7071"), PeerAddress("10.0.0.1", 7071))
        self.assertEqual(PeerAddress("h", 1).node_id, "h:1")
        self.assertEqual(parse_source("http://m/x.bin"), "http://m/x.bin")
        for bad in ("meshstream://host", "ftp://x/y", "x.bin", "http:///nohost"):
            self.assertRaises(ValueError, parse_source, bad)


class OutputFileTests(unittest.SynchronousTestCase):
    def test_written_only_under_part_name_until_finished(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        src = os.path.join(d, "in.bin")
        data = os.urandom(3 * SUB + 5)
        with open(src, "wb") as f:
            f.write(data)
        manifest, leaves = build_manifest(src, 2 * SUB, SUB)
        out = OutputFile(os.path.join(d, "out.bin"), manifest)
        self.assertFalse(os.path.exists(out.path))
        g = manifest.geometry
        done = [
            out.write(b, s, data[g.sub_offset(b, s) : g.sub_offset(b, s) + g.sub_length(b, s)], leaves[b])
            for b in range(g.num_blocks)
            for s in range(g.subs_in_block(b))
        ]
        self.assertEqual(done, [False, True, False, True])
        self.assertTrue(out.has_sub(1, 1))
        self.assertEqual(out.read_range(SUB, 10), data[SUB : SUB + 10])
        out.finish()
        with open(out.path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertFalse(os.path.exists(out.part))


class FetchTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "good"))
        os.makedirs(os.path.join(self.dir, "bad"))
        self.data = os.urandom(4 * 1024 * 1024 + 999)
        self.path = os.path.join(self.dir, "good", "c.bin")
        with open(self.path, "wb") as f:
            f.write(self.data)
        with open(os.path.join(self.dir, "bad", "c.bin"), "wb") as f:
            f.write(os.urandom(len(self.data)))
        self.manifest, self.leaves = build_manifest(self.path, BLOCK, SUB)
        self.manifest_path = os.path.join(self.dir, "c.json")
        with open(self.manifest_path, "wb") as f:
            f.write(self.manifest.to_json())

    def http(self, folder: str) -> str:
        port = reactor.listenTCP(0, Site(File(os.path.join(self.dir, folder))), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/c.bin"

    def peer(self, rate: float | None = None) -> str:
        store = AgentStore(os.path.join(self.dir, f"peer-{rate}"), os.urandom(32))
        store.add_seed(SeedFile(self.path, self.manifest, self.leaves))
        limiter = TokenBucket(rate, reactor) if rate else None
        factory = PeerFactory("seed", reactor, store, limiter=limiter)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        def stop() -> Deferred[Any]:
            factory.close_all()
            store.close()
            return port.stopListening()  # type: ignore[return-value]

        self.addCleanup(stop)
        return f"meshstream://127.0.0.1:{port.getHost().port}"

    async def fetch(self, *args: str) -> tuple[int, list[dict[str, Any]], str, str]:
        out = os.path.join(self.dir, "out.bin")
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "meshstream.cli", "fetch", "--progress", "json", "-o", out, *args],
            env=os.environ,
        )
        lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
        return code, lines, out, stderr.decode()

    def test_peer_and_mirrors_with_a_liar(self) -> Deferred[None]:
        """One peer, one honest mirror and one mirror serving other bytes: the file comes out right."""
        return ensureDeferred(self._pool())

    async def _pool(self) -> None:
        code, lines, out, err = await self.fetch(
            "--manifest",
            self.manifest_path,
            "--source",
            self.peer(rate=2 * 2**20),
            "--source",
            self.http("good"),
            "--source",
            self.http("bad"),
        )
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.data)
        final = lines[-1]
        self.assertTrue(final["ok"])
        self.assertGreater(final["rejected_bytes"], 0)
        by_source = final["bytes_by_source"]
        self.assertEqual(sum(by_source.values()), len(self.data))
        self.assertFalse(any("bad" in k for k in by_source), by_source)
        progress = [line["bytes"] for line in lines[:-1]]
        self.assertEqual(progress, sorted(progress))
        self.assertEqual(progress[-1], len(self.data))
        self.assertEqual(len(progress), self.manifest.num_blocks)

    def test_mirrors_only_with_a_liar(self) -> Deferred[None]:
        """Only HTTP sources: whole blocks per mirror, checked against their roots; the liar is caught."""
        return ensureDeferred(self._mirrors())

    def test_mirrors_only_checked_in_threads(self) -> Deferred[None]:
        """The same without helper processes: whole blocks are checked in worker threads."""
        return ensureDeferred(self._mirrors("--verify-processes", "0"))

    async def _mirrors(self, *extra: str) -> None:
        good, bad = self.http("good"), self.http("bad")
        code, lines, out, err = await self.fetch(
            "--manifest", self.manifest_path, "--source", bad, "--source", good, *extra
        )
        self.assertEqual(code, 0, err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.data)
        final = lines[-1]
        self.assertEqual(final["bytes_by_source"], {good: len(self.data)})
        self.assertGreater(final["rejected_bytes"], 0)

    def test_origin_fallback_and_static_policy(self) -> Deferred[None]:
        return ensureDeferred(self._origin())

    async def _origin(self) -> None:
        origin = self.http("good")
        manifest = self.manifest.with_origins([origin])
        with open(self.manifest_path, "wb") as f:
            f.write(manifest.to_json())
        code, lines, out, err = await self.fetch(
            "--manifest", self.manifest_path, "--origin-grace", "0.2", "--policy", "static", "--window", "1"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(lines[-1]["bytes_by_source"], {"origin": len(self.data)})
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.data)

    def test_no_source_fails_cleanly(self) -> Deferred[None]:
        return ensureDeferred(self._nothing())

    async def _nothing(self) -> None:
        code, lines, out, err = await self.fetch(
            "--manifest", self.manifest_path, "--source", "meshstream://127.0.0.1:9", "--origin-grace", "0.2"
        )
        self.assertEqual(code, 1)
        self.assertIn("no source can serve", err)
        self.assertFalse(lines[-1]["ok"])
        self.assertFalse(os.path.exists(out))

    def test_usage_errors(self) -> Deferred[None]:
        return ensureDeferred(self._usage())

    async def _usage(self) -> None:
        code, _, _, err = await self.fetch("--source", "meshstream://127.0.0.1:9")
        self.assertEqual(code, 2)
        self.assertIn("CONTENT_ID or --manifest", err)
        code, _, _, err = await self.fetch("--manifest", self.manifest_path, "--source", "gopher://x")
        self.assertEqual(code, 2)
        self.assertIn("unknown source", err)
        code, _, _, err = await self.fetch("--manifest", self.manifest_path, "--verify-processes", "-1")
        self.assertEqual(code, 2)
        self.assertIn("--verify-processes is at least 0", err)
