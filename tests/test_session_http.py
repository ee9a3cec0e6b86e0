"""
A session fed by HTTP sources only: whole blocks count as arrived as soon
as their bytes are in (the source's next request goes out while the block is
checked), are checked against their root by the C{check_block} hook (or in
the offloaded default), and their buffers are given back once written or
rejected.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshstream.agent.session import DownloadSession
from meshstream.errors import CheckDeclined
from meshstream.fetch import OutputFile
from meshstream.manifest import build_manifest

SUB = 1024
BLOCK = 16 * SUB  # so the HTTP pipeline of 64 sub blocks holds 4 blocks
URL = "http://mirror.example/c.bin"


class WholeBlockTests(SynchronousTestCase):
    def setUp(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.data = os.urandom(8 * BLOCK)
        path = os.path.join(d, "c.bin")
        with open(path, "wb") as f:
            f.write(self.data)
        self.manifest, self.leaves = build_manifest(path, BLOCK, SUB)
        self.sink = OutputFile(os.path.join(d, "out.bin"), self.manifest)
        self.addCleanup(lambda: self.sink.abandon() if not self.finished else None)
        self.finished = False
        self.requests: list[tuple[int, int, Deferred[memoryview]]] = []
        self.checks: list[tuple[int, Any, bytes, Deferred[list[bytes] | None]]] = []
        self.recycled: list[Any] = []
        self.delivered: list[int] = []

    def session(self, hook: bool = True) -> DownloadSession:
        def fetch_range(url: str, first: int, last: int) -> Deferred[memoryview]:
            self.assertEqual(url, URL)
            d: Deferred[memoryview] = Deferred()
            self.requests.append((first, last, d))
            return d

        def check_block(block: int, data: Any, root: bytes) -> Deferred[list[bytes] | None]:
            d: Deferred[list[bytes] | None] = Deferred()
            self.checks.append((block, data, root, d))
            return d

        session = DownloadSession(
            self.sink,
            Clock(),
            lambda: succeed([]),
            lambda node, listener: Deferred(),
            fetch_range=fetch_range,
            window=16,
            http_sources=[URL],
            on_block=self.delivered.append,
            recycle=self.recycled.append,
            check_block=check_block if hook else None,
        )
        session.start()
        return session

    def answer(self, i: int, data: bytes | None = None) -> memoryview:
        first, last, d = self.requests[i]
        body = memoryview(bytearray(self.data[first : last + 1] if data is None else data))
        d.callback(body)
        return body

    def test_next_request_before_the_check(self) -> None:
        session = self.session()
        self.assertEqual(
            [(a, b) for a, b, _ in self.requests], [(b * BLOCK, b * BLOCK + BLOCK - 1) for b in range(4)]
        )
        body = self.answer(0)
        # Block 0 is being checked, and the source already has its next request.
        [(block, data, root, check)] = self.checks
        self.assertEqual((block, root), (0, self.manifest.block_roots[0]))
        self.assertIs(data, body)
        self.assertEqual(len(self.requests), 5)
        self.assertEqual(self.requests[4][:2], (4 * BLOCK, 5 * BLOCK - 1))
        self.assertEqual(self.delivered, [])
        self.assertEqual(self.recycled, [])
        # Checked (and, as the hook promises, written): delivered, buffer back.
        check.callback(self.leaves[0])
        self.assertEqual(self.delivered, [0])
        self.assertEqual(self.recycled, [body])
        self.assertEqual(session.bytes_by_source, {URL: BLOCK})

    def test_block_not_matching_its_root(self) -> None:
        session = self.session()
        body = self.answer(0, os.urandom(BLOCK))
        self.checks[0][3].callback(None)
        self.assertEqual(self.recycled, [body])
        self.assertEqual(session.rejected_bytes, BLOCK)
        self.assertEqual(session.scheduler.sources[URL].strikes, 1)
        self.assertEqual(self.delivered, [])
        # To be asked again (once the source's pipeline has room).
        queue = session.scheduler.sources[URL].queue
        self.assertEqual([sid for sid in queue if sid[0] == 0], [(0, s) for s in range(16)])

    def test_declined_check_done_by_the_default(self) -> None:
        """A hook that gives up (its helper died) leaves the block to the offloaded default."""
        session = self.session()
        body = self.answer(0)
        self.checks[0][3].errback(CheckDeclined("gone"))
        self.assertEqual(self.delivered, [0])
        self.assertEqual(self.recycled, [body])
        self.assertEqual(session.bytes_by_source, {URL: BLOCK})
        self.assertEqual(os.pread(self.sink.fileno(), BLOCK, 0), self.data[:BLOCK])

    def test_default_check_in_the_offload(self) -> None:
        """Without the hook (or when it declines), the block is checked and stored by the offloaded default."""
        session = self.session(hook=False)
        for i in range(4):
            self.answer(i)
        self.assertEqual(self.delivered, [0, 1, 2, 3])
        self.assertEqual(len(self.recycled), 4)
        while len(self.delivered) < 8:
            self.answer(len(self.delivered))
        self.assertTrue(session.scheduler.finished)
        self.sink.finish()
        self.finished = True
        with open(self.sink.path, "rb") as f:
            self.assertEqual(f.read(), self.data)
